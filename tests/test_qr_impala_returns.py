"""qr_impala's distributional v-trace (eq. 9-10), A_Z (eq. 11) and quantile Huber loss (eq. 1-3) against rlax and loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax
from helpers import B, check_no_return_crosses_an_episode_boundary, make_unroll, vtrace_oracle_batch

from qr_impala import distributional_vtrace, quantile_huber_loss

N = 3
GAMMA = np.array([0.9, 0.97, 0.5], dtype=np.float32)


def run(u, lambda_, alpha, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    keys = ["values", "bootstrap_value", "rewards", "discounts", "trace_masks", "log_rhos"]
    return distributional_vtrace(*(u[k] for k in keys), GAMMA, jnp.asarray(lambda_), alpha, rho_bar, c_bar, pg_rho_bar)


LAMBDAS = {"0": [0.0, 0.0, 0.0], "0.5": [0.5, 0.5, 0.5], "1": [1.0, 1.0, 1.0], "per-quantile": [1.0, 0.5, 0.0]}


@pytest.mark.parametrize("lambda_name", list(LAMBDAS))
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_distributional_vtrace_equals_rlax_per_quantile_column(lambda_name, alpha, seed):
    u = make_unroll(seed, N)
    lambda_ = np.array(LAMBDAS[lambda_name], dtype=np.float32)
    returns, advantages = run(u, lambda_, alpha, rho_bar=1.0)
    is_ratio = np.exp(u["log_rhos"])
    pg_ratio = np.minimum(1.0, is_ratio)
    for b in range(B):
        expected_advantage = 0.0
        for q in range(N):
            v_tm1 = u["values"][:, b, q]
            v_t = np.append(v_tm1[1:], u["bootstrap_value"][b, q])
            args = (v_tm1, v_t, u["rewards"][:, b], GAMMA[q] * u["discounts"][:, b], is_ratio[:, b])
            lam_t = lambda_[q] * u["trace_masks"][:, b]
            if alpha == 1.0:
                out = rlax.vtrace_td_error_and_advantage(*args, lambda_=lam_t, stop_target_gradients=False)
                np.testing.assert_allclose(out.pg_advantage, pg_ratio[:, b] * (out.q_estimate - v_tm1), rtol=1e-5, atol=1e-5)
            else:
                out = rlax.leaky_vtrace_td_error_and_advantage(*args, alpha=alpha, lambda_=lam_t, stop_target_gradients=False)
            np.testing.assert_allclose(returns[:, b, q], out.errors + v_tm1, rtol=1e-5, atol=1e-5)
            # Eq. 11 clips the ratio of A_Z with min(c-bar, pi/mu) whatever alpha is.
            expected_advantage += pg_ratio[:, b] * (out.q_estimate - v_tm1) / N
        np.testing.assert_allclose(advantages[:, b], expected_advantage, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lambda_name", list(LAMBDAS))
@pytest.mark.parametrize("alpha,rho_bar,c_bar,pg_rho_bar", [(1.0, 1.0, 1.0, 1.0), (0.7, 2.0, 0.8, 1.5)])
def test_distributional_vtrace_equals_plain_loop_of_eq_10(lambda_name, alpha, rho_bar, c_bar, pg_rho_bar):
    u = make_unroll(2, N)
    lambda_ = np.array(LAMBDAS[lambda_name], dtype=np.float32)
    returns, advantages = run(u, lambda_, alpha, rho_bar, c_bar, pg_rho_bar)
    options = dict(rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, alpha_rho=alpha, alpha_pg=1.0)  # A_Z: eq. 11
    expected_returns, expected_advantages = vtrace_oracle_batch(u, GAMMA, lambda_, **options)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)
    if alpha < 1:  # the check can tell A_Z's clipped ratio from a leaky one
        leaky_advantages = vtrace_oracle_batch(u, GAMMA, lambda_, **dict(options, alpha_pg=alpha))[1]
        assert not np.allclose(advantages, leaky_advantages, rtol=1e-4, atol=1e-4)


def test_no_return_crosses_an_episode_boundary():
    check_no_return_crosses_an_episode_boundary(lambda u: run(u, np.ones(N, dtype=np.float32), 1.0), num_quantiles=N)


def central_difference(f, x, eps=1e-3):
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[j] = eps
        grad[j] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
    return grad


def test_gradients_flow_to_gamma_lambda_alpha_and_not_to_values_or_ratios():
    u = make_unroll(4, N)

    def total(gamma, lambda_, alpha, quantiles, log_rhos):
        returns, advantages = distributional_vtrace(
            quantiles,
            u["bootstrap_value"],
            u["rewards"],
            u["discounts"],
            u["trace_masks"],
            log_rhos,
            gamma,
            lambda_,
            alpha,
        )
        return jnp.sum(returns) + jnp.sum(advantages)

    inputs = [
        jnp.asarray(GAMMA),
        jnp.full((N,), 0.8),
        jnp.asarray(0.7),
        jnp.asarray(u["values"]),
        jnp.asarray(u["log_rhos"]),
    ]
    grads = jax.grad(total, argnums=(0, 1, 2, 3, 4))(*inputs)
    for i in range(3):  # gamma, lambda, alpha
        f = lambda x: total(*inputs[:i], jnp.asarray(x, dtype=jnp.float32), *inputs[i + 1 :])  # noqa: E731
        numeric = central_difference(f, inputs[i])
        np.testing.assert_allclose(grads[i], numeric, rtol=2e-2, atol=2e-2)
        assert np.all(np.abs(grads[i]) > 1e-3)
    assert np.all(grads[3] == 0) and np.all(grads[4] == 0)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0, 2.0])
def test_quantile_huber_loss_equals_rlax_and_a_double_loop(kappa):
    """kappa = 0 is eq. 1's plain quantile regression loss |tau - 1{u < 0}| |u| (rlax's huber_param=0 too)."""
    rng = np.random.default_rng(5)
    quantiles = rng.normal(size=(6, 5)).astype(np.float32)
    targets = rng.normal(scale=2.0, size=(6, 7)).astype(np.float32)  # M = 7 target atoms, |u| on both sides of kappa
    ours = np.asarray(quantile_huber_loss(jnp.asarray(quantiles), jnp.asarray(targets), kappa))
    assert ours.shape == (6, 5)
    taus = (2 * np.arange(5) + 1) / 10.0
    for b in range(6):
        oracle = rlax.quantile_regression_loss(quantiles[b], taus.astype(np.float32), targets[b], huber_param=kappa)
        np.testing.assert_allclose(ours[b].sum(), oracle, rtol=1e-5)
        for i in range(5):
            brute = 0.0
            for j in range(7):
                u = float(targets[b, j]) - float(quantiles[b, i])
                if kappa == 0:
                    huber = abs(u)
                else:
                    huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
                brute += abs(taus[i] - (1.0 if u < 0 else 0.0)) * huber / 7
            np.testing.assert_allclose(ours[b, i], brute, rtol=1e-5)
