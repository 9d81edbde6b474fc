"""benchmark/minatar.py on a tiny grid: it runs what has no results, keeps them, skips them when run again, summarises
them (rliable's IQM, the plots), and refuses a grid whose agents do not start from DrMG's eta."""

import json
import os

import minatar
import numpy as np
import pytest
from grid import eta_mismatch, initial_eta

TINY = "--local-num-envs 4 --num-actor-threads 1 --num-steps 8 --log-frequency 1"


def tiny_grid(tmp_path, **kwargs):
    return minatar.Args(
        **dict(
            agents=["qr", "drmg"],
            games=["Breakout-MinAtar"],
            seeds=[1],
            total_timesteps=640,
            flags=TINY,
            bin_steps=64,
            out_dir=str(tmp_path / "results"),
            runs_dir=str(tmp_path / "runs"),
            bootstrap_reps=200,
            random_moves=300,
        )
        | kwargs
    )


def test_tiny_grid_writes_its_results_skips_them_when_run_again_and_summarises(tmp_path, capsys):
    args = tiny_grid(tmp_path)
    minatar.main(args)
    paths = {agent: tmp_path / "results" / agent / "Breakout-MinAtar_seed1.json" for agent in args.agents}
    results = {agent: json.loads(path.read_text()) for agent, path in paths.items()}
    for agent, result in results.items():
        assert result["command"].startswith("python drmg.py --env-id Breakout-MinAtar --local-num-envs 4")
        assert result["last_step"] <= 640 and result["episodes"] > 0
        assert len(result["curve"]) == 640 // 64 and np.isfinite(result["final_return"])
    # QR learns nothing: its meta-parameters stay at DrMG's initial values; DrMG's move
    assert results["qr"]["meta"]["gamma"]["initial"] == results["qr"]["meta"]["gamma"]["final"]
    assert results["drmg"]["meta"]["gamma"]["initial"] != results["drmg"]["meta"]["gamma"]["final"]
    np.testing.assert_allclose(results["drmg"]["meta"]["w_pi"]["initial"], 0.99, rtol=1e-3)
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| Breakout-MinAtar |" in summary and "| QR | " in summary and "| DrMG | " in summary
    assert all(os.path.exists(tmp_path / "results" / name) for name in ["Breakout-MinAtar.png", "minatar.png", "random.json"])
    # the mean of the last 10% of episodes, read back from the run's own log
    steps, returns = minatar.episodic_returns(str(tmp_path / "runs" / "drmg" / "Breakout-MinAtar_seed1"))
    assert results["drmg"]["final_return"] == pytest.approx(np.mean(returns[-max(1, len(returns) // 10) :]))
    mtimes = {agent: os.path.getmtime(path) for agent, path in paths.items()}
    capsys.readouterr()
    minatar.main(args)
    assert "0 runs to do" in capsys.readouterr().out
    assert {agent: os.path.getmtime(path) for agent, path in paths.items()} == mtimes
    with pytest.raises(SystemExit, match="use another --out-dir"):
        minatar.main(tiny_grid(tmp_path, flags=TINY + " --learning-rate 1e-3"))
    # an ablation's summary goes beside the table's, not over it
    table = (tmp_path / "results" / "summary.md").read_text()
    minatar.summarise(tiny_grid(tmp_path, agents=["drmg", "drmg_eta1"]))  # drmg_eta1 has no result: a "–" cell
    assert (tmp_path / "results" / "summary.md").read_text() == table
    ablation = (tmp_path / "results" / "ablations_summary.md").read_text()
    assert "| DrMG | DrMG(eta1) |" in ablation and os.path.exists(tmp_path / "results" / "ablations_Breakout-MinAtar.png")


def test_iqm_and_its_interval_are_rliables_over_runs_and_games():
    scores = {"a": np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])}
    iqm, low, high = minatar.iqm_with_ci(scores, reps=500)["a"]
    assert iqm == pytest.approx(3.5)  # the middle half of the 8 scores: 2, 3, 4, 5
    assert low < iqm < high


def test_the_grid_refuses_agents_that_do_not_start_from_drmgs_eta(tmp_path, monkeypatch):
    monkeypatch.setitem(minatar.AGENTS, "mg", ("mg", ["--gamma", "0.95"]))
    with pytest.raises(SystemExit, match="Breakout-MinAtar: mg does not start from DrMG's eta: gamma 0.95"):
        minatar.main(tiny_grid(tmp_path, agents=["drmg", "mg"]))
    assert not os.path.exists(tmp_path / "runs")
    # STACX with its own loss weights (g'_v = 0.25) would not match DrMG's: the grid passes DrMG's w' to it
    drmg = initial_eta("drmg", ["--env-id", "Breakout-MinAtar"])
    assert "w_value 0.2475" in eta_mismatch({"stacx": initial_eta("stacx", ["--env-id", "Breakout-MinAtar"])}, drmg)
    assert eta_mismatch({"stacx": initial_eta(*minatar.agent_flags(tiny_grid(tmp_path), "stacx", "Breakout-MinAtar"))}, drmg) == ""


def test_bad_grid_flags_are_refused_in_one_line(tmp_path):
    for kwargs, message in [
        (dict(agents=["dqn"]), "--agents: unknown"),
        (dict(games=["Seaquest-MinAtar"]), "--games: unknown"),
        (dict(seeds=[1, 1]), "--seeds"),
        (dict(jobs=0), "must be positive"),
    ]:
        with pytest.raises(SystemExit, match=message):
            minatar.main(tiny_grid(tmp_path, **kwargs))
    assert not os.path.exists(tmp_path / "runs")
