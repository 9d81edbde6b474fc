"""mg.py: v-trace against rlax and a plain loop, the meta-gradient against finite differences, eta-conditioning,
the IMPALA step with --meta-learn none, two devices, learning, smoke runs."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax
from flax.training.train_state import TrainState
from test_drmg import assert_same_step, meta_step_on
from test_qr_impala_run import make_rollout as make_random_rollout
from test_qr_impala_run import only_run_dir, run_script, scalars

import mg

T, B = 9, 4
NUM_STEPS, NUM_ENVS, NUM_ACTIONS, OBS_DIM = 5, 4, 3, 3


def make_unroll(seed, log_rho_scale=1.5):
    """Random unroll with terminations, truncations, the reset steps that follow them, and ratios far from 1."""
    rng = np.random.default_rng(seed)
    terminations = rng.random((T, B)) < 0.15
    truncations = (rng.random((T, B)) < 0.1) & ~terminations
    resets = np.zeros((T, B), dtype=bool)
    resets[1:] = terminations[:-1] | truncations[:-1]
    terminations &= ~resets
    truncations &= ~resets
    return dict(
        values=rng.normal(size=(T, B)).astype(np.float32),
        bootstrap_value=rng.normal(size=(B,)).astype(np.float32),
        rewards=rng.normal(size=(T, B)).astype(np.float32),
        discounts=((1 - terminations) * (1 - resets)).astype(np.float32),
        trace_masks=(1 - truncations).astype(np.float32),
        log_rhos=rng.normal(scale=log_rho_scale, size=(T, B)).astype(np.float32),
    )


def run(u, gamma, lambda_, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    keys = ["values", "bootstrap_value", "rewards", "discounts", "trace_masks", "log_rhos"]
    return mg.vtrace(*(u[k] for k in keys), jnp.asarray(gamma), jnp.asarray(lambda_), rho_bar, c_bar, pg_rho_bar)


def loop_reference(u, gamma, lambda_, rho_bar, c_bar, pg_rho_bar, alpha_rho=1.0, alpha_c=1.0):
    """IMPALA's eq. 1 as written, with explicit products, and the advantage rho_s (r_s + gamma q_s+1 - V(x_s)); with
    alphas below 1, STAC's leaky ratios (alpha min(bar, pi/mu) + (1 - alpha) pi/mu)."""
    returns, advantages = np.zeros((T, B)), np.zeros((T, B))
    is_ratio = np.exp(u["log_rhos"].astype(np.float64))
    rho = alpha_rho * np.minimum(rho_bar, is_ratio) + (1 - alpha_rho) * is_ratio
    c = lambda_ * u["trace_masks"] * (alpha_c * np.minimum(c_bar, is_ratio) + (1 - alpha_c) * is_ratio)
    pg_rho = alpha_rho * np.minimum(pg_rho_bar, is_ratio) + (1 - alpha_rho) * is_ratio
    for b in range(B):
        v = np.append(u["values"][:, b], u["bootstrap_value"][b]).astype(np.float64)
        gam = gamma * u["discounts"][:, b]
        for s in range(T):
            total = v[s]
            for t in range(s, T):
                trace = np.prod([gam[i] * c[i, b] for i in range(s, t)]) if t > s else 1.0
                total += trace * rho[t, b] * (u["rewards"][t, b] + gam[t] * v[t + 1] - v[t])
            returns[s, b] = total
    for b, s in itertools.product(range(B), range(T)):
        lam = lambda_ * u["trace_masks"][s, b]
        next_return = returns[s + 1, b] if s + 1 < T else u["bootstrap_value"][b]
        next_value = u["values"][s + 1, b] if s + 1 < T else u["bootstrap_value"][b]
        q_estimate = u["rewards"][s, b] + gamma * u["discounts"][s, b] * (lam * next_return + (1 - lam) * next_value)
        advantages[s, b] = pg_rho[s, b] * (q_estimate - u["values"][s, b])
    return returns, advantages


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
    u = make_unroll(2, log_rho_scale)  # scale 8: ratios from e^-20 to e^20
    returns, advantages = run(u, 0.9, lambda_, rho_bar, c_bar, pg_rho_bar)
    expected_returns, expected_advantages = loop_reference(u, 0.9, lambda_, rho_bar, c_bar, pg_rho_bar)
    assert np.all(np.isfinite(returns)) and np.all(np.isfinite(advantages))
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)


def test_no_return_crosses_an_episode_boundary():
    u = make_unroll(3)
    u["discounts"][:] = 1.0
    u["trace_masks"][:] = 1.0
    u["discounts"][3, 0] = 0.0  # env 0 terminates at step 3
    u["trace_masks"][5, 1] = 0.0  # env 1 is truncated at step 5: bootstraps from V(S_6), traces stop
    returns, advantages = run(u, 0.99, 1.0)
    changed = {k: v.copy() for k, v in u.items()}
    changed["rewards"][4:, 0] += 10.0
    changed["rewards"][6:, 1] += 10.0
    changed["values"][7:, 1] += 10.0  # beyond S_6: must not matter either
    changed_returns, changed_advantages = run(changed, 0.99, 1.0)
    np.testing.assert_allclose(changed_returns[:4, 0], returns[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_returns[:6, 1], returns[:6, 1], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:4, 0], advantages[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:6, 1], advantages[:6, 1], rtol=1e-6)
    changed["values"][6, 1] += 1.0  # ... but the truncated step still bootstraps from V(S_6)
    assert not np.allclose(run(changed, 0.99, 1.0)[0][5, 1], returns[5, 1])


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


def make_rollout(seed=0, dtype=np.float32):
    return make_random_rollout(mg, NUM_STEPS, NUM_ENVS, NUM_ACTIONS, OBS_DIM, seed, dtype)


def make_states(args, rollout, seed=0):
    network = mg.AgentNetwork(NUM_ACTIONS, args.eta_embedding_size if args.eta_embedding else 0)
    eta = jnp.asarray([args.gamma, args.lambda_], dtype=rollout.obs.dtype)
    params = network.init(jax.random.PRNGKey(seed), rollout.obs[0], eta)
    params = jax.tree.map(lambda x: x.astype(rollout.obs.dtype), params)  # flax initialises float32 even under x64
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.rmsprop(args.learning_rate, decay=0.99, eps=0.01))
    agent_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    # One real step first, so that RMSProp's second-moment estimate is not all zeros.
    grads = jax.grad(lambda p: jnp.sum(network.apply(p, rollout.obs[0], eta)[1] ** 2))(params)
    return agent_state.apply_gradients(grads=grads)


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
        rollout = jax.tree.map(jnp.asarray, make_rollout(dtype=np.float64))
        inner, outer = mg.split_halves(rollout)
        agent_state = make_states(args, rollout)
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
    obs = jnp.asarray(make_rollout().obs[0])
    eta = jnp.asarray([0.99, 0.9])
    for size in [8, 0]:
        network = mg.AgentNetwork(NUM_ACTIONS, size)
        params = network.init(jax.random.PRNGKey(0), obs, eta)
        assert ("Dense_0" in params["params"] and params["params"]["Dense_0"]["kernel"].shape == (2, 8)) == (size == 8)
        d_logits, d_value = jax.jacobian(lambda e: network.apply(params, obs, e))(eta)
        assert (np.abs(d_logits).max() > 0 and np.abs(d_value).max() > 0) == (size == 8)


def test_meta_learn_none_is_one_impala_step_on_the_whole_batch():
    args = mg.Args(meta_learn="none", gamma=0.95, lambda_=0.9, learning_rate=0.01, eta_embedding_size=4)
    rollout = jax.tree.map(jnp.asarray, make_rollout())
    agent_state = make_states(args, rollout)
    meta_state = TrainState.create(apply_fn=None, params=mg.init_meta_params(args), tx=optax.adam(1e-3))
    step = jax.jit(lambda a, m, r: mg.learner_step(a, m, r, args, axis_name=None))
    new_state, new_meta_state, metrics = step(agent_state, meta_state, rollout)
    eta = mg.hyperparameters(meta_state.params, args)
    grads = jax.grad(lambda p: mg.impala_loss(p, agent_state.apply_fn, rollout, eta, args)[0])(agent_state.params)
    expected = agent_state.apply_gradients(grads=grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected.params)
    jax.tree.map(np.testing.assert_array_equal, new_meta_state.params, meta_state.params)
    assert "meta_grad_norm" not in metrics and set(metrics["meta"]) == {"gamma", "lambda_"}


def test_two_device_meta_step_equals_single_device_meta_step():
    args = mg.Args(gamma=0.9, lambda_=0.8, eta_embedding_size=4)
    rollout = make_rollout()
    agent_state = make_states(args, jax.tree.map(jnp.asarray, rollout))
    meta_state = TrainState.create(apply_fn=None, params=mg.init_meta_params(args), tx=optax.sgd(1.0))
    # Each device halves its own shard: on two devices tau1 = envs {0, 2} and tau2 = envs {1, 3}.
    reordered = jax.tree.map(lambda x: x[:, [0, 2, 1, 3]], rollout)
    one = meta_step_on(mg, jax.devices()[:1], args, agent_state, meta_state, reordered)
    assert_same_step(one, meta_step_on(mg, jax.devices()[:2], args, agent_state, meta_state, rollout))


def test_learns_cartpole_gamma_and_lambda_move_and_the_saved_model_evaluates(tmp_path):
    result = run_script(
        tmp_path,
        *["--env-id", "CartPole-v1", "--seed", "1", "--total-timesteps", "100000", "--save-model", "--eval-episodes", "3"],
        *["--local-num-envs", "4", "--num-steps", "16", "--learning-rate", "2e-3", "--log-frequency", "100"],
        script="mg.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    logged = scalars(run_dir)
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[0] < 40 and returns[-1] >= 100, returns[-10:]
    assert {tag for tag in logged if tag.startswith("meta/")} == {"meta/gamma", "meta/lambda", "meta/grad_norm"}
    for tag in ["meta/gamma", "meta/lambda"]:
        assert np.all(np.isfinite(logged[tag])) and np.all((0 < np.array(logged[tag])) & (np.array(logged[tag]) < 1)), tag
        assert abs(logged[tag][-1] - 0.99) > 1e-5, tag
    args, params, eta = mg.load_model(os.path.join(run_dir, "mg.flax_model"))
    np.testing.assert_allclose(eta, [logged["meta/gamma"][-1], logged["meta/lambda"][-1]], rtol=1e-5)
    assert len(logged["eval/episodic_return"]) == 3


@pytest.mark.parametrize(
    "env_id,variant", [("Breakout-v5", []), ("CartPole-v1", ["--no-eta-embedding"]), ("CartPole-v1", ["--meta-learn", "none"])]
)
def test_smoke_run(tmp_path, env_id, variant):
    result = run_script(
        tmp_path,
        *["--env-id", env_id, "--total-timesteps", "32", "--local-num-envs", "2", "--num-actor-threads", "1"],
        *["--num-steps", "8", "--log-frequency", "1", *variant],
        script="mg.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(only_run_dir(tmp_path))
    assert np.isfinite(logged["losses/loss"]).all() and "meta/gamma" in logged and "meta/lambda" in logged
    assert ("meta/grad_norm" in logged) == (variant != ["--meta-learn", "none"])


@pytest.mark.parametrize(
    "flags,message",
    [(["--env-id", "Breakout-v4x"], "unknown --env-id"), (["--gamma", "1.0"], "must lie in (0, 1)")],
)
def test_bad_flags_fail_before_writing_anything(tmp_path, flags, message):
    result = run_script(tmp_path, *flags, script="mg.py")
    assert result.returncode != 0 and message in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))
