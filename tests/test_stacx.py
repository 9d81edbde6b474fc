"""stacx.py: leaky v-trace against rlax and a plain loop, the KL term, the meta-gradient against finite differences,
auxiliary heads never act, two devices, learning, smoke runs."""

import os
import queue
import threading
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax
from flax.training.train_state import TrainState
from helpers import (
    NUM_ACTIONS,
    B,
    check_no_return_crosses_an_episode_boundary,
    check_two_devices_give_the_single_device_meta_step,
    learn_cartpole,
    make_small_rollout,
    make_states,
    make_unroll,
    run_script,
    smoke_run,
    vtrace_oracle_batch,
)

import plot
import stacx

NUM_HEADS = 3


def run(u, gamma, lambda_, alpha_rho, alpha_c, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    keys = ["values", "bootstrap_value", "rewards", "discounts", "trace_masks", "log_rhos"]
    hyper = map(jnp.asarray, (gamma, lambda_, alpha_rho, alpha_c))
    return stacx.leaky_vtrace(*(u[k] for k in keys), *hyper, rho_bar, c_bar, pg_rho_bar)


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_leaky_vtrace_equals_rlax_when_alpha_rho_equals_alpha_c(lambda_, alpha, seed):
    u = make_unroll(seed)
    gamma = 0.97
    returns, advantages = run(u, gamma, lambda_, alpha, alpha)
    is_ratio = np.exp(u["log_rhos"])
    for b in range(B):
        v_tm1 = u["values"][:, b]
        v_t = np.append(v_tm1[1:], u["bootstrap_value"][b])
        lam_t = lambda_ * u["trace_masks"][:, b]  # a truncation stops the traces
        args = (v_tm1, v_t, u["rewards"][:, b], gamma * u["discounts"][:, b], is_ratio[:, b])
        out = rlax.leaky_vtrace_td_error_and_advantage(*args, alpha=alpha, lambda_=lam_t, stop_target_gradients=False)
        np.testing.assert_allclose(returns[:, b], out.errors + v_tm1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(advantages[:, b], out.pg_advantage, rtol=1e-5, atol=1e-5)
        errors = rlax.leaky_vtrace(*args, alpha_=alpha, lambda_=lam_t, stop_target_gradients=False)
        np.testing.assert_allclose(returns[:, b], errors + v_tm1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("alpha_rho,alpha_c,rho_bar,c_bar,pg_rho_bar", [(0.9, 0.4, 1.0, 1.0, 1.0), (0.7, 0.2, 2.0, 0.8, 1.5)])
def test_leaky_vtrace_equals_plain_loop_with_different_alphas(lambda_, alpha_rho, alpha_c, rho_bar, c_bar, pg_rho_bar):
    u = make_unroll(2)
    returns, advantages = run(u, 0.9, lambda_, alpha_rho, alpha_c, rho_bar, c_bar, pg_rho_bar)
    options = dict(rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, alpha_rho=alpha_rho, alpha_c=alpha_c)
    expected_returns, expected_advantages = vtrace_oracle_batch(u, 0.9, lambda_, **options)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)


def test_no_return_crosses_an_episode_boundary():
    check_no_return_crosses_an_episode_boundary(lambda u: run(u, 0.99, 1.0, 0.9, 0.5))


def test_alpha_c_is_kept_at_most_alpha_rho():
    args = stacx.Args(num_heads=2)
    meta_params = stacx.init_meta_params(args)
    meta_params = dict(meta_params, alpha_rho=jnp.asarray([2.0, -1.0]), alpha_c=jnp.asarray([1.0, 0.5]))
    eta = stacx.hyperparameters(meta_params, args)
    np.testing.assert_allclose(eta["alpha_c"], [jax.nn.sigmoid(1.0), jax.nn.sigmoid(-1.0)], rtol=1e-6)
    assert sum(x.size for x in jax.tree.leaves(meta_params)) == 7 * 2  # |eta| = 7 per head
    np.testing.assert_allclose(eta["g_v"], args.value_coef * 0.99, rtol=1e-6)  # g = g' sigmoid(logit), sigmoid = 0.99


def test_kl_divergence_equals_a_direct_sum():
    rng = np.random.default_rng(0)
    logits_p, logits_q = rng.normal(size=(2, 5, 3, 4)) * 2
    valid = (rng.random((5, 3)) > 0.3).astype(np.float64)
    p = np.exp(logits_p) / np.exp(logits_p).sum(-1, keepdims=True)
    q = np.exp(logits_q) / np.exp(logits_q).sum(-1, keepdims=True)
    expected = sum(
        valid[t, b] * sum(p[t, b, a] * np.log(p[t, b, a] / q[t, b, a]) for a in range(4)) for t in range(5) for b in range(3)
    )
    ours = stacx.kl_divergence(jnp.asarray(logits_p, jnp.float32), jnp.asarray(logits_q, jnp.float32), jnp.asarray(valid))
    np.testing.assert_allclose(ours, expected / 15, rtol=1e-5)
    assert float(stacx.kl_divergence(jnp.asarray(logits_p), jnp.asarray(logits_p), jnp.asarray(valid))) == pytest.approx(
        0.0, abs=1e-7
    )


@pytest.mark.parametrize("two_halves", [False, True], ids=["same batch", "two halves"])
def test_meta_gradient_equals_central_finite_differences_in_float64(two_halves):
    """d L_out / d eta = (dL_out/dtheta') (dtheta'/d eta), where dL_out/dtheta' is the outer loss's usual gradient
    (targets and advantages stop-gradiented, pi_theta fixed in the KL) and theta' = theta + RMSProp(grad L_in(theta,
    eta)) (Xu et al. eq. 1-2). The oracle differentiates theta'(eta) by central differences."""
    with jax.enable_x64(True):
        args = stacx.Args(num_heads=NUM_HEADS, learning_rate=0.05, two_halves=two_halves, ent_coef=0.3)
        rollout = jax.tree.map(jnp.asarray, make_small_rollout(stacx, dtype=np.float64))
        inner, outer = stacx.split_halves(rollout) if two_halves else (rollout, rollout)
        agent_state = make_states(stacx, args, rollout)
        # Spread the logits so that no alpha_c sits on the alpha_rho bound, and every entry differs.
        initial = dict(gamma=0.9, lambda_=0.7, g_v=0.8, g_p=0.6, g_e=0.7, alpha_rho=0.9, alpha_c=0.5)
        meta_params = {
            k: jnp.asarray(stacx.logit(v) + np.linspace(-0.3, 0.3, NUM_HEADS), jnp.float64) for k, v in initial.items()
        }

        @jax.jit
        def params_prime(m):
            eta = stacx.hyperparameters(m, args)
            loss = lambda p: stacx.impala_loss(p, agent_state.apply_fn, inner, eta, args, NUM_HEADS)[0]  # noqa: E731
            updates, _ = agent_state.tx.update(jax.grad(loss)(agent_state.params), agent_state.opt_state, agent_state.params)
            return jax.tree.map(jnp.add, agent_state.params, updates)

        def outer_objective(p):
            loss, (_, logits_prime) = stacx.impala_loss(
                p, agent_state.apply_fn, outer, stacx.reference_hyperparameters(args), args, 1
            )
            logits = stacx.main_head(agent_state.apply_fn(agent_state.params, outer.obs[:-1])[0])
            return loss + args.kl_coef * stacx.kl_divergence(logits_prime, logits, 1.0 - outer.resets)

        outer_grad = jax.grad(outer_objective)(params_prime(meta_params))
        assert optax.global_norm(outer_grad) > 1e-3

        base = jax.tree.leaves(params_prime(meta_params))

        @jax.jit
        def linearised_outer_loss(m):  # relative to theta'(eta), to keep the sum small and its rounding error too
            leaves = zip(jax.tree.leaves(outer_grad), jax.tree.leaves(params_prime(m)), base)
            return sum(jnp.vdot(g, p - p0) for g, p, p0 in leaves)

        meta_grads = jax.jit(lambda m: stacx.meta_gradient(m, agent_state, inner, outer, args, None)[0])(meta_params)
        eps = 1e-6
        for name, value in meta_params.items():
            numeric = np.zeros(NUM_HEADS)
            for k in range(NUM_HEADS):
                step = np.eye(NUM_HEADS)[k] * eps
                plus, minus = dict(meta_params, **{name: value + step}), dict(meta_params, **{name: value - step})
                numeric[k] = (linearised_outer_loss(plus) - linearised_outer_loss(minus)) / (2 * eps)
            np.testing.assert_allclose(meta_grads[name], numeric, rtol=1e-5, atol=1e-9, err_msg=name)
            assert np.all(np.abs(numeric) > 1e-7), f"{name}: theta' does not depend on every head's entry"


def test_auxiliary_heads_never_choose_actions(tmp_path):
    """Run an actor thread with params whose auxiliary heads prefer other actions than the main head: the behaviour
    logits it records, and so the actions, are the main head's."""
    args = stacx.Args(env_id="CartPole-v1", local_num_envs=2, num_actor_threads=1, num_steps=6, num_heads=3)
    args.num_updates, args.world_size = 1, 1
    envs = stacx.make_env(args.env_id, 0, 1, args)
    network = stacx.AgentNetwork(envs.action_space.n, args.num_heads)
    params = network.init(jax.random.PRNGKey(0), np.array([envs.observation_space.sample()]))
    kernel = params["params"]["Dense_0"]["kernel"]  # the policy layer, [256, H * A]
    bias = np.zeros(kernel.shape[-1], np.float32)
    bias[2:] = [5.0, -5.0, -5.0, 5.0]  # heads 1 and 2 strongly prefer actions 0 and 1
    params = {"params": dict(params["params"], Dense_0={"kernel": kernel, "bias": jnp.asarray(bias)})}
    rollout_queue, params_queue = queue.Queue(), queue.Queue()
    params_queue.put(dict(params=params))  # the policy's inputs (stacx.policy_inputs)
    device = jax.devices()[0]
    writer = stacx.SummaryWriter(str(tmp_path))
    stop, doing, returns = threading.Event(), ["starting"], deque(maxlen=100)
    stacx.actor_loop(
        jax.random.PRNGKey(1), args, rollout_queue, params_queue, writer, [device], 0, device, (0, 0), returns, stop, doing
    )
    writer.close()
    _, shards = rollout_queue.get()
    obs, behaviour_logits = np.asarray(shards["obs"][0]), np.asarray(shards["behaviour_logits"][0])
    all_logits = network.apply(params, obs[:-1].reshape(-1, obs.shape[-1]))[0].reshape(6, 2, 3, -1)
    np.testing.assert_allclose(behaviour_logits, all_logits[:, :, 0], rtol=1e-5, atol=1e-6)
    assert np.abs(all_logits[:, :, 1] - all_logits[:, :, 0]).max() > 5  # the test would notice another head


def test_num_heads_one_has_no_auxiliary_heads_and_aux_heads_shape_the_torso():
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(stacx))
    grads = {}
    for heads in [1, 3]:
        args = stacx.Args(num_heads=heads)
        state = make_states(stacx, stacx.Args(num_heads=3), rollout)  # the same params; num_heads=1 ignores heads 1 and 2
        eta = stacx.hyperparameters(stacx.init_meta_params(args), args)
        loss = lambda p: stacx.impala_loss(p, state.apply_fn, rollout, eta, args, heads)[0]  # noqa: E731
        grads[heads] = jax.jit(jax.grad(loss))(state.params)["params"]
    policy_kernel = grads[1]["Dense_0"]["kernel"]
    assert np.all(policy_kernel[:, NUM_ACTIONS:] == 0) and np.abs(policy_kernel[:, :NUM_ACTIONS]).max() > 0
    torso = [grads[h]["Torso_0"]["Dense_0"]["kernel"] for h in (1, 3)]
    assert not np.allclose(torso[0], torso[1])


def test_meta_learn_none_is_one_step_on_the_whole_batch():
    args = stacx.Args(meta_learn="none", num_heads=NUM_HEADS, learning_rate=0.01)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(stacx))
    agent_state = make_states(stacx, args, rollout)
    meta_state = TrainState.create(apply_fn=None, params=stacx.init_meta_params(args), tx=stacx.make_meta_optimizer(args))
    step = jax.jit(lambda a, m, r: stacx.learner_step(dict(agent=a, meta=m), r, args, axis_name=None))
    new_states, metrics, checks = step(agent_state, meta_state, rollout)
    new_state, new_meta_state = new_states["agent"], new_states["meta"]
    eta = stacx.hyperparameters(meta_state.params, args)
    loss = lambda p: stacx.impala_loss(p, agent_state.apply_fn, rollout, eta, args, NUM_HEADS)[0]  # noqa: E731
    expected = agent_state.apply_gradients(grads=jax.grad(loss)(agent_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected.params)
    jax.tree.map(np.testing.assert_array_equal, new_meta_state.params, meta_state.params)


def test_two_device_meta_step_equals_single_device_meta_step():
    # Same batch for inner and outer: theta' comes from the gradient averaged over the shards, and the mean of the
    # shards' outer losses is the whole batch's, so two devices must give the single device's meta step exactly.
    check_two_devices_give_the_single_device_meta_step(stacx, stacx.Args(num_heads=NUM_HEADS), halves=False)


def test_learns_cartpole_and_every_head_meta_parameter_is_logged_and_plotted(tmp_path):
    logged, run_dir = learn_cartpole(tmp_path, "stacx.py", 150000, "1e-3", "--save-model", "--eval-episodes", "3")
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[-1] >= 150, returns[-10:]
    names = ["gamma", "lambda", "g_v", "g_p", "g_e", "alpha_rho", "alpha_c"]
    assert {f"meta/{n}/h{k}" for k in range(3) for n in names} <= set(logged)
    for tag in [t for t in logged if t.startswith("meta/")]:
        assert np.all(np.isfinite(logged[tag])), tag
    assert abs(logged["meta/gamma/h0"][-1] - 0.99) > 1e-5 and abs(logged["meta/g_p/h1"][-1] - 0.99) > 1e-5
    assert len(logged["eval/episodic_return"]) == 3
    # benchmark/plot.py stacks the heads of each meta-parameter, in head order, as it stacks drmg.py's quantiles
    meta = plot.meta_parameters([plot.read_scalars(run_dir)])
    assert set(meta) == set(names)
    steps, gammas = meta["gamma"]
    assert gammas.shape == (3, len(steps))
    np.testing.assert_allclose(gammas[:, -1], [logged[f"meta/gamma/h{k}"][-1] for k in range(3)], rtol=1e-6)


@pytest.mark.parametrize(
    "env_id,variant",
    [("Breakout-v5", []), ("CartPole-v1", ["--two-halves", "--num-heads", "1"]), ("CartPole-v1", ["--meta-learn", "none"])],
)
def test_smoke_run(tmp_path, env_id, variant):
    logged = smoke_run(tmp_path, "stacx.py", env_id, *variant)
    assert "meta/gamma/h0" in logged
    assert ("meta/gamma/h1" in logged) == ("--num-heads" not in variant)
    assert ("meta/grad_norm" in logged) == ("none" not in variant)


def test_bad_flags_fail_before_writing_anything(tmp_path):
    result = run_script(tmp_path, "--alpha-c", "1.5", script="stacx.py")
    assert result.returncode != 0 and "must lie in" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))
