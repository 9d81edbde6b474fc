"""The benchmark drivers (benchmark/minatar.py, benchmark/gpu_check.py, benchmark/plot.py) with fake training runs: a
killed driver leaves no training process, a killed gpu_check.py keeps the earlier complete results, two grid drivers on
one directory run each cell once, a damaged result is named, a run below one bin keeps its result, and the drivers'
extreme flags are refused in one line before anything is written."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import minatar
import numpy as np
import plot
import pytest
from children import CellLock
from grid import binned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A training run's stand-in: says it started ("run ..."), notes its cell and PID in $FAKE_MARKS, trains for
# $FAKE_SECONDS, then (unless $FAKE_NO_LOG) writes a TensorBoard log with two episodes, as a script does under runs/.
FAKE_RUN = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
print("run fake", flush=True)
with open(os.environ["FAKE_MARKS"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + f" {os.getpid()}\n")
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
if not os.environ.get("FAKE_NO_LOG"):
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join("runs", "fake"))
    for step, value in [(10, 1.0), (30, 3.0)]:
        writer.add_scalar("charts/episodic_return", value, step)
    writer.add_scalar("charts/SPS", 100.0, 30)
    writer.close()
"""
# benchmark/minatar.py's run_missing with the stand-in as every cell's command.
GRID_DRIVER = r"""
import sys, tyro
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmark"]
import minatar
minatar.run_command = lambda args, agent, game, seed: [sys.executable, sys.argv[2], agent, game, str(seed)]
minatar.run_missing(tyro.cli(minatar.Args, args=sys.argv[3:]))
"""
# benchmark/gpu_check.py with the stand-in as its training runs and instant other parts (its imports of the scripts,
# learner_setup and qr_impala_sps, replaced: seconds of startup saved).
GPU_DRIVER = r"""
import sys, types, tyro
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmark"]
setup = types.ModuleType("learner_setup")
setup.ROOT, setup.learner, setup.random_batch = sys.argv[1], None, None
setup.environment = lambda env_id: (None, 2)
setup.script_args = lambda *a, **k: types.SimpleNamespace(envpool_threads=1, local_num_envs=4, num_actor_threads=1)
sps = types.ModuleType("qr_impala_sps")
sps.Args, sps.random_action_sps = lambda **k: types.SimpleNamespace(**k), lambda args: 123.0
sys.modules.update(learner_setup=setup, qr_impala_sps=sps)
import gpu_check
gpu_check.train_command = lambda script, args, env_id, extra, name: [sys.executable, sys.argv[2], name]
gpu_check.versions = lambda: dict(python="3", devices=["cpu:fake"])
gpu_check.learner_step = lambda *a: dict(update_seconds=0.5)
gpu_check.main(tyro.cli(gpu_check.Args, args=sys.argv[3:]))
"""


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def marks(path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_marks(path, count: int, process, seconds: float = 60.0) -> list:
    deadline = time.time() + seconds
    while len(marks(path)) < count:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the fake run did not start"
        time.sleep(0.05)
    return marks(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(fake run script, marks file); FAKE_MARKS set for this process and its children."""
    script, notes = tmp_path / "fake_run.py", tmp_path / "marks"
    script.write_text(FAKE_RUN)
    monkeypatch.setenv("FAKE_MARKS", str(notes))
    monkeypatch.setenv("FAKE_SECONDS", "0")
    return script, notes


def grid_flags(tmp_path, **kwargs) -> list:
    values = dict(agents=["qr"], games=["Breakout-MinAtar"], seeds=["1"], total_timesteps="100", bin_steps="20")
    values |= dict(out_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs")) | kwargs
    flags = []
    for name, value in values.items():
        flags += [f"--{name.replace('_', '-')}", *(value if isinstance(value, list) else [value])]
    return flags


def start_grid(tmp_path, script, **kwargs):
    command = [sys.executable, "-c", GRID_DRIVER, ROOT, str(script), *grid_flags(tmp_path, **kwargs)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_grid_driver_leaves_no_training_process(tmp_path, fake, monkeypatch, signum):
    script, notes = fake
    monkeypatch.setenv("FAKE_SECONDS", "120")
    driver = start_grid(tmp_path, script)
    child = int(wait_for_marks(notes, 1, driver)[0].split()[-1])
    assert alive(child)
    driver.send_signal(signum)
    out, err = driver.communicate(timeout=30)
    assert gone(child), f"the training run {child} outlived its driver"
    lock = CellLock(str(tmp_path / "results" / "qr" / "Breakout-MinAtar_seed1.lock"))
    assert lock.acquire()  # a dead driver's lock is released
    if signum == signal.SIGTERM:
        assert driver.returncode == 128 + signal.SIGTERM
        assert f"SIGTERM: stopped qr Breakout-MinAtar 1 (its log: {tmp_path}/runs/qr/Breakout-MinAtar_seed1/stdout.log)" in err
        assert f"(PID {child})" in err and "Traceback" not in err


def test_two_grid_drivers_on_one_directory_run_each_cell_once(tmp_path, fake, monkeypatch):
    script, notes = fake
    monkeypatch.setenv("FAKE_SECONDS", "0.5")
    flags = dict(agents=["qr", "drmg"], seeds=["1", "2"])
    drivers = [start_grid(tmp_path, script, **flags) for _ in range(2)]
    outputs = [d.communicate(timeout=120) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outputs
    cells = sorted(" ".join(line.split()[:3]) for line in marks(notes))
    assert cells == sorted(f"{a} Breakout-MinAtar {s}" for a in ("qr", "drmg") for s in (1, 2)), outputs
    said = "".join(out for out, _ in outputs)
    assert "another driver (PID" in said or "another driver has finished it" in said
    for agent in ("qr", "drmg"):
        for seed in (1, 2):
            result = json.loads((tmp_path / "results" / agent / f"Breakout-MinAtar_seed{seed}.json").read_text())
            assert (result["agent"], result["seed"], result["final_return"]) == (agent, seed, 3.0)  # the last 10% of its episodes: the last
    assert not list((tmp_path / "results").rglob("*.lock")) and not list((tmp_path / "results").rglob("*.tmp"))


def grid(tmp_path, **kwargs):
    return minatar.Args(
        **dict(
            agents=["qr"],
            games=["Breakout-MinAtar"],
            seeds=[1],
            total_timesteps=100,
            bin_steps=50_000,
            out_dir=str(tmp_path / "results"),
            runs_dir=str(tmp_path / "runs"),
            bootstrap_reps=200,
            random_moves=300,
        )
        | kwargs
    )


def test_a_run_below_one_bin_keeps_its_result_and_a_failed_collection_keeps_the_run(tmp_path, fake, monkeypatch, capsys):
    script, notes = fake
    monkeypatch.setattr(minatar, "run_command", lambda args, agent, game, seed: [sys.executable, str(script), agent, game, str(seed)])
    np.testing.assert_array_equal(binned(np.array([10, 30]), np.array([1.0, 3.0]), 50_000, 100), [2.0])  # one bin, not IndexError
    np.testing.assert_array_equal(binned(np.zeros(0), np.zeros(0), 50_000, 100), [np.nan])
    args = grid(tmp_path, seeds=[1, 2])
    monkeypatch.setenv("FAKE_NO_LOG", "")
    minatar.run_missing(grid(tmp_path))  # --total-timesteps 100 below --bin-steps 50,000
    result = json.loads((tmp_path / "results" / "qr" / "Breakout-MinAtar_seed1.json").read_text())
    assert result["curve"] == [2.0] and result["final_return"] == 3.0 and result["last_step"] == 30
    monkeypatch.setenv("FAKE_NO_LOG", "1")  # a run that ends well but leaves nothing to collect
    capsys.readouterr()
    minatar.run_missing(args)
    out = capsys.readouterr().out
    kept = [p for p in (tmp_path / "runs" / "qr").iterdir() if p.name.startswith("Breakout-MinAtar_seed2.uncollected-")]
    assert len(kept) == 1 and (kept[0] / "stdout.log").read_text() == "run fake\n"
    assert "qr Breakout-MinAtar seed 2: trained, but its result could not be collected (RuntimeError: no TensorBoard log" in out
    assert f"kept in {kept[0]}" in out and not (tmp_path / "results" / "qr" / "Breakout-MinAtar_seed2.json").exists()
    assert len(marks(notes)) == 2  # seed 1 was not run again


def test_a_damaged_result_is_named_and_the_rest_summarised(tmp_path, fake, monkeypatch, capsys):
    script, notes = fake
    monkeypatch.setattr(minatar, "run_command", lambda args, agent, game, seed: [sys.executable, str(script), agent, game, str(seed)])
    args = grid(tmp_path, seeds=[1, 2, 3], bin_steps=20)
    minatar.run_missing(grid(tmp_path, seeds=[1, 2], bin_steps=20))
    path = tmp_path / "results" / "qr" / "Breakout-MinAtar_seed1.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated
    capsys.readouterr()
    minatar.run_missing(args)  # seed 3 runs; seed 1's file is named and left alone; seed 2 is kept
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if str(path) in line)
    assert line.startswith(f"{path}: unreadable (JSONDecodeError") and line.endswith(f"{path}.damaged) and the cell runs again")
    assert path.read_text() == text[: len(text) // 2] and [m.split()[2] for m in marks(notes)] == ["1", "2", "3"]
    (tmp_path / "results" / "random.json").write_text(json.dumps({"Breakout-MinAtar": dict(mean_return=0.5)}))
    summary = minatar.summarise(args)  # --no-run: the rest
    assert f"{path}: unreadable" in capsys.readouterr().out and "| Breakout-MinAtar | 3.00 ± 0.00 (2) |" in summary
    for damage, what in [
        ("", "unreadable (JSONDecodeError"),
        ("[1, 2]", "not a result (a JSON list)"),
        (json.dumps({k: v for k, v in json.loads(text).items() if k != "flags"}), "incomplete (no flags)"),
        (json.dumps(json.loads(text) | dict(final_return="x")), "incomplete (wrong type of final_return)"),
        (json.dumps(json.loads(text) | dict(seed=2)), "the result of qr on Breakout-MinAtar, seed 2"),
    ]:
        path.write_text(damage)
        with pytest.raises(minatar.Damaged, match="^" + re.escape(f"{path}: {what}")):
            minatar.load_result(str(path), "qr", "Breakout-MinAtar", 1)


def test_a_killed_gpu_check_keeps_the_earlier_complete_results_and_leaves_no_process(tmp_path, fake, monkeypatch):
    script, notes = fake
    monkeypatch.setenv("FAKE_SECONDS", "120")
    out = tmp_path / "check"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": "complete"}')
    (out / "summary.md").write_text("earlier summary")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    command = [sys.executable, "-c", GPU_DRIVER, ROOT, str(script), "--out-dir", str(out), "--atari-seconds", "600"]
    for signum, count in [(signal.SIGKILL, 1), (signal.SIGTERM, 2)]:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        child = int(wait_for_marks(notes, count, driver)[-1].split()[-1])
        assert (out / "partial" / "work").is_dir() and json.loads((out / "partial" / "results.json").read_text())["versions"]
        driver.send_signal(signum)
        _, err = driver.communicate(timeout=30)
        assert gone(child), f"the training run {child} outlived gpu_check.py ({signal.Signals(signum).name})"
        assert (out / "results.json").read_text() == '{"earlier": "complete"}' and (out / "summary.md").read_text() == "earlier summary"
    assert f"benchmark/gpu_check.py: SIGTERM: stopped the qr_impala training run (PID {child})" in err
    assert f"this run's partial results: {out}/partial/results.json; the earlier complete results in {out} are kept" in err
    assert not (out / "partial" / "work").exists() and not os.listdir(tmp_path / "tmp") and "Traceback" not in err
    # a run that finishes replaces them, and leaves no partial/
    finished = subprocess.run([*command[:-1], "0.2", "--overlap-seconds", "0", "--minatar-seconds", "0"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["envpool_sps"] == 123.0 and results["learner"]["drmg"]["0"] == dict(update_seconds=0.5)
    assert "| qr_impala.py | " in (out / "summary.md").read_text() and (out / "qr_impala_stdout.log").exists()
    assert sorted(os.listdir(out)) == ["drmg_stdout.log", "qr_impala_stdout.log", "results.json", "summary.md"]


def test_the_drivers_extreme_flags_are_refused_in_one_line_before_anything_is_written(tmp_path):
    def refused(main, args, message):
        with pytest.raises(SystemExit, match=message) as stop:
            main(args)
        assert isinstance(stop.value.code, str) and "\n" not in stop.value.code, stop.value.code
        assert not os.listdir(tmp_path), f"{args} wrote {os.listdir(tmp_path)}"

    for kwargs, message in [
        (dict(agents=[]), r"--agents: at least one, none twice \(got \[\]\)"),
        (dict(games=[]), "--games: at least one"),
        (dict(seeds=[]), "--seeds: at least one"),
        (dict(agents=["qr", "qr"]), "--agents: at least one, none twice"),
        (dict(bin_steps=0), "must be positive"),
        (dict(bin_steps=-5), "must be positive"),
        (dict(total_timesteps=-1), "must be positive"),
        (dict(jobs=0), "must be positive"),
        (dict(bootstrap_reps=10**9), "--bootstrap-reps 1000000000: at most 1,000,000"),
        (dict(random_moves=10**11), "--random-moves 100000000000: at most 1,000,000"),
        (dict(out_dir=""), "--out-dir: give a directory"),
        (dict(flags="--num-steps '8"), "--flags \"--num-steps '8\": No closing quotation"),
        (dict(flags="--learning-rate -1"), "drmg.py refuses qr on Breakout-MinAtar, seed 1: --learning-rate, .* must be positive"),
        (dict(flags="--no-such-flag 3"), "drmg.py .*refuses .*Unrecognized options: --no-such-flag"),
    ]:
        refused(minatar.main, grid(tmp_path, **kwargs), message)
    import gpu_check  # here, not at the top: its imports (every script) are not needed by the other tests

    check = dict(out_dir=str(tmp_path / "check"))
    for kwargs, message in [
        (dict(atari_seconds=-1.0), "--atari-seconds -1.0: must be positive"),
        (dict(atari_seconds=0.0), "--atari-seconds 0.0: must be positive"),
        (dict(atari_seconds=float("nan")), "--atari-seconds nan"),
        (dict(overlap_seconds=-5.0), "--overlap-seconds -5.0: must be >= 0"),
        (dict(minatar_seeds=[0]), r"--minatar-seeds 0: each in \[1, 256\], none twice"),
        (dict(minatar_seconds=1e30), "--minatar-seconds 1e\\+30: must be >= 0 and at most 86,400"),
        (dict(random_seconds=0.0), "--random-seconds 0.0: must be positive"),
        (dict(update_repeats=0), r"--update-repeats 0: must lie in \[1, 10000\]"),
        (dict(env_id=""), "--env-id: give an environment id"),
        (dict(out_dir=""), "--out-dir: give a directory"),
    ]:
        refused(gpu_check.main, gpu_check.Args(**(check | kwargs)), message)
    (tmp_path / "logs").mkdir()
    for kwargs, message in [
        (dict(bin_steps=-5), "--bin-steps -5: a bin is at least 1 step"),
        (dict(bin_steps=0), "--bin-steps 0: a bin is at least 1 step"),
        (dict(labels=[]), "--labels: 0 labels for 1 directories"),
        (dict(out=""), "--out '': give an output path prefix"),
    ]:
        with pytest.raises(SystemExit, match=message):
            plot.main(plot.Args(dirs=[str(tmp_path / "logs")], **(dict(out=str(tmp_path / "logs" / "p")) | kwargs)))
        assert not os.listdir(tmp_path / "logs")
