"""Figure 1 of the DrMG paper (§5.1): DrMG, MG and QR on the two-colors grid world, whose key rewards swap
every 1e5 environment steps. Does the agent that learns a return distribution re-adapt faster after a swap?

Runs DrMG (`drmg.py`), MG (`mg.py`) and QR as subprocesses on `--env-id two_colors_jax` with the same hyperparameters
and several seeds (one actor thread, so that every logged episode counts and the global step counter of the environment
is the scripts' `global_step`), reads `charts/episodic_return` from their TensorBoard logs, and writes
    benchmark/results/two_colors.csv           mean episodic return per seed and step bin
    benchmark/results/two_colors_toggles.csv   re-adaptation measures per algorithm, seed and toggle
    benchmark/results/two_colors.png           the curves (mean over seeds, min-max band), toggles marked
Re-adaptation measures, for each toggle at step t (averaged over the toggles at t >= --first-scored-toggle, after the
agents have learnt the task), on the returns binned by --bin-steps:
    pre        mean return over [t - window, t)
    after      mean return over the whole period [t, t + toggle_period): higher means a faster re-adaptation (the area
               of the curve after the swap)
    dip        lowest binned return in [t, t + window)
    recovery   steps after t until a binned return reaches --recovered-level (NaN in the CSV, the whole period in the
               means: not before the next toggle)
    peak       highest binned return between t and the next toggle (the paper: "DrMG achieves peaks with
               substantially higher return")
`colour` says which key is worth 0.7 after the toggle (0 before the first toggle, then 1, 0, ...).

QR is DrMG({}) (DrMG paper §5.3): `drmg.py --meta-learn none`, the same agent with its initial eta and nothing
meta-learnt. MG starts from DrMG's gamma, lambda and loss weights (0.99 w'); it has no leaky v-trace (alpha = 1).
Before running, the script checks that the agents it launches share their initial eta (`initial_eta`).

Run (matplotlib, from requirements.txt, is imported only for the plot):
    nice -n 10 python benchmark/two_colors.py --seeds 1 2 3          # runs what is missing, then tables and plot
    python benchmark/two_colors.py --no-run                          # tables and plot from the runs already there
    nice -n 10 python benchmark/two_colors.py --algorithms drmg drmg_bmg qr --seeds 1 2 3 4 5 --jobs 2 \
        --out-dir benchmark/results/two_colors_bmg                 # DrMG + BMG (docs/drmg_bmg.md), its own results
"""

import csv
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grid import ROOT, binned, episodic_returns, eta_mismatch, initial_eta, latest_log, run_commands  # noqa: E402

LABELS = {"drmg": "DrMG", "mg": "MG", "qr": "QR", "drmg_bmg": "DrMG + BMG (L=3)", "drmg_bmg1": "DrMG + BMG (L=1)"}
# agent: (script, its own flags). MG's fixed loss weights are DrMG's initial ones, weight_init 0.99 times w'.
AGENTS = {
    "drmg": ("drmg", []),
    "mg": ("mg", ["--value-coef", "0.495", "--policy-coef", "0.99", "--ent-coef", "0.0099"]),
    "qr": ("drmg", ["--meta-learn", "none"]),
    # DrMG + BMG (docs/drmg_bmg.md): its outer loss is a KL to a target bootstrapped L steps past theta'.
    "drmg_bmg": ("drmg", ["--bmg-steps", "3"]),
    "drmg_bmg1": ("drmg", ["--bmg-steps", "1"]),
}


@dataclass
class Args:
    algorithms: List[str] = field(default_factory=lambda: ["drmg", "mg", "qr"])
    """the agents to compare (keys of AGENTS)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per algorithm and seed"""
    total_timesteps: int = 600_000
    """environment steps per run: 6 periods of 1e5, 5 toggles"""
    toggle_period: int = 100_000
    """the key rewards swap every this many environment steps (paper: 1e5); passed as TWO_COLORS_TOGGLE_PERIOD"""
    flags: str = (
        "--local-num-envs 8 --num-actor-threads 1 --num-steps 16 --learning-rate 2e-3 --rmsprop-eps 1e-5 --no-anneal-lr "
        "--log-frequency 100"
    )
    """the hyperparameters shared by every script (the rest are each script's defaults); pass as --flags='...'"""
    meta_flags: str = ""
    """appended for the agents that meta-learn (drmg, mg), e.g. --meta-flags='--meta-learning-rate 1e-2'"""
    runs_dir: str = os.path.join(ROOT, "runs", "two_colors_benchmark")
    """each run works in runs_dir/{algorithm}_seed{seed}; a run whose log reaches total_timesteps is not run again"""
    run: bool = True
    """run what is missing (--no-run: only tables and plot)"""
    jobs: int = 1
    """runs at the same time"""
    bin_steps: int = 5_000
    """episodic returns are averaged in bins of this many environment steps"""
    window: int = 20_000
    """steps before / after a toggle for the `pre` and `dip` measures"""
    first_scored_toggle: int = 200_000
    """toggles before this step fall while the agents are still learning the task: reported, not averaged"""
    recovered_level: float = 1.45
    """`recovery`: a binned return at this level counts as re-adapted (a colour-aware agent gets about 1.6 minus 0.01 per
    extra move, one that goes for the 0.3 key about 1.2)"""
    out_dir: str = os.path.join(ROOT, "benchmark", "results")
    """where the CSVs and the plot go"""


def run_dir_of(args: Args, algorithm: str, seed: int) -> str:
    return os.path.join(args.runs_dir, f"{algorithm}_seed{seed}")


def script_flags(args: Args, algorithm: str) -> tuple[str, list[str]]:
    """(script, flags) of an agent, without seed and budget."""
    script, own = AGENTS[algorithm]
    return script, [*shlex.split(args.flags), *own, *(shlex.split(args.meta_flags) if algorithm != "qr" else [])]


def command(args: Args, algorithm: str, seed: int) -> list[str]:
    script, flags = script_flags(args, algorithm)
    return [
        *["nice", "-n", "10", sys.executable, os.path.join(ROOT, f"{script}.py")],
        *["--env-id", "two_colors_jax", "--seed", str(seed), "--total-timesteps", str(args.total_timesteps)],
        *flags,
    ]


def check_initial_eta(args: Args):
    """The agents launched must start from the same eta (MG without alpha); stop with one line otherwise."""
    etas = {algorithm: initial_eta(*script_flags(args, algorithm)) for algorithm in args.algorithms}
    reference = etas.get("drmg", initial_eta(*script_flags(args, "drmg")))
    mismatch = eta_mismatch(etas, reference, no_alpha=("mg",))  # MG has no leaky v-trace
    if mismatch:
        raise SystemExit(mismatch)
    return etas


def run_missing(args: Args):
    todo = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            steps, _ = episodic_returns(run_dir_of(args, algorithm, seed))
            # a finished run logs its last episodes in the final unroll
            if not len(steps) or steps[-1] < args.total_timesteps - args.bin_steps:
                todo.append((algorithm, seed))
    env = dict(os.environ, TWO_COLORS_TOGGLE_PERIOD=str(args.toggle_period), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    jobs = [(f"{a} seed {s}", command(args, a, s), run_dir_of(args, a, s)) for a, s in todo]
    run_commands(jobs, args.jobs, env)


def eta_movement(work_dir: str, args: Args) -> dict:
    """How fast eta moves in a run, from its meta/ scalars (sigmoids): for gamma, lambda, alpha and the loss weights
    (each divided by its initial value), the path length sum |change| per 1e5 steps and the distance |final - initial|,
    averaged over a vector's per-quantile entries; empty for a run that meta-learns nothing."""
    accumulator = latest_log(work_dir)
    if accumulator is None:
        return {}
    groups = {}
    for tag in accumulator.Tags()["scalars"]:
        parts = tag.split("/")
        if parts[0] == "meta" and parts[1] != "grad_norm":
            groups.setdefault(parts[1], []).append(np.array([e.value for e in accumulator.Scalars(tag)]))
    row = {}
    for name, curves in groups.items():
        curves = np.stack([c / c[0] if name.startswith("w_") else c for c in curves])
        row[f"{name}_path"] = np.mean(np.sum(np.abs(np.diff(curves, axis=1)), axis=1)) * 100_000 / args.total_timesteps
        row[f"{name}_moved"] = np.mean(np.abs(curves[:, -1] - curves[:, 0]))
    return row if any(row[k] != 0 for k in row if k.endswith("_path")) else {}


def toggle_measures(curve: np.ndarray, args: Args) -> list[dict]:
    """The re-adaptation measures of one binned curve at every toggle."""
    rows = []
    bins_per_window, bins_per_period = args.window // args.bin_steps, args.toggle_period // args.bin_steps
    for toggle in range(args.toggle_period, args.total_timesteps, args.toggle_period):
        k = toggle // args.bin_steps
        pre = np.nanmean(curve[k - bins_per_window : k])
        period = curve[k : k + bins_per_period]
        recovered = np.flatnonzero(period >= args.recovered_level)
        rows.append(
            dict(
                toggle=toggle,
                colour=(toggle // args.toggle_period) % 2,
                pre=pre,
                after=np.nanmean(period),
                dip=np.nanmin(period[:bins_per_window]),
                recovery=(recovered[0] + 1) * args.bin_steps if len(recovered) else np.nan,
                peak=np.nanmax(period),
            )
        )
    return rows


def plot(path: str, bins: np.ndarray, curves: dict, args: Args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for algorithm, runs in curves.items():
        runs = np.stack(runs)
        line = ax.plot(bins, np.nanmean(runs, axis=0), label=f"{LABELS.get(algorithm, algorithm)} ({len(runs)} seeds)")[0]
        ax.fill_between(bins, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0), color=line.get_color(), alpha=0.2)
    for toggle in range(args.toggle_period, args.total_timesteps, args.toggle_period):
        ax.axvline(toggle, color="grey", linestyle="--", linewidth=0.8)
    for start in range(0, args.total_timesteps, args.toggle_period):  # which key is worth 0.7 in each period
        colour = (start // args.toggle_period) % 2
        ax.text(start + args.toggle_period / 2, 1.02, f"0.7: key {colour}", transform=ax.get_xaxis_transform(), ha="center")
    ax.axhline(1.5, color="black", linestyle=":", linewidth=0.8, label="1.5: either key, no step penalty")
    ax.set_xlabel("environment steps (dashed: the key rewards swap)")
    ax.set_ylabel(f"episodic return (mean of {args.bin_steps} step bins)")
    ax.set_title("two-colors grid world (DrMG paper, Figure 1): mean over seeds, band min-max", pad=22)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args):
    warnings.simplefilter("ignore", RuntimeWarning)  # means of empty slices (no toggle of a group, a run never recovered)
    for algorithm, eta in check_initial_eta(args).items():
        print(f"{LABELS.get(algorithm, algorithm)} starts from " + ", ".join(f"{k}={v:.6g}" for k, v in eta.items()))
    if args.run:
        run_missing(args)
    os.makedirs(args.out_dir, exist_ok=True)
    bins = (np.arange(args.total_timesteps // args.bin_steps) + 0.5) * args.bin_steps
    curves, toggle_rows = {}, []
    with open(os.path.join(args.out_dir, "two_colors.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algorithm", "seed", "step", "episodic_return"])
        for algorithm in args.algorithms:
            for seed in args.seeds:
                steps, values = episodic_returns(run_dir_of(args, algorithm, seed))
                if not len(steps):
                    print(f"no log for {algorithm} seed {seed}")
                    continue
                curve = binned(steps, values, args.bin_steps, args.total_timesteps)
                curves.setdefault(algorithm, []).append(curve)
                writer.writerows([algorithm, seed, int(b), f"{v:.4f}"] for b, v in zip(bins, curve))
                toggle_rows += [dict(algorithm=algorithm, seed=seed, **row) for row in toggle_measures(curve, args)]
    names = ["pre", "after", "dip", "recovery", "peak"]
    with open(os.path.join(args.out_dir, "two_colors_toggles.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["algorithm", "seed", "toggle", "colour", *names])
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in toggle_rows)
    print(f"toggles at steps >= {args.first_scored_toggle}: mean over toggles and seeds (± std over seeds of per-seed means)")
    width = max([16] + [len(LABELS.get(a, a)) + 14 for a in curves])  # the longest "label to colour 0"
    print(" " * width + "".join(f"{name:>17s}" for name in names))
    for algorithm in curves:
        scored = [r for r in toggle_rows if r["algorithm"] == algorithm and r["toggle"] >= args.first_scored_toggle]
        for group, rows in [("all", scored)] + [(f"to colour {c}", [r for r in scored if r["colour"] == c]) for c in (0, 1)]:
            cells = []
            for name in names:
                # a run that never re-adapts before the next toggle counts as taking the whole period
                values = {
                    s: [
                        args.toggle_period if name == "recovery" and np.isnan(r[name]) else r[name]
                        for r in rows
                        if r["seed"] == s
                    ]
                    for s in args.seeds
                }
                per_seed = [np.nanmean(values[s] or [np.nan]) for s in args.seeds]
                digits = 0 if name == "recovery" else 3
                cells.append(f"{np.nanmean(per_seed):8.{digits}f} ±{np.nanstd(per_seed):7.{digits}f}")
            unrecovered = sum(np.isnan(r["recovery"]) for r in rows)
            label = f"{LABELS.get(algorithm, algorithm)} {group}"
            print(f"{label:{width}s}" + "".join(f"{c:>17s}" for c in cells) + f"  never recovered: {unrecovered}/{len(rows)}")
    movements = {a: [eta_movement(run_dir_of(args, a, seed), args) for seed in args.seeds] for a in args.algorithms}
    movements = {a: rows for a, rows in movements.items() if all(rows)}
    if movements:
        print("how fast eta moves (sigmoids, per-quantile entries averaged, loss weights relative to their initial value):")
        print("path = sum |change| per 1e5 steps, moved = |final - initial|; mean over seeds (± std over seeds)")
        columns = list(next(iter(movements.values()))[0])
        for algorithm, rows in movements.items():
            cells = [f"{k} {np.mean([r[k] for r in rows]):.5f} ±{np.std([r[k] for r in rows]):.5f}" for k in columns]
            print(f"  {LABELS.get(algorithm, algorithm)}: " + ", ".join(cells))
    try:
        path = os.path.join(args.out_dir, "two_colors.png")
        plot(path, bins, curves, args)
        print(f"saved {path}")
    except ImportError:
        print("matplotlib is not installed: no plot (the CSVs are written)")


if __name__ == "__main__":
    main(tyro.cli(Args))
