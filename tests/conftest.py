import os
import sys

# Two host "devices" so that the multi-device learner can be checked on a CPU; set before JAX starts.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
# The scripts and benchmark/ (learner_setup, plot) are imported by the tests as top-level modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmark")]
