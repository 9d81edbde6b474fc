"""Where the on-device loop's time goes: steps per second of each IMPALA-family script's jitted on-device loop on a JAX
environment (the policy, the environment and `learner_step` in one program), and of the same loop with a learner step
that does nothing (the unroll alone: the policy and the environment); the learner's share is the rest.

    python benchmark/on_device_sps.py                                  # Breakout-MinAtar, the four scripts, 1 seed
    python benchmark/on_device_sps.py --scripts qr_impala --num-seeds 1 8 32 --out sps.json

Each script runs with its own MinAtar defaults (`ENV_DEFAULTS`) on the first device, --updates-per-call updates per
call as the script makes --log-frequency updates per call; after one call that compiles, --calls calls are timed and
the median is kept. With --num-seeds N the N seeds train in one program (vmapped), and the rate is of all of them.
--out is written again (atomically) after each measurement, so that a run stopped midway (benchmark/gpu_check.py caps
this part's wall-clock time) keeps what it measured.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.sharding import Mesh, NamedSharding

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from learner_setup import MODULES  # noqa: E402


@dataclass
class Args:
    env_id: str = "Breakout-MinAtar"
    """a JAX environment (MinAtar, *_jax)"""
    scripts: List[str] = field(default_factory=lambda: ["qr_impala", "drmg", "mg", "stacx"])
    """the scripts to measure"""
    num_seeds: List[int] = field(default_factory=lambda: [1])
    """seeds trained in one program (vmapped), one measurement each"""
    updates_per_call: int = 50
    """updates of every seed per jitted call"""
    calls: int = 5
    """timed calls (after one that compiles)"""
    out: Optional[str] = None
    """write the results here as JSON"""


def runs_of(module, args, num_seeds, mesh):
    """`num_seeds` fresh RunStates stacked along a leading axis on `mesh`, the network and the environment's step."""
    envs = module.make_env(args.env_id, 0, 1, args)
    network = module.make_network(envs.action_space.n, args)
    obs = np.array([envs.observation_space.sample()])
    starts = [module.new_run(args, args.seed + i, network, obs, True) for i in range(num_seeds)]
    runs = [start["run"]._replace(learner=start["learner"]) for start in starts]
    stacked = jax.tree.unflatten(jax.tree.structure(runs[0]), [np.stack(x) for x in zip(*map(jax.tree.leaves, runs))])
    runs = module.RunState(*[jax.device_put(part, NamedSharding(mesh, spec)) for part, spec in zip(stacked, module.RUN_SPECS)])
    return runs, network, starts[0]["batch_step"]


def rate(module, args, num_seeds, updates, calls):
    """Median steps per second (of all seeds) of `calls` jitted calls of `updates` on-device updates."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("learner",))
    runs, network, batch_step = runs_of(module, args, num_seeds, mesh)
    train = module.make_on_device_train(args, mesh, batch_step, network, updates)
    runs = jax.block_until_ready(train(runs)[0])  # compiles
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        runs = jax.block_until_ready(train(runs)[0])
        seconds.append(time.perf_counter() - start)
    return num_seeds * updates * args.batch_size / float(np.median(seconds))


def no_learning(learner_state, rollout, args, axis_name=None):
    """A learner step that does nothing (its loss keeps the rollout alive): what the unroll alone costs."""
    loss = jnp.mean(rollout.rewards) + jnp.mean(rollout.behaviour_logits) + jnp.mean(rollout.obs)
    return learner_state, dict(loss=loss), dict(non_finite=dict(loss=~jnp.isfinite(loss)))


def write_json(path: str, value):
    """value as JSON at path, atomically: a reader sees the previous file or the whole new one."""
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def main(args: Args):
    results = []
    device = jax.devices()[0]
    summary = dict(device=f"{device.platform} {device.device_kind}", cpus=os.cpu_count(), jax=jax.__version__, results=results)
    for name in args.scripts:
        module = MODULES[name]
        script_args = replace(module.default_args(["--env-id", args.env_id]), env_id=args.env_id)
        script_args.world_size = 1
        script_args.local_batch_size = script_args.batch_size = script_args.local_num_envs * script_args.num_steps
        script_args.num_updates = 10**6
        for num_seeds in args.num_seeds:
            whole = rate(module, script_args, num_seeds, args.updates_per_call, args.calls)
            learner_step, module.learner_step = module.learner_step, no_learning
            try:
                unroll = rate(module, script_args, num_seeds, args.updates_per_call, args.calls)
            finally:
                module.learner_step = learner_step
            result = dict(script=name, env_id=args.env_id, num_seeds=num_seeds, sps=whole, unroll_sps=unroll)
            result["learner_share"] = 1 - whole / unroll
            results.append(result)
            print(
                f"{name} {args.env_id} {num_seeds} seed(s): {whole:,.0f} SPS in all; the unroll alone {unroll:,.0f} SPS; "
                f"the learner step takes {result['learner_share']:.0%} of the time",
                flush=True,
            )
            if args.out:  # after each measurement: what a stopped run measured is kept
                write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.updates_per_call < 1 or args.calls < 1 or not args.scripts or min(args.num_seeds, default=0) < 1:
        raise SystemExit("--updates-per-call, --calls and each --num-seeds must be >= 1, and --scripts must name one")
    main(replace(args))
