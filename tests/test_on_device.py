"""The on-device loop of the IMPALA-family scripts (Podracer's Anakin), which trains every JAX environment.

- Its updates and the episodes it logs equal a plain Python loop's: per step each env's key split, its action drawn
  from the policy, the environment stepped through its numpy interface, the episodes' returns and lengths counted by
  hand, then `learner_step` on the Rollout built from those steps. A copy of the loop that forgets to restart an ended
  episode's env (no reset step) must fail the comparison.
- Two learner devices (the envs split between them, gradients averaged) give the one-device update.
- Whole runs: the same seed twice gives the same fingerprints; `--num-seeds 2` writes two runs; a run stopped by SIGTERM
  and resumed ends with the uninterrupted run's fingerprints, and a copy of the script that drops the environments'
  state from what it restores does not.
"""

import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import IMPALA_FAMILY, ROOT, run_script, script_env
from jax.sharding import Mesh, NamedSharding


class Recorder:
    """A TensorBoard writer that keeps what it is given: {tag: [(step, value)]}."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((int(step), float(value)))


def small_args(module, env_id, num_envs=4, num_steps=8):
    args = module.Args(env_id=env_id, local_num_envs=num_envs, num_actor_threads=1, num_steps=num_steps, chunk_envs=0)
    args.world_size, args.local_batch_size, args.batch_size, args.num_updates = 1, num_envs * num_steps, num_envs * num_steps, 100
    return args


def on_device_run(module, args, num_updates, num_devices=1, seed=1):
    """`num_updates` updates of the script's jitted on-device loop for one seed on `num_devices` learner devices:
    (the learner state after them, what `log_episodes` logged, the network, the seed's fresh start)."""
    envs = module.make_env(args.env_id, 0, 1, args)
    network = module.make_network(envs.action_space.n, args)
    start = module.new_run(args, seed, network, np.array([envs.observation_space.sample()]), True)
    run = start["run"]._replace(learner=start["learner"])
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("learner",))
    runs = jax.tree.map(lambda x: jnp.asarray(x)[None], run)  # one seed
    runs = module.RunState(*[jax.device_put(part, NamedSharding(mesh, spec)) for part, spec in zip(runs, module.RUN_SPECS)])
    train = module.make_on_device_train(args, mesh, start["batch_step"], network, num_updates)
    runs, (_, _, episodes) = train(runs)
    writer = Recorder()
    episodes = jax.tree.map(lambda x: np.asarray(x)[0], episodes)
    module.log_episodes(writer, episodes, 0, args.local_num_envs, deque(maxlen=100))
    return jax.tree.map(lambda x: np.asarray(x)[0], runs.learner), writer.scalars, network, start


def plain_loop(module, args, network, start, num_updates, seed=1):
    """The same updates as a plain loop over steps and envs: (the learner state, the episodes {tag: [(step, value)]})."""
    learner = start["learner"]
    learner_step = jax.jit(lambda learner, rollout: module.learner_step(learner, rollout, args, None)[0])  # eager: minutes
    envs = module.make_env(args.env_id, seed, args.local_num_envs, args)
    obs, _ = envs.reset()
    keys = [np.asarray(k) for k in start["run"].action_keys]
    returns, resets, logged = np.zeros(args.local_num_envs), np.zeros(args.local_num_envs), {}
    for update in range(num_updates):
        steps = dict(obs=[], actions=[], behaviour_logits=[], rewards=[], terminations=[], truncations=[], resets=[])
        for t in range(args.num_steps):
            logits = np.asarray(module.policy_logits(network, module.policy_inputs(learner, args), jnp.asarray(obs)))
            actions = []
            for b in range(args.local_num_envs):
                keys[b], action_key = jax.random.split(keys[b])
                actions.append(int(jax.random.categorical(action_key, logits[b])))
            steps["obs"].append(obs)
            steps["actions"].append(actions)
            steps["behaviour_logits"].append(logits)
            steps["resets"].append(resets)
            obs, reward, terminated, truncated, info = envs.step(np.array(actions))
            steps["rewards"].append(reward)
            steps["terminations"].append(terminated)
            steps["truncations"].append(truncated)
            returns = returns + reward
            resets = np.asarray(terminated | truncated, np.float32)
            for b in np.nonzero(resets)[0]:
                end_step = (update * args.num_steps + t + 1) * args.local_num_envs
                logged.setdefault("charts/episodic_return", []).append((end_step, float(returns[b])))
                logged.setdefault("charts/episodic_length", []).append((end_step, float(info["elapsed_step"][b])))
                returns[b] = 0.0
        steps["obs"].append(obs)
        rollout = module.Rollout(**{k: jnp.asarray(np.stack(v)) for k, v in steps.items()})
        rollout = rollout._replace(**{k: getattr(rollout, k).astype(jnp.float32) for k in ("rewards", "terminations", "truncations", "resets")})
        learner = learner_step(learner, rollout._replace(actions=rollout.actions.astype(jnp.int32)))
    return learner, logged


def assert_same_training(a, b):
    (learner_a, logged_a), (learner_b, logged_b) = a, b
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)  # noqa: E731
    jax.tree.map(close, jax.tree.leaves(learner_a), jax.tree.leaves(learner_b))
    for tag in ("charts/episodic_return", "charts/episodic_length"):
        assert [s for s, _ in logged_a.get(tag, [])] == [s for s, _ in logged_b.get(tag, [])], tag
        np.testing.assert_allclose([v for _, v in logged_a.get(tag, [])], [v for _, v in logged_b.get(tag, [])], err_msg=tag)


@pytest.mark.parametrize("name,env_id", [("qr_impala", "Breakout-MinAtar"), ("mg", "snake_jax")])
def test_the_on_device_loop_is_a_plain_loop_of_unrolls_and_learner_steps(name, env_id):
    """Three updates of 4 envs x 8 steps (some episodes end: Breakout's in its first moves, Snake's on a 12 x 12 board);
    mg.py's policy acts conditioned on eta."""
    module = IMPALA_FAMILY[name]
    args = small_args(module, env_id)
    learner, logged, network, start = on_device_run(module, args, 3)
    assert logged.get("charts/episodic_return"), "some episodes must end in 24 steps"
    assert_same_training((learner, logged), plain_loop(module, args, network, start, 3))


def test_the_comparison_catches_a_loop_that_never_restarts_an_ended_episode(monkeypatch):
    module = IMPALA_FAMILY["qr_impala"]
    source = inspect.getsource(module.on_device_update)
    broken = source.replace("return (env_state, next_obs, ended, keys,", "return (env_state, next_obs, resets, keys,")
    assert broken != source
    namespace = dict(vars(module))
    exec(broken, namespace)
    monkeypatch.setattr(module, "on_device_update", namespace["on_device_update"])
    args = small_args(module, "Breakout-MinAtar")
    learner, logged, network, start = on_device_run(module, args, 3)
    with pytest.raises(AssertionError):
        assert_same_training((learner, logged), plain_loop(module, args, network, start, 3))


def test_two_learner_devices_give_the_one_device_updates():
    """The envs split between two devices, each with its own key per env, the gradients averaged: the same actions,
    episodes and parameters as on one device (QR's two halves average to the whole batch's gradient)."""
    assert len(jax.devices()) >= 2, "tests/conftest.py asks XLA for two host devices"
    module = IMPALA_FAMILY["qr_impala"]
    args = small_args(module, "Breakout-MinAtar")
    one_learner, one_logged, _, _ = on_device_run(module, args, 3, num_devices=1)
    two_learner, two_logged, _, _ = on_device_run(module, args, 3, num_devices=2)
    assert one_logged.get("charts/episodic_return")
    assert_same_training((one_learner, one_logged), (two_learner, two_logged))


FLAGS = ["--env-id", "Breakout-MinAtar", "--local-num-envs", "4", "--num-steps", "8", "--log-frequency", "2"]
FLAGS += ["--no-anneal-lr", "--num-seeds", "2", "--save-every", "0"]


def fingerprints(stdout):
    return re.findall(r"final parameters after update (\d+) of seed (\d+): sha256 (\w+)", stdout)


def stopped_run(cwd, script_path):
    """A run of `script_path` stopped by SIGTERM after its first call: (the update it stopped after, its stdout)."""
    process = subprocess.Popen(
        [sys.executable, script_path, *FLAGS, "--total-timesteps", "10000000"],
        cwd=cwd,
        env=script_env(PYTHONUNBUFFERED="1", PYTHONPATH=ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("update "):
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    return int(re.search(r"stopped by SIGTERM after update (\d+)", stdout).group(1)), stdout


def test_the_same_seeds_twice_give_the_same_fingerprints_in_two_runs_each(tmp_path):
    results = []
    for attempt in ("first", "second"):
        os.makedirs(tmp_path / attempt)
        result = run_script(tmp_path / attempt, *FLAGS, "--total-timesteps", "256")
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(fingerprints(result.stdout))
        run_dirs = sorted(os.listdir(tmp_path / attempt / "runs"))
        assert [d.split("__")[2] for d in run_dirs] == ["1", "2"]  # --seed 1 and 2, each in its own run directory
        for run_dir in run_dirs:
            files = os.listdir(tmp_path / attempt / "runs" / run_dir)
            assert "qr_impala.flax_model" in files and any(f.startswith("events.out.tfevents") for f in files)
    assert results[0] == results[1] and len(results[0]) == 2 and results[0][0][2] != results[0][1][2], results


def test_a_run_stopped_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    """Both seeds of a --num-seeds 2 run continue bit for bit from their checkpoints: learner states, the environments'
    states, observations, keys and episode returns. A copy of qr_impala.py that restarts the environments on resume
    (as for EnvPool), resuming a copy of the same checkpoints, ends elsewhere."""
    os.makedirs(tmp_path / "parts")
    stopped_at, stdout = stopped_run(tmp_path / "parts", os.path.join(ROOT, "qr_impala.py"))
    assert "the run stops after the current update" in stdout
    total = str((stopped_at + 4) * 32)
    (path,) = [p.strip() for p in stdout.split("continue with --resume ")[1:]]
    shutil.copytree(tmp_path / "parts", tmp_path / "broken")
    source = open(os.path.join(ROOT, "qr_impala.py")).read()
    broken = source.replace("            if keep_envs:\n", "            if False:\n")
    assert broken != source
    open(tmp_path / "broken" / "qr_impala.py", "w").write(broken)  # the same file name: the checkpoints name their script
    resumed = {}
    for name, script in (("parts", os.path.join(ROOT, "qr_impala.py")), ("broken", str(tmp_path / "broken" / "qr_impala.py"))):
        checkpoint = path.replace(str(tmp_path / "parts"), str(tmp_path / name))  # the copy's own, were it absolute
        resumed[name] = subprocess.run(
            [sys.executable, script, "--resume", checkpoint, "--total-timesteps", total],
            cwd=tmp_path / name,
            env=script_env(PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed[name].returncode == 0, resumed[name].stderr[-3000:]
        assert f"resumed from {checkpoint} at update {stopped_at}" in resumed[name].stdout
        shutil.rmtree(tmp_path / name)
    os.makedirs(tmp_path / "whole")
    whole = run_script(tmp_path / "whole", *FLAGS, "--total-timesteps", total)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert len(fingerprints(whole.stdout)) == 2 and fingerprints(whole.stdout)[0][0] == str(stopped_at + 4)
    assert fingerprints(resumed["parts"].stdout) == fingerprints(whole.stdout)
    assert fingerprints(resumed["broken"].stdout) != fingerprints(whole.stdout)
    assert len(fingerprints(resumed["broken"].stdout)) == 2  # it ran to the end, elsewhere
