"""qr_impala's distributional v-trace (eq. 9-10), A_Z (eq. 11) and quantile Huber loss (eq. 1-3) against rlax and loops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from qr_impala import distributional_vtrace, quantile_huber_loss

T, B, N = 9, 4, 3


def make_unroll(seed):
    """Random unroll with terminations, truncations, the reset steps that follow them, and ratios far from 1."""
    rng = np.random.default_rng(seed)
    terminations = rng.random((T, B)) < 0.15
    truncations = (rng.random((T, B)) < 0.1) & ~terminations
    resets = np.zeros((T, B), dtype=bool)
    resets[1:] = terminations[:-1] | truncations[:-1]
    terminations &= ~resets
    truncations &= ~resets
    return dict(
        quantiles=np.sort(rng.normal(size=(T, B, N)), axis=-1).astype(np.float32),
        bootstrap_quantiles=np.sort(rng.normal(size=(B, N)), axis=-1).astype(np.float32),
        rewards=rng.normal(size=(T, B)).astype(np.float32),
        discounts=((1 - terminations) * (1 - resets)).astype(np.float32),
        trace_masks=(1 - truncations).astype(np.float32),
        log_rhos=rng.normal(scale=1.5, size=(T, B)).astype(np.float32),  # ratios from ~0.05 to ~20
        gamma=np.array([0.9, 0.97, 0.5], dtype=np.float32)[:N],
    )


def loop_reference(u, lambda_, alpha, rho_bar, c_bar, pg_rho_bar):
    """Eq. 10 as written (IMPALA's placement of rho and c), one quantile column at a time, with explicit products."""
    returns = np.zeros((T, B, N))
    advantages = np.zeros((T, B))
    is_ratio = np.exp(u["log_rhos"].astype(np.float64))
    for b, q in itertools.product(range(B), range(N)):
        z = np.append(u["quantiles"][:, b, q], u["bootstrap_quantiles"][b, q]).astype(np.float64)
        gam = u["gamma"][q] * u["discounts"][:, b]
        rho = alpha * np.minimum(rho_bar, is_ratio[:, b]) + (1 - alpha) * is_ratio[:, b]
        lam = lambda_[q] * u["trace_masks"][:, b]
        c = lam * (alpha * np.minimum(c_bar, is_ratio[:, b]) + (1 - alpha) * is_ratio[:, b])
        for s in range(T):
            total = z[s]
            for t in range(s, T):
                trace = np.prod([gam[i] * c[i] for i in range(s, t)]) if t > s else 1.0
                total += trace * rho[t] * (u["rewards"][t, b] + gam[t] * z[t + 1] - z[t])
            returns[s, b, q] = total
    for b, s in itertools.product(range(B), range(T)):
        lam = lambda_ * u["trace_masks"][s, b]
        next_returns = returns[s + 1, b] if s + 1 < T else u["bootstrap_quantiles"][b]
        next_z = u["quantiles"][s + 1, b] if s + 1 < T else u["bootstrap_quantiles"][b]
        q_estimate = u["rewards"][s, b] + u["gamma"] * u["discounts"][s, b] * (lam * next_returns + (1 - lam) * next_z)
        advantages[s, b] = min(pg_rho_bar, is_ratio[s, b]) * np.mean(q_estimate - u["quantiles"][s, b])
    return returns, advantages


def run(u, lambda_, alpha, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    return distributional_vtrace(
        u["quantiles"],
        u["bootstrap_quantiles"],
        u["rewards"],
        u["discounts"],
        u["trace_masks"],
        u["log_rhos"],
        jnp.asarray(u["gamma"]),
        jnp.asarray(lambda_),
        alpha,
        rho_bar,
        c_bar,
        pg_rho_bar,
    )


LAMBDAS = {"0": [0.0, 0.0, 0.0], "0.5": [0.5, 0.5, 0.5], "1": [1.0, 1.0, 1.0], "per-quantile": [1.0, 0.5, 0.0]}


@pytest.mark.parametrize("lambda_name", list(LAMBDAS))
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_distributional_vtrace_equals_rlax_per_quantile_column(lambda_name, alpha, seed):
    u = make_unroll(seed)
    lambda_ = np.array(LAMBDAS[lambda_name], dtype=np.float32)
    returns, advantages = run(u, lambda_, alpha, rho_bar=1.0)
    is_ratio = np.exp(u["log_rhos"])
    pg_ratio = np.minimum(1.0, is_ratio)
    for b in range(B):
        expected_advantage = 0.0
        for q in range(N):
            v_tm1 = u["quantiles"][:, b, q]
            v_t = np.append(v_tm1[1:], u["bootstrap_quantiles"][b, q])
            args = (v_tm1, v_t, u["rewards"][:, b], u["gamma"][q] * u["discounts"][:, b], is_ratio[:, b])
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
    u = make_unroll(2)
    lambda_ = np.array(LAMBDAS[lambda_name], dtype=np.float32)
    returns, advantages = run(u, lambda_, alpha, rho_bar, c_bar, pg_rho_bar)
    expected_returns, expected_advantages = loop_reference(u, lambda_, alpha, rho_bar, c_bar, pg_rho_bar)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-4, atol=1e-4)


def test_no_return_crosses_an_episode_boundary():
    u = make_unroll(3)
    u["discounts"][:] = 1.0
    u["trace_masks"][:] = 1.0
    u["discounts"][3, 0] = 0.0  # env 0 terminates at step 3
    u["trace_masks"][5, 1] = 0.0  # env 1 is truncated at step 5: bootstraps from Z(S_6), traces stop
    lambda_ = np.ones(N, dtype=np.float32)
    returns, advantages = run(u, lambda_, 1.0)
    changed = {k: v.copy() for k, v in u.items()}
    changed["rewards"][4:, 0] += 10.0
    changed["rewards"][6:, 1] += 10.0
    changed["quantiles"][7:, 1] += 10.0  # beyond S_6: must not matter either
    changed_returns, changed_advantages = run(changed, lambda_, 1.0)
    np.testing.assert_allclose(changed_returns[:4, 0], returns[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_returns[:6, 1], returns[:6, 1], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:4, 0], advantages[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:6, 1], advantages[:6, 1], rtol=1e-6)
    # ... while an unbroken env sees the change, and the truncated step still bootstraps from Z(S_6).
    changed["quantiles"][6, 1] += 1.0
    assert not np.allclose(run(changed, lambda_, 1.0)[0][5, 1], returns[5, 1])


def central_difference(f, x, eps=1e-3):
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[j] = eps
        grad[j] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
    return grad


def test_gradients_flow_to_gamma_lambda_alpha_and_not_to_values_or_ratios():
    u = make_unroll(4)

    def total(gamma, lambda_, alpha, quantiles, log_rhos):
        returns, advantages = distributional_vtrace(
            quantiles,
            u["bootstrap_quantiles"],
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
        jnp.asarray(u["gamma"]),
        jnp.full((N,), 0.8),
        jnp.asarray(0.7),
        jnp.asarray(u["quantiles"]),
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
