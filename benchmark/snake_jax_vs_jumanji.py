"""Random-policy throughput of `snake_jax` against Jumanji's `Snake-v1`, same machine, same batch, one process.

Both environments: batch `num_envs`, uniform random actions, auto-reset (snake_jax `step_autoreset`, Jumanji
`AutoResetWrapper`), `num_steps` moves per jitted `lax.scan` call, compile excluded, calls of the two interleaved so that
background load hits both alike. The observations are carried through the scan and returned, so XLA has to build them.

Jumanji is a benchmark-only dependency; keep it out of the training environment:
    python3 -m venv /tmp/venv-bench && /tmp/venv-bench/bin/pip install -r benchmark/requirements-jumanji.txt
    /tmp/venv-bench/bin/python benchmark/snake_jax_vs_jumanji.py --num-envs 1024
"""

import os
import platform
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jumanji
import numpy as np
import tyro
from jumanji.wrappers import AutoResetWrapper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import snake_jax  # noqa: E402


@dataclass
class Args:
    num_envs: int = 1024
    """batch size of both environments"""
    num_steps: int = 100
    """moves per timed call (one lax.scan)"""
    repeats: int = 10
    """timed calls of each environment, interleaved"""
    seed: int = 0
    """seed of resets and actions"""


def make_rollout(step_fn, num_envs: int, num_steps: int):
    """jit(scan over num_steps of a vmapped step with random actions); carries (states, last obs, summed reward)."""

    @jax.jit
    def rollout(states, obs, returns, key):
        def one_step(carry, key):
            states, _, returns = carry
            actions = jax.random.randint(key, (num_envs,), 0, 4)
            states, obs, reward = jax.vmap(step_fn)(states, actions)
            return (states, obs, returns + reward), None

        return jax.lax.scan(one_step, (states, obs, returns), jax.random.split(key, num_steps))[0]

    return rollout


def main(args: Args):
    key = jax.random.PRNGKey(args.seed)
    reset_keys = jax.random.split(key, args.num_envs)
    returns = jnp.zeros(args.num_envs)

    def snake_step(state, action):
        state, obs, reward, _, _ = snake_jax.step_autoreset(state, action)
        return state, obs, reward

    jumanji_env = AutoResetWrapper(jumanji.make("Snake-v1"))

    def jumanji_step(state, action):
        state, timestep = jumanji_env.step(state, action)
        return state, timestep.observation, timestep.reward

    states, obs = jax.jit(jax.vmap(snake_jax.reset))(reset_keys)
    j_states, j_timestep = jax.jit(jax.vmap(jumanji_env.reset))(reset_keys)
    candidates = {
        "snake_jax": [make_rollout(snake_step, args.num_envs, args.num_steps), (states, obs, returns)],
        "jumanji Snake-v1": [
            make_rollout(jumanji_step, args.num_envs, args.num_steps),
            (j_states, j_timestep.observation, returns),
        ],
    }
    for name, (rollout, carry) in candidates.items():  # compile and warm up
        candidates[name][1] = jax.block_until_ready(rollout(*carry, key))

    rates = {name: [] for name in candidates}
    for i in range(args.repeats):
        for name, (rollout, carry) in candidates.items():
            start = time.perf_counter()
            candidates[name][1] = jax.block_until_ready(rollout(*carry, jax.random.fold_in(key, i)))
            rates[name].append(args.num_envs * args.num_steps / (time.perf_counter() - start))

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0]}")
    print(f"jumanji {jumanji.__version__}; batch {args.num_envs}, {args.num_steps} moves per call, {args.repeats} calls each")
    for name, r in rates.items():
        print(f"{name:>17}: median {np.median(r):>12,.0f} steps/s   (min {min(r):,.0f}, max {max(r):,.0f})")
    ratio = np.median(rates["snake_jax"]) / np.median(rates["jumanji Snake-v1"])
    per_call = np.median(np.array(rates["snake_jax"]) / np.array(rates["jumanji Snake-v1"]))
    print(f"ratio snake_jax / jumanji: {ratio:.2f}x (median of medians; median of per-call ratios {per_call:.2f}x)")


if __name__ == "__main__":
    main(tyro.cli(Args))
