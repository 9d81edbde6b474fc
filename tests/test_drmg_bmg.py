"""drmg.py --bmg-steps (DrMG + BMG, docs/drmg_bmg.md): the bootstrapped meta-gradient against finite differences, the
target bootstrap against a plain loop of optax steps, --bmg-steps 0 as the eq. 14 update, two devices, learning, smoke."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro
from helpers import (
    check_two_devices_give_the_single_device_meta_step,
    learn_cartpole,
    make_small_rollout,
    make_states,
    smoke_run,
)

import drmg


def setup(dtype=np.float64, **kwargs):
    """Args (3 quantiles), the two halves of a random unroll, the agent's train state and shifted meta-parameters."""
    args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.7, alpha=0.6, weight_init=0.8, learning_rate=0.05, **kwargs)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg, 0, dtype))
    agent_state = make_states(drmg, args, rollout)
    meta_params = jax.tree.map(lambda x: x + jnp.linspace(-0.3, 0.3, x.size).reshape(x.shape), drmg.init_meta_params(args))
    return args, *drmg.split_halves(rollout), agent_state, meta_params


def step(agent_state, params, opt_state, rollout, eta, args, n_step=0):
    """One optax step of the agent's optimiser on impala_loss, written here without drmg's chunking."""
    grads = jax.grad(lambda p: drmg.impala_loss(p, agent_state.apply_fn, rollout, eta, args, n_step)[0])(params)
    updates, opt_state = agent_state.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def theta_prime(agent_state, meta_params, inner, args):
    """(theta', RMSProp's state after it): theta' = theta + RMSProp(grad L_in(tau, theta, eta)) (eq. 12)."""
    eta = drmg.hyperparameters(meta_params, args)
    return step(agent_state, agent_state.params, agent_state.opt_state, inner, eta, args, args.n_step)


def plain_target(agent_state, meta_params, inner, outer, args):
    """theta' and, as a plain loop with no stop_gradient, theta~: L - 1 inner steps with eta, the last with eta'."""
    eta = drmg.hyperparameters(meta_params, args)
    params_prime, opt_state_prime = params, opt_state = theta_prime(agent_state, meta_params, inner, args)
    for _ in range(args.bmg_steps - 1):
        params, opt_state = step(agent_state, params, opt_state, outer, eta, args, args.n_step)
    params, _ = step(agent_state, params, opt_state, outer, drmg.reference_hyperparameters(args), args)
    return params_prime, opt_state_prime, params


def matching(apply_fn, target_params, params_prime, rollout, args):
    """mu(theta~, theta') written out: KL(pi~ || pi') + c x quantile Huber of Z' towards Z~, means over valid states."""
    obs = rollout.obs[:-1].reshape((-1,) + rollout.obs.shape[2:])
    (logits, z), (target_logits, target_z) = apply_fn(params_prime, obs), apply_fn(target_params, obs)
    p = jax.nn.softmax(target_logits)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits)), axis=-1)
    huber = jnp.mean(drmg.quantile_huber_loss(z, target_z, args.huber_kappa), axis=-1)
    valid = 1.0 - rollout.resets.reshape(-1)
    return jnp.sum(valid * (kl + args.bmg_value_coef * huber)) / valid.size


def test_bmg_meta_gradient_equals_central_finite_differences_of_the_matching_loss_in_float64():
    """BMG: d mu(theta~, theta'(eta)) / d eta with theta~ held fixed, theta'(eta) = theta + RMSProp(grad L_in) (eq. 12).
    The oracle differentiates mu(theta~, theta'(eta)) by central differences; theta' and mu are written here, and the
    chunks (--chunk-envs 1) of drmg must add up to the whole batch."""
    with jax.enable_x64(True):
        args, inner, outer, agent_state, meta_params = setup(bmg_steps=2, bmg_value_coef=0.5, chunk_envs=1, ent_coef=0.3)
        target = jax.jit(lambda m: plain_target(agent_state, m, inner, outer, args)[2])(meta_params)
        mu = jax.jit(
            lambda m: matching(agent_state.apply_fn, target, theta_prime(agent_state, m, inner, args)[0], outer, args)
        )
        meta_grads, _, metrics = jax.jit(partial(drmg.meta_gradient, args=args, axis_name=None))(
            meta_params, agent_state, inner, outer
        )
        np.testing.assert_allclose(metrics["bmg_matching_loss"], mu(meta_params), rtol=1e-10)
        eps = 1e-4  # mu is about 10: a smaller step drowns in roundoff
        for name, value in meta_params.items():
            numeric = np.zeros(np.shape(value))
            for j in np.ndindex(np.shape(value)):
                delta = np.zeros(np.shape(value))
                delta[j] = eps
                plus, minus = dict(meta_params, **{name: value + delta}), dict(meta_params, **{name: value - delta})
                numeric[j] = (mu(plus) - mu(minus)) / (2 * eps)
            np.testing.assert_allclose(
                meta_grads[name], numeric, rtol=1e-5, atol=1e-9, err_msg=name
            )  # atol: roundoff of mu / eps
            assert np.all(np.abs(numeric) > 1e-8), f"{name}: theta' does not depend on it"


def test_target_is_l_steps_past_theta_prime_and_passes_no_gradient_to_eta():
    """theta~ = L steps from theta' on the outer batch, continuing RMSProp's state: L - 1 with the inner loss (n-step
    here) and eta, the last with the outer loss of eq. 14 and eta'. No gradient reaches eta (nor theta') through it."""
    with jax.enable_x64(True):
        args, inner, outer, agent_state, meta_params = setup(bmg_steps=2, n_step=2)
        expected = jax.jit(lambda m: plain_target(agent_state, m, inner, outer, args)[2])(meta_params)

        def target(m):
            params_prime, opt_state = theta_prime(agent_state, m, inner, args)
            return drmg.bootstrapped_target(params_prime, opt_state, m, agent_state, outer, args, None)[0]

        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), jax.jit(target)(meta_params), expected
        )
        # A last step with the inner loss's gamma, lambda, alpha would end elsewhere.
        inner_args = dataclasses.replace(args, outer_gamma=args.gamma, outer_lambda=args.lambda_, outer_alpha=args.alpha)
        other = jax.jit(lambda m: plain_target(agent_state, m, inner, outer, inner_args)[2])(meta_params)
        assert optax.global_norm(jax.tree.map(jnp.subtract, other, expected)) > 1e-6

        weights = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)), expected)
        through_target = jax.jit(jax.grad(lambda m: optax.tree_utils.tree_vdot(weights, target(m))))(meta_params)
        for name, value in through_target.items():
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
        # The broken variant, the plain loop without stop_gradient, does pass a gradient: the check above can fail.
        leaky = jax.grad(lambda m: optax.tree_utils.tree_vdot(weights, plain_target(agent_state, m, inner, outer, args)[2]))
        assert optax.global_norm(jax.jit(leaky)(meta_params)) > 1e-6


def eq14_meta_gradient(meta_params, agent_state, inner, outer, args, axis_name):
    """drmg.meta_gradient as it stood before BMG (verbatim): the reference of --bmg-steps 0."""

    def inner_grads(meta_params, chunk):
        eta = drmg.hyperparameters(meta_params, args)
        return jax.grad(drmg.impala_loss, has_aux=True)(
            agent_state.params, agent_state.apply_fn, chunk, eta, args, args.n_step
        )

    def outer_grads(params_prime, chunk):
        eta_prime = drmg.reference_hyperparameters(args)
        return jax.grad(drmg.impala_loss, has_aux=True)(params_prime, agent_state.apply_fn, chunk, eta_prime, args)

    def inner_step(grads):
        updates, _ = agent_state.tx.update(grads, agent_state.opt_state, agent_state.params)
        return optax.apply_updates(agent_state.params, updates)

    grads, metrics = drmg.chunk_mean(lambda chunk: inner_grads(meta_params, chunk), inner, args.chunk_envs)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    params_prime, inner_step_vjp = jax.vjp(inner_step, grads)
    grads_prime, outer_metrics = drmg.chunk_mean(lambda chunk: outer_grads(params_prime, chunk), outer, args.chunk_envs)
    if axis_name is not None:
        grads_prime = jax.lax.pmean(grads_prime, axis_name)
    (v,) = inner_step_vjp(grads_prime)
    meta_grads = drmg.chunk_mean(
        lambda chunk: jax.grad(lambda m: optax.tree_utils.tree_vdot(v, inner_grads(m, chunk)[0]))(meta_params),
        inner,
        args.chunk_envs,
    )
    return meta_grads, grads, dict(metrics, outer_loss=outer_metrics["loss"])


def test_bmg_steps_0_is_the_eq14_meta_gradient_bit_for_bit(monkeypatch):
    """--bmg-steps 0 traces to the very program of the pre-BMG `meta_gradient` (`eq14_meta_gradient`): the same jaxpr,
    so the same compiled update, bit for bit; it never calls the BMG functions. learner_step does not read --bmg-steps."""
    args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7, chunk_envs=1)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(drmg, 1))
    agent_state = make_states(drmg, args, rollout)
    meta_params = drmg.init_meta_params(args)

    def untouched(*_, **__):
        raise AssertionError("--bmg-steps 0 calls a BMG function")

    monkeypatch.setattr(drmg, "bootstrapped_target", untouched)
    monkeypatch.setattr(drmg, "bmg_matching_loss", untouched)
    ours, reference = (
        str(jax.make_jaxpr(partial(fn, args=args, axis_name=None))(meta_params, agent_state, *drmg.split_halves(rollout)))
        for fn in (drmg.meta_gradient, eq14_meta_gradient)
    )
    assert ours == reference
    # The check can fail: BMG's program is another one.
    bmg_args = dataclasses.replace(args, bmg_steps=1)
    monkeypatch.undo()
    bmg = jax.make_jaxpr(partial(drmg.meta_gradient, args=bmg_args, axis_name=None))(
        meta_params, agent_state, *drmg.split_halves(rollout)
    )
    assert str(bmg) != reference


def test_two_device_bmg_meta_step_equals_single_device_meta_step():
    args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7, bmg_steps=1, bmg_value_coef=0.5)
    one = check_two_devices_give_the_single_device_meta_step(drmg, args)
    assert float(one[1]["bmg_matching_loss"]) > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bmg-steps", "-1"], "--bmg-steps must be >= 0"),
        (["--bmg-value-coef", "-0.5"], "--bmg-value-coef >= 0"),
        (["--bmg-value-coef", "1"], "need meta-learning"),
        (["--bmg-steps", "1", "--meta-learn", "none"], "need meta-learning"),
        (["--bmg-steps", str(10**9)], "--bmg-steps 1000000000: at most 64"),  # 10^9 traced steps never compiled
    ],
)
def test_bad_bmg_flags_stop_with_one_line(flags, message):
    with pytest.raises(SystemExit, match=message):
        drmg.check_args(tyro.cli(drmg.Args, args=["--env-id", "CartPole-v1", *flags]))


def test_learns_cartpole_with_bmg_and_meta_parameters_move(tmp_path):
    logged, _ = learn_cartpole(tmp_path, "drmg.py", 100000, "2e-3", "--bmg-steps", "3")
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[-1] >= 100, returns[-10:]
    meta_tags = [tag for tag in logged if tag.startswith("meta/")]
    for tag in meta_tags + ["losses/bmg_matching_loss", "losses/bmg_kl"]:
        assert np.all(np.isfinite(logged[tag])), tag
    assert abs(logged["meta/gamma/q00"][-1] - 0.99) > 1e-4 and abs(logged["meta/w_pi"][-1] - 0.99) > 1e-4


def test_bmg_smoke_run_on_breakout(tmp_path):
    """The ResNet, --bmg-steps 1 and the critic matching term; --bmg-steps 3 learns CartPole above."""
    logged = smoke_run(tmp_path, "drmg.py", "Breakout-v5", "--bmg-steps", "1", "--bmg-value-coef", "0.5")
    for tag in ["losses/loss", "losses/bmg_matching_loss", "losses/bmg_kl", "losses/bmg_value_matching", "meta/grad_norm"]:
        assert np.isfinite(logged[tag]).all(), tag


def test_two_colors_benchmark_launches_bmg_from_drmgs_eta():
    import two_colors

    args = two_colors.Args(algorithms=["drmg", "drmg_bmg", "qr"])
    etas = two_colors.check_initial_eta(args)
    assert etas["drmg_bmg"] == etas["drmg"] == etas["qr"]
    command = two_colors.command(args, "drmg_bmg", 1)
    assert command[4].endswith("drmg.py") and command[command.index("--bmg-steps") + 1] == "3"
