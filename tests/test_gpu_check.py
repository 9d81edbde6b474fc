"""benchmark/gpu_check.py's CPU rehearsal (--tiny): every part runs and lands in the summary, so that the GPU call is
not its first run."""

import json

import gpu_check
import jax


def test_the_tiny_gpu_check_measures_every_part(tmp_path):
    out = tmp_path / "check"
    gpu_check.main(gpu_check.Args(tiny=True, out_dir=str(out)))
    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["jax"] == jax.__version__ and results["versions"]["devices"]
    assert results["envpool_sps"] > 0
    for script in gpu_check.SCRIPTS:
        training = results["training"][script]
        assert training.get("steady_sps", 0) > 0, training
        assert "stats/learner_update_time" in training["stats"] and training["memory_check"].startswith("learner step")
        for chunk in ("16", "0"):
            step = results["learner"][script][chunk]
            assert step["update_seconds"] > 0 and step["xla_total_gib"] > 0 and step["batch"] == "8 x 4"
    assert results["minatar"]["minatar"].get("steady_sps", 0) > 0 and results["minatar"]["minatar"]["episodes"] > 0
    summary = (out / "summary.md").read_text()
    assert "| qr_impala.py | " in summary and "| drmg.py | " in summary and "n/a / n/a GiB |" in summary  # no peak memory on CPU
    assert (out / "drmg_returns.png").exists() and "| --network minatar | " in summary and "Failed:" not in summary
    assert not (out / "partial").exists() and not (out / "gpu_check.lock").exists()  # the run's files moved into --out-dir


def test_a_failing_part_is_recorded_and_the_others_go_on(tmp_path):
    results = {}
    gpu_check.part(results, str(tmp_path), ("learner", "drmg"), lambda: 1 / 0)
    gpu_check.part(results, str(tmp_path), ("learner", "qr_impala"), lambda: dict(update_seconds=0.5))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["learner"]["drmg"] == {"error": "ZeroDivisionError: division by zero"}
    assert saved["learner"]["qr_impala"] == {"update_seconds": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # written atomically: no temporary file left
