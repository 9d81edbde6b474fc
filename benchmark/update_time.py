"""Learner update time of qr_impala.py, drmg.py, mg.py and stacx.py on the same batch, in one run.

    python benchmark/update_time.py --env-id Breakout-v5 --num-envs 128
    python benchmark/update_time.py --env-id Breakout-v5 --scripts mg stacx

Every jitted learner step (one device) gets the same random batch of the environment's shapes; compilation is
excluded and the timed calls of the scripts are interleaved. drmg.py and mg.py differentiate through one inner RMSProp
step twice (two inner/outer loops; DrMG's budget is about 3x its QR base); stacx.py does it once on the whole batch
(STAC's default) for its 3 heads.
"""

import os
import sys
import time
from dataclasses import dataclass, field
from typing import List

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from jax.sharding import Mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import drmg  # noqa: E402
import mg  # noqa: E402
import qr_impala  # noqa: E402
import stacx  # noqa: E402

MODULES = {"qr_impala": qr_impala, "drmg": drmg, "mg": mg, "stacx": stacx}


@dataclass
class Args:
    env_id: str = "Breakout-v5"
    """the environment whose observation and action shapes the batch takes"""
    num_envs: int = 128
    """envs in the learner batch (qr_impala.py's default: 64 envs x 2 actor threads)"""
    num_steps: int = 20
    """unroll length"""
    repeats: int = 5
    """timed updates of each script"""
    scripts: List[str] = field(default_factory=lambda: ["qr_impala", "drmg", "mg", "stacx"])
    """the scripts to time, in this order"""
    stacx_two_halves: bool = False
    """stacx.py's --two-halves (the siblings' scheme) instead of the same batch for inner and outer loss"""


def compiled_update(module, args: Args, batch, num_actions: int):
    """The script's jitted learner step on one device, compiled, as a function of nothing."""
    script_args = module.Args(env_id=args.env_id, num_steps=args.num_steps)
    if module is qr_impala or module is drmg:
        network = module.AgentNetwork(num_actions, script_args.num_quantiles)
        params = network.init(jax.random.PRNGKey(0), batch.obs[0])
    elif module is mg:
        network = mg.AgentNetwork(num_actions, script_args.eta_embedding_size)
        params = network.init(jax.random.PRNGKey(0), batch.obs[0], jnp.array([script_args.gamma, script_args.lambda_]))
    else:
        script_args.two_halves = args.stacx_two_halves
        network = stacx.AgentNetwork(num_actions, script_args.num_heads)
        params = network.init(jax.random.PRNGKey(0), batch.obs[0])
    tx = optax.chain(optax.clip_by_global_norm(40.0), optax.rmsprop(6e-4, decay=0.99, eps=0.01))
    states = [TrainState.create(apply_fn=network.apply, params=params, tx=tx)]
    if module is not qr_impala:
        states.append(TrainState.create(apply_fn=None, params=module.init_meta_params(script_args), tx=optax.adam(1e-3)))
    step = module.make_learner_step(script_args, Mesh(np.array(jax.devices()[:1]), ("learner",)))
    jax.block_until_ready(step(*states, batch))  # compile
    return lambda: jax.block_until_ready(step(*states, batch))


if __name__ == "__main__":
    args = tyro.cli(Args)
    envs = qr_impala.make_env(args.env_id, 0, 1, qr_impala.Args(env_id=args.env_id))()
    num_actions, obs_space = envs.action_space.n, envs.observation_space
    rng = np.random.default_rng(0)
    T, B = args.num_steps, args.num_envs
    obs = rng.integers(0, 256, size=(T + 1, B, *obs_space.shape)).astype(obs_space.dtype)
    batch = dict(
        obs=obs,
        actions=rng.integers(0, num_actions, size=(T, B)).astype(np.int32),
        behaviour_logits=rng.normal(size=(T, B, num_actions)).astype(np.float32),
        rewards=rng.normal(size=(T, B)).astype(np.float32),
        terminations=(rng.random((T, B)) < 0.01).astype(np.float32),
        truncations=np.zeros((T, B), np.float32),
        resets=np.zeros((T, B), np.float32),
    )
    updates = {
        name: compiled_update(MODULES[name], args, MODULES[name].Rollout(**batch), num_actions) for name in args.scripts
    }
    samples = {name: [] for name in args.scripts}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits every script alike
        for name, update in updates.items():
            start = time.perf_counter()
            update()
            samples[name].append(time.perf_counter() - start)
    times = {name: float(np.median(seconds)) for name, seconds in samples.items()}
    print(f"device {jax.devices()[0].device_kind}; {args.env_id}, batch {T} steps x {B} envs, median of {args.repeats}")
    for name, seconds in times.items():
        print(f"{name}.py learner update: {seconds * 1000:.1f} ms")
    for a, b in [("drmg", "qr_impala"), ("mg", "qr_impala"), ("stacx", "mg"), ("drmg", "mg")]:
        if a in times and b in times:
            print(f"ratio {a} / {b}: {times[a] / times[b]:.2f}")
