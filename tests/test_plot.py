"""benchmark/plot.py on logs written here: binned curves per group, per-quantile meta-parameters stacked."""

import csv
import os

import numpy as np
import plot
import pytest
from tensorboardX import SummaryWriter


def write_run(path, returns, gammas=None):
    writer = SummaryWriter(path)
    for step, value in returns:
        writer.add_scalar("charts/episodic_return", value, step)
    for step, entries in gammas or []:
        for q, value in enumerate(entries):
            writer.add_scalar(f"meta/gamma/q{q:02d}", value, step)
        writer.add_scalar("meta/alpha", entries[0] / 2, step)
        writer.add_scalar("meta/grad_norm", 1.0, step)
    writer.close()


def test_curves_and_meta_parameters_of_several_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "Env__drmg__1__100", [(5, 1.0), (15, 3.0), (18, 5.0)], [(10, [0.9, 0.8]), (20, [0.7, 0.6])])
    write_run(runs / "Env__drmg__2__100", [(2, 3.0), (12, 5.0)], [(10, [0.5, 0.4]), (20, [0.3, 0.2])])
    write_run(runs / "Env__qr_impala__1__100", [(1, 0.0), (19, 2.0)])
    out = str(tmp_path / "out" / "plot")
    plot.main(plot.Args(dirs=[str(runs)], out=out, bin_steps=10))
    assert os.path.exists(f"{out}_returns.png") and os.path.exists(f"{out}_meta.png")
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    means = {}
    for row in rows:
        means.setdefault((row["group"], int(row["step"])), []).append(float(row["charts/episodic_return"]))
    # bins [0, 10) and [10, 20): drmg seed 1 has 1.0 and (3 + 5) / 2, seed 2 has 3 and 5; qr 0 and 2
    assert means == {("drmg", 5): [1.0, 3.0], ("drmg", 15): [4.0, 5.0], ("qr_impala", 5): [0.0], ("qr_impala", 15): [2.0]}
    drmg_runs = [plot.read_scalars(str(runs / f"Env__drmg__{s}__100")) for s in (1, 2)]
    meta = plot.meta_parameters(drmg_runs)
    assert set(meta) == {"alpha", "gamma"}  # grad_norm is no meta-parameter
    steps, gamma = meta["gamma"]
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(gamma, [[0.7, 0.5], [0.6, 0.4]])  # [quantile, step], mean over the two runs
    np.testing.assert_allclose(meta["alpha"][1], [[0.35, 0.25]])


def test_labels_must_match_the_directories(tmp_path):
    write_run(tmp_path / "a", [(1, 1.0)])
    with pytest.raises(SystemExit, match="2 labels for 1 directories"):
        plot.main(plot.Args(dirs=[str(tmp_path / "a")], labels=["A", "B"], out=str(tmp_path / "p")))


def test_no_directories_print_the_usage_and_a_run_without_the_tag_says_so(tmp_path):
    with pytest.raises(SystemExit, match="usage: python benchmark/plot.py RUN_DIR_OR_PARENT"):
        plot.main(plot.Args(dirs=[], out=str(tmp_path / "p")))
    write_run(tmp_path / "a", [(1, 1.0)])
    with pytest.raises(SystemExit, match="logged charts/nothing"):
        plot.main(plot.Args(dirs=[str(tmp_path / "a")], tag="charts/nothing", out=str(tmp_path / "p")))
