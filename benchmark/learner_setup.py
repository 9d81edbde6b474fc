"""What benchmark/learner_memory.py and benchmark/update_time.py share: each script's learner step on one device.

For qr_impala.py, drmg.py, mg.py and stacx.py: the script's own Args for an environment, its network's parameters and
learner state, and its jitted learner step; with `abstract=True`, shapes only (nothing is allocated or run).
"""

import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from helpers import IMPALA_FAMILY as MODULES  # noqa: E402  (the one registry of the scripts)

qr_impala = MODULES["qr_impala"]


def environment(env_id: str):
    """(observation space, number of actions) of an environment, from one env of qr_impala.py's make_env."""
    envs = qr_impala.make_env(env_id, 0, 1, qr_impala.Args(env_id=env_id))
    return envs.observation_space, envs.action_space.n


def script_args(name: str, env_id: str, **overrides):
    """The script's Args with its defaults, the run-time fields filled in as for one process."""
    args = MODULES[name].Args(env_id=env_id, **overrides)
    args.world_size = 1
    args.local_batch_size = args.batch_size = args.local_num_envs * args.num_actor_threads * args.num_steps
    args.num_updates = 1000
    return args


def learner(name: str, args, observation_space, num_actions: int, abstract: bool = False):
    """(jitted learner step, its learner state, the rollout spec of its batch) on the first device."""
    module = MODULES[name]
    mesh = Mesh(np.array(jax.devices()[:1]), ("learner",))
    obs = np.zeros((1,) + observation_space.shape, observation_space.dtype)
    network = module.make_network(num_actions, args)

    def state():
        params = module.init_params(network, jax.random.PRNGKey(0), obs, args)
        return module.make_learner_state(network.apply, params, args)

    spec = module.rollout_spec(args, observation_space, num_actions, NamedSharding(mesh, P(None, "learner")))
    return module.make_learner_step(args, mesh), jax.eval_shape(state) if abstract else state(), spec


def random_batch(spec, num_actions: int, seed: int = 0):
    """A batch of the spec's shapes: random observations, actions and logits, rewards, 1% terminations."""
    rng = np.random.default_rng(seed)
    T, B = spec.actions.shape
    obs = spec.obs
    if np.issubdtype(obs.dtype, np.integer):
        observations = rng.integers(0, 256, size=obs.shape).astype(obs.dtype)
    else:
        observations = rng.normal(size=obs.shape).astype(obs.dtype)
    return type(spec)(
        obs=observations,
        actions=rng.integers(0, num_actions, size=(T, B)).astype(np.int32),
        behaviour_logits=rng.normal(size=(T, B, num_actions)).astype(np.float32),
        rewards=rng.normal(size=(T, B)).astype(np.float32),
        terminations=(rng.random((T, B)) < 0.01).astype(np.float32),
        truncations=np.zeros((T, B), np.float32),
        resets=np.zeros((T, B), np.float32),
    )
