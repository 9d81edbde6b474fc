"""Learner update time of qr_impala.py, drmg.py, mg.py and stacx.py on the same batch, in one run.

    python benchmark/update_time.py --env-id Breakout-v5 --num-envs 128
    python benchmark/update_time.py --env-id Breakout-v5 --num-envs 64 --chunk-envs 0 16   # the memory saving's cost
    python benchmark/update_time.py --env-id Breakout-v5 --scripts mg stacx
    python benchmark/update_time.py --env-id Breakout-v5 --num-envs 16 --scripts drmg drmg_bmg1 drmg_bmg3   # BMG's cost

Every jitted learner step (one device) gets the same random batch of the environment's shapes; compilation is
excluded and the timed calls of all scripts and settings are interleaved, so that a change in the machine's load hits
them alike. drmg.py and mg.py differentiate through one inner RMSProp step twice (two inner/outer loops); stacx.py does
it once on the whole batch (STAC's default) for its 3 heads. With several --chunk-envs, each script is timed at each.
Variants (VARIANTS) are a script with flags: drmg_bmg1 and drmg_bmg3 are drmg.py --bmg-steps 1 and 3 (docs/drmg_bmg.md).
"""

import time
from dataclasses import dataclass, field
from typing import List

import jax
import numpy as np
import tyro
from learner_setup import MODULES, environment, learner, random_batch, script_args

# variant: (script, its flags as Args fields)
VARIANTS = {"drmg_bmg1": ("drmg", dict(bmg_steps=1)), "drmg_bmg3": ("drmg", dict(bmg_steps=3))}


@dataclass
class Args:
    env_id: str = "Breakout-v5"
    """the environment whose observation and action shapes the batch takes"""
    num_envs: int = 128
    """envs in the learner batch (the scripts' default: 64 envs x 2 actor threads)"""
    num_steps: int = 20
    """unroll length"""
    repeats: int = 5
    """timed updates of each script and setting"""
    scripts: List[str] = field(default_factory=lambda: list(MODULES))
    """the scripts (or VARIANTS) to time, in this order"""
    chunk_envs: List[int] = field(default_factory=lambda: [16])
    """the --chunk-envs settings to time (0: the whole batch at once; 16: the scripts' choice on CPU)"""
    stacx_two_halves: bool = False
    """stacx.py's --two-halves (the siblings' scheme) instead of the same batch for inner and outer loss"""


def compiled_update(name: str, chunk_envs: int, args: Args, observation_space, num_actions: int):
    """The script's jitted learner step on one device and a random batch, compiled, as a function of nothing."""
    name, flags = VARIANTS.get(name, (name, {}))
    overrides = dict(local_num_envs=args.num_envs, num_actor_threads=1, num_steps=args.num_steps, chunk_envs=chunk_envs)
    if name == "stacx":
        overrides["two_halves"] = args.stacx_two_halves
    step, state, spec = learner(name, script_args(name, args.env_id, **overrides, **flags), observation_space, num_actions)
    batch = random_batch(spec, num_actions)
    jax.block_until_ready(step(state, batch))  # compile
    return lambda: jax.block_until_ready(step(state, batch))


if __name__ == "__main__":
    args = tyro.cli(Args)
    observation_space, num_actions = environment(args.env_id)
    settings = [(name, chunk_envs) for name in args.scripts for chunk_envs in args.chunk_envs]
    updates = {setting: compiled_update(*setting, args, observation_space, num_actions) for setting in settings}
    samples = {setting: [] for setting in settings}
    for _ in range(args.repeats):
        for setting, update in updates.items():
            start = time.perf_counter()
            update()
            samples[setting].append(time.perf_counter() - start)
    times = {setting: float(np.median(seconds)) for setting, seconds in samples.items()}
    device = jax.devices()[0]
    print(
        f"device {device.device_kind}, jax {jax.__version__}; {args.env_id}, batch {args.num_steps} steps x {args.num_envs} envs"
    )
    for (name, chunk_envs), seconds in times.items():
        script, flags = VARIANTS.get(name, (name, {}))
        flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in flags.items())
        print(
            f"{script}.py{flags} --chunk-envs {chunk_envs} learner update: {seconds * 1000:.1f} ms (median of {args.repeats})"
        )
    for chunk_envs in args.chunk_envs:
        pairs = [("drmg", "qr_impala"), ("mg", "qr_impala"), ("stacx", "mg"), ("drmg", "mg")]
        for a, b in pairs + [(variant, script) for variant, (script, _) in VARIANTS.items()]:
            if (a, chunk_envs) in times and (b, chunk_envs) in times:
                print(f"--chunk-envs {chunk_envs}: ratio {a} / {b}: {times[a, chunk_envs] / times[b, chunk_envs]:.2f}")
    for name in args.scripts:
        for chunk_envs in args.chunk_envs[1:]:
            ratio = times[name, chunk_envs] / times[name, args.chunk_envs[0]]
            print(f"{name}.py: --chunk-envs {chunk_envs} / --chunk-envs {args.chunk_envs[0]}: {ratio:.2f}")
