"""Paper 003 Table 1 with mix_metagrad.py: final return per estimator (n = 0, 1, 3, 5, 10, 3-mix, 5-mix) over seeds,
and the meta-gradient std of every estimator normalised to the 1-step one, measured along a 1-step run.

    python benchmark/mix_metagrad_table1.py --total-timesteps 64000 --seeds 1 --variance-points 3 --variance-samples 32

Writes benchmark/results/mix_metagrad_table1.{md,csv} (rows with the exact command of each run) and keeps each run's
stdout under benchmark/results/mix_metagrad_logs/.
"""

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RETURN = {
    "0": "67 (3)",
    "1": "85 (28)",
    "3": "114 (15)",
    "5": "97 (7)",
    "10": "86 (9)",
    "3-mix": "115 (2)",
    "5-mix": "113 (12)",
}
PAPER_STD = {"1": "1.0", "3": "4.6 (0.5)", "5": "8.6 (2.1)", "10": "23.5 (8.4)", "3-mix": "1.7 (0.4)", "5-mix": "2.6 (0.8)"}


@dataclass
class Args:
    total_timesteps: int = 64_000
    """agent steps of each training run (paper: not given)"""
    seeds: List[int] = field(default_factory=lambda: [1])
    """seeds of every row (paper: 3)"""
    estimators: List[str] = field(default_factory=lambda: ["0", "1", "3", "5", "10", "3-mix", "5-mix"])
    """Table 1's columns"""
    log_frequency: int = 10
    """updates per jitted chunk"""
    variance_points: int = 3
    """K points of the variance run (paper: 300); 0 skips it"""
    variance_samples: int = 32
    """M meta-gradients per point (paper: 96)"""
    variance_timesteps: int = 0
    """agent steps of the 1-step run along which the variance is measured (0: --total-timesteps)"""
    extra: List[str] = field(default_factory=list)
    """more flags for mix_metagrad.py"""
    out: str = os.path.join(ROOT, "benchmark", "results")
    """where the tables and logs go"""


def flags_of(estimator: str) -> List[str]:
    n, mix = (estimator.split("-")[0], True) if estimator.endswith("-mix") else (estimator, False)
    return ["--inner-steps", n] + (["--mix"] if mix else [])


def run(cmd: List[str], log_path: str):
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n" + result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return result.stdout, time.time() - start


if __name__ == "__main__":
    args = tyro.cli(Args)
    logs = os.path.join(args.out, "mix_metagrad_logs")
    os.makedirs(logs, exist_ok=True)
    base = [sys.executable, "mix_metagrad.py", "--total-timesteps", str(args.total_timesteps)]
    base += ["--log-frequency", str(args.log_frequency), *args.extra]
    variance, variance_cmd = {}, ""
    if args.variance_points:
        steps = args.variance_timesteps or args.total_timesteps
        cmd = [sys.executable, "mix_metagrad.py", "--total-timesteps", str(steps), "--log-frequency", str(args.log_frequency)]
        cmd += ["--inner-steps", "1", "--variance-points", str(args.variance_points)]
        cmd += ["--variance-samples", str(args.variance_samples), "--seed", str(args.seeds[0]), *args.extra]
        stdout, wall = run(cmd, os.path.join(logs, "variance.txt"))
        run_name = re.search(r"run (\S+):", stdout).group(1)
        with open(os.path.join(ROOT, "runs", run_name, "variance.json")) as f:
            variance = json.load(f)
        variance_cmd = " ".join(cmd[1:]) + f"  ({wall:.0f} s)"
        print(f"variance: {variance['mean']} in {wall:.0f} s", flush=True)

    rows = []
    for estimator in args.estimators:
        finals, walls, commands = [], [], []
        for seed in args.seeds:
            cmd = base + flags_of(estimator) + ["--seed", str(seed)]
            stdout, wall = run(cmd, os.path.join(logs, f"n{estimator}_seed{seed}.txt"))
            finals.append(float(re.search(r"final episodic_return \(.*\) (\S+)", stdout).group(1)))
            walls.append(wall)
            commands.append(" ".join(cmd[1:]))
            print(f"{estimator} seed {seed}: final return {finals[-1]:.2f} in {wall:.0f} s", flush=True)
        rows.append(dict(estimator=estimator, final_return=finals, wall_s=walls, commands=commands))

    key = lambda e: f"{e.split('-')[0]}-mix" if e.endswith("-mix") else f"{e}-step"
    with open(os.path.join(args.out, "mix_metagrad_table1.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["estimator", "final_return_mean", "final_return_std", "seeds", "paper_return", "std_ratio", "paper_std"]
        )
        for row in rows:
            e = row["estimator"]
            ratio = variance.get("mean", {}).get(key(e), "")
            writer.writerow(
                [e, np.mean(row["final_return"]), np.std(row["final_return"]), len(row["final_return"]), PAPER_RETURN[e]]
                + [ratio, PAPER_STD.get(e, "")]
            )
    lines = [
        f"Snake 12x12, {args.total_timesteps} agent steps per run (paper: not stated; see the report), seeds {args.seeds}.",
        "",
        "| inner steps n | final return (ours, mean (std)) | paper | meta-grad std / 1-step (ours, mean (std over points)) | paper |",
        "|-|-|-|-|-|",
    ]
    for row in rows:
        e = row["estimator"]
        ret = f"{np.mean(row['final_return']):.2f} ({np.std(row['final_return']):.2f})"
        if e == "0":
            std = "—"
        elif key(e) in variance.get("mean", {}):
            std = f"{variance['mean'][key(e)]:.2f} ({variance['std_over_points'][key(e)]:.2f})"
        else:
            std = "not measured"
        lines.append(f"| {e} | {ret} | {PAPER_RETURN[e]} | {std} | {PAPER_STD.get(e, '—')} |")
    lines += ["", "Commands (wall time of each run):", ""]
    for row in rows:
        for cmd, wall in zip(row["commands"], row["wall_s"]):
            lines.append(f"- `{cmd}` ({wall:.0f} s)")
    if variance_cmd:
        lines.append(f"- variance: `{variance_cmd}`")
    with open(os.path.join(args.out, "mix_metagrad_table1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
