"""Settings of one agent side by side: several grids of `benchmark/minatar.py` (one --out-dir per setting, each run with
its own --flags) read back into one table and one plot per game.

For each grid and game: the mean final return over its seeds (the mean of the last 10% of each run's episodes), each
seed's, the mean return in the bins that end at 2M and 5M steps, and the PPO-normalised score (0: random, 1: gymnax's
PPO at 10M steps; random.json of the grid) and, for a meta agent, where each meta-parameter started and ended (the
mean over seeds and over a vector's entries: a setting at which eta barely moves is its fixed-eta twin in all but
noise; '-' for a fixed-eta agent). The table goes to {out}.md, the curves (mean over seeds, band min-max) to
{out}.png.

    python benchmark/minatar_sweep.py benchmark/results/minatar_defaults/{rmsprop_lr2e-3,adam_lr5e-4,adam_lr1e-3} \\
        --out benchmark/results/minatar_defaults/sweep
"""

import glob
import os
import sys
import warnings
from dataclasses import dataclass
from typing import List

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minatar import LABELS, PPO_10M, TWINS, Damaged, load, load_result  # noqa: E402

GAMES = ["Breakout-MinAtar", "SpaceInvaders-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar"]  # the table's order


@dataclass
class Args:
    grids: tyro.conf.Positional[List[str]]
    """the --out-dir of each grid, one setting each"""
    agent: str = "qr"
    """the agent whose runs are compared (a key of benchmark/minatar.py's AGENTS)"""
    out: str = "sweep"
    """the table goes to {out}.md, the plot to {out}.png"""


def grid_runs(grid: str, agent: str) -> dict:
    """{(game, seed): result} of the agent's readable results in a grid (a damaged one is named and left out)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(grid, agent, "*_seed*.json"))):
        game, seed = os.path.basename(path)[: -len(".json")].rsplit("_seed", 1)
        try:
            runs[game, int(seed)] = load_result(path, agent, game, int(seed))
        except Damaged as error:
            print(error, file=sys.stderr)
    return runs


def at_step(result: dict, step: int) -> float:
    """The mean return in the bin that ends at `step` (nan past the run)."""
    index = step // result["bin_steps"] - 1
    value = result["curve"][index] if 0 <= index < len(result["curve"]) else None
    return float("nan") if value is None else value


def moved(results: list) -> str:
    """'name initial -> final' of each meta-parameter, means over the runs that logged it ('-' if none did)."""
    names = sorted({name for r in results for name in r["meta"]})
    parts = []
    for name in names:
        pairs = [(r["meta"][name]["initial"], r["meta"][name]["final"]) for r in results if name in r["meta"]]
        start, end = np.mean(pairs, 0)
        parts.append(f"{name} {start:.4g} -> {end:.4g}")
    return ", ".join(parts) or "-"


def table(args: Args, grids: dict) -> str:
    games = sorted({game for runs in grids.values() for game, _ in runs}, key=GAMES.index)
    lines = [
        f"# {LABELS.get(args.agent, args.agent)}: settings side by side",
        "",
        "Final return: the mean of the last 10% of a run's episodes; mean over seeds (each seed's in brackets); the mean",
        "return in the 50k-step bins ending at 2M and 5M steps; score: (final - random) / (PPO at 10M - random); eta:",
        "each meta-parameter at the start -> at the end (mean over seeds and a vector's entries).",
        "",
        "| setting (--flags) | game | final | seeds | 2M | 5M | score | steps | eta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for grid, runs in grids.items():
        random = load(os.path.join(grid, "random.json")) if os.path.exists(os.path.join(grid, "random.json")) else {}
        for game in games:
            results = [r for (g, _), r in sorted(runs.items()) if g == game]
            if not results:
                continue
            final = np.mean([r["final_return"] for r in results])
            seeds = ", ".join(f"{r['final_return']:.2f}" for r in results)
            two, five = (np.nanmean([at_step(r, s) for r in results]) for s in (2_000_000, 5_000_000))
            base = random.get(game, {}).get("mean_return", float("nan"))
            score = (final - base) / (PPO_10M[game] - base)
            flags = results[0]["flags"] or "(the defaults)"
            steps = f"{results[0]['total_timesteps']:,}"
            lines.append(
                f"| {os.path.basename(grid)} (`{flags}`) | {game} | {final:.2f} | {seeds} | {two:.2f} | {five:.2f} | "
                f"{score:.2f} | {steps} | {'-' if args.agent in TWINS.values() else moved(results)} |"
            )
    return "\n".join(lines) + "\n"


def plot(args: Args, grids: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = sorted({game for runs in grids.values() for game, _ in runs}, key=GAMES.index)
    fig, axes = plt.subplots(1, len(games), figsize=(5 * len(games), 3.8), squeeze=False)
    for ax, game in zip(axes[0], games):
        for grid, runs in grids.items():
            results = [r for (g, _), r in sorted(runs.items()) if g == game]
            if not results:
                continue
            length = min(len(r["curve"]) for r in results)
            curves = np.array([[np.nan if v is None else v for v in r["curve"][:length]] for r in results], float)
            centres = (np.arange(length) + 0.5) * results[0]["bin_steps"]
            with np.errstate(invalid="ignore"):
                line = ax.plot(centres, np.nanmean(curves, 0), label=f"{os.path.basename(grid)} ({len(results)})")[0]
                ax.fill_between(centres, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
        ax.axhline(PPO_10M[game], color="grey", linestyle="--", linewidth=1, label="PPO, gymnax, 10M")
        ax.set_title(game, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episodic return")
        ax.legend(fontsize=7)
    fig.suptitle(f"{LABELS.get(args.agent, args.agent)} on MinAtar: mean over seeds, band min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    plt.close(fig)


def main(args: Args):
    warnings.simplefilter("ignore", RuntimeWarning)  # a bin where no seed's episode ended (Freeway's) is a gap
    missing = [g for g in args.grids if not os.path.isdir(g)]
    if missing:
        raise SystemExit(f"not a directory: {missing[0]}")
    grids = {grid.rstrip(os.sep): grid_runs(grid, args.agent) for grid in args.grids}
    if not any(grids.values()):
        raise SystemExit(f"no results of agent {args.agent!r} in {args.grids}")
    text = table(args, grids)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    plot(args, grids)
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
