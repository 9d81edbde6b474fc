"""Defect checks behind the plateau probe (issue 31), on qr_impala.py as of d919d67 (loaded as the probe loads it).

1. On-policy (rho = 1), lambda 1: `distributional_vtrace`'s targets and advantages, with the discounts and trace masks
   that `impala_loss` builds from a Rollout (terminations, truncations, EnvPool reset steps), equal a hand-computed
   n-step return per quantile column (bootstrap from V(final obs) at a truncation, 0 after a termination).
2. The CPU convolution's custom gradient (`cpu_conv`) equals the gradient of `lax.conv_general_dilated`.

    python benchmark/results/plateau/defect_checks.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from plateau_probe import load_qr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

qr, commit = load_qr("d919d67")
T, B, N = 20, 4, 3
rng = np.random.default_rng(0)
q = rng.normal(size=(T + 1, B, N)).astype(np.float32)
r = rng.normal(size=(T, B)).astype(np.float32)
term, trunc, resets = (np.zeros((T, B), np.float32) for _ in range(3))
term[5, 0] = 1; resets[6, 0] = 1; trunc[9, 1] = 1; resets[10, 1] = 1; term[18, 2] = 1; resets[19, 2] = 1; term[19, 3] = 1  # noqa: E702
r = r * (1 - resets)  # a reset step has reward 0
valid = 1 - resets
disc = (1 - term) * valid  # as impala_loss
ret, adv = qr.distributional_vtrace(
    jnp.asarray(q[:-1]), jnp.asarray(q[-1]), jnp.asarray(r), jnp.asarray(disc), jnp.asarray(1 - trunc),
    jnp.zeros((T, B)), jnp.full((N,), 0.99), jnp.full((N,), 1.0), jnp.asarray(1.0),
)
expected = np.zeros((T, B, N))
following = q[-1].copy()
for t in reversed(range(T)):
    boot = np.where(trunc[t][:, None] > 0, q[t + 1], following)
    expected[t] = r[t][:, None] + 0.99 * disc[t][:, None] * boot
    following = expected[t]
mask = np.broadcast_to(valid[..., None] > 0, expected.shape)
err_ret = np.abs(np.asarray(ret) - expected)[mask].max()
next_target = np.where(trunc[..., None] > 0, q[1:], np.concatenate([expected[1:], q[-1][None]], 0))
err_adv = np.abs(np.asarray(adv) - (r[..., None] + 0.99 * disc[..., None] * next_target - q[:-1]).mean(-1))[valid > 0].max()
print(f"qr_impala.py at {commit[:10]}: v-trace targets vs hand n-step returns: max error {err_ret:.1e}; advantages {err_adv:.1e}")

k1, k2 = jax.random.split(jax.random.PRNGKey(0))
x, w = jax.random.normal(k1, (5, 10, 10, 4)), jax.random.normal(k2, (3, 3, 4, 16))
for pad in (((0, 0), (0, 0)), ((1, 1), (1, 1))):
    g1 = jax.grad(lambda x, w: jnp.sum(qr.cpu_conv(x, w, pad) ** 2), (0, 1))(x, w)
    g2 = jax.grad(lambda x, w: jnp.sum(qr.canonical_conv(x, w, pad) ** 2), (0, 1))(x, w)
    print(f"cpu_conv gradient vs lax.conv, padding {pad}: max relative error", [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g1, g2)])
assert err_ret < 1e-5 and err_adv < 1e-5
