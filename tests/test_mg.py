"""mg.py: v-trace against rlax and a plain loop, the meta-gradient against finite differences, eta-conditioning,
the IMPALA step with --meta-learn none, two devices, learning, smoke runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
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

import mg


def run(u, gamma, lambda_, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    keys = ["values", "bootstrap_value", "rewards", "discounts", "trace_masks", "log_rhos"]
    return mg.vtrace(*(u[k] for k in keys), jnp.asarray(gamma), jnp.asarray(lambda_), rho_bar, c_bar, pg_rho_bar)


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_vtrace_equals_rlax(lambda_, seed):
    u = make_unroll(seed)
    gamma = 0.97
    returns, advantages = run(u, gamma, lambda_)
    is_ratio = np.exp(u["log_rhos"])
    for b in range(B):
        v_tm1 = u["values"][:, b]
        v_t = np.append(v_tm1[1:], u["bootstrap_value"][b])
        lam_t = lambda_ * u["trace_masks"][:, b]  # a truncation stops the traces
        args = (v_tm1, v_t, u["rewards"][:, b], gamma * u["discounts"][:, b], is_ratio[:, b])
        out = rlax.vtrace_td_error_and_advantage(*args, lambda_=lam_t, stop_target_gradients=False)
        np.testing.assert_allclose(returns[:, b], out.errors + v_tm1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(advantages[:, b], out.pg_advantage, rtol=1e-5, atol=1e-5)
        errors = rlax.vtrace(*args, lambda_=lam_t, stop_target_gradients=False)
        np.testing.assert_allclose(returns[:, b], errors + v_tm1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(
    "rho_bar,c_bar,pg_rho_bar,log_rho_scale", [(1.0, 1.0, 1.0, 1.5), (2.0, 0.8, 1.5, 1.5), (1.0, 1.0, 1.0, 8.0)]
)
def test_vtrace_equals_plain_loop(lambda_, rho_bar, c_bar, pg_rho_bar, log_rho_scale):
    u = make_unroll(2, log_rho_scale=log_rho_scale)  # scale 8: ratios from e^-20 to e^20
    returns, advantages = run(u, 0.9, lambda_, rho_bar, c_bar, pg_rho_bar)
    options = dict(rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar)
    expected_returns, expected_advantages = vtrace_oracle_batch(u, 0.9, lambda_, **options)
    assert np.all(np.isfinite(returns)) and np.all(np.isfinite(advantages))
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)


def test_no_return_crosses_an_episode_boundary():
    check_no_return_crosses_an_episode_boundary(lambda u: run(u, 0.99, 1.0))


def test_gradients_flow_to_gamma_and_lambda_and_not_to_values_or_ratios():
    u = make_unroll(4)

    def total(gamma, lambda_, values, log_rhos):
        keys = ["bootstrap_value", "rewards", "discounts", "trace_masks"]
        returns, advantages = mg.vtrace(values, *(u[k] for k in keys), log_rhos, gamma, lambda_)
        return jnp.sum(returns) + jnp.sum(advantages)

    inputs = [jnp.asarray(0.9), jnp.asarray(0.8), jnp.asarray(u["values"]), jnp.asarray(u["log_rhos"])]
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*inputs)
    eps = 1e-3
    for i in range(2):
        plus = total(*inputs[:i], inputs[i] + eps, *inputs[i + 1 :])
        minus = total(*inputs[:i], inputs[i] - eps, *inputs[i + 1 :])
        np.testing.assert_allclose(grads[i], (plus - minus) / (2 * eps), rtol=2e-2)
        assert abs(grads[i]) > 1e-2
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0)


def oracle_inner_loss(params, apply_fn, rollout, eta, eta_hat, args):
    """The inner loss written out again, with the stop-gradiented values and importance ratios inside the targets taken
    from the network conditioned on eta_hat: autodiff treats them as constants, so the oracle holds eta_hat fixed."""
    num_steps, num_envs = rollout.actions.shape
    obs = rollout.obs.reshape((-1,) + rollout.obs.shape[2:])
    logits, values = apply_fn(params, obs, jnp.stack([eta["gamma"], eta["lambda_"]]))
    logits_hat, values_hat = apply_fn(params, obs, jnp.stack([eta_hat["gamma"], eta_hat["lambda_"]]))
    logits, logits_hat = logits.reshape(num_steps + 1, num_envs, -1)[:-1], logits_hat.reshape(num_steps + 1, num_envs, -1)[:-1]
    values, values_hat = values.reshape(num_steps + 1, num_envs), values_hat.reshape(num_steps + 1, num_envs)
    log_pi = jax.nn.log_softmax(logits)
    actions = rollout.actions[..., None]
    log_pi_a = jnp.take_along_axis(log_pi, actions, axis=-1)[..., 0]
    log_pi_hat_a = jnp.take_along_axis(jax.nn.log_softmax(logits_hat), actions, axis=-1)[..., 0]
    log_mu_a = jnp.take_along_axis(jax.nn.log_softmax(rollout.behaviour_logits), actions, axis=-1)[..., 0]
    valid = 1.0 - rollout.resets
    returns, advantages = mg.vtrace(
        values_hat[:-1],
        values_hat[-1],
        jnp.clip(rollout.rewards, -1.0, 1.0),
        (1.0 - rollout.terminations) * valid,
        1.0 - rollout.truncations,
        log_pi_hat_a - log_mu_a,
        eta["gamma"],
        eta["lambda_"],
    )
    value_loss = jnp.mean(valid * 0.5 * (returns - values[:-1]) ** 2)
    policy_loss = -jnp.mean(valid * advantages * log_pi_a)
    entropy = jnp.mean(valid * -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1))
    return args.policy_coef * policy_loss - args.ent_coef * entropy + args.value_coef * value_loss


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(eta_embedding=False, outer_value_coef=0.5, outer_ent_coef=0.01)],
    ids=["eta-conditioned, J' = policy gradient", "no embedding, J' with value and entropy"],
)
def test_meta_gradient_equals_central_finite_differences_in_float64(flags):
    """Xu et al. eq. 2: dJ'/d eta = (dJ'/dtheta') (dtheta'/d eta), where dJ'/dtheta' is the outer loss's usual gradient
    (targets and advantages stop-gradiented) and theta' = theta + RMSProp(grad L_in(theta, eta)) (eq. 1). The oracle
    differentiates theta'(eta) by central differences, its inner step written here independently; eta enters the
    return and, with the embedding, the network's input."""
    with jax.enable_x64(True):
        args = mg.Args(gamma=0.9, lambda_=0.7, learning_rate=0.05, eta_embedding_size=4, **flags)
        rollout = jax.tree.map(jnp.asarray, make_small_rollout(mg, dtype=np.float64))
        inner, outer = mg.split_halves(rollout)
        agent_state = make_states(mg, args, rollout)
        meta_params = {"gamma": jnp.asarray(mg.logit(0.9) + 0.2), "lambda_": jnp.asarray(mg.logit(0.7) - 0.3)}
        assert meta_params["gamma"].dtype == jnp.float64
        eta_hat = jax.tree.map(jax.nn.sigmoid, meta_params)

        @jax.jit
        def params_prime(logits):
            eta = jax.tree.map(lambda x: 1 / (1 + jnp.exp(-x)), logits)
            grads = jax.grad(oracle_inner_loss)(agent_state.params, agent_state.apply_fn, inner, eta, eta_hat, args)
            updates, _ = agent_state.tx.update(grads, agent_state.opt_state, agent_state.params)
            return jax.tree.map(jnp.add, agent_state.params, updates)

        reference = mg.reference_hyperparameters(args)
        outer_grad = jax.grad(lambda p: mg.impala_loss(p, agent_state.apply_fn, outer, reference, args)[0])(
            params_prime(meta_params)
        )

        def linearised_outer_loss(logits):
            return sum(jnp.vdot(g, p) for g, p in zip(jax.tree.leaves(outer_grad), jax.tree.leaves(params_prime(logits))))

        meta_grads = jax.jit(lambda m: mg.meta_gradient(m, agent_state, inner, outer, args, None)[0])(meta_params)
        eps = 1e-6
        for name in ["gamma", "lambda_"]:
            plus = dict(meta_params, **{name: meta_params[name] + eps})
            minus = dict(meta_params, **{name: meta_params[name] - eps})
            numeric = (linearised_outer_loss(plus) - linearised_outer_loss(minus)) / (2 * eps)
            np.testing.assert_allclose(meta_grads[name], numeric, rtol=1e-5, atol=1e-9, err_msg=name)
            assert abs(numeric) > 1e-6, f"{name}: theta' does not depend on it"


def test_eta_embedding_conditions_policy_and_value_and_can_be_turned_off():
    obs = jnp.asarray(make_small_rollout(mg).obs[0])
    eta = jnp.asarray([0.99, 0.9])
    for size in [8, 0]:
        network = mg.AgentNetwork(NUM_ACTIONS, size)
        params = network.init(jax.random.PRNGKey(0), obs, eta)
        assert ("Dense_0" in params["params"] and params["params"]["Dense_0"]["kernel"].shape == (2, 8)) == (size == 8)
        d_logits, d_value = jax.jacobian(lambda e: network.apply(params, obs, e))(eta)
        assert (np.abs(d_logits).max() > 0 and np.abs(d_value).max() > 0) == (size == 8)


def test_meta_learn_none_is_one_impala_step_on_the_whole_batch():
    args = mg.Args(meta_learn="none", gamma=0.95, lambda_=0.9, learning_rate=0.01, eta_embedding_size=4)
    rollout = jax.tree.map(jnp.asarray, make_small_rollout(mg))
    agent_state = make_states(mg, args, rollout)
    meta_state = TrainState.create(apply_fn=None, params=mg.init_meta_params(args), tx=mg.make_meta_optimizer(args))
    step = jax.jit(lambda a, m, r: mg.learner_step(dict(agent=a, meta=m), r, args, axis_name=None))
    new_states, metrics, checks = step(agent_state, meta_state, rollout)
    new_state, new_meta_state = new_states["agent"], new_states["meta"]
    eta = mg.hyperparameters(meta_state.params, args)
    grads = jax.grad(lambda p: mg.impala_loss(p, agent_state.apply_fn, rollout, eta, args)[0])(agent_state.params)
    expected = agent_state.apply_gradients(grads=grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected.params)
    jax.tree.map(np.testing.assert_array_equal, new_meta_state.params, meta_state.params)
    assert "meta_grad_norm" not in metrics and set(metrics["meta"]) == {"gamma", "lambda_"}
    assert checks["saturated"] == {} and not any(jax.device_get(checks["non_finite"]).values())


def test_two_device_meta_step_equals_single_device_meta_step():
    check_two_devices_give_the_single_device_meta_step(mg, mg.Args(gamma=0.9, lambda_=0.8, eta_embedding_size=4))


def test_learns_cartpole_gamma_and_lambda_move_and_the_saved_model_evaluates(tmp_path):
    logged, run_dir = learn_cartpole(tmp_path, "mg.py", 100000, "2e-3", "--save-model", "--eval-episodes", "3")
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[-1] >= 100, returns[-10:]
    assert {tag for tag in logged if tag.startswith("meta/")} == {"meta/gamma", "meta/lambda", "meta/grad_norm"}
    for tag in ["meta/gamma", "meta/lambda"]:
        assert np.all(np.isfinite(logged[tag])) and np.all((0 < np.array(logged[tag])) & (np.array(logged[tag]) < 1)), tag
        assert abs(logged[tag][-1] - 0.99) > 1e-5, tag
    args, _, inputs = mg.load_model(os.path.join(run_dir, "mg.flax_model"))
    np.testing.assert_allclose(inputs["eta"], [logged["meta/gamma"][-1], logged["meta/lambda"][-1]], rtol=1e-5)
    assert len(logged["eval/episodic_return"]) == 3


@pytest.mark.parametrize(
    "env_id,variant", [("Breakout-v5", []), ("CartPole-v1", ["--no-eta-embedding"]), ("CartPole-v1", ["--meta-learn", "none"])]
)
def test_smoke_run(tmp_path, env_id, variant):
    logged = smoke_run(tmp_path, "mg.py", env_id, *variant)
    assert "meta/gamma" in logged and "meta/lambda" in logged
    assert ("meta/grad_norm" in logged) == (variant != ["--meta-learn", "none"])


@pytest.mark.parametrize(
    "flags,message",
    [(["--env-id", "Breakout-v4x"], "unknown --env-id"), (["--gamma", "1.0"], "must lie in (0, 1)")],
)
def test_bad_flags_fail_before_writing_anything(tmp_path, flags, message):
    result = run_script(tmp_path, *flags, script="mg.py")
    assert result.returncode != 0 and message in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))
