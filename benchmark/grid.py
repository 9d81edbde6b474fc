"""What the benchmark grids share (two_colors.py, minatar.py): the eta an agent starts from, the episodic returns of a
run's TensorBoard log, binning, and running a list of commands a bounded number at a time."""

import glob
import importlib
import os
import subprocess
import sys
import time

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from children import owned_children  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def initial_eta(script: str, flags: list[str]) -> dict:
    """The eta an agent starts from, read from the script's own Args (with its per-environment defaults) and
    meta-parameter functions: gamma, lambda, alpha (1 where the return has no leaky v-trace; STACX's alpha_rho) and the
    loss weights w_value, w_pi, w_entropy (one number each)."""
    sys.path.insert(0, ROOT)
    module = importlib.import_module(script)
    defaults = module.default_args(flags) if hasattr(module, "default_args") else module.Args()
    script_args = tyro.cli(module.Args, args=flags, default=defaults)
    eta = {k: np.asarray(v) for k, v in module.hyperparameters(module.init_meta_params(script_args), script_args).items()}
    for name, value in eta.items():  # per-quantile and per-head entries all start equal
        assert np.all(value == value.flat[0]), (script, name)
    eta = {k: float(v.flat[0]) for k, v in eta.items()}
    return dict(
        gamma=eta["gamma"],
        lambda_=eta["lambda_"],
        alpha=eta.get("alpha", eta.get("alpha_rho", 1.0)),
        w_value=eta.get("w_z", eta.get("w_v", eta.get("g_v"))),
        w_pi=eta.get("w_pi", eta.get("g_p")),
        w_entropy=eta.get("w_h", eta.get("g_e")),
    )


def eta_mismatch(etas: dict, reference: dict, no_alpha=()) -> str:
    """'' if every agent's eta equals the reference (agents in no_alpha have no leaky v-trace); else one line."""
    for agent, eta in etas.items():
        differs = [k for k in eta if not (agent in no_alpha and k == "alpha") and not np.isclose(eta[k], reference[k], rtol=1e-6)]
        if differs:
            shown = ", ".join(f"{k} {eta[k]:.6g} (DrMG {reference[k]:.6g})" for k in differs)
            return f"{agent} does not start from DrMG's eta: {shown}"
    return ""


def latest_log(work_dir: str):
    """The EventAccumulator of the latest TensorBoard log under work_dir/runs (every scalar kept), or None."""
    logs = sorted(glob.glob(os.path.join(work_dir, "runs", "*")), key=os.path.getmtime)
    if not logs:
        return None
    accumulator = EventAccumulator(logs[-1], size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def episodic_returns(work_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(global steps, episodic returns) of the latest TensorBoard log under work_dir/runs."""
    accumulator = latest_log(work_dir)
    if accumulator is None or "charts/episodic_return" not in accumulator.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = accumulator.Scalars("charts/episodic_return")
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def binned(steps: np.ndarray, values: np.ndarray, bin_steps: int, total: int) -> np.ndarray:
    """Mean of the values logged in each bin [k * bin_steps, (k + 1) * bin_steps); NaN where none was. A run shorter than
    one bin has one bin (its whole run); steps at or after the last bin's start go to the last bin."""
    num_bins = max(1, total // bin_steps)
    index = np.minimum(np.asarray(steps) // bin_steps, num_bins - 1).astype(int)
    sums, counts = np.zeros(num_bins), np.zeros(num_bins)
    np.add.at(sums, index, values)
    np.add.at(counts, index, 1)
    with np.errstate(invalid="ignore"):
        return sums / counts


def run_commands(jobs: list, parallel: int, env: dict, on_done=None, on_start=None):
    """Run jobs = [(name, command, work_dir)] at most `parallel` at a time, each in its work_dir with its output in
    work_dir/stdout.log; on_start(name, work_dir) before each (False: skip it), on_done(name, work_dir, returncode,
    seconds) after each. Each run ends with this process, however it ends (benchmark/children.py): stopped by a signal
    or an exception, the driver says which runs it stopped; killed, the kernel kills them."""
    todo, running = list(jobs), []
    with owned_children() as children:
        while todo or running:
            while todo and len(running) < parallel:
                name, cmd, work_dir = todo.pop(0)
                if on_start is not None and not on_start(name, work_dir):
                    continue
                os.makedirs(work_dir, exist_ok=True)
                print(f"[{time.strftime('%H:%M:%S')}] start {shown(name)}: {' '.join(cmd)}", flush=True)
                with open(os.path.join(work_dir, "stdout.log"), "w") as log:
                    description = f"{shown(name)} (its log: {log.name})"
                    process = children.start(cmd, description, cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((name, work_dir, time.time(), log.name, process))
            if running:
                time.sleep(0.2)
            for item in list(running):
                name, work_dir, start, log_name, process = item
                if process.poll() is not None:
                    children.ended(process)
                    running.remove(item)
                    status = "done" if process.returncode == 0 else f"FAILED ({process.returncode}), see {log_name}"
                    print(f"[{time.strftime('%H:%M:%S')}] {status}: {shown(name)} in {time.time() - start:.0f} s", flush=True)
                    if on_done is not None:
                        on_done(name, work_dir, process.returncode, time.time() - start)


def shown(name) -> str:
    """A job's name as printed: a tuple's entries joined by spaces."""
    return " ".join(map(str, name)) if isinstance(name, tuple) else str(name)
