"""What several test modules use: running a script, reading its logs, random unrolls and train states, the learner step
on a set of devices. Test modules import from here and never from each other."""

import dataclasses
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(cwd, *flags, script="qr_impala.py", xla_devices=1):
    """Run `script` with `flags` in a subprocess on `xla_devices` CPU devices; returns the CompletedProcess."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={xla_devices}", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def scalars(run_dir):
    """Every scalar of a run's TensorBoard log: {tag: [values in step order]}."""
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def only_run_dir(cwd):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def make_rollout(module, num_steps=6, num_envs=8, num_actions=3, obs_dim=5, seed=0, dtype=np.float32):
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


def make_states(module, args, rollout, num_actions=3, seed=0):
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
