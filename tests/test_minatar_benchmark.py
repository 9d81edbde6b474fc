"""benchmark/minatar.py on a tiny grid: it runs what has no results, keeps them, skips them when run again, summarises
them (rliable's IQM and probability of improvement, the sample std, the plots), gives each meta agent a control that
differs only by --meta-learn none, and refuses a grid whose agents do not start from DrMG's eta."""

import glob
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


def hand_improvement(x, y) -> float:
    """P(X > Y) by hand: on each game, 1 for each pair of runs where x's is higher, 1/2 where equal; mean over the
    pairs, then over the games."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    per_game = []
    for game in range(x.shape[1]):
        total = 0.0
        for a in x[:, game]:
            for b in y[:, game]:
                total += 1.0 if a > b else 0.5 if a == b else 0.0
        per_game.append(total / (len(x) * len(y)))
    return float(np.mean(per_game))


def test_the_probability_of_improvement_is_the_share_of_better_pairs_per_game_averaged_over_games():
    from rliable import metrics

    x, y = [[1.0], [2.0], [3.0]], [[0.0], [2.0], [4.0]]  # 1 > 0; 2 > 0, 2 = 2 (half); 3 > 0, 3 > 2: 4.5 of 9 pairs
    point, low, high = minatar.probability_of_improvement(np.array(x), np.array(y), reps=300)
    assert point == pytest.approx(hand_improvement(x, y)) == pytest.approx(4.5 / 9)
    assert 0 <= low <= point <= high <= 1
    # two games: the mean of each game's share (0.5 and 0.25), not the share of pairs pooled over games (7 of 16)
    x, y = [[1.0, 10.0], [2.0, 20.0]], [[0.0, 15.0], [3.0, 25.0]]
    point, low, high = minatar.probability_of_improvement(np.array(x), np.array(y), reps=300)
    assert point == pytest.approx(hand_improvement(x, y)) == pytest.approx(0.375)
    assert point == pytest.approx(metrics.probability_of_improvement(np.array(x), np.array(y)))
    # rliable's own metric on runs with ties, and a resampled interval that cannot leave [1, 1] when X always wins
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, (3, 4)).astype(float), rng.integers(0, 4, (5, 4)).astype(float)
        assert minatar.improvement(x, y)[0] == pytest.approx(metrics.probability_of_improvement(x, y))
        assert minatar.improvement(x, y)[0] == pytest.approx(hand_improvement(x, y))
    assert minatar.probability_of_improvement(np.ones((3, 2)), np.zeros((3, 2)), reps=100) == (1.0, 1.0, 1.0)
    # a fixed random state, and numpy's global one given back as it was
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    x, y = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    assert minatar.probability_of_improvement(x, y, reps=300) == minatar.probability_of_improvement(x, y, reps=300)
    assert minatar.iqm_with_ci({"a": x}, reps=300) == minatar.iqm_with_ci({"a": x}, reps=300)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def faked_grid(tmp_path, returns: dict, **kwargs) -> minatar.Args:
    """A grid whose results are written as a run leaves them, without training: returns {(agent, game, seed): final
    return}; a random policy's return 0 on every game."""
    args = tiny_grid(tmp_path, **kwargs)
    for (agent, game, seed), value in returns.items():
        result = dict(
            agent=agent, game=game, seed=seed, command=minatar.shown_command(minatar.run_command(args, agent, game, seed)),
            flags=args.flags, total_timesteps=args.total_timesteps, last_step=args.total_timesteps, episodes=10,
            final_return=float(value), wall_seconds=1.0, sps=1.0, bin_steps=args.bin_steps, curve=[float(value)] * 10, meta={},
        )
        minatar.write_json(minatar.result_path(args, agent, game, seed), result)
    minatar.write_json(os.path.join(args.out_dir, "random.json"), {g: dict(mean_return=0.0) for g in minatar.PPO_10M})
    return args


GAMES = ["Breakout-MinAtar", "SpaceInvaders-MinAtar"]


def improvement_rows(summary: str) -> list:
    """The rows of the summary's probability-of-improvement table (with intervals; not those of each game alone)."""
    return [line for line in summary.splitlines() if line.startswith("| ") and " over " in line and " | [" in line]


def test_the_summary_has_the_probability_of_improvement_of_the_pairs_in_the_grid_and_no_other(tmp_path):
    rng = np.random.default_rng(1)
    returns = {(a, g, s): float(rng.integers(0, 30)) for a in minatar.TABLE for g in GAMES for s in (1, 2, 3)}
    args = faked_grid(tmp_path, returns, agents=minatar.TABLE, games=GAMES, seeds=[1, 2, 3])
    summary = minatar.summarise(args)
    assert summary == minatar.summarise(args)  # deterministic
    assert "| X over Y | P(X > Y) | 95% CI |" in summary
    rows = improvement_rows(summary)
    assert [row.split(" | ")[0] for row in rows] == [
        "| DrMG over QR", "| MG over MG({})", "| STACX over STACX({})", "| DrMG over MG", "| DrMG over STACX",
    ]
    scores = {a: np.array([[returns[a, g, s] / minatar.PPO_10M[g] for g in GAMES] for s in (1, 2, 3)]) for a in minatar.TABLE}
    point, low, high = minatar.probability_of_improvement(scores["mg"], scores["mg_fixed"], args.bootstrap_reps)
    assert f"| MG over MG({{}}) | {point:.3f} | [{low:.3f}, {high:.3f}] |" in rows
    assert point == pytest.approx(hand_improvement(scores["mg"], scores["mg_fixed"]))
    # and on each game alone, the share of better pairs of seeds, without interval
    assert "| X over Y | Breakout-MinAtar | SpaceInvaders-MinAtar |" in summary
    per_game = [hand_improvement(scores["mg"][:, [j]], scores["mg_fixed"][:, [j]]) for j in range(2)]
    assert f"| MG over MG({{}}) | {per_game[0]:.3f} | {per_game[1]:.3f} |" in summary
    assert np.mean(per_game) == pytest.approx(point)
    # an ablation grid: DrMG over MG and over DrMG(eta1), nothing of the agents it lacks
    returns = {(a, g, s): float(rng.integers(0, 30)) for a in ("drmg", "mg", "drmg_eta1") for g in GAMES for s in (1, 2, 3)}
    summary = minatar.summarise(faked_grid(tmp_path, returns, agents=["drmg", "mg", "drmg_eta1"], games=GAMES, seeds=[1, 2, 3]))
    assert [row.split(" | ")[0] for row in improvement_rows(summary)] == ["| DrMG over MG", "| DrMG over DrMG(eta1)"]
    # over the complete games only: with a seed missing on SpaceInvaders, Breakout alone
    returns.pop(("mg", "SpaceInvaders-MinAtar", 3))
    os.remove(minatar.result_path(args, "mg", "SpaceInvaders-MinAtar", 3))
    args = tiny_grid(tmp_path, agents=["drmg", "mg"], games=GAMES, seeds=[1, 2, 3])
    scores = {a: np.array([[returns[a, "Breakout-MinAtar", s] / 28.0] for s in (1, 2, 3)]) for a in ("drmg", "mg")}
    point, low, high = minatar.probability_of_improvement(scores["drmg"], scores["mg"], args.bootstrap_reps)
    assert f"| DrMG over MG | {point:.3f} | [{low:.3f}, {high:.3f}] |" in minatar.summarise(args)


def test_the_per_game_std_is_the_sample_std_over_seeds(tmp_path):
    returns = {("qr", "Breakout-MinAtar", s): v for s, v in [(1, 1.0), (2, 2.0), (3, 4.0)]} | {("drmg", "Breakout-MinAtar", 1): 5.0}
    summary = minatar.summarise(faked_grid(tmp_path, returns, seeds=[1, 2, 3]))
    assert np.std([1.0, 2.0, 4.0], ddof=1) == pytest.approx(1.5275, abs=1e-4)  # ddof = 0: 1.2472
    assert "mean ± sample std (ddof = 1)" in summary
    assert "| Breakout-MinAtar | 2.33 ± 1.53 (3) | 5.00 ± – (1) |" in summary
    assert "- Breakout-MinAtar: QR 1.00, 2.00, 4.00 (seeds 1, 2, 3); DrMG 5.00 (seeds 1)\n" in summary
    returns[("qr", "Breakout-MinAtar", 2)] = -0.5  # below the random policy's 0.0 (faked_grid's random.json)
    summary = minatar.summarise(faked_grid(tmp_path, returns, seeds=[1, 2, 3]))
    assert "- Breakout-MinAtar: QR 1.00, -0.50 (below random), 4.00 (seeds 1, 2, 3); DrMG 5.00 (seeds 1)\n" in summary
    returns[("qr", "Breakout-MinAtar", 2)] = 2.0
    summary = minatar.summarise(faked_grid(tmp_path, returns, seeds=[1, 2, 3]))
    assert "P(X > Y)" not in summary  # DrMG lacks seeds: no complete game
    assert "copied from an earlier grid" not in summary
    path = minatar.result_path(minatar.Args(out_dir=str(tmp_path / "results")), "qr", "Breakout-MinAtar", 2)
    result = minatar.load(path) | dict(adopted_from=dict(path="elsewhere/qr/Breakout-MinAtar_seed2.json", flags="--x 1"))
    minatar.write_json(path, result)
    summary = minatar.summarise(faked_grid(tmp_path, {}, seeds=[1, 2, 3]))
    assert "- QR on Breakout-MinAtar, seed 2: elsewhere/qr/Breakout-MinAtar_seed2.json (--flags '--x 1')" in summary
    assert summary.count("elsewhere/") == 1 and "| Breakout-MinAtar | 2.33 ± 1.53 (3) |" in summary


def test_each_meta_agents_control_differs_from_its_command_only_by_meta_learn_none(tmp_path, monkeypatch):
    args = minatar.Args()
    for agent, control in minatar.TWINS.items():
        assert minatar.AGENTS[agent][0] == minatar.AGENTS[control][0]
        assert minatar.LABELS[control] in ("QR", minatar.LABELS[agent] + "({})")
        for game in args.games:
            ours, theirs = minatar.run_command(args, agent, game, 1), minatar.run_command(args, control, game, 1)
            at = theirs.index("--meta-learn")
            assert theirs[at : at + 2] == ["--meta-learn", "none"] and theirs[:at] + theirs[at + 2 :] == ours
            assert "--meta-learn" not in ours
    # they start from DrMG's eta (MG({}) without alpha, as MG) on every game, and are refused if they do not
    etas = minatar.check_initial_eta(args)
    assert etas["mg_fixed", "Freeway-MinAtar"] == etas["mg", "Freeway-MinAtar"]
    assert etas["stacx_fixed", "Asterix-MinAtar"] == etas["drmg", "Asterix-MinAtar"]
    monkeypatch.setitem(minatar.AGENTS, "stacx_fixed", ("stacx", ["--meta-learn", "none", "--gamma", "0.95"]))
    with pytest.raises(SystemExit, match="Breakout-MinAtar: stacx_fixed does not start from DrMG's eta: gamma 0.95"):
        minatar.check_initial_eta(minatar.Args(agents=["drmg", "stacx_fixed"], games=["Breakout-MinAtar"]))
    assert "alpha 1" in eta_mismatch({"mg_fixed": etas["mg_fixed", "Breakout-MinAtar"]}, etas["drmg", "Breakout-MinAtar"])


def test_the_table_defaults_and_the_names_of_their_summary(tmp_path):
    import minatar_jax

    args = minatar.Args()
    assert args.agents == ["qr", "drmg", "mg", "stacx", "mg_fixed", "stacx_fixed"] == minatar.TABLE
    assert args.games == list(minatar_jax.GAMES) and args.seeds == [1, 2, 3] and args.total_timesteps == 10_000_000
    assert args.out_dir == os.path.join(minatar.ROOT, "benchmark", "results", "minatar_10m")
    assert minatar.stem(args) == minatar.stem(tiny_grid(tmp_path, agents=["qr", "drmg", "mg", "stacx"])) == ""
    assert minatar.stem(tiny_grid(tmp_path, agents=["drmg", "drmg_nstep3"])) == "ablations_"


def test_a_grid_of_the_new_agents_writes_skips_and_summarises_its_runs(tmp_path, monkeypatch, capsys):
    """The grid's own checks, collection and summary with every table agent; the runs faked in this process: each
    writes the TensorBoard log a script leaves (meta agents return 10 + seed and move gamma, controls return seed)."""
    from tensorboardX import SummaryWriter

    started = []

    def fake_run_commands(jobs, parallel, env, on_done=None, on_start=None):
        for name, command, work_dir in jobs:
            if not on_start(name, work_dir):
                continue
            started.append((name, command))
            agent, _, seed = name
            os.makedirs(work_dir, exist_ok=True)
            writer = SummaryWriter(os.path.join(work_dir, "runs", "fake"))
            value = seed + (10.0 if agent in minatar.TWINS else 0.0)
            for step in (100, 600):
                writer.add_scalar("charts/episodic_return", value, step)
                writer.add_scalar("meta/gamma", 0.99 + (step / 1e5 if agent in minatar.TWINS else 0.0), step)
            writer.add_scalar("charts/SPS", 100.0, 600)
            writer.close()
            on_done(name, work_dir, 0, 1.0)

    monkeypatch.setattr(minatar, "run_commands", fake_run_commands)
    args = tiny_grid(tmp_path, agents=minatar.TABLE, seeds=[1, 2])
    minatar.write_json(os.path.join(args.out_dir, "random.json"), {"Breakout-MinAtar": dict(mean_return=0.0)})
    minatar.main(args)
    assert len(started) == 12 and all(command[:5] == ["nice", "-n", "10", *minatar.run_command(args, *name)[:2]] for name, command in started)
    paths = {(a, s): minatar.result_path(args, a, "Breakout-MinAtar", s) for a in minatar.TABLE for s in (1, 2)}
    results = {cell: json.loads(open(path).read()) for cell, path in paths.items()}
    assert results["mg_fixed", 1]["command"].startswith("python mg.py --env-id Breakout-MinAtar --local-num-envs 4")
    assert "--meta-learn none" in results["stacx_fixed", 2]["command"] and "--meta-learn" not in results["stacx", 2]["command"]
    assert results["mg", 2]["final_return"] == 12.0 and results["mg_fixed", 2]["final_return"] == 2.0
    mtimes = {cell: os.path.getmtime(path) for cell, path in paths.items()}
    capsys.readouterr()
    minatar.main(args)
    assert "0 runs to do" in capsys.readouterr().out and len(started) == 12
    assert {cell: os.path.getmtime(path) for cell, path in paths.items()} == mtimes
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| game | QR | DrMG | MG | STACX | MG({}) | STACX({}) | random | PPO (10M) |" in summary
    for row in ("DrMG over QR", "MG over MG({})", "STACX over STACX({})"):
        assert f"| {row} | 1.000 | [1.000, 1.000] |" in summary
    assert "| DrMG over MG | 0.500 |" in summary and "- MG: gamma 0.99" in summary and "- MG({})" not in summary
    assert os.path.exists(tmp_path / "results" / "minatar.png") and not os.path.exists(tmp_path / "results" / "ablations_summary.md")


def fake_group_runs(started: list):
    """run_commands' stand-in that trains nothing: each run, of seeds --seed S .. S + --num-seeds - 1 (1 without it),
    writes each seed's TensorBoard log where the scripts do, runs/{game}__drmg__{seed}__{time} (return 10 x seed, SPS
    100 x seed); `started` gets each command."""
    from tensorboardX import SummaryWriter

    def fake_run_commands(jobs, parallel, env, on_done=None, on_start=None):
        for name, command, work_dir in jobs:
            if not on_start(name, work_dir):
                continue
            started.append(command)
            first, game = int(command[command.index("--seed") + 1]), command[command.index("--env-id") + 1]
            count = int(command[command.index("--num-seeds") + 1]) if "--num-seeds" in command else 1
            for seed in range(first, first + count):
                writer = SummaryWriter(os.path.join(work_dir, "runs", f"{game}__drmg__{seed}__1796000000"))
                for step in (100, 600):
                    writer.add_scalar("charts/episodic_return", 10.0 * seed, step)
                writer.add_scalar("charts/SPS", 100.0 * seed, 600)
                writer.close()
            on_done(name, work_dir, 0, 2.0)

    return fake_run_commands


def test_consecutive_seeds_run_in_one_process_and_each_seeds_result_is_its_own_runs(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(minatar, "run_commands", fake_group_runs(started))
    args = tiny_grid(tmp_path, agents=["qr"], seeds=[1, 2, 3], seeds_per_run=2)
    minatar.write_json(os.path.join(args.out_dir, "random.json"), {"Breakout-MinAtar": dict(mean_return=0.0)})
    minatar.main(args)
    group = minatar.run_command(args, "qr", "Breakout-MinAtar", 1)
    group[group.index("--seed") : group.index("--seed")] = ["--num-seeds", "2"]
    assert started == [["nice", "-n", "10", *group], ["nice", "-n", "10", *minatar.run_command(args, "qr", "Breakout-MinAtar", 3)]]
    assert "--num-seeds 2 --seed 1 --total-timesteps 640" in " ".join(started[0]) and "--num-seeds" not in started[1]
    for seed in (1, 2, 3):
        result = json.loads(open(minatar.result_path(args, "qr", "Breakout-MinAtar", seed)).read())
        assert (result["final_return"], result["sps"]) == (10.0 * seed, 100.0 * seed)  # from its own run's log
        assert result["command"] == minatar.shown_command(minatar.run_command(args, "qr", "Breakout-MinAtar", seed))
        assert result["seeds_per_run"] == (2 if seed < 3 else 1) and result["wall_seconds"] == 2.0
        # its run directory in its own work directory, where a run of that seed alone leaves it
        assert os.listdir(tmp_path / "runs" / "qr" / f"Breakout-MinAtar_seed{seed}" / "runs") == [f"Breakout-MinAtar__drmg__{seed}__1796000000"]
    assert "| Breakout-MinAtar | 20.00 ± 10.00 (3) |" in (tmp_path / "results" / "summary.md").read_text()
    # the same grid one seed per run (a CPU's): every cell is done
    capsys.readouterr()
    minatar.main(tiny_grid(tmp_path, agents=["qr"], seeds=[1, 2, 3]))
    assert "0 runs to do" in capsys.readouterr().out and len(started) == 2


def test_a_group_with_a_cell_another_driver_holds_runs_its_other_seeds_later(tmp_path, monkeypatch, capsys):
    from children import CellLock

    started = []
    monkeypatch.setattr(minatar, "run_commands", fake_group_runs(started))
    args = tiny_grid(tmp_path, agents=["qr", "drmg"], seeds=[1, 2, 3], seeds_per_run=3)
    held = CellLock(minatar.result_path(args, "qr", "Breakout-MinAtar", 2)[: -len(".json")] + ".lock")
    assert held.acquire()  # another driver runs qr's seed 2
    try:
        minatar.run_missing(args)
    finally:
        held.release()
    out = capsys.readouterr().out
    assert "skip qr Breakout-MinAtar seed 2: another driver (PID" in out and "qr Breakout-MinAtar seeds 1-3: seeds 1 3 run later" in out
    runs = [(os.path.basename(c[4])[: -len(".py")], c[c.index("--seed") + 1], "--num-seeds" in c) for c in started]
    assert runs == [("drmg", "1", True), ("drmg", "1", False), ("drmg", "3", False)]  # drmg's 3 seeds, then qr's 1 and 3
    assert [c.count("none") for c in started] == [0, 1, 1]  # QR: drmg.py --meta-learn none
    done = {(a, s) for a in ("qr", "drmg") for s in (1, 2, 3) if os.path.exists(minatar.result_path(args, a, "Breakout-MinAtar", s))}
    assert done == {("drmg", 1), ("drmg", 2), ("drmg", 3), ("qr", 1), ("qr", 3)}
    assert not list((tmp_path / "results").rglob("*.lock")) and not list((tmp_path / "runs").glob("*/*.lock"))


def test_the_runs_of_a_grid_are_its_consecutive_seeds_in_groups(tmp_path):
    cells = [("qr", "g", s) for s in (5, 1, 3, 2)] + [("drmg", "g", 4)]
    assert minatar.plan(cells, 1) == [("qr", "g", [5]), ("qr", "g", [1]), ("qr", "g", [3]), ("qr", "g", [2]), ("drmg", "g", [4])]
    assert minatar.plan(cells, 2) == [("qr", "g", [1, 2]), ("qr", "g", [3]), ("qr", "g", [5]), ("drmg", "g", [4])]
    assert minatar.plan(cells, 3) == [("qr", "g", [1, 2, 3]), ("qr", "g", [5]), ("drmg", "g", [4])]
    for value in (0, 257):
        with pytest.raises(SystemExit, match=rf"--seeds-per-run {value}: must lie in \[1, 256\]"):
            minatar.main(tiny_grid(tmp_path, seeds_per_run=value))
    assert not os.path.exists(tmp_path / "runs")


def test_the_sweep_table_puts_settings_side_by_side_with_how_far_eta_moved(tmp_path):
    import minatar_sweep

    grids = []
    for name, flags, finals, gammas in [("lo", "--meta-learning-rate 1e-3", (10.0, 20.0), (0.995, 0.997)),
                                        ("hi", "--meta-learning-rate 1e-2", (30.0, 32.0), (0.95, 0.97))]:
        grid = tmp_path / name
        for seed, final, gamma in zip((1, 2), finals, gammas):
            result = dict(
                agent="drmg", game="Breakout-MinAtar", seed=seed, command="python drmg.py", flags=flags,
                total_timesteps=10_000_000, final_return=final, sps=1.0, episodes=10, bin_steps=1_000_000,
                curve=[float(seed * i) for i in range(10)],  # the bin ending at 2M: index 1, at 5M: index 4
                meta={"gamma": dict(initial=0.99, final=gamma), "lambda": dict(initial=0.99, final=0.98)},
            )
            minatar.write_json(str(grid / "drmg" / f"Breakout-MinAtar_seed{seed}.json"), result)
        minatar.write_json(str(grid / "random.json"), {"Breakout-MinAtar": dict(mean_return=1.0)})
        grids.append(str(grid))
    args = minatar_sweep.Args(grids=grids, agent="drmg", out=str(tmp_path / "sweep"))
    minatar_sweep.main(args)
    text = (tmp_path / "sweep.md").read_text()
    # lo: final (10 + 20) / 2 = 15, at 2M (1 + 2) / 2 = 1.5, at 5M (4 + 8) / 2 = 6, score (15 - 1) / (28 - 1) = 0.52
    assert (
        "| lo (`--meta-learning-rate 1e-3`) | Breakout-MinAtar | 15.00 | 10.00, 20.00 | 1.50 | 6.00 | 0.52 | 10,000,000 | "
        "gamma 0.99 -> 0.996, lambda 0.99 -> 0.98 |" in text
    )
    assert "| hi (`--meta-learning-rate 1e-2`) | Breakout-MinAtar | 31.00 | 30.00, 32.00 | 1.50 | 6.00 | 1.11 | 10,000,000 | gamma 0.99 -> 0.96," in text
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert minatar_sweep.moved([dict(meta={})]) == "-"
    # QR (drmg.py --meta-learn none) logs DrMG's eta too, unmoved: the table says '-' for a fixed-eta agent
    for grid in grids:
        os.rename(os.path.join(grid, "drmg"), os.path.join(grid, "qr"))
        for path in glob.glob(os.path.join(grid, "qr", "*.json")):
            minatar.write_json(path, dict(minatar.load(path), agent="qr"))
    minatar_sweep.main(minatar_sweep.Args(grids=grids, agent="qr", out=str(tmp_path / "sweep")))
    assert "| lo (`--meta-learning-rate 1e-3`) | Breakout-MinAtar | 15.00 | 10.00, 20.00 | 1.50 | 6.00 | 0.52 | 10,000,000 | - |" in (
        tmp_path / "sweep.md"
    ).read_text()
