import atexit
import os
import shutil
import sys
import tempfile

# Two host "devices" so that the multi-device learner can be checked on a CPU; set before JAX starts.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
# The scripts and benchmark/ (learner_setup, plot) are imported by the tests as top-level modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmark")]

# One persistent XLA compilation cache for the whole run of the suite, its xdist workers (started by this process, they
# inherit the variable) and the scripts the tests start: a script started again with the same shapes (a resume, an
# uninterrupted twin, a second seed) loads its executables instead of compiling them again. A fresh directory each time,
# removed at the end, so that no test ever sees an executable compiled by an older version of the code.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-compilation-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
