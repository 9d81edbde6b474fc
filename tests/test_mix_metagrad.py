"""mix_metagrad.py: n-step and mixed meta-gradients against direct and finite-difference references, the mixing
weights, lambda-returns against rlax, the variance statistic, a smoke run on Snake and the refusal of other environments."""

import json
import os
import re
from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax
from flax.training.train_state import TrainState
from helpers import only_run_dir, run_script, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mix_metagrad as mm

NUM_STEPS, NUM_ENVS, NUM_ACTIONS, OBS_DIM = 5, 3, 3, 4


def make_rollouts(num, seed=0, dtype=np.float32):
    """`num` random unrolls stacked on a leading axis, with terminations, a reset step after each, and a truncation."""
    rng = np.random.default_rng(seed)
    resets = np.zeros((num, NUM_STEPS, NUM_ENVS))
    resets[:, 3, 1] = 1.0
    truncations = np.zeros((num, NUM_STEPS, NUM_ENVS))
    truncations[:, 1, 0] = 1.0
    return mm.Rollout(
        obs=rng.normal(size=(num, NUM_STEPS + 1, NUM_ENVS, OBS_DIM)).astype(dtype),
        actions=rng.integers(0, NUM_ACTIONS, size=(num, NUM_STEPS, NUM_ENVS)).astype(np.int32),
        rewards=rng.normal(size=(num, NUM_STEPS, NUM_ENVS)).astype(dtype),
        terminations=np.roll(resets, -1, axis=1).astype(dtype),
        truncations=truncations.astype(dtype),
        resets=resets.astype(dtype),
    )


def make_problem(dtype=np.float64, seed=0):
    args = mm.Args(gamma=0.9, lambda_=0.8, crit_coef=0.4, ent_coef=0.05)
    args.num_updates = 100
    args.learning_rate = 0.05  # large steps, so that theta^(n) depends visibly on every inner step
    network = mm.AgentNetwork(NUM_ACTIONS)
    rollouts = jax.tree.map(jnp.asarray, make_rollouts(N_MAX + 1, seed, dtype))
    params = network.init(jax.random.PRNGKey(seed), rollouts.obs[0, 0])
    params = jax.tree.map(lambda x: x.astype(dtype), params)  # flax initialises float32 even under x64
    state = TrainState.create(apply_fn=network.apply, params=params, tx=mm.make_optimizer(args))
    # One real step first, so that Adam's moments are not all zeros.
    warm_up = jax.jit(lambda s, o: s.apply_gradients(grads=jax.grad(lambda p: jnp.sum(network.apply(p, o)[1] ** 2))(s.params)))
    state = warm_up(state, rollouts.obs[0, 0])
    meta_params = jax.tree.map(lambda x: x.astype(dtype), mm.init_meta_params(args))
    return args, state, meta_params, rollouts


def stored(rollouts):
    """A look-ahead 'collector' that hands out the stored rollouts tau^(1), tau^(2), ... instead of stepping games."""
    return lambda params, j: (jax.tree.map(lambda x: x[j], rollouts), j + 1)


def flat(tree):
    return np.array([tree[k] for k in sorted(tree)], dtype=np.float64)


N_MAX = 3
WEIGHTINGS = {
    "3-step": mm.mixing_weights(3, mix=False),
    "3-mix": mm.mixing_weights(3),
    "kappa=0": mm.mixing_weights(3, kappa=0.0),
    "kappa=0.5": mm.mixing_weights(3, kappa=0.5),
}


@pytest.fixture(scope="module")
def computed():
    """Every meta-gradient the tests compare, computed once in float64 (few compilations: they dominate the time)."""
    out = {}
    with jax.enable_x64(True):
        args, state, meta_params, rollouts = make_problem()
        tau = [jax.tree.map(lambda x, j=j: x[j], rollouts) for j in range(N_MAX + 1)]
        eta_ref = mm.reference_hyperparameters(args)

        # the training path of --inner-steps 1 and a direct one-step meta-gradient written out without the scan
        objective = partial(mm.meta_objective, agent_state=state, rollout=tau[0], collect=stored(rollouts), collect_carry=1)
        out["1-step"] = flat(jax.jit(jax.grad(lambda mp: objective(mp, weights=np.ones(1), args=args)[0]))(meta_params))

        def direct(meta_params):
            eta = {k: jax.nn.sigmoid(v) for k, v in meta_params.items()}
            grads = jax.grad(lambda p: mm.a2c_loss(p, state.apply_fn, tau[0], eta)[0])(state.params)
            updates, _ = state.tx.update(grads, state.opt_state, state.params)
            params_prime = optax.apply_updates(state.params, updates)
            return mm.a2c_loss(params_prime, state.apply_fn, tau[1], eta_ref)[0]

        out["direct"] = flat(jax.jit(jax.grad(direct))(meta_params))

        # n = 3, every L'(theta^(i)) evaluated, the weights an argument: one compilation for every weighting
        weighted = jax.jit(
            jax.grad(lambda mp, w: objective(mp, weights=w, args=args, every_step=True), has_aux=True), static_argnums=()
        )
        for name, weights in WEIGHTINGS.items():
            grads, (first, _) = weighted(meta_params, jnp.asarray(weights))
            out[name] = flat(grads)
        out["first_params"] = jax.flatten_util.ravel_pytree(first.params)[0]
        # the training path of --inner-steps 3 (only L'(theta^(3)) evaluated)
        out["3-step (training path)"] = flat(
            jax.jit(jax.grad(lambda mp: objective(mp, weights=WEIGHTINGS["3-step"], args=args)[0]))(meta_params)
        )
        # the variance mode's forward-mode rows
        rows = mm.per_step_meta_gradients(meta_params, state, tau[0], stored(rollouts), 1, N_MAX, args)
        out["rows"] = np.stack([rows[k] for k in sorted(rows)], axis=-1)

        # An independent plain-loop replay of the inner updates (eq. 5), for central finite differences of theta^(i)
        @jax.jit
        def inner_params(meta_params):
            eta = {k: jax.nn.sigmoid(v) for k, v in meta_params.items()}
            params, opt_state, chain = state.params, state.opt_state, []
            for j in range(N_MAX):
                grads = jax.grad(lambda p: mm.a2c_loss(p, state.apply_fn, tau[j], eta)[0])(params)
                updates, opt_state = state.tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                chain.append(jax.flatten_util.ravel_pytree(params)[0])
            return jnp.stack(chain)

        chain = inner_params(meta_params)
        out["chain_first"] = chain[0]
        unravel = jax.flatten_util.ravel_pytree(state.params)[1]
        outer_grad = jax.jit(
            lambda flat_params, rollout: jax.flatten_util.ravel_pytree(
                jax.grad(lambda p: mm.a2c_loss(p, state.apply_fn, rollout, eta_ref)[0])(unravel(flat_params))
            )[0]
        )
        outer_grads = jnp.stack([outer_grad(chain[i], tau[i + 1]) for i in range(N_MAX)])  # grad L'(theta^(i)), [n, |theta|]
        h, d_chain = 1e-6, []
        for name in sorted(meta_params):
            plus = inner_params(dict(meta_params, **{name: meta_params[name] + h}))
            minus = inner_params(dict(meta_params, **{name: meta_params[name] - h}))
            d_chain.append((plus - minus) / (2 * h))
        d_chain = jnp.stack(d_chain)  # [|eta|, n, |theta|]
        for name in ("3-step", "3-mix"):
            out[f"fd {name}"] = np.asarray(jnp.einsum("i,ip,kip->k", WEIGHTINGS[name], outer_grads, d_chain))
    return jax.tree.map(np.asarray, out)


def test_mixing_weights_are_normalised_and_follow_eq_10():
    for n in (1, 2, 3, 5, 10):
        for kappa in (None, 0.0, 0.3, 0.9, 1.0):
            w = mm.mixing_weights(n, kappa, mix=True)
            assert w.shape == (n,) and np.isclose(w.sum(), 1.0) and np.all(w >= 0)
            k = 1.0 - 1.0 / n if kappa is None else kappa
            if 0 < k < 1:
                np.testing.assert_allclose(w, (1 - k) / (1 - k**n) * k ** np.arange(n), rtol=1e-12)  # eq. 10
    np.testing.assert_allclose(mm.mixing_weights(3, 0.0), [1, 0, 0])
    np.testing.assert_allclose(mm.mixing_weights(4, 1.0), [0.25] * 4)
    np.testing.assert_allclose(mm.mixing_weights(5), 0.8 ** np.arange(5) / np.sum(0.8 ** np.arange(5)))  # kappa = 1 - 1/n
    np.testing.assert_allclose(mm.mixing_weights(4, mix=False), [0, 0, 0, 1])


def test_lambda_returns_match_rlax():
    rng = np.random.default_rng(1)
    T, B = 7, 4
    values, bootstrap = rng.normal(size=(T, B)), rng.normal(size=B)
    rewards = rng.normal(size=(T, B))
    discounts = (rng.random((T, B)) > 0.2).astype(np.float64)
    trace_masks = (rng.random((T, B)) > 0.2).astype(np.float64)
    gamma, lambda_ = 0.9, 0.7
    with jax.enable_x64(True):
        ours = mm.lambda_returns(values, bootstrap, rewards, discounts, trace_masks, gamma, lambda_)
        next_values = np.concatenate([values[1:], bootstrap[None]])
        reference = jax.vmap(
            lambda r, d, v, lam: rlax.lambda_returns(r, gamma * d, v, lam, stop_target_gradients=False), in_axes=1, out_axes=1
        )(rewards, discounts, next_values, lambda_ * trace_masks)
        np.testing.assert_allclose(ours, reference, rtol=1e-12)
        # the targets keep gamma's gradient (the meta-gradient flows through them)
        d_gamma = jax.grad(lambda g: jnp.sum(mm.lambda_returns(values, bootstrap, rewards, discounts, trace_masks, g, 0.7)))
        assert abs(d_gamma(0.9)) > 1e-3


def test_one_step_meta_gradient_equals_a_direct_one_step_meta_gradient(computed):
    """n = 1: grad_eta L'(theta - Adam(grad L(theta, eta, tau0)), eta', tau1), written out without the look-ahead scan."""
    assert np.all(np.abs(computed["direct"]) > 1e-4)
    np.testing.assert_allclose(computed["1-step"], computed["direct"], rtol=1e-9)


def test_kappa_zero_mix_equals_the_one_step_meta_gradient(computed):
    np.testing.assert_allclose(computed["kappa=0"], computed["1-step"], rtol=1e-9)
    assert not np.allclose(computed["kappa=0.5"], computed["1-step"], rtol=1e-2)
    assert not np.allclose(computed["3-step"], computed["1-step"], rtol=1e-2)


@pytest.mark.parametrize("name", ["3-step", "3-mix"])
def test_n_step_meta_gradient_equals_central_finite_differences_in_float64(computed, name):
    """Eq. 5 / eq. 10: sum_i w_i (dtheta^(i)/d eta)^T grad L'(theta^(i)), where grad L' is the outer loss's policy
    gradient (advantage constant, App. C.2) and dtheta^(i)/d eta comes from central differences of an independent
    plain-loop replay of the i Adam steps (eps_root > 0) on the same fixed rollouts."""
    assert np.all(np.abs(computed[f"fd {name}"]) > 1e-4)
    np.testing.assert_allclose(computed[name], computed[f"fd {name}"], rtol=1e-6, atol=1e-10)
    if name == "3-step":
        np.testing.assert_allclose(computed["3-step (training path)"], computed[name], rtol=1e-9)


def test_real_update_is_the_first_inner_update(computed):
    np.testing.assert_allclose(computed["first_params"], computed["chain_first"], rtol=1e-12)


def test_per_step_meta_gradients_give_the_n_step_and_mixed_meta_gradients(computed):
    """The variance mode's forward-mode rows: row 1 and row n are the 1- and n-step meta-gradients; eq. 10's weighted
    sum of the rows is the n-mix one."""
    rows = computed["rows"]
    np.testing.assert_allclose(rows[0], computed["1-step"], rtol=1e-8)
    np.testing.assert_allclose(rows[2], computed["3-step"], rtol=1e-8)
    np.testing.assert_allclose(WEIGHTINGS["3-mix"] @ rows, computed["3-mix"], rtol=1e-8)


def test_the_look_ahead_learning_rate_never_goes_below_the_schedules_last_value():
    """Adam on a constant gradient steps by about the learning rate: 3 real updates, then look-ahead steps past them."""
    args = mm.Args(learning_rate=0.3, adam_eps=1e-12)
    args.num_updates = 3
    tx = mm.make_optimizer(args)
    params, grads = jnp.ones(()), jnp.full((), 0.01)
    state, steps = tx.init(params), []
    for _ in range(6):
        updates, state = tx.update(grads, state, params)
        steps.append(-float(updates))
    expected = [0.3 * (1 - min(count, 2) / 3) for count in range(6)]  # 0.3, 0.2, 0.1, then the last value 0.1
    np.testing.assert_allclose(steps, expected, rtol=1e-4)


def test_normalised_meta_gradient_std():
    rng = np.random.default_rng(0)
    per_step = rng.normal(size=(4000, 3, 4)) * np.array([1.0, 2.0, 4.0])[None, :, None]  # independent steps
    ratios = mm.normalised_meta_gradient_std(per_step, [(1, False), (3, False), (3, True)])
    assert ratios["1-step"] == 1.0
    assert abs(ratios["3-step"] - 4.0) < 0.2
    w = mm.mixing_weights(3)
    assert abs(ratios["3-mix"] - np.sqrt(np.sum((w * [1.0, 2.0, 4.0]) ** 2))) < 0.1


def test_snake_smoke_run_with_mixing_and_variance_mode(tmp_path):
    result = run_script(
        tmp_path,
        *["--total-timesteps", "96", "--num-envs", "4", "--num-steps", "4", "--log-frequency", "3", "--board-size", "6"],
        *["--inner-steps", "2", "--mix", "--variance-points", "1", "--variance-samples", "3", "--variance-batch", "1"],
        *["--variance-nstep", "1", "2", "--variance-mix", "2", "--save-model"],
        script="mix_metagrad.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    logged = scalars(run_dir)
    for tag in ["charts/SPS", "losses/loss", "losses/outer_loss", "meta/gamma", "meta/lambda", "meta/c_crit", "meta/c_entr"]:
        assert tag in logged and np.all(np.isfinite(logged[tag])), tag
    assert logged["meta/gamma"][-1] != pytest.approx(0.99, abs=1e-7)  # the meta step moved gamma
    assert "charts/episodic_return" in logged  # a random snake on a 6 x 6 board dies within 24 moves
    with open(os.path.join(run_dir, "variance.json")) as f:
        variance = json.load(f)
    assert set(variance["mean"]) == {"1-step", "2-step", "2-mix"} and variance["mean"]["1-step"] == 1.0
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    # measured after the first 3 updates (3 x 4 envs x 4 steps), never at update 0 before any real step
    assert [event.step for event in accumulator.Scalars("variance/2-mix")] == [48]
    saved_args, params, meta_params = mm.load_model(os.path.join(run_dir, "mix_metagrad.flax_model"))
    assert (
        saved_args.inner_steps == 2
        and saved_args.num_updates == 6
        and set(meta_params) == set(mm.init_meta_params(saved_args))
    )


def test_other_environments_are_refused_with_one_line_before_anything_is_written(tmp_path):
    result = run_script(tmp_path, "--env-id", "CartPole-v1", script="mix_metagrad.py")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "--env-id CartPole-v1: only snake_jax, a pure JAX game whose state the look-ahead rollouts copy"
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(inner_steps=0, mix=True), "--mix needs"),
        (dict(inner_steps=3, mix=True, kappa=1.5), "--kappa must lie"),
        (dict(env_id="two_colors_jax"), "--env-id two_colors_jax: only snake_jax"),
        (dict(variance_points=3, variance_nstep=[3, 5]), "must contain 1"),
        (dict(env_id="Breakout-v5", variance_points=3), "--env-id Breakout-v5: only snake_jax"),
        (dict(gamma=1.0), "must lie in (0, 1)"),
    ],
)
def test_bad_arguments_fail_early_with_a_message(overrides, message):
    """`check_args` runs before anything is written (see the script's main)."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        mm.check_args(mm.Args(**overrides))
