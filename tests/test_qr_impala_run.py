"""qr_impala.py end to end: smoke runs, saved models, determinism, errors, the multi-device learner, and learning."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from helpers import learn_cartpole, learner_step_on, make_rollout, only_run_dir, run_script, scalars

import qr_impala
from qr_impala import AgentNetwork, Args, evaluate, hyperparameters, impala_loss, load_model


@pytest.mark.parametrize(
    "flags",
    [
        ["--env-id", "CartPole-v1", "--total-timesteps", "3000", "--local-num-envs", "4", "--num-steps", "8"],
        ["--env-id", "Breakout-v5", "--total-timesteps", "64", "--local-num-envs", "2", "--num-actor-threads", "1"]
        + ["--num-steps", "8", "--eval-episodes", "1"],
        ["--env-id", "snake_jax", "--total-timesteps", "256", "--local-num-envs", "4", "--num-steps", "8"],
    ],
    ids=["CartPole-v1", "Breakout-v5", "snake_jax"],
)
def test_smoke_run_logs_saves_loads_and_evaluates(tmp_path, flags):
    result = run_script(tmp_path, *flags, "--save-model", "--eval-episodes", "2", "--log-frequency", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SPS=" in result.stdout and "evaluation over" in result.stdout
    run_dir = only_run_dir(tmp_path)
    logged = scalars(run_dir)
    for tag in [
        "charts/SPS",
        "losses/loss",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "eval/episodic_return",
    ]:
        assert tag in logged and np.all(np.isfinite(logged[tag])), tag
    if "CartPole-v1" in flags:
        assert "charts/episodic_return" in logged
    saved_args, _, inputs = load_model(os.path.join(run_dir, "qr_impala.flax_model"))
    assert set(inputs) == {"params"} and jax.tree.leaves(inputs["params"])
    assert saved_args.env_id == flags[1] and saved_args.num_updates >= 2
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))
    returns = evaluate(os.path.join(run_dir, "qr_impala.flax_model"), eval_episodes=2, seed=3)
    assert returns.shape == (2,) and np.all(np.isfinite(returns))


def test_same_seed_gives_the_same_params_whatever_the_thread_timing(tmp_path):
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", "4000", "--local-num-envs", "4", "--num-steps", "8"]
    saved = []
    for name in ["first", "second"]:
        os.makedirs(tmp_path / name)
        result = run_script(tmp_path / name, *flags, "--save-model", "--eval-episodes", "1")
        assert result.returncode == 0, result.stderr[-3000:]
        saved.append(load_model(os.path.join(only_run_dir(tmp_path / name), "qr_impala.flax_model"))[2]["params"])
    jax.tree.map(np.testing.assert_array_equal, *saved)


def test_unknown_env_id_fails_clearly_before_writing_anything(tmp_path):
    result = run_script(tmp_path, "--env-id", "Breakot-v5")
    assert result.returncode != 0
    assert "unknown --env-id 'Breakot-v5'" in result.stderr and "Breakout-v5" in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_two_learner_devices_end_to_end(tmp_path):
    result = run_script(
        tmp_path,
        *["--env-id", "CartPole-v1", "--total-timesteps", "2000", "--local-num-envs", "4", "--num-steps", "8"],
        *["--learner-device-ids", "0", "1", "--actor-device-ids", "1"],
        xla_devices=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learner devices [CpuDevice(id=0), CpuDevice(id=1)]" in result.stdout


def test_two_device_gradient_equals_single_device_gradient():
    assert len(jax.devices()) >= 2, "tests/conftest.py asks XLA for two host devices"
    num_actions = 3
    args = Args(env_id="CartPole-v1", num_quantiles=4, gamma=0.95, lambda_=0.9, alpha=0.8)
    rollout = make_rollout(qr_impala)
    network = AgentNetwork(num_actions, args.num_quantiles)
    params = network.init(jax.random.PRNGKey(0), rollout.obs[0])
    # With SGD at learning rate 1 the step is minus the gradient.
    state = TrainState.create(apply_fn=network.apply, params=params, tx=optax.sgd(1.0))

    def gradient_on(devices):
        new_state, metrics, _ = learner_step_on(qr_impala, devices, args, dict(agent=state), rollout)
        return jax.tree.map(lambda new, old: np.asarray(old) - np.asarray(new), new_state["agent"].params, params), metrics

    one_device, metrics_one = gradient_on(jax.devices()[:1])
    two_devices, metrics_two = gradient_on(jax.devices()[:2])
    full_batch = jax.grad(
        lambda p: impala_loss(p, network.apply, jax.tree.map(jnp.asarray, rollout), hyperparameters(args), args)[0]
    )(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), two_devices, one_device)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one_device, full_batch)
    assert optax.global_norm(one_device) > 1e-3
    np.testing.assert_allclose(metrics_two["loss"], metrics_one["loss"], rtol=1e-5)


def test_learns_cartpole(tmp_path):
    logged, _ = learn_cartpole(tmp_path, "qr_impala.py", 150000, "2e-3", log_frequency=200)
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[-1] >= 150, returns[-10:]
