"""drmg.py: meta-gradient against finite differences, QR equivalence, n-step return, scalar eta, learning, smoke runs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_qr_impala_run import make_rollout as make_random_rollout
from test_qr_impala_run import only_run_dir, run_script, scalars

import drmg
import qr_impala

NUM_STEPS, NUM_ENVS, NUM_ACTIONS, OBS_DIM = 5, 4, 3, 3


def make_rollout(module, seed=0, dtype=np.float32):
    return make_random_rollout(module, NUM_STEPS, NUM_ENVS, NUM_ACTIONS, OBS_DIM, seed, dtype)


def make_states(module, args, rollout, seed=0):
    network = module.AgentNetwork(NUM_ACTIONS, args.num_quantiles)
    params = network.init(jax.random.PRNGKey(seed), rollout.obs[0])
    params = jax.tree.map(lambda x: x.astype(rollout.obs.dtype), params)  # flax initialises float32 even under x64
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.rmsprop(args.learning_rate, decay=0.99, eps=0.01))
    agent_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    # One real step first, so that RMSProp's second-moment estimate is not all zeros.
    grads = jax.grad(lambda p: jnp.sum(network.apply(p, rollout.obs[0])[1] ** 2))(params)
    return agent_state.apply_gradients(grads=grads)


def test_meta_gradient_equals_central_finite_differences_in_float64():
    """Eq. 14: d L_out / d eta = (dL_out/dtheta') (dtheta'/d eta), where dL_out/dtheta' is the outer loss's usual
    gradient (its targets and advantages stop-gradiented) and theta' = theta + RMSProp(grad L_in(theta, eta)) (eq. 12).
    The oracle differentiates theta'(eta) by central differences, its inner step written here independently."""
    with jax.enable_x64(True):
        args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.7, alpha=0.6, weight_init=0.8, learning_rate=0.05)
        rollout = jax.tree.map(jnp.asarray, make_rollout(drmg, dtype=np.float64))
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
    rollout = jax.tree.map(jnp.asarray, make_rollout(drmg))
    agent_state = make_states(drmg, drmg_args, rollout)
    meta_state = TrainState.create(apply_fn=None, params=drmg.init_meta_params(drmg_args), tx=optax.adam(1e-3))
    drmg_state, new_meta_state, _ = drmg.learner_step(agent_state, meta_state, rollout, drmg_args, axis_name=None)
    qr_state, _ = qr_impala.learner_step(agent_state, qr_impala.Rollout(*rollout), qr_args, axis_name=None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), drmg_state.params, qr_state.params)
    jax.tree.map(np.testing.assert_array_equal, new_meta_state.params, meta_state.params)
    assert optax.global_norm(jax.tree.map(jnp.subtract, qr_state.params, agent_state.params)) > 1e-4


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
    rollout = jax.tree.map(jnp.asarray, make_rollout(drmg))
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
    rollout = jax.tree.map(jnp.asarray, make_rollout(drmg))
    inner, outer = drmg.split_halves(rollout)
    agent_state = make_states(drmg, args, rollout)
    grads, _, _ = drmg.meta_gradient(drmg.init_meta_params(args), agent_state, inner, outer, args, None)
    for name in ["gamma", "lambda_", "alpha"]:
        assert np.all(grads[name] == 0), name
    for name in ["w_z", "w_pi", "w_h"]:
        assert np.all(grads[name] != 0), name


def meta_step_on(module, devices, args, agent_state, meta_state, batch):
    """`module`'s jitted learner step with the batch sharded over `devices` and the train states replicated."""
    mesh = Mesh(np.array(devices), ("learner",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "learner"))
    return module.make_learner_step(args, mesh)(
        jax.device_put(agent_state, replicated), jax.device_put(meta_state, replicated), jax.device_put(batch, sharded)
    )


def assert_same_step(one, two):
    """Both train states equal; with SGD at learning rate 1 the meta step is minus the meta-gradient."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), two[1].params, one[1].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), two[0].params, one[0].params)
    assert float(one[2]["meta_grad_norm"]) > 1e-6


def test_two_device_meta_step_equals_single_device_meta_step():
    args = drmg.Args(num_quantiles=3, gamma=0.9, lambda_=0.8, alpha=0.7)
    rollout = make_rollout(drmg)
    agent_state = make_states(drmg, args, jax.tree.map(jnp.asarray, rollout))
    meta_state = TrainState.create(apply_fn=None, params=drmg.init_meta_params(args), tx=optax.sgd(1.0))
    # Each device halves its own shard, so on two devices tau1 = envs {0, 2} and tau2 = envs {1, 3}: the pairing of
    # inner and outer data matters to the meta-gradient, so give the single device the same halves.
    reordered = jax.tree.map(lambda x: x[:, [0, 2, 1, 3]], rollout)
    one = meta_step_on(drmg, jax.devices()[:1], args, agent_state, meta_state, reordered)
    assert_same_step(one, meta_step_on(drmg, jax.devices()[:2], args, agent_state, meta_state, rollout))


def test_learns_cartpole_and_meta_parameters_move(tmp_path):
    result = run_script(
        tmp_path,
        *["--env-id", "CartPole-v1", "--seed", "1", "--total-timesteps", "100000"],
        *["--local-num-envs", "4", "--num-steps", "16", "--learning-rate", "2e-3", "--log-frequency", "100"],
        script="drmg.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(only_run_dir(tmp_path))
    returns = logged["charts/avg_episodic_return_last100"]
    assert returns[0] < 40 and returns[-1] >= 100, returns[-10:]
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
    result = run_script(
        tmp_path,
        *["--env-id", env_id, "--total-timesteps", "32", "--local-num-envs", "2", "--num-actor-threads", "1"],
        *["--num-steps", "8", "--log-frequency", "1", *ablation],
        script="drmg.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(only_run_dir(tmp_path))
    assert np.isfinite(logged["losses/loss"]).all() and "meta/gamma/q00" in logged
    assert ("meta/grad_norm" in logged) == (ablation != ["--meta-learn", "none"])
    assert ("meta/gamma/q01" in logged) == (ablation != ["--scalar-eta"])
