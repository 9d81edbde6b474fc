"""The one command for a fresh GPU machine (issues 22 and 33): every figure the README needs from a GPU, in one call of
about 8.9 minutes with the defaults (at most 9), nothing installed, every result under --out-dir.

    PYTHONUNBUFFERED=1 python benchmark/gpu_check.py --out-dir gpu_check          # on the GPU machine
    python benchmark/gpu_check.py --tiny --out-dir /tmp/gpu_check                 # the CPU rehearsal (the tests run it)

It measures, one part after the other (the default seconds; "+ ~N s": what else the part costs on a GPU, estimated):
    versions   Python, JAX, jaxlib, the CUDA plugin, envpool, flax, optax, the devices and the NVIDIA driver (~15 s with
               this process's start);
    atari      Atari learning: qr_impala.py, then drmg.py, on --env-id (Breakout-v5) with their defaults, each for
               --atari-seconds (120) after its compilation (+ ~5 s each: the start and the compilation before it): the
               steady-state SPS (between the first and the last SPS log), the stats/ breakdown (mean over the logs), the
               startup memory check, the return of the last 10% of episodes, episodes, steps and minutes; both return
               curves in atari_returns.png (benchmark/plot.py, ~5 s), each labelled with its steps and minutes;
    overlap    qr_impala.py with the other setting of --overlap-envs than its default (the actor steps its envs as two
               EnvPools of half each, overlapping env steps with inference; off by default, so this run has
               --overlap-envs) for --overlap-seconds (45, + ~5 s; 0 skips the part): its steady SPS
               beside the atari part's qr_impala.py;
    envpool    EnvPool's random-action rate with the same envs and actor threads for --random-seconds (15, + ~5 s), and
               each training SPS over it;
    on_device  the on-device loop at full width: benchmark/on_device_sps.py (a child process) on Breakout-MinAtar, the
               steps per second in all of qr_impala.py's and drmg.py's jitted loop with --num-seeds each of
               --minatar-seeds (1 8 32; none skips the part) and of its unroll alone, hence the learner's share; the
               whole part, its compilations included, is capped at --minatar-seconds (150, + ~5 s; 0 skips the part),
               and what it measured by then is kept (results.json is written again after each measurement);
    learner    each script's learner step at the whole batch (--chunk-envs 0, the choice on a GPU that holds it; the CPU's
               16 is benchmark/update_time.py's): XLA's memory analysis, the device's peak memory after the step
               (memory_stats(), where the device reports it) and the median update time of --update-repeats (3) calls
               after compilation (~40 s, mostly the two compilations);
and writes summary.md (a table per part, with the issue's goals under each), results.json (also each part's wall-clock
seconds, to check these estimates), atari_returns.png (and drmg.py's atari_meta.png) and the runs' logs. The default
total, `estimated_seconds`: 15 + 2 x (120 + 5) + 5 + (45 + 5) + (15 + 5) + (150 + 5) + 40 = 535 s, 8.9 minutes (the
~5 s of a training run: the previous version of this check took 436 s on an H200 for 320 s of parts, 67 s of learner
compilations and five training runs, docs/benchmarks.md). results.json is written after every part, and a part that
fails is recorded as such while the others go on.

--tiny is the CPU rehearsal of every part in a few minutes: CartPole-v1 with 4 envs, one actor thread and 8 steps for
the training runs (a few seconds each), Breakout-MinAtar with --num-seeds 1 2 and few updates per call for the
on-device part (its cap raised to TINY_ON_DEVICE_CAP: the CPU compiles slowly), 1 s of random actions, 2 timed
updates; its children compile with XLA's backend optimisation level 0 (quicker; a rehearsal's timings mean nothing).

A run works in {out_dir}/partial (its results.json after every part, the training logs, the training runs' working
directory) and moves its files into --out-dir only once every part is done (summary.md last), so that a stopped or
killed run never replaces an earlier complete result with a partial one; the next run starts partial/ afresh. The
children (training runs, on_device_sps.py, plot.py) end with this process however it ends (benchmark/children.py: a
signal or an exception stops them and says which; kill -9 of this process makes the kernel kill them), and a signal or
an exception removes the working directory. Two checks cannot write to one --out-dir at once (a lock, released by the
kernel if its holder dies).
"""

import glob
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List

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
MINATAR = "Breakout-MinAtar"  # the on-device part's game
COMPILE_LIMIT = 900.0  # seconds a training run may take to compile and start before it is stopped
MAX_SECONDS = 86_400.0  # the most seconds of a part (a day)
MAX_SEEDS = 256  # the most --num-seeds of an on-device measurement
# The CPU rehearsal: a vector environment and a small batch, the same code paths.
TINY_FLAGS = ["--local-num-envs", "4", "--num-actor-threads", "1", "--num-steps", "8"]
TINY_ON_DEVICE = ["--updates-per-call", "2", "--calls", "1"]
TINY_ON_DEVICE_CAP = 480.0  # the on-device part's cap on a CPU: 8 compilations
# What each part costs on a GPU besides its own seconds (estimates, see the docstring; results.json's part_seconds
# measures them): this process's start and the versions, a training run's start and compilation, the plot, making
# EnvPool's envs, stopping on_device_sps.py, the learner part (two compilations).
OVERHEAD = dict(start=15.0, training_run=5.0, plot=5.0, envpool=5.0, on_device=5.0, learner=40.0)
# The issue's goals, under the summary's tables.
GOALS = dict(
    atari="Breakout-v5 training SPS >= 0.8 of EnvPool's rate; qr_impala.py >= 12,000 SPS; drmg.py >= 0.85 of qr_impala.py",
    overlap="Breakout-v5 training SPS >= 0.8 of EnvPool's rate; qr_impala.py >= 12,000 SPS",
    on_device="on-device qr_impala.py with 32 seeds >= 2,000,000 steps/s in all",
)


@dataclass
class Args:
    out_dir: str = "gpu_check"
    """where every result goes"""
    env_id: str = "Breakout-v5"
    """the environment of the Atari, overlap, envpool and learner parts"""
    atari_seconds: float = 120.0
    """seconds of each Atari training run (qr_impala.py, then drmg.py) after its compilation"""
    overlap_seconds: float = 45.0
    """seconds of qr_impala.py with the other --overlap-envs setting after its compilation (0: skip the part)"""
    random_seconds: float = 15.0
    """seconds of EnvPool's random-action rate"""
    minatar_seeds: List[int] = field(default_factory=lambda: [1, 8, 32])
    """--num-seeds of the on-device loop on Breakout-MinAtar, one measurement each of qr_impala.py and drmg.py (none:
    skip the part)"""
    minatar_seconds: float = 150.0
    """wall-clock cap of the whole on-device part, its compilations included (0: skip the part)"""
    update_repeats: int = 3
    """timed learner updates per script"""
    tiny: bool = False
    """the CPU rehearsal: CartPole-v1, 4 envs, one actor thread, 8 steps, a few seconds per training run"""


def estimated_seconds(args: Args) -> float:
    """The whole check's wall-clock seconds on a GPU: the parts' seconds and OVERHEAD (estimates)."""
    o = OVERHEAD
    total = o["start"] + len(SCRIPTS) * (args.atari_seconds + o["training_run"]) + o["plot"]
    total += args.overlap_seconds + o["training_run"] if args.overlap_seconds else 0.0
    total += args.random_seconds + o["envpool"] + o["learner"]
    total += args.minatar_seconds + o["on_device"] if args.minatar_seeds and args.minatar_seconds else 0.0
    return total


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
    for name, positive in (("atari_seconds", True), ("overlap_seconds", False), ("random_seconds", True), ("minatar_seconds", False)):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0) and value <= MAX_SECONDS):
            bound = "positive" if positive else ">= 0"
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {bound} and at most {MAX_SECONDS:,.0f} (a day)")
    seeds = args.minatar_seeds
    if any(not 1 <= n <= MAX_SEEDS for n in seeds) or len(set(seeds)) != len(seeds):
        shown = " ".join(map(str, seeds))
        raise SystemExit(f"--minatar-seeds {shown}: each in [1, {MAX_SEEDS}], none twice (none: skip the part)")
    if not 1 <= args.update_repeats <= 10_000:
        raise SystemExit(f"--update-repeats {args.update_repeats}: must lie in [1, 10000]")


def child_env(args: Args) -> dict:
    """The environment of the children: the user's (not this process's XLA_PYTHON_CLIENT_PREALLOCATE), unbuffered so
    that a training run's "run ..." line is seen when it is printed; in the rehearsal, XLA's quicker CPU compilation."""
    env = dict(USER_ENV, PYTHONUNBUFFERED="1")
    if args.tiny:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def train_command(script: str, args: Args, env_id: str, extra, name: str) -> list:
    """The command of a training run: the script with its defaults for 10^10 steps (stopped after its seconds)."""
    flags = ["--env-id", env_id, "--total-timesteps", str(10**10), "--log-frequency", "5", "--save-every", "0"]
    flags += (TINY_FLAGS + ["--log-frequency", "2"] if args.tiny else []) + list(extra)
    flags += ["--exp-name", name]
    return [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags]


def train(script: str, args: Args, seconds: float, cwd: str, out: str, env_id: str = "", extra=(), name: str = "") -> dict:
    """Run the script with its defaults (and `extra` flags) for `seconds` after its compilation, stop it with SIGTERM,
    and read its log (its output in out/{name}_stdout.log)."""
    env_id, name = env_id or args.env_id, name or script
    command = train_command(script, args, env_id, extra, name)
    print(" ".join(command), flush=True)
    path = os.path.join(out, f"{name}_stdout.log")
    with open(path, "w") as log:
        process = CHILDREN.start(
            command, f"the {name} training run", cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env(args)
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
    ended = time.time()
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
    result["startup_seconds"] = (started or ended) - begin  # the start and the compilation, before "run ..."
    result["minutes"] = (ended - started) / 60 if started else 0.0  # after it
    if len(sps) >= 2:
        result["steady_sps"] = (sps[-1].step - sps[0].step) / (sps[-1].wall_time - sps[0].wall_time)
    if sps:
        result["steps"] = sps[-1].step
    result["stats"] = {t: float(np.mean([e.value for e in accumulator.Scalars(t)])) for t in tags if t.startswith("stats/")}
    returns = [e.value for e in accumulator.Scalars("charts/episodic_return")] if "charts/episodic_return" in tags else []
    if returns:
        result["episodes"], result["last_returns"] = len(returns), float(np.mean(returns[-max(1, len(returns) // 10) :]))
    return result


def plot_returns(atari: dict, out: str) -> dict:
    """Both Atari runs' return curves in one plot, out/atari_returns.png (benchmark/plot.py), each labelled with its
    steps and minutes."""
    runs = [(script, atari[script]) for script in SCRIPTS if isinstance(atari.get(script), dict) and atari[script].get("run_dir")]
    labels = [f"{script}.py: {r.get('steps', 0):,} steps in {r['minutes']:.1f} min" for script, r in runs]
    command = [sys.executable, os.path.join(ROOT, "benchmark", "plot.py"), *(r["run_dir"] for _, r in runs)]
    command += ["--labels", *labels, "--out", os.path.join(out, "atari")]
    returncode = CHILDREN.run(command, "plot.py")
    if returncode != 0 or not os.path.exists(os.path.join(out, "atari_returns.png")):
        raise RuntimeError(f"benchmark/plot.py exited with {returncode}: no atari_returns.png")
    return dict(png="atari_returns.png", labels=labels)


def overlap_flag(args: Args) -> str:
    """The overlap part's flag: the other setting than qr_impala.py's default --overlap-envs."""
    return "--no-overlap-envs" if getattr(script_args("qr_impala", args.env_id), "overlap_envs", False) else "--overlap-envs"


def on_device_command(args: Args, path: str) -> list:
    """benchmark/on_device_sps.py on Breakout-MinAtar: both scripts at each --minatar-seeds, its results in `path`."""
    command = [sys.executable, os.path.join(ROOT, "benchmark", "on_device_sps.py"), "--env-id", MINATAR]
    command += ["--scripts", *SCRIPTS, "--num-seeds", *map(str, args.minatar_seeds), "--out", path]
    return command + (TINY_ON_DEVICE if args.tiny else [])


def on_device(args: Args, cwd: str, out: str, results: dict) -> dict:
    """The on-device part: on_device_sps.py as a child (its output in out/on_device_stdout.log), stopped once the part
    has taken --minatar-seconds; its measurements read from its --out as each (script, seeds) ends, and put in
    results.json at once."""
    path = os.path.abspath(os.path.join(out, "on_device_sps.json"))
    found = dict(env_id=MINATAR, runs=[])

    def read() -> bool:
        """found updated from on_device_sps.py's --out (written atomically); True if it has a new measurement."""
        try:
            with open(path) as f:
                measured = json.load(f)
        except (OSError, ValueError):  # none yet
            return False
        if len(measured["results"]) == len(found["runs"]):
            return False
        found.update(device=measured["device"], runs=[dict(r, sps_per_seed=r["sps"] / r["num_seeds"]) for r in measured["results"]])
        return True

    command = on_device_command(args, path)
    print(" ".join(command), flush=True)
    with open(os.path.join(out, "on_device_stdout.log"), "w") as log:
        process = CHILDREN.start(command, "on_device_sps.py", cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env(args))
    begin, capped = time.time(), False
    try:
        while process.poll() is None:
            if time.time() - begin > args.minatar_seconds:
                CHILDREN.stop(process, f"--minatar-seconds {args.minatar_seconds:g} reached")
                capped = True
                break
            if read():
                results["on_device"] = dict(found)
                save(results, out)
            time.sleep(0.5)
    except BaseException as error:  # a signal: it ends here, and says why
        CHILDREN.stop(process, why(error))
        raise
    CHILDREN.ended(process)
    read()
    found["seconds"] = time.time() - begin
    measured = {(r["script"], r["num_seeds"]) for r in found["runs"]}
    missing = [f"{script}.py x {n}" for script in SCRIPTS for n in args.minatar_seeds if (script, n) not in measured]
    if capped:
        found["capped"] = f"stopped at --minatar-seconds {args.minatar_seconds:g}; not measured: {', '.join(missing) or 'none'}"
    elif process.returncode != 0 or missing:
        with open(os.path.join(out, "on_device_stdout.log"), errors="replace") as f:
            lines = f.read().strip().splitlines()
        found["error"] = f"on_device_sps.py exit {process.returncode}: " + (lines[-1] if lines else "no output")
    return found


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


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "n/a"


def ratio(a, b) -> float:
    """a / b, NaN where either is missing or b is 0."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a / b if numbers and b != 0 else float("nan")


def summary(results: dict, args: Args, command: str) -> str:
    """summary.md: a table per part, the issue's goals under each."""
    v = results.get("versions", {})
    plugin = v.get("jax-cuda13-plugin") or v.get("jax-cuda12-plugin") or "none"
    lines = [
        f"# GPU check: {args.env_id}",
        "",
        f"{', '.join(v.get('devices', ['devices unknown']))}; {v.get('nvidia-smi', 'no nvidia-smi')}; Python "
        f"{v.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, CUDA plugin {plugin}, envpool {v.get('envpool')}",
    ]
    envpool = results.get("envpool_sps")
    envpool = envpool if isinstance(envpool, float) else float("nan")
    atari = {script: results.get("atari", {}).get(script, {}) for script in SCRIPTS}
    sps = {script: atari[script].get("steady_sps", float("nan")) for script in SCRIPTS}

    lines += [
        "",
        f"## Atari: each script with its defaults for {args.atari_seconds:g} s after its compilation",
        "",
        "| script | training SPS | EnvPool random SPS | ratio | return (last 10% of episodes) | episodes | steps | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for script in SCRIPTS:
        t = atari[script]
        cells = [fmt(sps[script], ",.0f"), fmt(envpool, ",.0f"), fmt(ratio(sps[script], envpool), ".2f"), fmt(t.get("last_returns"), ".2f")]
        cells += [fmt(t.get("episodes"), ",d"), fmt(t.get("steps"), ",d"), fmt(t.get("minutes"), ".1f")]
        lines.append(f"| {script}.py | " + " | ".join(cells) + " |")
    lines += ["", f"Goals (issue): {GOALS['atari']} (here: drmg.py / qr_impala.py = {fmt(ratio(sps['drmg'], sps['qr_impala']), '.2f')})."]
    plot = results.get("atari_plot", {})
    lines += ["", "Return curves: atari_returns.png" if "png" in plot else "Return curves: none (see Failed)"]
    for script in SCRIPTS:
        t = atari[script]
        stats = ", ".join(f"{k[6:]} {v:.4f}" for k, v in sorted(t.get("stats", {}).items()))
        lines.append(f"\n{script}.py: {t.get('memory_check') or 'no memory check line'}; stats/ (means): {stats}")

    lines += ["", "## Overlap: qr_impala.py with one EnvPool per actor thread or two of half of its envs each", ""]
    if "overlap" in results:
        overlap = results["overlap"]
        flag = overlap.get("flag", "?")
        default = "--no-overlap-envs" if flag == "--overlap-envs" else "--overlap-envs"
        rows = [(f"{default} (the default: the Atari part's run)", sps["qr_impala"]), (flag, overlap.get("steady_sps", float("nan")))]
        lines += ["| qr_impala.py | training SPS | ratio to EnvPool | seconds |", "|---|---|---|---|"]
        for (label, value), seconds in zip(rows, (args.atari_seconds, args.overlap_seconds)):
            lines.append(f"| {label} | {fmt(value, ',.0f')} | {fmt(ratio(value, envpool), '.2f')} | {seconds:g} |")
        lines += ["", f"{flag} / {default}: {fmt(ratio(rows[1][1], rows[0][1]), '.2f')}. Goals (issue): {GOALS['overlap']}."]
    else:
        lines += ["Skipped (--overlap-seconds 0)."]

    lines += ["", f"## On-device loop: {MINATAR}, the scripts' MinAtar defaults, several seeds in one program", ""]
    if "on_device" in results:
        found = results["on_device"]
        lines += [
            f"{found.get('device', 'device unknown')}; the part took {fmt(found.get('seconds'), '.0f')} s (cap "
            f"--minatar-seconds {args.minatar_seconds:g}).",
            "",
            "| script | seeds | SPS in all | SPS per seed | the unroll alone, SPS | learner share |",
            "|---|---|---|---|---|---|",
        ]
        for r in found.get("runs", []):
            cells = [fmt(r.get("sps"), ",.0f"), fmt(r.get("sps_per_seed"), ",.0f"), fmt(r.get("unroll_sps"), ",.0f")]
            lines.append(f"| {r['script']}.py | {r['num_seeds']} | " + " | ".join(cells) + f" | {fmt(r.get('learner_share'), '.0%')} |")
        if "capped" in found:
            lines += ["", f"Capped: {found['capped']}."]
        best = [r["sps"] for r in found.get("runs", []) if r["script"] == "qr_impala" and r["num_seeds"] == 32]
        lines += ["", f"Goal (issue): {GOALS['on_device']} (here: {fmt(best[0], ',.0f') if best else 'not measured'})."]
    else:
        lines += ["Skipped (--minatar-seeds none or --minatar-seconds 0)."]

    lines += [
        "",
        "## Learner step: the whole batch (--chunk-envs 0)",
        "",
        "| script | batch (steps x envs) | update | XLA memory | peak device memory | compilation |",
        "|---|---|---|---|---|---|",
    ]
    for script in SCRIPTS:
        step = results.get("learner", {}).get(script, {}).get("0", {})
        cells = [step.get("batch", "n/a"), f"{fmt(step.get('update_seconds'), '.3f')} s", f"{fmt(step.get('xla_total_gib'), '.2f')} GiB"]
        cells += [f"{fmt(step.get('peak_gib'), '.2f')} GiB", f"{fmt(step.get('compile_seconds'), '.0f')} s"]
        lines.append(f"| {script}.py | " + " | ".join(cells) + " |")
    lines += ["", "No goal of the issue here; --chunk-envs 16 (the CPU's choice) is benchmark/update_time.py's."]

    errors = [f"{k}: {v['error']}" for k, v in _flat(results) if isinstance(v, dict) and "error" in v]
    seconds = results.get("part_seconds", {})
    lines += [""] + [f"Failed: {e}" for e in errors]
    estimate = "a CPU rehearsal" if args.tiny else f"estimated beforehand: {estimated_seconds(args) / 60:.1f} min on a GPU"
    lines += [
        "",
        f"Wall-clock seconds per part: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}; in all "
        f"{sum(seconds.values()) / 60:.1f} min ({estimate}).",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def save(results: dict, out: str):
    """out/results.json, atomically (a reader sees the previous file or this one, never a part of it)."""
    write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))


def part(results: dict, out: str, key, fn):
    """results[key...] = fn(), or the error it raised, and its wall-clock seconds in results["part_seconds"]; then
    out/results.json is written again."""
    *path, last = key if isinstance(key, tuple) else (key,)
    target = results
    for k in path:
        target = target.setdefault(k, {})
    start = time.time()
    try:
        target[last] = fn()
    except Exception as error:  # noqa: BLE001  (one failed part must not cost the others)
        target[last] = dict(error=f"{type(error).__name__}: {error}")
    results.setdefault("part_seconds", {})["/".join((*path, last))] = time.time() - start
    print(*(key if isinstance(key, tuple) else (key,)), json.dumps(target[last]), flush=True)
    save(results, out)


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
        args.atari_seconds, args.overlap_seconds = min(args.atari_seconds, 8.0), min(args.overlap_seconds, 5.0)
        args.random_seconds, args.update_repeats = min(args.random_seconds, 1.0), min(args.update_repeats, 2)
        args.minatar_seeds = [1, 2] if args.minatar_seeds else []
        args.minatar_seconds = TINY_ON_DEVICE_CAP if args.minatar_seconds else 0.0
    else:
        print(f"benchmark/gpu_check.py: about {estimated_seconds(args) / 60:.1f} minutes on a GPU", flush=True)
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
    results = dict(atari={}, learner={})
    part(results, out, "versions", versions)
    cwd = os.path.join(out, "work")
    os.makedirs(cwd)
    for script in SCRIPTS:
        part(results, out, ("atari", script), lambda: train(script, args, args.atari_seconds, cwd, out))
    if any(isinstance(r, dict) and r.get("run_dir") for r in results["atari"].values()):
        part(results, out, "atari_plot", lambda: plot_returns(results["atari"], out))
    if args.overlap_seconds:
        flag = overlap_flag(args)
        name = "qr_impala_" + flag.lstrip("-").replace("-", "_")  # qr_impala_no_overlap_envs
        run = lambda: dict(train("qr_impala", args, args.overlap_seconds, cwd, out, extra=[flag], name=name), flag=flag)  # noqa: E731
        part(results, out, "overlap", run)

    def envpool_sps():
        defaults = script_args("qr_impala", args.env_id)
        random_args = RandomArgs(
            env_id=args.env_id, random_seconds=args.random_seconds, envpool_threads=defaults.envpool_threads
        )
        random_args.local_num_envs = 4 if args.tiny else defaults.local_num_envs
        random_args.num_actor_threads = 1 if args.tiny else defaults.num_actor_threads
        return random_action_sps(random_args)

    part(results, out, "envpool_sps", envpool_sps)
    if args.minatar_seeds and args.minatar_seconds:
        part(results, out, "on_device", lambda: on_device(args, cwd, out, results))
    observation_space, num_actions = environment(args.env_id)
    for script in SCRIPTS:
        step = lambda: learner_step(script, 0, args, observation_space, num_actions)  # noqa: E731
        part(results, out, ("learner", script, "0"), step)


if __name__ == "__main__":
    main(tyro.cli(Args), command=" ".join(["PYTHONUNBUFFERED=1 python benchmark/gpu_check.py", *sys.argv[1:]]))
