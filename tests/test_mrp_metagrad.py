"""mrp_metagrad.py: the inner and outer targets against explicit sums, the Monte Carlo meta-gradient against central
finite differences, and a short run that moves the odd discounts down and the even ones up."""

import jax
import jax.numpy as jnp
import numpy as np

import mrp_metagrad as mrp


def test_targets_match_explicit_sums():
    rng = np.random.default_rng(0)
    rewards, gammas = rng.normal(size=(3, 10)), rng.uniform(0.1, 0.9, size=10)
    with jax.enable_x64(True):
        ours = np.asarray(mrp.discounted_targets(rewards, gammas))
        mc = np.asarray(mrp.monte_carlo_targets(rewards))
    for i in range(10):
        np.testing.assert_allclose(ours[:, i], sum(gammas[j] ** (j - i + 1) * rewards[:, j] for j in range(i, 10)))  # App. C.1
        np.testing.assert_allclose(mc[:, i], rewards[:, i:].sum(axis=1))


def test_n_step_meta_gradient_equals_central_finite_differences_in_float64():
    """The outer MSE is an ordinary function of eta here (its target has no eta and no theta): differentiate it numerically
    through 3 inner Adam steps on fixed keys (the reward samples do not depend on eta)."""
    args = mrp.Args(batch_size=4, learning_rate=0.05)
    with jax.enable_x64(True):
        network = mrp.ValueNetwork()
        params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)  # flax initialises float32 even under x64
        tx = mrp.make_optimizer(args)
        logits = jnp.asarray(np.random.default_rng(1).normal(size=10))
        f = jax.jit(
            lambda lg: mrp.n_step_outer_loss(lg, params, tx.init(params), tx, network.apply, jax.random.PRNGKey(3), 3, args)
        )
        ours = np.asarray(jax.jit(jax.grad(lambda lg: f(lg)))(logits))
        h = 1e-6
        fd = np.array([(f(logits.at[i].add(h)) - f(logits.at[i].add(-h))) / (2 * h) for i in range(10)])
    assert np.all(np.abs(fd) > 1e-7)
    np.testing.assert_allclose(ours, fd, rtol=1e-5, atol=1e-10)


def test_short_run_moves_odd_gammas_down_and_even_gammas_up():
    args = mrp.Args(num_updates=60, mc_samples=64)
    gammas, _, mses = jax.device_get(mrp.make_train(args, 1)(jax.random.PRNGKey(args.seed)))
    assert gammas.shape == (60, 10)
    assert np.all(gammas[-1, 0::2] > 0.51), gammas[-1]
    assert np.all(gammas[-1, 1::2] < 0.5), gammas[-1]
    assert mses[-1] < mses[0]
