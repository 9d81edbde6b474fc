"""The one command for a fresh GPU machine (issue 22): every figure the README needs from a GPU, in one call of about 8
minutes, nothing installed, every result under --out-dir.

    PYTHONUNBUFFERED=1 python benchmark/gpu_check.py --out-dir gpu_check          # on the GPU machine
    python benchmark/gpu_check.py --tiny --out-dir /tmp/gpu_check                 # the CPU rehearsal (the tests run it)

It measures, one part after the other:
    versions     Python, JAX, jaxlib, the CUDA plugin, envpool, flax, optax, the devices and the NVIDIA driver;
    training     qr_impala.py and drmg.py on --env-id with their defaults for --train-seconds each (drmg.py's run goes
                 on for --curve-seconds more and its return curve is drawn): steady-state SPS after compilation (between
                 the first and the last SPS log), the stats/ breakdown (mean over the logs) and the startup memory check;
    envpool      EnvPool's random-action rate with the same envs and actor threads, and training SPS over it;
    learner      each script's learner step at --chunk-envs 16 (the CPU choice) and at the whole batch (0: the choice on
                 a GPU that holds it): XLA's memory analysis, the device's peak memory after the step (memory_stats(),
                 where the device reports it) and the median update time of --update-repeats calls after compilation;
    minatar      drmg.py on Breakout-MinAtar with each torso (--network minatar, resnet) for --minatar-seconds each:
                 steady-state SPS and the return reached (0 skips this part);
and writes summary.md (a table to paste into the README), results.json, and drmg_returns.png. results.json is written
after every part, and a part that fails is recorded as such while the others go on.

A run works in {out_dir}/partial (its results.json after every part, the training logs, the training runs' working
directory) and moves its files into --out-dir only once every part is done (summary.md last), so that a stopped or
killed run never replaces an earlier complete result with a partial one; the next run starts partial/ afresh. The
training runs end with this process however it ends (benchmark/children.py: a signal or an exception stops them and
says which; kill -9 of this process makes the kernel kill them), and a signal or an exception removes the working
directory. Two checks cannot write to one --out-dir at once (a lock, released by the kernel if its holder dies).
"""

import glob
import importlib.metadata
import json
import os
import math
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# This process allocates only what its learner steps use, so that the training runs it starts can take their share.
USER_ENV = dict(os.environ)
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from children import CHILDREN, CellLock, owned_children, why  # noqa: E402
from learner_setup import ROOT, environment, learner, random_batch, script_args  # noqa: E402
from qr_impala_sps import Args as RandomArgs  # noqa: E402
from qr_impala_sps import random_action_sps  # noqa: E402

SCRIPTS = ("qr_impala", "drmg")
# The CPU rehearsal: a vector environment and a small batch, the same code paths.
COMPILE_LIMIT = 900.0  # seconds a training run may take to compile and start before it is stopped
MAX_SECONDS = 86_400.0  # the most seconds of a part (a day)
TINY_FLAGS = ["--local-num-envs", "4", "--num-actor-threads", "1", "--num-steps", "8"]


@dataclass
class Args:
    out_dir: str = "gpu_check"
    """where every result goes"""
    env_id: str = "Breakout-v5"
    """the environment of every part"""
    train_seconds: float = 75.0
    """seconds of each training run after its compilation"""
    curve_seconds: float = 90.0
    """seconds drmg.py trains on after its SPS window, for its return curve"""
    random_seconds: float = 15.0
    """seconds of EnvPool's random-action rate"""
    update_repeats: int = 5
    """timed learner updates per script and chunk setting"""
    minatar_seconds: float = 30.0
    """seconds of each drmg.py run on Breakout-MinAtar after its compilation, one per torso (0: skip the part)"""
    tiny: bool = False
    """the CPU rehearsal: CartPole-v1, 4 envs, one actor thread, 8 steps, a few seconds per part"""


def versions() -> dict:
    found = dict(python=platform.python_version())
    for package in ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "envpool", "flax", "optax", "numpy"]:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        found["nvidia-smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return found


def check_args(args: Args):
    """The check's own flags, before anything is written: one line naming the flag at fault."""
    if not args.out_dir.strip():
        raise SystemExit(f"--out-dir: give a directory (got {args.out_dir!r})")
    existing = os.path.abspath(args.out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
        raise SystemExit(f"--out-dir {args.out_dir}: {existing} is not a writable directory")
    if not args.env_id.strip():
        raise SystemExit("--env-id: give an environment id")
    for name, least in (("train_seconds", 0), ("curve_seconds", None), ("random_seconds", 0), ("minatar_seconds", None)):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value > least if least is not None else value >= 0) and value <= MAX_SECONDS):
            bound = "positive" if least is not None else ">= 0"
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {bound} and at most {MAX_SECONDS:,.0f} (a day)")
    if not 1 <= args.update_repeats <= 10_000:
        raise SystemExit(f"--update-repeats {args.update_repeats}: must lie in [1, 10000]")


def train_command(script: str, args: Args, env_id: str, extra, name: str) -> list:
    """The command of a training run: the script with its defaults for 10^10 steps (stopped after its seconds)."""
    flags = ["--env-id", env_id, "--total-timesteps", str(10**10), "--log-frequency", "5", "--save-every", "0"]
    flags += (TINY_FLAGS + ["--log-frequency", "2"] if args.tiny else []) + list(extra)
    flags += ["--exp-name", name]
    return [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags]


def train(script: str, args: Args, seconds: float, cwd: str, out: str, env_id: str = "", extra=(), name: str = "") -> dict:
    """Run the script with its defaults (and `extra` flags) for `seconds`, stop it with SIGTERM, and read its log (its
    output in out/{name}_stdout.log)."""
    env_id, name = env_id or args.env_id, name or script
    command = train_command(script, args, env_id, extra, name)
    print(" ".join(command), flush=True)
    path = os.path.join(out, f"{name}_stdout.log")
    with open(path, "w") as log:
        process = CHILDREN.start(
            command, f"the {name} training run", cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=USER_ENV
        )
    try:
        begin, started = time.time(), None  # the run has started once it prints "run ...", after its compilation
        while process.poll() is None:
            if started is None and any(line.startswith("run ") for line in open(path, errors="replace")):
                started = time.time()
            if time.time() - (started or begin) > (seconds if started else COMPILE_LIMIT):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=600)
            time.sleep(0.2)
    except BaseException as error:  # a signal, or a run that did not stop within 600 s: it ends here, and says why
        CHILDREN.stop(process, why(error))
        raise
    CHILDREN.ended(process)
    with open(path, errors="replace") as f:
        output = f.read()
    runs = glob.glob(os.path.join(cwd, "runs", f"*__{name}__*"))
    if not runs or process.returncode not in (0, 128 + signal.SIGTERM):
        return dict(error=f"exit {process.returncode}: " + output.strip().splitlines()[-1] if output.strip() else "no output")
    accumulator = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    sps = accumulator.Scalars("charts/SPS") if "charts/SPS" in tags else []
    result = dict(run_dir=runs[0], memory_check=next((l for l in output.splitlines() if l.startswith("learner step")), ""))
    if len(sps) >= 2:
        result["steady_sps"] = (sps[-1].step - sps[0].step) / (sps[-1].wall_time - sps[0].wall_time)
        result["steps"] = sps[-1].step
    result["stats"] = {t: float(np.mean([e.value for e in accumulator.Scalars(t)])) for t in tags if t.startswith("stats/")}
    returns = [e.value for e in accumulator.Scalars("charts/episodic_return")] if "charts/episodic_return" in tags else []
    if returns:
        result["episodes"], result["last_returns"] = len(returns), float(np.mean(returns[-max(1, len(returns) // 10) :]))
    return result


def learner_step(script: str, chunk_envs: int, args: Args, observation_space, num_actions) -> dict:
    overrides = dict(chunk_envs=chunk_envs)
    if args.tiny:
        overrides.update(local_num_envs=4, num_actor_threads=1, num_steps=8)
    config = script_args(script, args.env_id, **overrides)
    step, state, spec = learner(script, config, observation_space, num_actions)
    batch = random_batch(spec, num_actions)
    start = time.time()
    compiled = step.lower(state, batch).compile()
    result = dict(compile_seconds=time.time() - start, batch=f"{config.num_steps} x {spec.actions.shape[1]}")
    memory = compiled.memory_analysis()
    if memory is not None:
        total = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        result["xla_total_gib"] = (total - memory.alias_size_in_bytes) / 2**30
    jax.block_until_ready(compiled(state, batch))
    times = []
    for _ in range(args.update_repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    result["update_seconds"] = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return result


def summary(results: dict, args: Args, command: str) -> str:
    v = results["versions"]
    plugin = v.get("jax-cuda13-plugin") or v.get("jax-cuda12-plugin") or "none"
    lines = [
        f"# GPU check: {args.env_id}",
        "",
        f"{', '.join(v['devices'])}; {v.get('nvidia-smi', 'no nvidia-smi')}; Python {v['python']}, jax {v.get('jax')}, "
        f"jaxlib {v.get('jaxlib')}, CUDA plugin {plugin}, envpool {v.get('envpool')}",
        "",
        "| script | training SPS | EnvPool random SPS | ratio | learner update (chunk 16 / whole batch) | XLA memory | peak device memory |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "n/a"

    envpool = results["envpool_sps"] if isinstance(results.get("envpool_sps"), float) else float("nan")
    for script in SCRIPTS:
        t, steps = results["training"][script], results["learner"].get(script, {})
        ratio = t.get("steady_sps", float("nan")) / envpool
        chunked, whole = steps.get("16", {}), steps.get("0", {})
        lines.append(
            f"| {script}.py | {fmt(t.get('steady_sps'), ',.0f')} | {fmt(envpool, ',.0f')} | {ratio:.2f} | "
            f"{fmt(chunked.get('update_seconds'), '.3f')} s / {fmt(whole.get('update_seconds'), '.3f')} s | "
            f"{fmt(chunked.get('xla_total_gib'), '.2f')} / {fmt(whole.get('xla_total_gib'), '.2f')} GiB | "
            f"{fmt(chunked.get('peak_gib'), '.2f')} / {fmt(whole.get('peak_gib'), '.2f')} GiB |"
        )
    for script in SCRIPTS:
        stats = results["training"][script].get("stats", {})
        lines.append(f"\n{script}.py stats/ (means): " + ", ".join(f"{k[6:]} {v:.4f}" for k, v in sorted(stats.items())))
    if results["minatar"]:
        lines += ["", "| drmg.py on Breakout-MinAtar | training SPS | steps | return (last 10% of episodes) |", "|---|---|---|---|"]
        for network, t in results["minatar"].items():
            row = [fmt(t.get("steady_sps"), ",.0f"), fmt(t.get("steps"), ",d"), fmt(t.get("last_returns"), ".2f")]
            lines.append(f"| --network {network} | " + " | ".join(row) + " |")
    errors = [f"{k}: {v['error']}" for k, v in _flat(results) if isinstance(v, dict) and "error" in v]
    lines += [""] + [f"Failed: {e}" for e in errors] + ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def part(results: dict, out: str, key, fn):
    """results[key...] = fn(), or the error it raised; then out/results.json is written again (atomically: a reader
    sees the previous part's file or this one's, never a part of it)."""
    *path, last = key if isinstance(key, tuple) else (key,)
    target = results
    for k in path:
        target = target.setdefault(k, {})
    try:
        target[last] = fn()
    except Exception as error:  # noqa: BLE001  (one failed part must not cost the others)
        target[last] = dict(error=f"{type(error).__name__}: {error}")
    print(*(key if isinstance(key, tuple) else (key,)), json.dumps(target[last]), flush=True)
    write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))


def write_text(path: str, text: str):
    """text at path, atomically (a temporary file beside it, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _flat(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        yield prefix + k, v
        if isinstance(v, dict) and "error" not in v:
            yield from _flat(v, prefix + k + "/")


def main(args: Args, command: str = "benchmark/gpu_check.main (from Python)"):
    check_args(args)
    if args.tiny:
        args.env_id = "CartPole-v1"
        args.train_seconds, args.curve_seconds = min(args.train_seconds, 15.0), min(args.curve_seconds, 5.0)
        args.random_seconds, args.update_repeats = min(args.random_seconds, 1.0), min(args.update_repeats, 2)
        args.minatar_seconds = min(args.minatar_seconds, 10.0)
    os.makedirs(args.out_dir, exist_ok=True)
    lock = CellLock(os.path.join(args.out_dir, "gpu_check.lock"))
    if not lock.acquire():
        raise SystemExit(f"--out-dir {args.out_dir}: another gpu_check.py (PID {lock.holder()}) is writing there")
    staging = os.path.join(args.out_dir, "partial")
    try:
        with owned_children("benchmark/gpu_check.py"):
            shutil.rmtree(staging, ignore_errors=True)  # an earlier stopped run's: its results were partial
            os.makedirs(staging)
            try:
                measure(args, staging)
            except BaseException as error:
                CHILDREN.stop_all(why(error))  # before their working directory goes
                shutil.rmtree(os.path.join(staging, "work"), ignore_errors=True)
                kept = os.path.join(args.out_dir, "summary.md")
                earlier = "no earlier results"
                if os.path.exists(kept):
                    earlier = f"the earlier complete results in {args.out_dir} are kept"
                print(
                    f"benchmark/gpu_check.py: {why(error)}: stopped; this run's partial results: "
                    f"{os.path.join(staging, 'results.json')}; {earlier}",
                    file=sys.stderr,
                    flush=True,
                )
                raise
            shutil.rmtree(os.path.join(staging, "work"), ignore_errors=True)
            with open(os.path.join(staging, "results.json")) as f:
                results = json.load(f)
            text = summary(results, args, command)
            write_text(os.path.join(staging, "summary.md"), text)
            names = sorted(os.listdir(staging), key=lambda n: n == "summary.md")  # summary.md last: it marks a complete run
            for name in names:
                if not os.path.isdir(os.path.join(staging, name)):
                    os.replace(os.path.join(staging, name), os.path.join(args.out_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    print(text)


def measure(args: Args, out: str):
    """Every part, its results in out/results.json after each; the training runs work in out/work."""
    results = dict(training={}, learner={}, minatar={})
    part(results, out, "versions", versions)
    cwd = os.path.join(out, "work")
    os.makedirs(cwd)
    for script in SCRIPTS:
        seconds = args.train_seconds + (args.curve_seconds if script == "drmg" else 0.0)
        part(results, out, ("training", script), lambda: train(script, args, seconds, cwd, out))

    def envpool_sps():
        defaults = script_args("qr_impala", args.env_id)
        random_args = RandomArgs(
            env_id=args.env_id, random_seconds=args.random_seconds, envpool_threads=defaults.envpool_threads
        )
        random_args.local_num_envs = 4 if args.tiny else defaults.local_num_envs
        random_args.num_actor_threads = 1 if args.tiny else defaults.num_actor_threads
        return random_action_sps(random_args)

    part(results, out, "envpool_sps", envpool_sps)
    observation_space, num_actions = environment(args.env_id)
    for script in SCRIPTS:
        for chunk_envs in (16, 0):
            step = lambda: learner_step(script, chunk_envs, args, observation_space, num_actions)  # noqa: E731
            part(results, out, ("learner", script, str(chunk_envs)), step)
    drmg_run = results["training"]["drmg"].get("run_dir")
    if drmg_run:
        plot = [sys.executable, os.path.join(ROOT, "benchmark", "plot.py"), drmg_run, "--labels", "drmg.py"]
        CHILDREN.run([*plot, "--out", os.path.join(out, "drmg")], "plot.py")
    for network in (("minatar",) if args.tiny else ("minatar", "resnet")) if args.minatar_seconds else ():
        flags = ["--network", network]
        name = f"minatar_{network}"
        run = lambda: train("drmg", args, args.minatar_seconds, cwd, out, "Breakout-MinAtar", flags, name)  # noqa: E731
        part(results, out, ("minatar", network), run)


if __name__ == "__main__":
    main(tyro.cli(Args), command=" ".join(["PYTHONUNBUFFERED=1 python benchmark/gpu_check.py", *sys.argv[1:]]))
