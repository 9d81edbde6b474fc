"""Learning curves and meta-parameter trajectories from TensorBoard logs of several runs (seeds) of several scripts.

Each run directory (or any directory above run directories: they are found by their event files) is grouped by its
experiment name, `runs/{env_id}__{exp_name}__{seed}__{time}` (or by --labels, one per directory given). Writes
    {out}_returns.png   --tag (charts/episodic_return) in --bin-steps bins: mean over a group's runs, band min-max
    {out}_meta.png      every meta-parameter that moves, of every group, mean over its runs: a scalar as a line; one
                        with an entry per quantile or head (drmg.py's meta/gamma/q00..q31, stacx.py's per-head eta)
                        as a heat map, entry against step
    {out}.csv           the binned curves: group, run, step, value

    python benchmark/plot.py runs/two_colors_benchmark --out benchmark/results/two_colors_plot
    python benchmark/plot.py runs/a runs/b --labels DrMG QR --out plots/breakout
"""

import csv
import glob
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Args:
    dirs: tyro.conf.Positional[List[str]]
    """run directories, or directories that hold run directories"""
    labels: Optional[List[str]] = None
    """one label per directory given (default: each run's exp_name)"""
    out: str = "plot"
    """output path prefix"""
    tag: str = "charts/episodic_return"
    """the scalar of the learning curves"""
    bin_steps: Optional[int] = None
    """bin width in global steps, at least 1 (default: 100 bins over the longest run)"""


def run_dirs(path: str) -> List[str]:
    """The directories under `path` (itself included) that hold TensorBoard event files."""
    files = glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})


def read_scalars(run_dir: str) -> dict:
    """{tag: (steps, values)} of every scalar of a run, sorted by step (a resumed run's event files together)."""
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        events = sorted(accumulator.Scalars(tag), key=lambda e: e.step)
        scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return scalars


def group_of(run_dir: str) -> str:
    parts = os.path.basename(run_dir).split("__")
    return parts[1] if len(parts) == 4 else os.path.basename(run_dir)


def binned(steps: np.ndarray, values: np.ndarray, bin_steps: int, num_bins: int) -> np.ndarray:
    """Mean of the values logged in each bin [k bin_steps, (k + 1) bin_steps); NaN where none was."""
    index = np.minimum(steps // bin_steps, num_bins - 1).astype(int)
    sums, counts = np.zeros(num_bins), np.zeros(num_bins)
    np.add.at(sums, index, values)
    np.add.at(counts, index, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def meta_parameters(runs: List[dict]) -> dict:
    """{name: (steps, [entries, steps] mean over runs)}: meta/x/qNN and meta/x/hK entries stacked, scalars as one entry."""
    names = defaultdict(set)
    for scalars in runs:
        for tag in scalars:
            match = re.fullmatch(r"meta/([^/]+)(?:/([qh])(\d+))?", tag)  # per quantile (drmg.py) or per head (stacx.py)
            if match and match.group(1) != "grad_norm":
                names[match.group(1)].add((match.group(2), int(match.group(3))) if match.group(2) else ("", -1))
    result = {}
    for name, entries in sorted(names.items()):
        tags = [f"meta/{name}" if e < 0 else f"meta/{name}/q{e:02d}" if kind == "q" else f"meta/{name}/h{e}" for kind, e in sorted(entries)]
        present = [scalars for scalars in runs if all(t in scalars for t in tags)]
        length = min(len(scalars[tags[0]][0]) for scalars in present)
        steps = present[0][tags[0]][0][:length]
        values = np.mean([[scalars[t][1][:length] for t in tags] for scalars in present], axis=0)
        result[name] = (steps, values)
    return result


def check_args(args: Args):
    """The flags, before anything is read or written: one line naming the flag at fault."""
    if not args.dirs:
        raise SystemExit("usage: python benchmark/plot.py RUN_DIR_OR_PARENT [...] [--labels ...] [--out PREFIX] (--help)")
    if args.labels is not None and len(args.labels) != len(args.dirs):
        raise SystemExit(f"--labels: {len(args.labels)} labels for {len(args.dirs)} directories")
    if args.bin_steps is not None and not 1 <= args.bin_steps <= 10**15:
        raise SystemExit(
            f"--bin-steps {args.bin_steps}: a bin is at least 1 step and at most 10^15 (leave it out for 100 bins over the "
            "longest run)"
        )
    if not args.tag.strip():
        raise SystemExit("--tag: give a scalar's tag, e.g. charts/episodic_return")
    if not args.out.strip():
        raise SystemExit(f"--out {args.out!r}: give an output path prefix, e.g. plots/breakout")


def main(args: Args):
    check_args(args)
    groups = defaultdict(dict)  # label: {run directory: scalars}
    for i, path in enumerate(args.dirs):
        found = run_dirs(path)
        if not found:
            raise SystemExit(f"{path}: no TensorBoard event files under it")
        for run_dir in found:
            groups[args.labels[i] if args.labels else group_of(run_dir)][run_dir] = read_scalars(run_dir)
    logged = [s[args.tag][0].max() for runs in groups.values() for s in runs.values() if args.tag in s]
    if not logged:
        raise SystemExit(f"no run under {args.dirs} logged {args.tag}")
    last = max(logged)
    bin_steps = args.bin_steps or max(1, int(np.ceil((last + 1) / 100)))
    num_bins = int(last // bin_steps) + 1
    centres = (np.arange(num_bins) + 0.5) * bin_steps

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "run", "step", args.tag])
        for label, runs in groups.items():
            curves = []
            for run_dir, scalars in runs.items():
                if args.tag in scalars:
                    curves.append(binned(*scalars[args.tag], bin_steps, num_bins))
                    writer.writerows([label, run_dir, int(c), f"{v:.5g}"] for c, v in zip(centres, curves[-1]))
            if curves:
                curves = np.stack(curves)
                with np.errstate(invalid="ignore"):
                    line = ax.plot(centres, np.nanmean(curves, axis=0), label=f"{label} ({len(curves)} runs)")[0]
                    ax.fill_between(centres, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("global step")
    ax.set_ylabel(f"{args.tag} (mean of {bin_steps}-step bins)")
    ax.set_title("mean over runs, band min-max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}_returns.png", dpi=120)
    print(f"saved {args.out}_returns.png and {args.out}.csv")

    panels = [(label, name, m) for label, runs in groups.items() for name, m in meta_parameters(list(runs.values())).items()]
    panels = [p for p in panels if np.ptp(p[2][1]) > 0]  # what never moved (--meta-learn none, QR) is left out
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), squeeze=False)
    for ax, (label, name, (steps, values)) in zip(axes[:, 0], panels):
        if len(values) == 1:
            ax.plot(steps, values[0])
            ax.set_ylabel(name)
        else:
            image = ax.imshow(
                values,
                aspect="auto",
                origin="lower",
                interpolation="nearest",
                extent=(steps[0], steps[-1], -0.5, len(values) - 0.5),
            )
            fig.colorbar(image, ax=ax, label=name)
            ax.set_ylabel("quantile / head")
        ax.set_title(f"{label}: {name}", fontsize=9)
    axes[-1, 0].set_xlabel("global step")
    fig.tight_layout()
    fig.savefig(f"{args.out}_meta.png", dpi=110)
    print(f"saved {args.out}_meta.png ({len(panels)} meta-parameters)")


if __name__ == "__main__":
    main(tyro.cli(Args))
