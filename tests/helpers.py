"""What several test modules use: running a script, reading its logs, random unrolls and train states, the learner step
on a set of devices, and the one plain-loop v-trace oracle. Test modules import from here and never from each other."""

import dataclasses
import glob
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import drmg
import mg
import qr_impala
import stacx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The IMPALA-family scripts, {name: module}: the one registry of the tests and of benchmark/.
IMPALA_FAMILY = {"qr_impala": qr_impala, "drmg": drmg, "mg": mg, "stacx": stacx}
NUM_ACTIONS = 3  # of make_rollout's and make_states' agents
T, B = 9, 4  # make_unroll's steps and envs


# ---------------------------------------------------------------------------------------------------------------------
# Scripts in a subprocess and their logs


def script_env(xla_devices=1, **extra):
    """The environment of a script's subprocess: JAX on `xla_devices` CPU devices, and `extra` variables."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={xla_devices}", JAX_PLATFORMS="cpu", **extra)


def run_script(cwd, *flags, script="qr_impala.py", xla_devices=1, timeout=900, **extra_env):
    """Run `script` with `flags` in a subprocess on `xla_devices` CPU devices; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=cwd,
        env=script_env(xla_devices, **extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scalars(run_dir):
    """Every scalar of a run's TensorBoard log: {tag: [values in step order]}."""
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def only_run_dir(cwd):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def learn_cartpole(tmp_path, script, total_timesteps, learning_rate, *flags, log_frequency=100):
    """A CartPole-v1 run of `script` (seed 1, 4 envs, 16 steps) that must start at a random policy's returns; returns its
    logged scalars and its run directory."""
    flags = ["--env-id", "CartPole-v1", "--seed", "1", "--total-timesteps", str(total_timesteps), *flags]
    flags += ["--local-num-envs", "4", "--num-steps", "16", "--learning-rate", str(learning_rate)]
    result = run_script(tmp_path, *flags, "--log-frequency", str(log_frequency), script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    logged = scalars(run_dir)
    assert logged["charts/avg_episodic_return_last100"][0] < 40  # a random policy balances for about 20 steps
    return logged, run_dir


def smoke_run(tmp_path, script, env_id, *flags):
    """A 32-step run of `script` on `env_id` (2 envs, one actor thread, 8 steps, a log every update) that must succeed;
    returns its logged scalars, every loss finite."""
    result = run_script(
        tmp_path,
        *["--env-id", env_id, "--total-timesteps", "32", "--local-num-envs", "2", "--num-actor-threads", "1"],
        *["--num-steps", "8", "--log-frequency", "1", *flags],
        script=script,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(only_run_dir(tmp_path))
    assert np.isfinite(logged["losses/loss"]).all()
    return logged


# ---------------------------------------------------------------------------------------------------------------------
# Random unrolls, train states and the learner step


def make_rollout(module, num_steps=6, num_envs=8, num_actions=NUM_ACTIONS, obs_dim=5, seed=0, dtype=np.float32):
    """A random unroll of `module.Rollout` with a termination, the reset step after it, truncations, ratios far from 1."""
    rng = np.random.default_rng(seed)
    resets = np.zeros((num_steps, num_envs))
    resets[3, [1, num_envs - 2]] = 1.0
    return module.Rollout(
        obs=rng.normal(size=(num_steps + 1, num_envs, obs_dim)).astype(dtype),
        actions=rng.integers(0, num_actions, size=(num_steps, num_envs)).astype(np.int32),
        behaviour_logits=rng.normal(size=(num_steps, num_envs, num_actions)).astype(dtype),
        rewards=rng.normal(scale=2.0, size=(num_steps, num_envs)).astype(dtype),
        terminations=np.roll(resets, -1, axis=0).astype(dtype),
        truncations=np.eye(num_steps, num_envs, k=-2).astype(dtype),  # env 0 is truncated at step 2
        resets=resets.astype(dtype),
    )


def make_small_rollout(module, seed=0, dtype=np.float32):
    """The unroll of the meta-gradient tests: 5 steps of 4 envs (two halves, or a half on each of two devices) with
    3-dimensional observations, small enough for quick second-order compilations and finite differences."""
    return make_rollout(module, num_steps=5, num_envs=4, obs_dim=3, seed=seed, dtype=dtype)


def make_states(module, args, rollout, num_actions=NUM_ACTIONS, seed=0):
    """The agent's train state of an IMPALA-family script on `rollout`'s observations and dtype, built by the script's own
    `make_optimizer` (constant learning rate), after one real step so that RMSProp's second moments are not all zeros."""
    obs = rollout.obs[0]
    if module.__name__ == "mg":
        network = module.AgentNetwork(num_actions, args.eta_embedding_size if args.eta_embedding else 0)
        extra = (jnp.asarray([args.gamma, args.lambda_], dtype=obs.dtype),)
    else:
        network = module.AgentNetwork(num_actions, args.num_heads if module.__name__ == "stacx" else args.num_quantiles)
        extra = ()
    params = network.init(jax.random.PRNGKey(seed), obs, *extra)
    params = jax.tree.map(lambda x: x.astype(obs.dtype), params)  # flax initialises float32 even under x64
    tx = module.make_optimizer(dataclasses.replace(args, anneal_lr=False))
    agent_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    grads = jax.grad(lambda p: jnp.sum(network.apply(p, obs, *extra)[1] ** 2))(params)
    return agent_state.apply_gradients(grads=grads)


def learner_step_on(module, devices, args, learner_state, batch):
    """`module`'s jitted learner step on `devices`: the learner state replicated, the batch sharded along its env axis."""
    mesh = Mesh(np.array(devices), ("learner",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "learner"))
    return module.make_learner_step(args, mesh)(jax.device_put(learner_state, replicated), jax.device_put(batch, sharded))


def assert_same_step(one, two):
    """Both learner states equal; with SGD at learning rate 1 the meta step is minus the meta-gradient."""
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)  # noqa: E731
    jax.tree.map(close, two[0]["meta"].params, one[0]["meta"].params)
    jax.tree.map(close, two[0]["agent"].params, one[0]["agent"].params)
    assert float(one[1]["meta_grad_norm"]) > 1e-6


def check_two_devices_give_the_single_device_meta_step(module, args, halves=True):
    """`module`'s learner step with SGD at learning rate 1 on eta, its batch on one device and split over two. With
    `halves`, each device halves its own shard, so on two devices tau1 = envs {0, 2} and tau2 = envs {1, 3}: the pairing
    of inner and outer data matters to the meta-gradient, so the single device gets the same halves. Returns the
    single-device (learner state, metrics)."""
    rollout = make_small_rollout(module)
    agent_state = make_states(module, args, jax.tree.map(jnp.asarray, rollout))
    meta_state = TrainState.create(apply_fn=None, params=module.init_meta_params(args), tx=optax.sgd(1.0))
    single = jax.tree.map(lambda x: x[:, [0, 2, 1, 3]], rollout) if halves else rollout
    state = dict(agent=agent_state, meta=meta_state)
    one = learner_step_on(module, jax.devices()[:1], args, state, single)
    assert_same_step(one, learner_step_on(module, jax.devices()[:2], args, state, rollout))
    return one[:2]


# ---------------------------------------------------------------------------------------------------------------------
# V-trace: random unrolls and the plain-loop oracle


def make_unroll(seed, num_quantiles=0, log_rho_scale=1.5):
    """The inputs of a v-trace over T steps of B envs: terminations, truncations, the reset steps that follow them, and
    ratios far from 1 (scale 1.5: from ~0.05 to ~20). values V(S_t) [T, B] and bootstrap_value V(S_T) [B], or with
    `num_quantiles` N, sorted quantiles Z(S_t) [T, B, N] and Z(S_T) [B, N]."""
    rng = np.random.default_rng(seed)
    terminations = rng.random((T, B)) < 0.15
    truncations = (rng.random((T, B)) < 0.1) & ~terminations
    resets = np.zeros((T, B), dtype=bool)
    resets[1:] = terminations[:-1] | truncations[:-1]
    terminations &= ~resets
    truncations &= ~resets
    atoms = (num_quantiles,) if num_quantiles else ()
    values, bootstrap_value = rng.normal(size=(T, B, *atoms)), rng.normal(size=(B, *atoms))
    if num_quantiles:
        values, bootstrap_value = np.sort(values, axis=-1), np.sort(bootstrap_value, axis=-1)
    return dict(
        values=values.astype(np.float32),
        bootstrap_value=bootstrap_value.astype(np.float32),
        rewards=rng.normal(size=(T, B)).astype(np.float32),
        discounts=((1 - terminations) * (1 - resets)).astype(np.float32),
        trace_masks=(1 - truncations).astype(np.float32),
        log_rhos=rng.normal(scale=log_rho_scale, size=(T, B)).astype(np.float32),
    )


def vtrace_oracle(
    values,
    bootstrap_value,
    rewards,
    discounts,
    trace_masks,
    log_rhos,
    gamma,
    lambda_,
    rho_bar=1.0,
    c_bar=1.0,
    pg_rho_bar=1.0,
    alpha_rho=1.0,
    alpha_c=None,
    alpha_pg=None,
):
    """The v-trace return of one trajectory and its policy-gradient advantage, by plain loops in float64.

    IMPALA's eq. 1 as written, with explicit products of the traces:
        G_s = V(x_s) + sum_{t >= s} (prod_{s <= i < t} gamma_i c_i) rho_t (r_t + gamma_t V(x_t+1) - V(x_t)),
    and the advantage rho^pg_s (r_s + gamma_s [(1 - lambda_s) V(x_s+1) + lambda_s G_s+1] - V(x_s)), G_T = V(x_T),
    with gamma_t = gamma discounts_t (per-step discounts), lambda_t = lambda_ trace_masks_t (a truncation stops the
    traces), and STAC's leaky ratios (IMPALA's clipped ones when the alphas are 1):
        rho_t = alpha_rho min(rho_bar, pi/mu) + (1 - alpha_rho) pi/mu,  c_t = lambda_t [alpha_c min(c_bar, pi/mu) + ...],
        rho^pg_t = alpha_pg min(pg_rho_bar, pi/mu) + (1 - alpha_pg) pi/mu;  alpha_c and alpha_pg default to alpha_rho.
    values, rewards, discounts, trace_masks, log_rhos: [T]; bootstrap_value, gamma, lambda_: scalars.
    Returns (G [T], advantages [T]).
    """
    alpha_c = alpha_rho if alpha_c is None else alpha_c
    alpha_pg = alpha_rho if alpha_pg is None else alpha_pg
    num_steps = len(rewards)
    ratio = np.exp(np.asarray(log_rhos, np.float64))
    v = np.append(np.asarray(values, np.float64), np.float64(bootstrap_value))
    r = np.asarray(rewards, np.float64)
    gam = np.float64(gamma) * np.asarray(discounts, np.float64)
    lam = np.float64(lambda_) * np.asarray(trace_masks, np.float64)
    rho = alpha_rho * np.minimum(rho_bar, ratio) + (1 - alpha_rho) * ratio
    c = lam * (alpha_c * np.minimum(c_bar, ratio) + (1 - alpha_c) * ratio)
    pg_rho = alpha_pg * np.minimum(pg_rho_bar, ratio) + (1 - alpha_pg) * ratio
    returns, advantages = np.zeros(num_steps), np.zeros(num_steps)
    for s in range(num_steps):
        total = v[s]
        for t in range(s, num_steps):
            trace = np.prod([gam[i] * c[i] for i in range(s, t)])  # 1 when t = s
            total += trace * rho[t] * (r[t] + gam[t] * v[t + 1] - v[t])
        returns[s] = total
    for s in range(num_steps):
        next_return = returns[s + 1] if s + 1 < num_steps else v[num_steps]
        q_estimate = r[s] + gam[s] * (lam[s] * next_return + (1 - lam[s]) * v[s + 1])
        advantages[s] = pg_rho[s] * (q_estimate - v[s])
    return returns, advantages


def vtrace_oracle_batch(u, gamma, lambda_, **options):
    """`vtrace_oracle` on every env of `make_unroll`'s dict u: (G [T, B], advantages [T, B]). With quantiles (values
    [T, B, N]; gamma, lambda_: [N]) each quantile column on its own, and the advantage their mean (DrMG eq. 9-11):
    (G [T, B, N], A_Z [T, B])."""
    values, bootstrap_value = u["values"], u["bootstrap_value"]
    if values.ndim == 2:
        values, bootstrap_value = values[..., None], bootstrap_value[..., None]
        gamma, lambda_ = [gamma], [lambda_]
    returns, advantages = np.zeros(values.shape), np.zeros(values.shape)
    for b, q in itertools.product(range(values.shape[1]), range(values.shape[2])):
        steps = (u[k][:, b] for k in ["rewards", "discounts", "trace_masks", "log_rhos"])
        column = vtrace_oracle(values[:, b, q], bootstrap_value[b, q], *steps, gamma[q], lambda_[q], **options)
        returns[:, b, q], advantages[:, b, q] = column
    if u["values"].ndim == 2:
        return returns[..., 0], advantages[..., 0]
    return returns, advantages.mean(axis=-1)


def check_no_return_crosses_an_episode_boundary(vtrace, num_quantiles=0):
    """`vtrace(u)` -> (returns, advantages) of a `make_unroll` dict u: after a termination nothing of the next episode
    reaches the returns and advantages; after a truncation neither, but the truncated step bootstraps from V(S_t+1)."""
    u = make_unroll(3, num_quantiles)
    u["discounts"][:] = 1.0
    u["trace_masks"][:] = 1.0
    u["discounts"][3, 0] = 0.0  # env 0 terminates at step 3
    u["trace_masks"][5, 1] = 0.0  # env 1 is truncated at step 5: bootstraps from V(S_6), traces stop
    returns, advantages = vtrace(u)
    changed = {k: v.copy() for k, v in u.items()}
    changed["rewards"][4:, 0] += 10.0
    changed["rewards"][6:, 1] += 10.0
    changed["values"][7:, 1] += 10.0  # beyond S_6: must not matter either
    changed_returns, changed_advantages = vtrace(changed)
    np.testing.assert_allclose(changed_returns[:4, 0], returns[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_returns[:6, 1], returns[:6, 1], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:4, 0], advantages[:4, 0], rtol=1e-6)
    np.testing.assert_allclose(changed_advantages[:6, 1], advantages[:6, 1], rtol=1e-6)
    changed["values"][6, 1] += 1.0  # ... but the truncated step still bootstraps from V(S_6)
    assert not np.allclose(vtrace(changed)[0][5, 1], returns[5, 1])
