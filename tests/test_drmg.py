"""drmg.py: meta-gradient against finite differences, QR equivalence, distributional v-trace and n-step return against
plain loops, scalar eta, learning, smoke runs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from helpers import (
    check_no_return_crosses_an_episode_boundary,
    check_two_devices_give_the_single_device_meta_step,
    learn_cartpole,
    make_small_rollout,
    make_states,
    make_unroll,
    smoke_run,
    vtrace_oracle_batch,
)

import drmg
import qr_impala


def test_meta_gradient_equals_central_finite_differences_in_float64():
    """Eq. 14: d L_out / d eta = (dL_out/dtheta') (dtheta'/d eta), where dL_out/dtheta' is the outer loss's usual
    gradient (its targets and advantages stop-gradiented) and theta' = theta + RMSProp(grad L_in(theta, eta)) (eq. 12).
    The oracle differentiates theta'(eta) by central differences, its inner step written here independently."""
    with jax.enable_x64(True):
        args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.7, alpha=0.6, weight_init=0.8, learning_rate=0.05)
        rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg, dtype=np.float64))
        inner, outer = drmg.split_halves(rollout)
        agent_state = make_states(drmg, args, rollout)
        meta_params = jax.tree.map(lambda x: x + jnp.linspace(-0.3, 0.3, x.size).reshape(x.shape), drmg.init_meta_params(args))
        assert jax.tree.leaves(meta_params)[0].dtype == jnp.float64

        def params_prime(m):
            eta = drmg.hyperparameters(m, args)
            grads = jax.grad(lambda p: drmg.impala_loss(p, agent_state.apply_fn, inner, eta, args)[0])(agent_state.params)
            updates, _ = agent_state.tx.update(grads, agent_state.opt_state, agent_state.params)
            return jax.tree.map(jnp.add, agent_state.params, updates)

        reference = drmg.reference_hyperparameters(args)
        outer_grad = jax.grad(lambda p: drmg.impala_loss(p, agent_state.apply_fn, outer, reference, args)[0])(
            params_prime(meta_params)
        )

        def linearised_outer_loss(m):
            return sum(jnp.vdot(g, p) for g, p in zip(jax.tree.leaves(outer_grad), jax.tree.leaves(params_prime(m))))

        meta_grads = drmg.meta_gradient(meta_params, agent_state, inner, outer, args, None)[0]
        eps = 1e-6
        for name, value in meta_params.items():
            numeric = np.zeros(np.shape(value))
            for j in np.ndindex(np.shape(value)):
                step = np.zeros(np.shape(value))
                step[j] = eps
                plus, minus = dict(meta_params, **{name: value + step}), dict(meta_params, **{name: value - step})
                numeric[j] = (linearised_outer_loss(plus) - linearised_outer_loss(minus)) / (2 * eps)
            np.testing.assert_allclose(meta_grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)
            assert np.all(np.abs(numeric) > 1e-6), f"{name}: theta' does not depend on it"


def test_meta_learn_none_step_equals_qr_impala_step():
    common = dict(num_quantiles=4, gamma=0.95, lambda_=0.9, alpha=0.8, learning_rate=0.01)
    drmg_args = drmg.Args(meta_learn="none", weight_init=1.0, **common)
    qr_args = qr_impala.Args(**common)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg))
    agent_state = make_states(drmg, drmg_args, rollout)
    meta_state = TrainState.create(
        apply_fn=None, params=drmg.init_meta_params(drmg_args), tx=drmg.make_meta_optimizer(drmg_args)
    )
    new_state, _, _ = drmg.learner_step(dict(agent=agent_state, meta=meta_state), rollout, drmg_args, axis_name=None)
    drmg_state, new_meta_state = new_state["agent"], new_state["meta"]
    qr_state = qr_impala.learner_step(dict(agent=agent_state), qr_impala.Rollout(*rollout), qr_args, axis_name=None)[0]["agent"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), drmg_state.params, qr_state.params)
    jax.tree.map(np.testing.assert_array_equal, new_meta_state.params, meta_state.params)
    assert optax.global_norm(jax.tree.map(jnp.subtract, qr_state.params, agent_state.params)) > 1e-4


GAMMA, LAMBDA = np.array([0.9, 0.97, 0.5], np.float32), np.array([1.0, 0.5, 0.0], np.float32)


def distributional_vtrace(u, alpha, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    keys = ["values", "bootstrap_value", "rewards", "discounts", "trace_masks", "log_rhos"]
    return drmg.distributional_vtrace(*(u[k] for k in keys), GAMMA, LAMBDA, alpha, rho_bar, c_bar, pg_rho_bar)


@pytest.mark.parametrize("alpha,rho_bar,c_bar,pg_rho_bar", [(1.0, 1.0, 1.0, 1.0), (0.7, 2.0, 0.8, 1.5)])
def test_distributional_vtrace_equals_the_plain_loop_per_quantile(alpha, rho_bar, c_bar, pg_rho_bar):
    """Eq. 9-11, each quantile its own v-trace with its own gamma and lambda; A_Z's ratio is clipped whatever alpha is."""
    u = make_unroll(2, num_quantiles=3)
    returns, advantages = distributional_vtrace(u, alpha, rho_bar, c_bar, pg_rho_bar)
    options = dict(rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, alpha_rho=alpha, alpha_pg=1.0)
    expected_returns, expected_advantages = vtrace_oracle_batch(u, GAMMA, LAMBDA, **options)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)


def test_no_distributional_return_crosses_an_episode_boundary():
    check_no_return_crosses_an_episode_boundary(lambda u: distributional_vtrace(u, 0.8), num_quantiles=3)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_nstep_distributional_return_equals_a_plain_loop(n):
    rng = np.random.default_rng(n)
    T, B, N = 7, 3, 2
    quantiles = rng.normal(size=(T, B, N))
    bootstrap = rng.normal(size=(B, N))
    rewards = rng.normal(size=(T, B))
    discounts = (rng.random((T, B)) > 0.2).astype(float)
    trace_masks = (rng.random((T, B)) > 0.2).astype(float)
    gamma = np.array([0.9, 0.6])
    ours = drmg.nstep_distributional_return(
        *map(jnp.asarray, (quantiles, bootstrap, rewards, discounts, trace_masks, gamma)), n
    )
    z = np.concatenate([quantiles, bootstrap[None]], axis=0)
    for t, b, q in itertools.product(range(T), range(B), range(N)):
        total, scale, k = 0.0, 1.0, t
        while True:  # sum rewards until n steps, the unroll's end, or a truncation, then bootstrap
            total += scale * rewards[k, b]
            scale *= gamma[q] * discounts[k, b]
            k += 1
            if k - t == n or k == T or trace_masks[k - 1, b] == 0:
                break
        expected = total + scale * z[k, b, q]
        np.testing.assert_allclose(ours[t, b, q], expected, rtol=1e-5, atol=1e-6)


def test_scalar_eta_equals_vector_eta_with_equal_entries():
    vector_args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7)
    scalar_args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7, scalar_eta=True)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg))
    inner, outer = drmg.split_halves(rollout)
    agent_state = make_states(drmg, vector_args, rollout)
    scalar_meta, vector_meta = drmg.init_meta_params(scalar_args), drmg.init_meta_params(vector_args)
    assert scalar_meta["gamma"].shape == (1,) and vector_meta["gamma"].shape == (3,)
    assert sum(x.size for x in jax.tree.leaves(vector_meta)) == 3 * 3 + 3  # |eta| = 3N + 3
    scalar_grads, scalar_inner, _ = drmg.meta_gradient(scalar_meta, agent_state, inner, outer, scalar_args, None)
    vector_grads, vector_inner, _ = drmg.meta_gradient(vector_meta, agent_state, inner, outer, vector_args, None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), scalar_inner, vector_inner)
    for name in ["gamma", "lambda_", "w_z"]:  # a shared entry collects the meta-gradients of all quantiles
        np.testing.assert_allclose(scalar_grads[name], jnp.sum(vector_grads[name], keepdims=True), rtol=1e-4, atol=1e-8)
    for name in ["alpha", "w_pi", "w_h"]:
        np.testing.assert_allclose(scalar_grads[name], vector_grads[name], rtol=1e-4, atol=1e-8)


def test_eta1_learns_only_the_loss_weights():
    args = drmg.Args(num_quantiles=3, meta_learn="eta1")
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg))
    inner, outer = drmg.split_halves(rollout)
    agent_state = make_states(drmg, args, rollout)
    grads, _, _ = drmg.meta_gradient(drmg.init_meta_params(args), agent_state, inner, outer, args, None)
    for name in ["gamma", "lambda_", "alpha"]:
        assert np.all(grads[name] == 0), name
    for name in ["w_z", "w_pi", "w_h"]:
        assert np.all(grads[name] != 0), name


def test_two_device_meta_step_equals_single_device_meta_step():
    check_two_devices_give_the_single_device_meta_step(drmg, drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7))


def test_learns_cartpole_and_meta_parameters_move(tmp_path):
    logged, _ = learn_cartpole(tmp_path, "drmg.py", 100000, "2e-3")
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[-1] >= 100, returns[-10:]
    meta_tags = [tag for tag in logged if tag.startswith("meta/")]
    assert {"meta/gamma/q00", "meta/lambda/q31", "meta/w_z/q07", "meta/alpha", "meta/w_pi", "meta/w_h"} <= set(meta_tags)
    for tag in meta_tags:
        assert np.all(np.isfinite(logged[tag])), tag
    assert abs(logged["meta/gamma/q00"][-1] - 0.99) > 1e-4 and abs(logged["meta/w_pi"][-1] - 0.99) > 1e-4


@pytest.mark.parametrize(
    "ablation", [[], ["--meta-learn", "eta1"], ["--meta-learn", "none"], ["--scalar-eta"], ["--n-step", "3"]]
)
def test_smoke_run(tmp_path, ablation):
    """The default on Breakout-v5 (the ResNet), the ablations on CartPole-v1 (quicker to compile)."""
    env_id = "CartPole-v1" if ablation else "Breakout-v5"
    logged = smoke_run(tmp_path, "drmg.py", env_id, *ablation)
    assert "meta/gamma/q00" in logged
    assert ("meta/grad_norm" in logged) == (ablation != ["--meta-learn", "none"])
    assert ("meta/gamma/q01" in logged) == (ablation != ["--scalar-eta"])


@pytest.mark.parametrize("eps_root,finite", [(None, True), (0.0, False)])
def test_the_derivative_of_an_adam_step_is_finite_where_a_gradient_is_zero(eps_root, finite):
    """The meta-gradient differentiates through the agent's optimiser step. Adam's root has an infinite derivative at 0
    (a parameter whose gradient is 0: DrMG on Breakout-MinAtar stopped at update 1 with non-finite meta-gradients);
    the default --adam-eps-root keeps it finite, and 0 must not."""
    flags = dict(optimizer="adam", anneal_lr=False, **({} if eps_root is None else dict(adam_eps_root=eps_root)))
    tx = drmg.make_optimizer(drmg.Args(**flags))
    params = {"w": jnp.ones(3)}

    def step_sum(gradient):
        updates, _ = tx.update({"w": gradient}, tx.init(params), params)
        return updates["w"].sum()

    derivative = jax.grad(step_sum)(jnp.array([0.5, 0.0, -0.2]))
    assert bool(jnp.all(jnp.isfinite(derivative))) == finite, derivative
