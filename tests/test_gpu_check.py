"""benchmark/gpu_check.py's CPU rehearsal (--tiny): every part runs and lands in the summary, so that the GPU call is
not its first run; the on-device part keeps what it measured before its cap; the flags are checked before anything is
written; the default call fits its 9 minutes."""

import json
import os
import re
import sys

import gpu_check
import jax
import numpy as np
import pytest


def test_the_tiny_gpu_check_measures_every_part(tmp_path):
    out = tmp_path / "check"
    gpu_check.main(gpu_check.Args(tiny=True, out_dir=str(out)))
    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["jax"] == jax.__version__ and results["versions"]["devices"]
    assert results["envpool_sps"] > 0
    for script in gpu_check.SCRIPTS:
        atari = results["atari"][script]
        assert atari.get("steady_sps", 0) > 0, atari
        assert "stats/learner_update_time" in atari["stats"] and atari["memory_check"].startswith("learner step")
        assert atari["episodes"] > 0 and atari["steps"] > 0 and 0 < atari["minutes"] < 2 and np.isfinite(atari["last_returns"])
        assert list(results["learner"][script]) == ["0"]  # the whole batch only
        step = results["learner"][script]["0"]
        assert step["update_seconds"] > 0 and step["xla_total_gib"] > 0 and step["batch"] == "8 x 4"
    labels = results["atari_plot"]["labels"]
    assert [label.split(":")[0] for label in labels] == ["qr_impala.py", "drmg.py"] and all(" steps in " in label for label in labels)
    # one EnvPool per actor thread is the scripts' default: the overlap part runs the other setting
    overlap = results["overlap"]
    assert overlap["flag"] == "--overlap-envs" and overlap.get("steady_sps", 0) > 0, overlap
    on_device = results["on_device"]
    assert [(r["script"], r["num_seeds"]) for r in on_device["runs"]] == [(s, n) for s in gpu_check.SCRIPTS for n in (1, 2)]
    for r in on_device["runs"]:
        assert r["sps"] > 0 and r["unroll_sps"] > 0 and r["sps_per_seed"] == pytest.approx(r["sps"] / r["num_seeds"])
        assert r["learner_share"] == pytest.approx(1 - r["sps"] / r["unroll_sps"])
    assert "capped" not in on_device and "error" not in on_device
    assert set(results["part_seconds"]) == {
        "versions", "atari/qr_impala", "atari/drmg", "atari_plot", "overlap", "envpool_sps", "on_device",
        "learner/qr_impala/0", "learner/drmg/0",
    }
    summary = (out / "summary.md").read_text()
    for line in [
        "| qr_impala.py | 8 x 4 | ",  # the learner table
        "| --overlap-envs | ",
        "| drmg.py | 2 | ",  # the on-device table
        f"Goals (issue): {gpu_check.GOALS['atari']} (here: drmg.py / qr_impala.py = ",
        f"Goal (issue): {gpu_check.GOALS['on_device']} (here: not measured).",
        "Return curves: atari_returns.png",
    ]:
        assert line in summary, line
    assert re.search(r"\n\| drmg\.py \| [\d,]+ \| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d,]+ \| [\d,]+ \| [\d.]+ \|\n", summary), summary
    assert "n/a GiB | " in summary and "Failed:" not in summary  # no peak memory on CPU
    assert (out / "atari_returns.png").exists() and (out / "on_device_sps.json").exists()
    assert not (out / "partial").exists() and not (out / "gpu_check.lock").exists()  # the run's files moved into --out-dir


def test_a_failing_part_is_recorded_and_the_others_go_on(tmp_path):
    results = {}
    gpu_check.part(results, str(tmp_path), ("learner", "drmg"), lambda: 1 / 0)
    gpu_check.part(results, str(tmp_path), ("learner", "qr_impala"), lambda: dict(update_seconds=0.5))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["learner"]["drmg"] == {"error": "ZeroDivisionError: division by zero"}
    assert saved["learner"]["qr_impala"] == {"update_seconds": 0.5}
    assert set(saved["part_seconds"]) == {"learner/drmg", "learner/qr_impala"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # written atomically: no temporary file left


# on_device_sps.py's stand-in: writes its --out after each of its measurements ($FAKE_MEASURED, e.g.
# "qr_impala:1,qr_impala:8"), 0.2 s apart; then exits with $FAKE_EXIT if set, else sleeps on past the cap.
FAKE_ON_DEVICE = r"""
import json, os, sys, time
path = sys.argv[sys.argv.index("--out") + 1]
results = []
for item in os.environ["FAKE_MEASURED"].split(","):
    script, seeds = item.split(":")
    n = int(seeds)
    results.append(dict(script=script, env_id="Breakout-MinAtar", num_seeds=n, sps=1000.0 * n, unroll_sps=4000.0 * n, learner_share=0.75))
    with open(path + ".tmp", "w") as f:
        json.dump(dict(device="cpu fake", results=results), f)
    os.replace(path + ".tmp", path)
    time.sleep(0.2)
if os.environ.get("FAKE_EXIT"):
    print("measured what it could", flush=True)
    sys.exit(int(os.environ["FAKE_EXIT"]))
time.sleep(60)
"""


def fake_on_device(tmp_path, monkeypatch, measured: str, **env):
    """gpu_check.on_device (--minatar-seeds 1 8, --minatar-seconds 3) with the stand-in: (its result, results.json as
    the part left it)."""
    script = tmp_path / "fake_on_device.py"
    script.write_text(FAKE_ON_DEVICE)
    monkeypatch.setattr(gpu_check, "on_device_command", lambda args, path: [sys.executable, str(script), "--out", path])
    for key, value in dict(FAKE_MEASURED=measured, **env).items():  # the children's environment
        monkeypatch.setitem(gpu_check.USER_ENV, key, value)
    out, cwd = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    cwd.mkdir()
    args = gpu_check.Args(out_dir=str(out), minatar_seeds=[1, 8], minatar_seconds=3.0)
    found = gpu_check.on_device(args, str(cwd), str(out), dict(versions={}))
    saved = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return found, saved


def test_the_on_device_part_keeps_what_it_measured_before_its_cap(tmp_path, monkeypatch, capsys):
    found, saved = fake_on_device(tmp_path, monkeypatch, "qr_impala:1,qr_impala:8")
    assert [(r["script"], r["num_seeds"], r["sps_per_seed"]) for r in found["runs"]] == [("qr_impala", 1, 1000.0), ("qr_impala", 8, 1000.0)]
    assert found["capped"] == "stopped at --minatar-seconds 3; not measured: drmg.py x 1, drmg.py x 8"
    assert 3 <= found["seconds"] < 15 and "error" not in found and found["device"] == "cpu fake"
    assert saved["on_device"]["runs"] == found["runs"]  # results.json had them before the part ended
    assert "--minatar-seconds 3 reached: stopped on_device_sps.py (PID" in capsys.readouterr().err
    assert not gpu_check.CHILDREN.running
    summary = gpu_check.summary(dict(on_device=found), gpu_check.Args(minatar_seconds=3.0), "cmd")
    assert "| qr_impala.py | 8 | 8,000 | 1,000 | 32,000 | 75% |" in summary
    assert "Capped: stopped at --minatar-seconds 3; not measured: drmg.py x 1, drmg.py x 8." in summary


def test_an_on_device_part_that_fails_is_named_with_what_it_measured(tmp_path, monkeypatch):
    found, _ = fake_on_device(tmp_path, monkeypatch, "qr_impala:1", FAKE_EXIT="1")
    assert found["error"] == "on_device_sps.py exit 1: measured what it could" and "capped" not in found
    assert [(r["script"], r["num_seeds"]) for r in found["runs"]] == [("qr_impala", 1)]


def test_the_checks_flags_are_refused_in_one_line_before_anything_is_written(tmp_path):
    check = dict(out_dir=str(tmp_path / "check"))
    for kwargs, message in [
        (dict(atari_seconds=0.0), "--atari-seconds 0.0: must be positive and at most 86,400"),
        (dict(atari_seconds=float("nan")), "--atari-seconds nan"),
        (dict(overlap_seconds=-1.0), "--overlap-seconds -1.0: must be >= 0"),
        (dict(overlap_seconds=float("inf")), "--overlap-seconds inf: must be >= 0 and at most 86,400"),
        (dict(minatar_seconds=-5.0), "--minatar-seconds -5.0: must be >= 0"),
        (dict(minatar_seeds=[0, 8]), r"--minatar-seeds 0 8: each in \[1, 256\], none twice"),
        (dict(minatar_seeds=[-1]), r"--minatar-seeds -1: each in \[1, 256\]"),
        (dict(minatar_seeds=[1, 257]), r"--minatar-seeds 1 257: each in \[1, 256\]"),
        (dict(minatar_seeds=[8, 8]), r"--minatar-seeds 8 8: each in \[1, 256\], none twice"),
        (dict(update_repeats=0), r"--update-repeats 0: must lie in \[1, 10000\]"),
    ]:
        with pytest.raises(SystemExit, match=message) as stop:
            gpu_check.main(gpu_check.Args(**(check | kwargs)))
        assert isinstance(stop.value.code, str) and "\n" not in stop.value.code, stop.value.code
        assert not os.listdir(tmp_path), f"{kwargs} wrote {os.listdir(tmp_path)}"
    gpu_check.check_args(gpu_check.Args(**check, minatar_seeds=[], overlap_seconds=0.0, minatar_seconds=0.0))  # skips


def test_the_default_check_fits_nine_minutes_on_a_gpu_as_its_docstring_says():
    args = gpu_check.Args()
    assert (args.atari_seconds, args.overlap_seconds, args.random_seconds) == (120.0, 45.0, 15.0)
    assert (args.minatar_seeds, args.minatar_seconds, args.update_repeats) == ([1, 8, 32], 150.0, 3)
    total = gpu_check.estimated_seconds(args)
    assert total <= 9 * 60
    assert f"= {total:.0f} s, {total / 60:.1f} minutes" in " ".join(gpu_check.__doc__.split())
    # a skipped part costs nothing
    assert gpu_check.estimated_seconds(gpu_check.Args(overlap_seconds=0.0, minatar_seeds=[])) == total - 45 - 5 - 150 - 5
