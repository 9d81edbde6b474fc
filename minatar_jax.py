"""MinAtar (Young & Tian, "MinAtar: An Atari-Inspired Testbed for Thorough and Reproducible Reinforcement Learning
Experiments", 2019, https://arxiv.org/abs/1903.03176) through gymnax (Lange, https://github.com/RobertTLange/gymnax),
with EnvPool's gym interface and auto-reset rule, for the IMPALA-family scripts: `--env-id Breakout-MinAtar`.

The games are gymnax's, unchanged: `gymnax.make(id)` with its default parameters, which are the MinAtar paper's
dynamics with gymnax's choices: no sticky actions (the original repeats the last action with probability 0.1), the
minimal action set (Breakout 3, SpaceInvaders 4, Asterix 5, Freeway 3 actions), and a time limit of
`max_steps_in_episode` moves (1,000; Freeway 2,500, the length of its game clock). The time limit is a truncation, not a
termination (gymnax reports it apart, and Freeway's episodes end only by it). Rewards are the game's (+1 per brick,
alien, treasure or crossing; none of them needs clipping).

Observation: float32 in {0, 1}, channels first as EnvPool's Atari frames and `snake_jax`: (C, 10, 10), one channel per
object kind (Breakout 4, SpaceInvaders 6, Asterix 4, Freeway 7).

Auto-reset: gymnax's `env.step` resets at once (the move that ends an episode returns the new episode's first
observation). EnvPool's rule is laid over it by `jax_env_autoreset.envpool_step_over_autoreset`: the move that ends an
episode returns its final observation; the next step ignores that env's action and shows the new episode's first
observation (drawn by gymnax's own step) with reward 0, terminated and truncated False and info["elapsed_step"] 0.
Keys: each env holds one; a move splits it into (the env's next key, the key of gymnax's `env.step`).

    envs = make_vec_env("Breakout-MinAtar", num_envs, seed); obs, info = envs.reset(); obs, r, term, trunc, info = envs.step(a)

Run:
    python minatar_jax.py --env-id Breakout-MinAtar --num-envs 1024   # random-policy steps/s, fully on device
"""

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple

import gymnasium as gym
import gymnax
import jax
import jax.numpy as jnp
import numpy as np

import jax_env_autoreset

GAMES = ("Breakout-MinAtar", "SpaceInvaders-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar")


class MinAtarState(NamedTuple):
    env_state: object  # gymnax's state of the game
    key: jax.Array  # this env's PRNG key


@functools.cache
def make_game(env_id: str, max_steps_in_episode: int = 0):
    """gymnax's (env, params) of a MinAtar game: its default params, with another time limit if `max_steps_in_episode`."""
    if env_id not in GAMES:
        raise ValueError(f"{env_id!r} is not one of the MinAtar games {GAMES}")
    env, params = gymnax.make(env_id)
    return env, params.replace(max_steps_in_episode=max_steps_in_episode) if max_steps_in_episode else params


def observe(env_id: str, state: MinAtarState, max_steps_in_episode: int = 0) -> jax.Array:
    """The game's observation, channels first: (C, 10, 10) float32."""
    env, params = make_game(env_id, max_steps_in_episode)
    return jnp.moveaxis(env.get_obs(state.env_state, params), -1, 0).astype(jnp.float32)


def reset_state(env_id: str, key: jax.Array, max_steps_in_episode: int = 0) -> MinAtarState:
    """A new episode from gymnax's `env.reset`."""
    env, params = make_game(env_id, max_steps_in_episode)
    key, reset_key = jax.random.split(key)
    return MinAtarState(env.reset(reset_key, params)[1], key)


def step_autoreset(env_id: str, state: MinAtarState, action: jax.Array, max_steps_in_episode: int = 0):
    """gymnax's own `env.step` (immediate auto-reset): (state, final_obs, reward, terminated, truncated)."""
    env, params = make_game(env_id, max_steps_in_episode)
    key, step_key = jax.random.split(state.key)
    _, env_state, reward, terminated, truncated, info = env.step(step_key, state.env_state, action, params)
    final_obs = jnp.moveaxis(info["final_observation"], -1, 0).astype(jnp.float32)
    return MinAtarState(env_state, key), final_obs, reward.astype(jnp.float32), terminated, truncated


def envpool_step(env_id: str, states: MinAtarState, reset_now: jax.Array, actions: jax.Array, max_steps_in_episode: int = 0):
    """Batched move with EnvPool's rule: (states, obs, reward, terminated, truncated), leading axis B."""
    return jax_env_autoreset.envpool_step_over_autoreset(
        functools.partial(step_autoreset, env_id, max_steps_in_episode=max_steps_in_episode),
        functools.partial(observe, env_id, max_steps_in_episode=max_steps_in_episode),
        states,
        reset_now,
        actions,
    )


class EnvState(NamedTuple):
    """What a batch of envs carries from one step to the next."""

    games: MinAtarState  # leading axis B
    reset_now: jax.Array  # [B] bool: the episode ended at the previous step, this step restarts it
    elapsed_step: jax.Array  # [B] int32: moves of the current episode


def batch_reset(env_id: str, key: jax.Array, num_envs: int, max_steps_in_episode: int = 0):
    """(EnvState of `num_envs` new episodes, their observations [B, C, 10, 10]); env i starts from split(key, B)[i]."""
    games = jax.vmap(functools.partial(reset_state, env_id, max_steps_in_episode=max_steps_in_episode))(
        jax.random.split(key, num_envs)
    )
    zeros = jnp.zeros(num_envs, jnp.int32)
    obs = jax.vmap(functools.partial(observe, env_id, max_steps_in_episode=max_steps_in_episode))(games)
    return EnvState(games, zeros.astype(bool), zeros), obs


def batch_step(env_id: str, env_state: EnvState, actions: jax.Array, max_steps_in_episode: int = 0):
    """One step of every env under EnvPool's rule: (env_state, (obs, reward, terminated, truncated, elapsed_step))."""
    games, obs, reward, terminated, truncated = envpool_step(
        env_id, env_state.games, env_state.reset_now, actions, max_steps_in_episode
    )
    elapsed = jnp.where(env_state.reset_now, 0, env_state.elapsed_step + 1)
    return EnvState(games, terminated | truncated, elapsed), (obs, reward, terminated, truncated, elapsed)


@functools.cache
def _jitted_batch_functions(env_id: str, num_envs: int, max_steps_in_episode: int):
    """One compilation per setting, shared by every MinAtarVecEnv (e.g. one per actor thread)."""
    limit = dict(max_steps_in_episode=max_steps_in_episode)
    return (
        jax.jit(functools.partial(batch_reset, env_id, num_envs=num_envs, **limit)),
        jax.jit(functools.partial(batch_step, env_id, **limit)),
    )


class MinAtarVecEnv:
    """`num_envs` games of one MinAtar game behind EnvPool's gym interface (`envpool.make(..., env_type="gym")`), numpy
    in and out; each `step` is one jitted, vmapped call of `batch_step`. `reset` draws the envs from `split(key, B)` with
    the key the seed's PRNGKey after one split; `max_steps_in_episode` (0: gymnax's) is the time limit.

    For an actor that steps on device (the IMPALA-family scripts' `make_device_unroll`): `state` is the batch's
    EnvState after `reset`, and `batch_step(state, actions) -> (state, (obs, reward, terminated, truncated,
    elapsed_step))` the pure function that `step` runs, to be composed with a policy inside one jitted call."""

    def __init__(self, env_id: str, num_envs: int, seed: int, max_steps_in_episode: int = 0):
        env, params = make_game(env_id, max_steps_in_episode)
        channels = env.observation_space(params).shape[-1]
        self.env_id, self.num_envs = env_id, num_envs
        self.observation_space = gym.spaces.Box(0.0, 1.0, (channels, 10, 10), np.float32)
        self.action_space = gym.spaces.Discrete(env.num_actions)
        self.single_observation_space, self.single_action_space = self.observation_space, self.action_space
        self._key = jax.random.PRNGKey(seed)
        self._reset, self._step = _jitted_batch_functions(env_id, num_envs, max_steps_in_episode)
        self.env_state = None
        self.batch_step = functools.partial(batch_step, env_id, max_steps_in_episode=max_steps_in_episode)

    @property
    def state(self) -> EnvState:
        return self.env_state

    def _info(self, reward, elapsed_step, terminated) -> dict:
        return {
            "reward": np.asarray(reward, np.float32),  # no reward clipping here: the same as the returned reward
            "elapsed_step": np.asarray(elapsed_step, np.int32),
            "terminated": np.asarray(terminated, np.int32),
            "env_id": np.arange(self.num_envs, dtype=np.int32),
        }

    def reset(self) -> tuple[np.ndarray, dict]:
        self._key, key = jax.random.split(self._key)
        self.env_state, obs = self._reset(key)
        zeros = np.zeros(self.num_envs)
        return np.asarray(obs), self._info(zeros, zeros, zeros)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self.env_state is None:
            raise RuntimeError("call reset() before step()")
        actions = jnp.asarray(np.asarray(actions).reshape(self.num_envs), jnp.int32)
        self.env_state, outputs = self._step(self.env_state, actions)
        obs, reward, terminated, truncated, elapsed = jax.device_get(outputs)
        return obs, reward, terminated, truncated, self._info(reward, elapsed, terminated)

    def close(self):
        pass


def make_vec_env(env_id: str, num_envs: int, seed: int, **kwargs) -> MinAtarVecEnv:
    """What the IMPALA-family scripts call for `--env-id Breakout-MinAtar` and the other games of GAMES; kwargs:
    max_steps_in_episode."""
    return MinAtarVecEnv(env_id, num_envs, seed, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# `python minatar_jax.py`: throughput of a random policy through the adapter, fully on device.


@dataclass
class Args:
    env_id: str = "Breakout-MinAtar"
    """one of GAMES"""
    num_envs: int = 1024
    """envs stepped together"""
    num_steps: int = 100
    """moves per jitted call"""
    repeats: int = 5
    """timed calls"""
    seed: int = 0
    """seed of the envs and the random policy"""


def benchmark(args: Args) -> list[float]:
    num_actions = make_game(args.env_id)[0].num_actions

    @jax.jit
    def rollout(env_state, key):
        def one_step(env_state, key):
            actions = jax.random.randint(key, (args.num_envs,), 0, num_actions)
            return batch_step(args.env_id, env_state, actions)[0], None

        return jax.lax.scan(one_step, env_state, jax.random.split(key, args.num_steps))[0]

    key = jax.random.PRNGKey(args.seed)
    env_state = jax.block_until_ready(rollout(batch_reset(args.env_id, key, args.num_envs)[0], key))  # compiles
    rates = []
    for i in range(args.repeats):
        start = time.perf_counter()
        env_state = jax.block_until_ready(rollout(env_state, jax.random.fold_in(key, i)))
        rates.append(args.num_envs * args.num_steps / (time.perf_counter() - start))
    return rates


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    rates = benchmark(args)
    print(f"{args.env_id} (gymnax) under EnvPool's rule, batch {args.num_envs}, {jax.devices()[0].platform}: ", end="")
    print(f"median {np.median(rates):,.0f} steps/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.repeats} calls)")
