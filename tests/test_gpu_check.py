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
    summary = (out / "summary.md").read_text()
    assert "| qr_impala.py | " in summary and "| drmg.py | " in summary and "n/a / n/a GiB |" in summary  # no peak memory on CPU
    assert (out / "drmg_returns.png").exists()
