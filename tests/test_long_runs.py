"""Runs that survive: checkpoints and --resume, the non-finite guard, clean stops on signals and errors, flags checked
before anything is written, and --distributed with two processes."""

import errno
import glob
import importlib.util
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from helpers import IMPALA_FAMILY, ROOT, make_small_rollout, make_states, only_run_dir, run_script, scalars, script_env
from learner_setup import learner, script_args

import drmg
import mix_metagrad
import mrp_metagrad
import qr_impala
import snake_jax

CARTPOLE = ["--env-id", "CartPole-v1", "--local-num-envs", "4", "--num-steps", "8", "--log-frequency", "2"]


def checkpoint_of(run_dir, script):
    return mix_metagrad.load_checkpoint if script == "mix_metagrad" else IMPALA_FAMILY[script].load_checkpoint


@pytest.mark.parametrize("name", IMPALA_FAMILY)
def test_checkpoint_round_trip_restores_every_state(tmp_path, name):
    """The learner state (train states: parameters, optimiser states, step counts; the meta-state), update, step, key
    and returns come back exactly, into the structures the script builds."""
    module = IMPALA_FAMILY[name]
    args = script_args(name, "CartPole-v1", local_num_envs=4, num_actor_threads=1, num_steps=8)
    _, state, _ = learner(name, args, SimpleNamespace(shape=(4,), dtype=np.dtype(np.float32)), 2)
    rng = np.random.default_rng(0)
    perturb = lambda x: np.asarray(x) + (rng.normal(size=np.shape(x)) if np.asarray(x).dtype.kind == "f" else 7)  # noqa: E731
    saved = dict(learner_state=jax.tree.map(lambda x: perturb(x).astype(np.asarray(x).dtype), state))
    path = str(tmp_path / "model.flax_model")
    key, returns = jax.random.PRNGKey(3), np.array([1.0, 2.5])
    module.save_checkpoint(path, args, update=12, global_step=384, actor_key=key, returns=returns, **saved)
    loaded = module.load_checkpoint(path)
    assert loaded["args"] == args and int(loaded["update"]) == 12 and int(loaded["global_step"]) == 384
    np.testing.assert_array_equal(loaded["actor_key"], key)
    np.testing.assert_array_equal(loaded["returns"], returns)
    for field, state in saved.items():
        restored = flax.serialization.from_state_dict(state, loaded[field])
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert os.listdir(tmp_path) == ["model.flax_model"]


def test_a_failed_save_removes_its_partial_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args, path = qr_impala.Args(), str(tmp_path / "model.flax_model")
    qr_impala.save_checkpoint(path, args, update=1)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit, match="could not write the checkpoint .*: No space left on device"):
        qr_impala.save_checkpoint(path, args, update=2)
    assert os.listdir(tmp_path) == ["model.flax_model"] and int(qr_impala.load_checkpoint(path)["update"]) == 1


def test_the_next_save_replaces_a_stale_tmp_file_left_by_a_killed_save(tmp_path):
    """kill -9 mid-save leaves `PATH.tmp` (here: longer than a checkpoint, and garbage); the next save leaves none."""
    args, path = qr_impala.Args(), str(tmp_path / "model.flax_model")
    (tmp_path / "model.flax_model.tmp").write_bytes(b"\xff" * 10**6)
    qr_impala.save_checkpoint(path, args, update=3)
    assert os.listdir(tmp_path) == ["model.flax_model"] and int(qr_impala.load_checkpoint(path)["update"]) == 3


@pytest.mark.parametrize("script", ["drmg"])
def test_resume_continues_the_run_in_its_directory_from_its_update_and_step(tmp_path, script):
    first = run_script(tmp_path, *CARTPOLE, "--total-timesteps", "256", "--no-anneal-lr", script=f"{script}.py")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    path = os.path.join(run_dir, f"{script}.flax_model")
    after_first = checkpoint_of(run_dir, script)(path)
    assert int(after_first["update"]) == 4 and int(after_first["global_step"]) == 256
    second = run_script(tmp_path, "--resume", path, "--total-timesteps", "512", script=f"{script}.py")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {path} at update 4, global step 256" in second.stdout and "update 5/8 " in second.stdout
    assert only_run_dir(tmp_path) == run_dir and len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 2
    after_second = checkpoint_of(run_dir, script)(path)
    assert int(after_second["update"]) == 8 and int(after_second["global_step"]) == 512
    assert int(after_second["learner_state"]["agent"]["step"]) == 8  # the optimiser's count (and schedule) went on from 4
    moved = jax.tree.map(
        lambda a, b: np.abs(a - b).max(), after_first["learner_state"]["agent"]["params"], after_second["learner_state"]["agent"]["params"]
    )
    assert max(jax.tree.leaves(moved)) > 0
    if script == "drmg":
        meta_first, meta_second = after_first["learner_state"]["meta"], after_second["learner_state"]["meta"]
        assert int(meta_second["step"]) == 8
        assert np.abs(meta_first["params"]["gamma"] - meta_second["params"]["gamma"]).max() > 0
    steps = scalars(run_dir)["charts/SPS"]
    assert len(steps) >= 6  # updates 2, 4 of the first part and 5, 6, 8 of the second, all in one run directory


def test_a_resumed_run_refuses_flags_that_change_what_it_learns(tmp_path, monkeypatch):
    path = str(tmp_path / "qr_impala.flax_model")
    qr_impala.save_checkpoint(path, qr_impala.Args(env_id="CartPole-v1"), update=1)
    message = refusal(tmp_path, monkeypatch, "qr_impala", "--resume", path, "--learning-rate", "0.1")
    assert message == "--resume continues a run with its own flags: --learning-rate cannot change"


MODULES = {**IMPALA_FAMILY, "mix_metagrad": mix_metagrad}


@pytest.mark.parametrize("script", MODULES)
def test_a_resumed_run_refuses_a_flag_set_back_to_its_default(tmp_path, monkeypatch, script):
    """A flag given on the command line counts even where its value is the default: resuming a run made with another
    learning rate (or without annealing) by naming the default is refused, not silently ignored."""
    module, path = MODULES[script], str(tmp_path / f"{script}.flax_model")
    module.save_checkpoint(path, replace(module.Args(), learning_rate=0.125, anneal_lr=False), update=1)
    default = str(module.Args().learning_rate)
    message = refusal(tmp_path, monkeypatch, script, "--resume", path, f"--learning_rate={default}")
    assert message == "--resume continues a run with its own flags: --learning-rate cannot change"
    message = refusal(tmp_path, monkeypatch, script, "--resume", path, "--anneal-lr")
    assert message == "--resume continues a run with its own flags: --anneal-lr cannot change"


@pytest.mark.parametrize("script", MODULES)
def test_a_resumed_run_applies_the_flags_that_may_change_even_at_their_defaults(tmp_path, script):
    """`--save-every` (a RESUME_FLAGS member) given at its default replaces the checkpoint's value; a flag equal to the
    checkpoint's is accepted; flags not given keep the checkpoint's values."""
    module, path = MODULES[script], str(tmp_path / f"{script}.flax_model")
    saved = replace(module.Args(), save_every=7, learning_rate=0.125)
    module.save_checkpoint(path, saved, update=1)
    argv = ["--resume", path, "--save-every", str(module.Args().save_every), "--learning-rate", "0.125"]
    assert module.given_flags(argv) == {"resume", "save_every", "learning_rate"}
    args, _ = module.resume_args(module.tyro.cli(module.Args, args=argv), module.given_flags(argv))
    assert args == replace(saved, resume=path, save_every=module.Args().save_every)
    assert module.given_flags(["--no-anneal-lr", "--seed=3", "--exp_name", "x", "--not-a-flag"]) == {
        "anneal_lr",
        "seed",
        "exp_name",
    }


def test_snake_resumed_equals_uninterrupted(tmp_path):
    """mix_metagrad.py on snake_jax keeps the games' state in its checkpoint: stopping and resuming changes nothing."""
    flags = ["--num-envs", "4", "--num-steps", "5", "--log-frequency", "4", "--no-anneal-lr", "--inner-steps", "1"]
    os.makedirs(tmp_path / "whole")
    whole = run_script(tmp_path / "whole", *flags, "--total-timesteps", "160", script="mix_metagrad.py")
    assert whole.returncode == 0, whole.stderr[-3000:]
    os.makedirs(tmp_path / "parts")
    part = run_script(tmp_path / "parts", *flags, "--total-timesteps", "80", script="mix_metagrad.py")
    assert part.returncode == 0, part.stderr[-3000:]
    path = os.path.join(only_run_dir(tmp_path / "parts"), "mix_metagrad.flax_model")
    resumed = run_script(tmp_path / "parts", "--resume", path, "--total-timesteps", "160", script="mix_metagrad.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fingerprints = [line for line in whole.stdout.splitlines() + resumed.stdout.splitlines() if "sha256" in line]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1] and "after update 8" in fingerprints[0]
    a = mix_metagrad.load_checkpoint(os.path.join(only_run_dir(tmp_path / "whole"), "mix_metagrad.flax_model"))
    b = mix_metagrad.load_checkpoint(path)
    for field in ["agent_state", "meta_state", "env"]:
        jax.tree.map(np.testing.assert_array_equal, a[field], b[field])


def test_divergence_stops_at_its_update_and_keeps_the_last_finite_checkpoint(tmp_path):
    result = run_script(
        tmp_path, *CARTPOLE, "--total-timesteps", "4000", "--learning-rate", "1e17", "--no-anneal-lr", "--save-every", "1"
    )
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert line.startswith("non-finite") and "parameters" in line and "at update 2: stopped" in line, line
    saved = qr_impala.load_checkpoint(os.path.join(only_run_dir(tmp_path), "qr_impala.flax_model"))
    assert int(saved["update"]) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["learner_state"]))
    assert "Traceback" not in result.stderr


def test_saturated_flags_a_sigmoid_at_its_bound_with_a_zero_meta_gradient():
    logits = {"a": jnp.array([30.0, 0.0]), "b": jnp.array(-30.0), "c": jnp.array(30.0)}
    grads = {"a": jnp.array([0.0, 0.0]), "b": jnp.array(0.0), "c": jnp.array(1e-3)}
    assert {k: bool(v) for k, v in drmg.saturated(logits, grads).items()} == {"a": True, "b": True, "c": False}


def started_until(tmp_path, script, prefix, *flags, **extra_env):
    """Start `script` with `flags` in `tmp_path` and return the process once it has printed a line beginning `prefix`."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags],
        cwd=tmp_path,
        env=script_env(PYTHONUNBUFFERED="1", **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith(prefix):
            break
    return process


@pytest.mark.parametrize(
    "script,signum", [("qr_impala", signal.SIGINT), ("drmg", signal.SIGTERM), ("mix_metagrad", signal.SIGTERM)]
)
def test_a_signal_stops_the_run_with_a_checkpoint_and_a_closed_event_file(tmp_path, script, signum):
    flags = ["--num-envs", "4", "--num-steps", "5", "--log-frequency", "2"] if script == "mix_metagrad" else CARTPOLE
    process = started_until(tmp_path, script, "update ", *flags, "--total-timesteps", "100000000")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name} after update" in stdout
    assert "Traceback" not in stderr and "terminate called" not in stderr
    run_dir = only_run_dir(tmp_path)
    saved = checkpoint_of(run_dir, script)(os.path.join(run_dir, f"{script}.flax_model"))
    assert int(saved["update"]) >= 1
    logged = scalars(run_dir)
    assert max(logged["charts/SPS"]) > 0  # the events were flushed and the file closed


@pytest.mark.parametrize("script", ["qr_impala", "mix_metagrad"])
def test_a_second_signal_exits_at_once_and_says_what_is_lost(tmp_path, script):
    """SIGINT then SIGTERM at once (two signals of one kind may merge into one): the second exits without saving."""
    flags = ["--num-envs", "4", "--num-steps", "5", "--log-frequency", "2"] if script == "mix_metagrad" else CARTPOLE
    process = started_until(tmp_path, script, "update ", *flags, "--total-timesteps", "100000000", "--save-every", "0")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: exit now; the work since the last checkpoint is lost" in stdout
    assert "stopped by" not in stdout and "Traceback" not in stderr


@pytest.mark.parametrize("script,signum", [("qr_impala", signal.SIGTERM), ("drmg", signal.SIGINT)])
def test_a_signal_while_the_learner_step_compiles_exits_at_once_with_nothing_written(tmp_path, script, signum):
    """Before the run directory exists a signal exits at once, saying so (it used to wait, silent, for the compilation
    to end: seconds on CartPole, minutes for Atari on a GPU)."""
    # Without the suite's compilation cache (tests/conftest.py): an executable loaded from it could be ready first.
    flags = [*CARTPOLE, "--total-timesteps", "256"]
    process = started_until(tmp_path, script, "compiling the learner step", *flags, JAX_ENABLE_COMPILATION_CACHE="false")
    process.send_signal(signum)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=300)
    assert time.monotonic() - sent < 2  # the compilation alone takes several seconds
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"{signal.Signals(signum).name}: exit now, before the run started: nothing was written" in stdout
    assert "Traceback" not in stderr and os.listdir(tmp_path) == []


FAILURES = {
    "raises": (
        "raise ValueError('the environment broke')",
        "RuntimeError: actor thread 0 failed: ValueError: the environment broke",
    ),
    "hangs": ("time.sleep(10)", "TimeoutError: actor thread 0 sent no rollout for 4 s: it is stepping its environments"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_an_actor_that_fails_or_hangs_stops_the_run_with_one_line_of_cause_first(tmp_path, failure):
    """An environment that raises (or blocks) inside an actor thread: exit 1, its cause on the first line of stderr."""
    statement, cause = FAILURES[failure]
    timeout = ["--queue-timeout", "4"] if failure == "hangs" else []
    (tmp_path / "crash_jax.py").write_text(
        "import time\n\nimport snake_jax\n\n"
        "class Crashing:  # no pure batch_step: it trains with actor threads, stepped one call at a time\n"
        "    calls = 0\n\n"
        "    def __init__(self, num_envs, seed):\n"
        "        self.envs = snake_jax.SnakeVecEnv(num_envs=num_envs, seed=seed)\n\n"
        "    def __getattr__(self, name):\n"
        "        if name in ('batch_step', 'state'):\n"
        "            raise AttributeError(name)\n"
        "        return getattr(self.envs, name)\n\n"
        "    def step(self, actions):\n"
        "        self.calls += 1\n"
        "        if self.calls == 12:\n"
        f"            {statement}\n"
        "        return self.envs.step(actions)\n\n\n"
        "def make_vec_env(num_envs, seed):\n"
        "    return Crashing(num_envs=num_envs, seed=seed)\n"
    )
    result = run_script(
        tmp_path,
        *["--env-id", "crash_jax", "--local-num-envs", "4", "--num-steps", "4", "--total-timesteps", "100000"],
        *["--num-actor-threads", "1", *timeout],
        timeout=300,
        PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
    )
    assert result.returncode == 1
    first = [line for line in result.stderr.splitlines() if "Warn" not in line and "warn(" not in line][0]
    assert first == f"qr_impala.py: {cause}", first
    assert "terminate called" not in result.stderr


BAD_FLAGS = [
    (["--exp-name", "a/b"], "must be a file name"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--log-frequency", "0"], "--log-frequency"),
    (["--save-every", "-1"], "--save-every"),
    (["--total-timesteps", "0"], "--total-timesteps"),
    (["--learner-device-ids", "0", "0"], "must be >= 0 and distinct"),
    (["--learner-device-ids", "-1"], "must be >= 0 and distinct"),
    (["--learner-device-ids", "5"], "this process has 2 devices"),
    (["--actor-device-ids", "3"], "this process has 2 devices"),
    (["--rmsprop-eps", "0"], "--rmsprop-eps"),
    (["--huber-kappa", "-1"], "--huber-kappa"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--process-id", "1"], "go with --distributed"),
    (["--num-processes", "0"], "go with --distributed"),  # was taken as not given
    (["--distributed", "--num-processes", "0"], "--num-processes 0, --process-id None: need 0 <= id < processes"),
    (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id 2: need 0 <= id < processes"),
    (["--distributed", "--process-id", "-1"], "--process-id -1: need 0 <= id < processes"),
    (["--resume", "missing.flax_model"], "not a checkpoint of"),
    (["--resume", "garbage.flax_model"], "not a checkpoint of"),
    (["--chunk-envs", "-2"], "--chunk-envs -2: must be >= 0"),
    (["--env-id", "Pong-v5", "--noop-max", "-1"], "--noop-max and --envpool-threads must be >= 0"),
    (["--envpool-threads", "-1"], "--noop-max and --envpool-threads must be >= 0"),
    (["--max-episode-steps", "0"], "--max-episode-steps >= 1"),
    (["--envpool-threads", "5"], "--envpool-threads 5: at most --local-num-envs (4)"),  # 10**9 aborted in C++
    (["--num-quantiles", "1000000"], "--num-quantiles 1000000: at most 1024 (the quantile loss compares every pair"),
    (["--local-num-envs", str(2**64)], f"--local-num-envs {2**64}: at most 2^31 - 1"),  # EnvPool's C int, XLA's int32
    (["--eval-episodes", str(10**11)], f"--eval-episodes {10**11}: at most 2^31 - 1"),
    (["--actor-device-ids", "0", str(2**64)], f"--actor-device-ids {2**64}: at most 2^31 - 1"),
    (["--learner-device-ids"], "--learner-device-ids []: device indices must be >= 0 and distinct"),  # was a ZeroDivisionError
    (["--optimizer", "adam", "--adam-eps", "nan"], "--adam-eps"),
    (["--env-id", "os.x_jax"], "a JAX environment is a module name, without dots"),
    (["--env-id", "evil.x_jax"], "a JAX environment is a module name, without dots"),
    (["--seed", str(2**64)], f"--seed {2**64}: the run's seeds (--seed + its seeds, processes and actor threads) must lie"),
    (["--seed", "-1"], "--seed -1: the run's seeds"),
    (["--total-timesteps", str(10**15)], f"--total-timesteps {10**15}: more than 2^31 - 1 updates of 64 steps"),
    (["--num-seeds", "0"], "--num-seeds 0: at least 1"),
    (["--num-seeds", "2"], "--num-seeds 2: at least 1, and more than 1 only for a JAX environment"),
    (["--env-id", "Breakout-MinAtar", "--num-seeds", "2", "--track"], "--track follows one run in Weights & Biases"),
]


def refusal(tmp_path, monkeypatch, script, *flags):
    """Run a script's main in this process (no start-up cost) and return the one line it exits with; nothing may have
    been written to the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(os.path.join(ROOT, f"{script}.py"), run_name="__main__")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_with_one_line_before_anything_is_written(tmp_path, monkeypatch, flags, message):
    (tmp_path / "garbage.flax_model").write_bytes(b"not msgpack at all")
    short = ["--total-timesteps", "64", *CARTPOLE]  # a script that misses the flag trains for one short update
    assert message in refusal(tmp_path, monkeypatch, "qr_impala", *short, *flags)
    assert sorted(os.listdir(tmp_path)) == ["garbage.flax_model"]


@pytest.mark.parametrize("script", ["drmg", "mg", "stacx", "mix_metagrad"])
def test_the_siblings_check_their_flags_too(tmp_path, monkeypatch, script):
    (tmp_path / "runs").write_text("a file where the run directory should be")
    cases = [(["--meta-learning-rate", "0"], "--meta-learning-rate"), ([], "is not a writable directory")]
    cases += [(["--huber-kappa", "-0.5"], "--huber-kappa")] if script == "drmg" else []
    cases += [(["--chunk-envs", "-1"], "--chunk-envs -1: must be >= 0")] if script != "mix_metagrad" else []
    env_id = "snake_jax" if script == "mix_metagrad" else "CartPole-v1"  # mix_metagrad runs on snake_jax only
    for flags, message in cases:
        assert message in refusal(tmp_path, monkeypatch, script, *flags, "--env-id", env_id)
    assert os.listdir(tmp_path) == ["runs"]


@pytest.mark.parametrize(
    "script,flags,copies",
    [
        ("drmg", ["--num-quantiles", "1024", "--memory-limit-gib", "0.001"], 3),
        ("mg", ["--eta-embedding-size", str(2**31 - 1)], 3),
        ("stacx", ["--num-heads", str(2**31 - 1), "--optimizer", "adam"], 4),  # Adam keeps two moments
    ],
)
def test_a_network_too_large_for_the_device_is_refused_before_it_is_allocated(tmp_path, monkeypatch, script, flags, copies):
    message = refusal(tmp_path, monkeypatch, script, *flags, "--total-timesteps", "64", *CARTPOLE)
    pattern = rf"the network's parameters need [\d.]+ GiB \({copies} copies\) and a learner device \(cpu\) has [\d.]+ GiB: .*"
    assert re.fullmatch(pattern, message), message
    assert os.listdir(tmp_path) == []


EXTREME_FLAGS = [  # issue 34: each refused by the script's own checks, in one line, before anything is written
    ("drmg", ["--num-quantiles", "2000"], "--num-quantiles 2000: at most 1024"),
    ("mg", ["--total-timesteps", str(10**15)], f"--total-timesteps {10**15}: more than 2^31 - 1 updates"),
    ("stacx", ["--num-steps", str(10**11)], f"--num-steps {10**11}: at most 2^31 - 1"),
    ("stacx", ["--learner-device-ids"], "--learner-device-ids []: device indices must be >= 0 and distinct"),
    ("mix_metagrad", ["--seed", str(2**64)], f"--seed {2**64}: must lie in [0, 2^31)"),
    ("mix_metagrad", ["--seed", "-1"], "--seed -1: must lie in [0, 2^31)"),
    ("mix_metagrad", ["--total-timesteps", str(2**64)], f"--total-timesteps {2**64}: more than 2^31 - 1 updates"),
    ("mix_metagrad", ["--log-frequency", str(10**11)], f"--log-frequency {10**11}: at most 2^31 - 1"),
    ("mix_metagrad", ["--adam-eps-root", "nan"], "--adam-eps-root must be >= 0 and finite"),
    ("mrp_metagrad", ["--seed", str(2**64)], f"--seed {2**64}: must lie in [0, 2^31)"),
    ("mrp_metagrad", ["--adam-eps-root", "inf"], "--adam-eps-root must be > 0 and finite"),
]


@pytest.mark.parametrize("script,flags,message", EXTREME_FLAGS, ids=[f"{s} {' '.join(f)}" for s, f, _ in EXTREME_FLAGS])
def test_extreme_flags_are_refused_in_one_line(tmp_path, monkeypatch, script, flags, message):
    base = ["--env-id", "snake_jax"] if script == "mix_metagrad" else [] if script == "mrp_metagrad" else CARTPOLE
    assert message in refusal(tmp_path, monkeypatch, script, *base, *flags)
    assert os.listdir(tmp_path) == []


HUGE = 10**9


@pytest.mark.parametrize(
    "module,overrides",
    [
        *[(mix_metagrad, {name: HUGE}) for name in ("board_size", "num_envs", "num_steps", "inner_steps")],
        (mix_metagrad, dict(variance_points=3, variance_batch=HUGE)),
        (mix_metagrad, dict(variance_points=3, variance_samples=HUGE)),
        *[(mrp_metagrad, {name: HUGE}) for name in ("num_updates", "batch_size", "mc_samples")],
        (mrp_metagrad, dict(inner_steps=[1, HUGE])),
    ],
)
def test_mix_and_mrp_refuse_a_run_that_cannot_fit_before_any_array_is_made(module, overrides, monkeypatch):
    """10^9 boards, envs, steps or chains (native aborts and out-of-memory tracebacks in the flag sweep before), on a
    device with 32 GiB free; the defaults pass."""
    monkeypatch.setattr(module, "available_memory", lambda device: 32 * 2**30)
    module.check_args(module.Args())
    with pytest.raises(SystemExit, match=r"needs at least [\d.e+]+ GiB and the device has 32.0 GiB: lower --"):
        module.check_args(module.Args(**overrides))


def mix_train_chunk(args):
    """mix_metagrad's training chunk and the states that its main builds, lowered on them."""
    network = mix_metagrad.AgentNetwork(snake_jax.NUM_ACTIONS)
    obs = jnp.zeros((1, snake_jax.NUM_CHANNELS, args.board_size, args.board_size))
    tx = mix_metagrad.make_optimizer(args)
    agent_state = TrainState.create(apply_fn=network.apply, params=network.init(jax.random.PRNGKey(0), obs), tx=tx)
    meta_tx = optax.chain(optax.clip_by_global_norm(args.meta_grad_clip), optax.adam(args.meta_learning_rate))
    meta_state = TrainState.create(apply_fn=None, params=mix_metagrad.init_meta_params(args), tx=meta_tx)
    env = mix_metagrad.snake_reset(jax.random.PRNGKey(1), args.num_envs, args.board_size)
    weights = mix_metagrad.mixing_weights(args.inner_steps) if args.inner_steps else None
    return mix_metagrad.make_snake_train_chunk(args, weights).lower(agent_state, meta_state, env)


def xla_bytes(lowered):
    analysis = lowered.compile().memory_analysis()
    needed = sum(getattr(analysis, f"{kind}_size_in_bytes") for kind in ("temp", "argument", "output"))
    return needed - analysis.alias_size_in_bytes


@pytest.mark.parametrize("inner_steps", [0, 3])
def test_mix_metagrads_least_bytes_are_at_most_what_xla_compiles(inner_steps):
    """The bound refuses before anything is made, so it must never refuse a run that fits: it stays below XLA's own
    figure for the compiled chunk, and grows with the look-ahead as XLA's does."""
    args = mix_metagrad.Args(num_envs=8, num_steps=6, board_size=7, inner_steps=inner_steps, log_frequency=1)
    args.num_updates = 10
    assert 0 < mix_metagrad.least_bytes(args) <= xla_bytes(mix_train_chunk(args))


@pytest.mark.parametrize("n", [4])
def test_mrp_metagrads_least_bytes_are_at_most_what_xla_compiles(n):
    args = mrp_metagrad.Args(num_updates=50, batch_size=16, mc_samples=8, inner_steps=[n])
    lowered = mrp_metagrad.make_train(args, n).lower(jax.random.PRNGKey(0))
    assert 0 < mrp_metagrad.least_bytes(args) <= xla_bytes(lowered)


@pytest.mark.parametrize("module", [mix_metagrad, mrp_metagrad])
def test_a_compiled_step_larger_than_the_device_is_refused_in_one_line(module, monkeypatch):
    lowered = jax.jit(lambda x: jnp.cumsum(x) * 2).lower(jnp.ones(1000))
    needed = xla_bytes(lowered)
    compiled = lowered.compile()
    monkeypatch.setattr(module, "available_memory", lambda device: needed)
    module.check_fits(compiled, "the step", "--x")  # exactly what it needs: it fits
    monkeypatch.setattr(module, "available_memory", lambda device: needed - 1)
    with pytest.raises(SystemExit, match=r"^the step needs [\d.]+ GiB and the device has [\d.]+ GiB: lower --x$"):
        module.check_fits(compiled, "the step", "--x")


def test_a_log_frequency_longer_than_the_run_becomes_one_chunk_of_its_updates(tmp_path):
    flags = ["--total-timesteps", "64", "--num-envs", "4", "--num-steps", "4", "--board-size", "5", "--inner-steps", "1"]
    result = run_script(tmp_path, *flags, "--log-frequency", str(HUGE), script="mix_metagrad.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--log-frequency {HUGE} is more than the run's 4 updates: one chunk of them" in result.stdout
    assert "update 4/4 global_step=64" in result.stdout


@pytest.mark.parametrize("name", IMPALA_FAMILY)
def test_the_gradient_clip_is_optaxs_with_a_finite_derivative_at_zero(name):
    clip, reference = IMPALA_FAMILY[name].clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    rng = np.random.default_rng(0)
    for scale in [1e-3, 0.3, 2.0, 50.0]:  # below and above the threshold
        grads = {"a": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=5) * scale, jnp.float32)}
        jax.tree.map(np.testing.assert_array_equal, clip.update(grads, clip.init(grads))[0], reference.update(grads, reference.init(grads))[0])

    def through(tx, g):
        return jnp.sum(tx.update({"a": g}, tx.init({"a": g}))[0]["a"])

    zeros = jnp.zeros(3)
    np.testing.assert_array_equal(jax.grad(partial(through, clip))(zeros), [1.0, 1.0, 1.0])
    assert np.all(np.isnan(jax.grad(partial(through, reference))(zeros)))  # optax's: what a meta-gradient met


@pytest.mark.parametrize("name", ["drmg"])
def test_a_half_batch_of_reset_steps_alone_gives_a_finite_meta_step(name, monkeypatch):
    """Its inner gradient is 0 (every entry is masked out), and the meta-gradient differentiates the update there: with
    optax's clip that was NaN (drmg.py --num-steps 1 stopped at update 89). mg.py and stacx.py build their inner step
    with the same make_optimizer (tests/test_siblings.py), and checked the same when it was written; drmg.py alone
    keeps the test's second-order compilations to one script."""
    module = IMPALA_FAMILY[name]
    args = module.Args(num_quantiles=4) if name == "drmg" else module.Args(two_halves=True) if name == "stacx" else module.Args()
    rollout = make_small_rollout(module)
    resets = np.array(rollout.resets)
    resets[:, :2] = 1.0  # the first half tau1: reset steps only
    rollout = jax.tree.map(jnp.asarray, rollout._replace(resets=resets))

    def meta_step_checks():
        agent_state = make_states(module, args, rollout)
        meta_state = TrainState.create(apply_fn=None, params=module.init_meta_params(args), tx=module.make_meta_optimizer(args))
        state = dict(agent=agent_state, meta=meta_state)
        return jax.device_get(module.learner_step(state, rollout, args, axis_name=None)[2]["non_finite"])

    assert not any(meta_step_checks().values())
    monkeypatch.setattr(module, "clip_by_global_norm", optax.clip_by_global_norm)  # the clip it had: the check can fail
    assert meta_step_checks()["meta_gradients"]


CHECKPOINTED = {**IMPALA_FAMILY, "mix_metagrad": mix_metagrad}


@pytest.mark.parametrize("writer", CHECKPOINTED)
def test_a_checkpoint_is_refused_by_every_other_script_with_the_name_of_its_own(tmp_path, writer):
    path = str(tmp_path / "model.flax_model")
    CHECKPOINTED[writer].save_checkpoint(path, CHECKPOINTED[writer].Args(), update=1)
    assert int(CHECKPOINTED[writer].load_checkpoint(path)["update"]) == 1
    for reader, module in CHECKPOINTED.items():
        if reader != writer:
            with pytest.raises(module.ForeignCheckpoint, match=f"it was written by {writer}.py"):
                module.load_checkpoint(path)


def test_resume_of_another_scripts_checkpoint_says_whose_it_is(tmp_path, monkeypatch):
    qr_impala.save_checkpoint(str(tmp_path / "qr.flax_model"), qr_impala.Args(lambda_=0.9, alpha=0.9), update=1)
    message = refusal(tmp_path, monkeypatch, "drmg", "--resume", "qr.flax_model")
    assert message == "--resume qr.flax_model: not a checkpoint of drmg.py: it was written by qr_impala.py"


def test_a_checkpoint_of_another_format_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "model.flax_model")
    monkeypatch.setattr(drmg, "CHECKPOINT_FORMAT", 0)
    drmg.save_checkpoint(path, drmg.Args(), update=1)
    monkeypatch.undo()
    with pytest.raises(drmg.ForeignCheckpoint, match=f"format 0, this drmg.py reads format {drmg.CHECKPOINT_FORMAT}"):
        drmg.load_checkpoint(path)


def test_a_taken_run_directory_gets_a_suffix_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert qr_impala.make_run_dir("Env__x__1__100") == os.path.join("runs", "Env__x__1__100")
    assert qr_impala.make_run_dir("Env__x__1__100") == os.path.join("runs", "Env__x__1__100-2")
    assert qr_impala.make_run_dir("Env__x__1__100") == os.path.join("runs", "Env__x__1__100-3")
    assert "runs/Env__x__1__100-2 is another run's: this run writes to runs/Env__x__1__100-3" in capsys.readouterr().out
    assert qr_impala.make_run_dir("Env__x__1__101", create=False) == os.path.join("runs", "Env__x__1__101")
    assert sorted(os.listdir("runs")) == ["Env__x__1__100", "Env__x__1__100-2", "Env__x__1__100-3"]


def test_two_runs_started_together_never_share_a_directory(tmp_path):
    flags = ["--total-timesteps", "64", "--save-every", "1", *CARTPOLE]
    runs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "qr_impala.py"), *flags], cwd=tmp_path, env=script_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    saved = sorted(line.split("checkpoint saved to ")[1] for out, _ in outputs for line in out.splitlines() if "saved to" in line)
    assert len(saved) == 2 and saved[0] != saved[1] and all(os.path.exists(tmp_path / path) for path in saved)


WANDB = importlib.util.find_spec("wandb") is not None
TRACKED = ["qr_impala", "drmg", "mg", "stacx", "mix_metagrad", "mrp_metagrad"]


@pytest.mark.skipif(WANDB, reason="wandb is installed: test_track_logs_to_wandb_offline checks --track")
@pytest.mark.parametrize("script", TRACKED)
def test_track_without_wandb_says_how_to_install_it(tmp_path, monkeypatch, script):
    flags = ["--track"] + (["--env-id", "CartPole-v1"] if script not in ("mrp_metagrad", "mix_metagrad") else [])
    assert refusal(tmp_path, monkeypatch, script, *flags) == "--track needs Weights & Biases: pip install wandb"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not WANDB, reason="wandb is not installed: test_track_without_wandb_says_how_to_install_it")
def test_track_logs_to_wandb_offline(tmp_path):
    flags = [*CARTPOLE, "--total-timesteps", "128", "--track"]
    result = run_script(tmp_path, *flags, script="drmg.py", timeout=600, WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    assert glob.glob(os.path.join(run, "*.wandb"))
    assert glob.glob(os.path.join(run, "files", "runs", "CartPole-v1__drmg__*", "events.out.tfevents.*"))  # synced


def test_a_bad_flag_exits_with_code_1_and_one_line_on_stderr(tmp_path):
    result = run_script(tmp_path, "--env-id", "CartPole-v1", "--log-frequency", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "--log-frequency, --eval-episodes and --total-timesteps must be >= 1, --save-every >= 0"
    )
    assert not os.path.exists(tmp_path / "runs")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_parameters_and_only_process_0_writes(tmp_path):
    flags = [*CARTPOLE, "--total-timesteps", "512", "--distributed", "--num-processes", "2"]
    flags += ["--coordinator-address", f"127.0.0.1:{free_port()}"]
    env = script_env()
    command = [sys.executable, os.path.join(ROOT, "drmg.py"), *flags, "--process-id"]
    processes = [
        subprocess.Popen(command + [str(i)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    fingerprints = [[line for line in stdout.splitlines() if "sha256" in line] for stdout, _ in outputs]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 1
    assert "global_step=512" in outputs[0][0]  # 2 processes x 2 threads x 4 envs x 8 steps per update
    run_dir = only_run_dir(tmp_path)  # only process 0 wrote one
    assert os.path.exists(os.path.join(run_dir, "drmg.flax_model"))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--inner-steps"], "--inner-steps: give at least one n"),
        (["--even-reward", "nan"], "--even-reward must lie in [-1e18, 1e18]"),
        (["--even-reward", "-1e30"], "--even-reward must lie in [-1e18, 1e18]"),
        (["--noise-std", "-1"], "--noise-std in [0, 1e18]"),
        (["--noise-std", "1e19"], "--noise-std in [0, 1e18]"),
        (["--gamma", "1"], "--gamma in (0, 1)"),
    ],
)
def test_mrp_metagrad_refuses_bad_flags_before_writing_anything(tmp_path, monkeypatch, flags, message):
    assert message in refusal(tmp_path, monkeypatch, "mrp_metagrad", *flags)
    assert os.listdir(tmp_path) == []
