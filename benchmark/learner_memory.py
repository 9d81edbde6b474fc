"""Memory of the compiled learner step of qr_impala.py, drmg.py, mg.py and stacx.py at an environment's default batch.

    python benchmark/learner_memory.py                                  # Breakout-v5, --chunk-envs 0 and the default
    python benchmark/learner_memory.py --env-id Breakout-v5 --chunk-envs 0 16 8
    python benchmark/learner_memory.py --scripts drmg drmg_bmg1 drmg_bmg3 --chunk-envs 16   # BMG (docs/drmg_bmg.md)

XLA's memory analysis of the step compiled for the first device (`jax.jit(...).lower(...).compile().memory_analysis()`),
from shapes alone: nothing is allocated or run. Temporaries are the step's working memory; arguments are the train
states and the batch; outputs the new states and metrics. The default batch is each script's defaults
(--local-num-envs x --num-actor-threads envs x --num-steps), all on one learner device. Variants (VARIANTS) are a
script with flags: drmg_bmg1 and drmg_bmg3 are drmg.py --bmg-steps 1 and 3.
"""

import time
from dataclasses import dataclass, field
from typing import List

import jax
import tyro
from learner_setup import MODULES, environment, learner, script_args

# variant: (script, its flags as Args fields)
VARIANTS = {"drmg_bmg1": ("drmg", dict(bmg_steps=1)), "drmg_bmg3": ("drmg", dict(bmg_steps=3))}


@dataclass
class Args:
    env_id: str = "Breakout-v5"
    """the environment whose observation and action shapes the batch takes"""
    scripts: List[str] = field(default_factory=lambda: list(MODULES))
    """the scripts (or VARIANTS) to measure"""
    chunk_envs: List[int] = field(default_factory=lambda: [0, 16])
    """the --chunk-envs settings to measure (0: the whole batch at once; 16: the scripts' choice on CPU)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    observation_space, num_actions = environment(args.env_id)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.env_id}")
    print("| script | --chunk-envs | batch (steps x envs) | temporaries | arguments | outputs | total | compile |")
    print("|-|-|-|-|-|-|-|-|")
    for variant in args.scripts:
        name, flags = VARIANTS.get(variant, (variant, {}))
        flags_text = "".join(f" --{k.replace('_', '-')} {v}" for k, v in flags.items())
        for chunk_envs in args.chunk_envs:
            config = script_args(name, args.env_id, chunk_envs=chunk_envs, **flags)
            step, state, spec = learner(name, config, observation_space, num_actions, abstract=True)
            start = time.time()
            memory = step.lower(state, spec).compile().memory_analysis()
            seconds = time.time() - start
            sizes = [memory.temp_size_in_bytes, memory.argument_size_in_bytes, memory.output_size_in_bytes]
            total = sum(sizes) - memory.alias_size_in_bytes
            cells = " | ".join(f"{size / 2**30:.2f} GiB" for size in sizes + [total])
            batch = f"{config.num_steps} x {spec.actions.shape[1]}"
            print(f"| {name}.py{flags_text} | {chunk_envs} | {batch} | {cells} | {seconds:.0f} s |", flush=True)
