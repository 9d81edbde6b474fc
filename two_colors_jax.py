"""The two-colors grid world of the DrMG paper (§5.1, Figure 1) as a pure JAX environment, with an EnvPool-style
batched wrapper.

A 7 x 7 grid holds the agent, two keys of different colours and a goal door, on four distinct cells drawn uniformly at
random at the start of every episode. Collecting a key (walking onto it) gives that colour's reward, 0.7 for one colour
and 0.3 for the other; the agent then holds that key and both keys leave the grid (one key per episode). Walking onto
the goal while holding a key gives +1 and terminates the episode; without a key the goal is an ordinary cell. Every
move costs `step_penalty` (r_pen); the episode is truncated (not terminated) after `max_episode_steps` (T) moves. Moves
into the outer wall leave the agent where it is.

Which colour is worth 0.7 swaps every `toggle_period` (1e5) environment steps, counted globally: the agents are not
told (the observation has no phase), so they must notice the swap from their returns. Step i (i = 0, 1, ...) of the
global count is played with colour 0 worth 0.7 when (i // toggle_period) is even, 0.3 when it is odd. The pure API takes
`swapped` from the caller; `TwoColorsVecEnv` numbers every env step of every `step` call (the reset steps of EnvPool's
rule included, as the IMPALA scripts' `global_step` counts them) on a `StepCounter` that every instance in the process
shares, so the two actor threads of a script play in one world and its toggles fall at the scripts' global steps.

Reading of "a key-agnostic optimal agent could collect +1.5 - r_pen * T" (the paper is silent on the rest): only one
key can be collected per episode, otherwise 0.7 + 0.3 + 1 = 2 would be possible; an agent that takes either key gets
(0.7 + 0.3) / 2 + 1 = 1.5 on average, minus r_pen per move (at most T moves, hence 1.5 - r_pen * T as a lower bound
for one that reaches the goal within the horizon). An agent that knows the current colours gets 1.7 - r_pen * moves.

Choices where the paper is silent (module constants, overridable with environment variables read at import, since
the scripts call `make_vec_env(num_envs, seed)` only; or as keyword arguments of `make_vec_env`):
    TWO_COLORS_TOGGLE_PERIOD       toggle_period      100000  (paper: 1e5)
    TWO_COLORS_STEP_PENALTY        step_penalty       0.01    (r_pen; our choice: a 0.4 key difference is worth 40 moves)
    TWO_COLORS_MAX_EPISODE_STEPS   max_episode_steps  50      (T; our choice: 4x the ~12 moves an optimal agent needs)

Observation (our choice): a float32 vector of 516 = 3 * 169 + 9 values, so that the scripts' torso is their MLP:
    3 egocentric one-hot planes, 13 x 13 and centred on the agent (every cell of the grid stays in view), flattened:
        0 key of colour 0, 1 key of colour 1, 2 goal; a key plane is empty once a key is held;
    then, for the same three objects, whether it is on the grid (3 values), its row offset from the agent / 6 (3) and
    its column offset / 6 (3); the offsets of a collected key are 0.
The offsets repeat what the planes show, in a form an MLP uses at once: with the planes alone, QR-IMPALA with the
hyperparameters of benchmark/two_colors.py (seed 1) had not started to learn after 2e5 steps; with them it returned
about 1.5 after 1.5e5 steps (one run each).
Actions: 0 up (row - 1), 1 right (col + 1), 2 down (row + 1), 3 left (col - 1).

Pure API (jit- and vmap-able):
    state, obs = reset(key)
    state, obs, reward, terminated, truncated = step(state, action, swapped, step_penalty=0.01, max_episode_steps=50)
    state, obs, reward, terminated, truncated = step_autoreset(state, action, swapped, ...)
    swapped = is_swapped(global_step, toggle_period)
Batched, with EnvPool's auto-reset rule (jax_env_autoreset.py; reset_now: terminated | truncated of the previous call):
    states, obs, reward, terminated, truncated, swapped = envpool_step(states, reset_now, actions, first_step, ...)
Batched numpy API with EnvPool's gym interface and auto-reset rule (what `--env-id two_colors_jax` gives the IMPALA
scripts):
    envs = make_vec_env(num_envs, seed); obs, info = envs.reset(); obs, reward, terminated, truncated, info = envs.step(a)

Run:
    python two_colors_jax.py --mode benchmark --num-envs 1024   # random-policy steps/s, fully on device
    python two_colors_jax.py --mode render                      # an episode of a scripted policy in the terminal
"""

import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

import jax_env_autoreset

GRID_SIZE = 7
NUM_CELLS = GRID_SIZE * GRID_SIZE
NUM_ACTIONS = 4
NUM_PLANES = 3
VIEW_SIZE = 2 * GRID_SIZE - 1  # the egocentric view reaches every cell from every cell
OBS_SIZE = NUM_PLANES * VIEW_SIZE * VIEW_SIZE + 3 * NUM_PLANES
KEY_REWARDS = (0.7, 0.3)  # colour 0, colour 1 before the first toggle
GOAL_REWARD = 1.0
TOGGLE_PERIOD = int(float(os.environ.get("TWO_COLORS_TOGGLE_PERIOD", "100000")))
STEP_PENALTY = float(os.environ.get("TWO_COLORS_STEP_PENALTY", "0.01"))
MAX_EPISODE_STEPS = int(os.environ.get("TWO_COLORS_MAX_EPISODE_STEPS", "50"))
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int32)  # (d_row, d_col) of up, right, down, left
GONE = NUM_CELLS  # the cell index of a key that has left the grid


class TwoColorsState(NamedTuple):
    agent: jax.Array  # () int32 flat index row * 7 + col
    keys: jax.Array  # (2,) int32 flat index of the key of colour 0 and of colour 1; GONE once a key is collected
    goal: jax.Array  # () int32 flat index
    held: jax.Array  # () int32 colour of the key held, -1 for none
    step_count: jax.Array  # () int32 moves made in the current episode
    key: jax.Array  # PRNG key; split at every reset, untouched by moves


def is_swapped(global_step, toggle_period: int = TOGGLE_PERIOD):
    """Whether colour 0 is worth 0.3 (and colour 1 0.7) at global step `global_step` (0-based)."""
    return (global_step // toggle_period) % 2 == 1


def key_rewards(swapped: jax.Array) -> jax.Array:
    """(2,) rewards of the keys of colour 0 and 1."""
    rewards = jnp.asarray(KEY_REWARDS, jnp.float32)
    return jnp.where(swapped, rewards[::-1], rewards)


def distinct_cells(words: jax.Array, num_cells: int = NUM_CELLS) -> jax.Array:
    """len(words) distinct cells, drawn uniformly without replacement, one uniform uint32 word each.

    The k-th cell is the r-th cell not yet taken, r uniform on {0, ..., num_cells - k - 1}: counting up past the taken
    cells in increasing order finds it (modulo bias < 49 / 2**32).
    """
    cells = []
    for k in range(words.shape[0]):
        cell = (words[k] % jnp.uint32(num_cells - k)).astype(jnp.int32)
        for taken in jnp.sort(jnp.stack(cells)) if cells else []:
            cell = cell + (cell >= taken).astype(jnp.int32)
        cells.append(cell)
    return jnp.stack(cells)


def observe(state: TwoColorsState) -> jax.Array:
    """Egocentric planes of the key of colour 0, the key of colour 1 and the goal, then presence and offsets: (516,).

    Plane k is a (13, 13) grid centred on the agent: the object sits at (6 + its row - the agent's row, 6 + its
    col - the agent's col). A key plane is empty once a key is held.
    """
    cell = jnp.arange(VIEW_SIZE * VIEW_SIZE, dtype=jnp.int32)
    objects = jnp.concatenate([state.keys, state.goal[None]])
    offsets = (objects // GRID_SIZE - state.agent // GRID_SIZE + GRID_SIZE - 1) * VIEW_SIZE + (
        objects % GRID_SIZE - state.agent % GRID_SIZE + GRID_SIZE - 1
    )
    present = objects != GONE
    planes = (cell[None, :] == offsets[:, None]) & present[:, None]
    d_row = jnp.where(present, objects // GRID_SIZE - state.agent // GRID_SIZE, 0) / (GRID_SIZE - 1)
    d_col = jnp.where(present, objects % GRID_SIZE - state.agent % GRID_SIZE, 0) / (GRID_SIZE - 1)
    vector = jnp.concatenate([present, d_row, d_col]).astype(jnp.float32)
    return jnp.concatenate([planes.astype(jnp.float32).reshape(-1), vector])


def reset_state(key: jax.Array) -> TwoColorsState:
    key, placement_key = jax.random.split(key)
    agent, key0, key1, goal = distinct_cells(jax.random.bits(placement_key, (4,), jnp.uint32))
    zero = jnp.zeros((), jnp.int32)
    return TwoColorsState(agent, jnp.stack([key0, key1]), goal, zero - 1, zero, key)


def reset(key: jax.Array) -> tuple[TwoColorsState, jax.Array]:
    """A new episode: (state, obs)."""
    state = reset_state(key)
    return state, observe(state)


def step_state(
    state: TwoColorsState,
    action: jax.Array,
    swapped: jax.Array,
    step_penalty: float = STEP_PENALTY,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    autoreset: bool = False,
) -> tuple[TwoColorsState, jax.Array, jax.Array, jax.Array]:
    """One move without building the observation: (state, reward, terminated, truncated).

    With `autoreset`, a move that ends the episode returns the first state of a new episode instead.
    """
    moves = jnp.asarray(MOVES)
    row = jnp.clip(state.agent // GRID_SIZE + moves[action, 0], 0, GRID_SIZE - 1)
    col = jnp.clip(state.agent % GRID_SIZE + moves[action, 1], 0, GRID_SIZE - 1)
    agent = row * GRID_SIZE + col
    has_key = state.held >= 0
    found = (state.keys == agent) & ~has_key  # (2,) at most one True: keys lie on distinct cells
    collected = found.any()
    # a key and the goal never share a cell, so the goal can only open with a key held before this move
    terminated = has_key & (agent == state.goal)
    reward = jnp.sum(jnp.where(found, key_rewards(swapped), 0.0)) + GOAL_REWARD * terminated - step_penalty
    step_count = state.step_count + 1
    truncated = ~terminated & (step_count >= max_episode_steps)
    next_state = TwoColorsState(
        agent=agent,
        keys=jnp.where(collected, GONE, state.keys),
        goal=state.goal,
        held=jnp.where(collected, jnp.argmax(found).astype(jnp.int32), state.held),
        step_count=step_count,
        key=state.key,
    )
    if autoreset:
        next_state = jax_env_autoreset.where_tree(terminated | truncated, reset_state(state.key), next_state)
    return next_state, reward.astype(jnp.float32), terminated, truncated


def step(
    state: TwoColorsState,
    action: jax.Array,
    swapped: jax.Array = False,
    step_penalty: float = STEP_PENALTY,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> tuple[TwoColorsState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One move: (state, obs, reward, terminated, truncated). Do not step an episode that has ended."""
    state, reward, terminated, truncated = step_state(state, action, swapped, step_penalty, max_episode_steps)
    return state, observe(state), reward, terminated, truncated


def step_autoreset(
    state: TwoColorsState,
    action: jax.Array,
    swapped: jax.Array = False,
    step_penalty: float = STEP_PENALTY,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> tuple[TwoColorsState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`step`, with an ended episode replaced at once by a new one (the Jumanji / gymnax convention).

    reward, terminated and truncated are those of the move just made. When that move ends the episode, state and obs
    are the new episode's first ones (the final observation is not returned; `TwoColorsVecEnv` keeps it, EnvPool-style).
    """
    state, reward, terminated, truncated = step_state(state, action, swapped, step_penalty, max_episode_steps, True)
    return state, observe(state), reward, terminated, truncated


def envpool_step(
    states: TwoColorsState,
    reset_now: jax.Array,
    actions: jax.Array,
    first_step: jax.Array,
    toggle_period: int = TOGGLE_PERIOD,
    step_penalty: float = STEP_PENALTY,
    max_episode_steps: int = MAX_EPISODE_STEPS,
):
    """Batched move with EnvPool's rule (`jax_env_autoreset.envpool_step`): envs that ended at the previous call ignore
    their action and restart. (states, obs, reward, terminated, truncated, swapped), leading axis B.

    Env i plays global step first_step + i, so a toggle can fall inside a batch, exactly at its step.
    """
    step_numbers = first_step + jnp.arange(actions.shape[0], dtype=first_step.dtype)
    return envpool_step_at(states, reset_now, actions, step_numbers, toggle_period, step_penalty, max_episode_steps)


def envpool_step_at(
    states: TwoColorsState,
    reset_now: jax.Array,
    actions: jax.Array,
    step_numbers: jax.Array,
    toggle_period: int = TOGGLE_PERIOD,
    step_penalty: float = STEP_PENALTY,
    max_episode_steps: int = MAX_EPISODE_STEPS,
):
    """`envpool_step` with each env's global step number given: env i plays global step step_numbers[i] ([B] int)."""
    swapped = is_swapped(step_numbers, toggle_period)
    step_fn = functools.partial(step_state, step_penalty=step_penalty, max_episode_steps=max_episode_steps)
    return *jax_env_autoreset.envpool_step(step_fn, reset_state, observe, states, reset_now, actions, swapped), swapped


@functools.cache
def _jitted_batch_functions(toggle_period: int, step_penalty: float, max_episode_steps: int):
    """One compilation per setting, shared by every TwoColorsVecEnv (e.g. one per actor thread)."""
    batch_step = functools.partial(
        envpool_step, toggle_period=toggle_period, step_penalty=step_penalty, max_episode_steps=max_episode_steps
    )
    return jax.jit(jax.vmap(reset)), jax.jit(batch_step)


class StepCounter:
    """A thread-safe count of environment steps; `take(n)` returns the first of the next n step numbers."""

    def __init__(self, start: int = 0):
        self._count = start
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        with self._lock:
            first = self._count
            self._count += n
            return first

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


GLOBAL_STEP_COUNTER = StepCounter()  # shared by every TwoColorsVecEnv of the process unless it is given its own


class TwoColorsVecEnv:
    """`num_envs` two-colors grid worlds behind EnvPool's gym interface (`envpool.make(..., env_type="gym")`).

    Auto-reset as in EnvPool: the step at which an env's episode ends returns that episode's final observation; the
    next `step` ignores that env's action and returns the first observation of a new episode, with reward 0,
    terminated and truncated False and info["elapsed_step"] 0. Each `step` is one jitted, vmapped call, and takes
    num_envs step numbers from `counter` (the process-wide one by default) to decide which key is worth 0.7. With
    several instances stepping in threads the numbers each one gets depend on the thread timing, so runs of the
    IMPALA scripts with more than one actor thread are not bitwise reproducible on this environment.
    """

    def __init__(
        self,
        num_envs: int,
        seed: int,
        toggle_period: int = TOGGLE_PERIOD,
        step_penalty: float = STEP_PENALTY,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        counter: StepCounter = None,
    ):
        self.num_envs = num_envs
        self.toggle_period, self.step_penalty, self.max_episode_steps = toggle_period, step_penalty, max_episode_steps
        self.counter = GLOBAL_STEP_COUNTER if counter is None else counter
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (OBS_SIZE,), np.float32)  # offsets are signed
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.single_observation_space, self.single_action_space = self.observation_space, self.action_space
        self._key = jax.random.PRNGKey(seed)
        self._reset, self._step = _jitted_batch_functions(toggle_period, step_penalty, max_episode_steps)
        self._state, self._reset_now = None, None

    @property
    def state(self):
        """For the on-device loop of the IMPALA-family scripts: (states, reset_now, the global step number each env
        plays next, modulo two toggle periods), after `reset`; global steps count from 0 there."""
        step_numbers = jnp.arange(self.num_envs, dtype=jnp.int32) % (2 * self.toggle_period)
        return self._state, self._reset_now, step_numbers

    def batch_step(self, state, actions: jax.Array):
        """A step as a pure function of `state`: (state, (obs, reward, terminated, truncated, elapsed)); each of the
        `num_envs` envs of the batch (those of all learner devices) steps once per call, so its step number goes up
        by `num_envs`."""
        states, reset_now, step_numbers = state
        states, obs, reward, terminated, truncated, _ = envpool_step_at(
            states, reset_now, actions, step_numbers, self.toggle_period, self.step_penalty, self.max_episode_steps
        )
        step_numbers = (step_numbers + self.num_envs) % (2 * self.toggle_period)
        return (states, terminated | truncated, step_numbers), (obs, reward, terminated, truncated, states.step_count)

    def _info(self, reward, elapsed_step, terminated, swapped) -> dict:
        return {
            "reward": np.asarray(reward, np.float32),
            "elapsed_step": np.asarray(elapsed_step, np.int32),
            "terminated": np.asarray(terminated, np.int32),
            "env_id": np.arange(self.num_envs, dtype=np.int32),
            "swapped": np.asarray(swapped, bool),  # whether colour 0 was worth 0.3 at this step
        }

    def reset(self) -> tuple[np.ndarray, dict]:
        self._key, key = jax.random.split(self._key)
        self._state, obs = self._reset(jax.random.split(key, self.num_envs))
        self._reset_now = jnp.zeros(self.num_envs, bool)
        zeros = np.zeros(self.num_envs)
        return np.asarray(obs), self._info(zeros, zeros, zeros, is_swapped(self.counter.count, self.toggle_period) + zeros)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = jnp.asarray(np.asarray(actions).reshape(self.num_envs), jnp.int32)
        # only the phase within a pair of periods matters, and it keeps the number small (no int32 overflow)
        first_step = jnp.int32(self.counter.take(self.num_envs) % (2 * self.toggle_period))
        self._state, obs, reward, terminated, truncated, swapped = self._step(
            self._state, self._reset_now, actions, first_step
        )
        self._reset_now = terminated | truncated
        obs, reward, terminated, truncated, elapsed, swapped = jax.device_get(
            (obs, reward, terminated, truncated, self._state.step_count, swapped)
        )
        return obs, reward, terminated, truncated, self._info(reward, elapsed, terminated, swapped)

    def close(self):
        pass


def make_vec_env(num_envs: int, seed: int, **kwargs) -> TwoColorsVecEnv:
    """What the IMPALA-family scripts call for `--env-id two_colors_jax`; kwargs: toggle_period, step_penalty,
    max_episode_steps, counter."""
    return TwoColorsVecEnv(num_envs, seed, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# `python two_colors_jax.py`: throughput of a random policy, or an episode of a scripted policy shown in the terminal.


@dataclass
class Args:
    mode: Literal["benchmark", "render"] = "benchmark"
    """`benchmark`: random-policy steps/s on device; `render`: play one episode and print it as ASCII"""
    seed: int = 1
    """seed of the environments and of the policy"""
    toggle_period: int = TOGGLE_PERIOD
    """which key is worth 0.7 swaps every this many environment steps (1e5 in the paper)"""
    step_penalty: float = STEP_PENALTY
    """r_pen, the reward of every move (our choice)"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """T, the time limit of an episode (a truncation; our choice)"""
    num_envs: int = 1024
    """benchmark: batch size (envs stepped together by one vmapped call)"""
    num_steps: int = 100
    """benchmark: moves per timed call (a lax.scan, so one dispatch covers num_envs * num_steps steps)"""
    repeats: int = 10
    """benchmark: timed calls after the compiling one"""
    swapped: bool = False
    """render: play with colour 0 worth 0.3"""


def scripted_policy(state: TwoColorsState, swapped: jax.Array) -> jax.Array:
    """Toward the key worth 0.7 while no key is held, then toward the goal: the colour-aware optimal agent."""
    target = jnp.where(state.held >= 0, state.goal, state.keys[jnp.where(swapped, 1, 0)])
    d_row = target // GRID_SIZE - state.agent // GRID_SIZE
    d_col = target % GRID_SIZE - state.agent % GRID_SIZE
    return jnp.where(d_row < 0, 0, jnp.where(d_row > 0, 2, jnp.where(d_col > 0, 1, 3)))


def benchmark(args: Args) -> list[float]:
    """Random-policy steps/s with auto-reset and the global toggle, fully on device."""
    step_fn = functools.partial(step_autoreset, step_penalty=args.step_penalty, max_episode_steps=args.max_episode_steps)

    @jax.jit
    def rollout(states, obs, global_step, key):
        def one_step(carry, key):
            states, _, returns, global_step = carry
            actions = jax.random.randint(key, (args.num_envs,), 0, NUM_ACTIONS)
            swapped = is_swapped(global_step + jnp.arange(args.num_envs), args.toggle_period)
            states, obs, reward, _, _ = jax.vmap(step_fn)(states, actions, swapped)
            return (states, obs, returns + reward, global_step + args.num_envs), None

        return jax.lax.scan(
            one_step, (states, obs, jnp.zeros(args.num_envs), global_step), jax.random.split(key, args.num_steps)
        )[0]

    key = jax.random.PRNGKey(args.seed)
    states, obs = jax.jit(jax.vmap(reset))(jax.random.split(key, args.num_envs))
    carry = jax.block_until_ready(rollout(states, obs, jnp.int32(0), key))  # compiles
    rates = []
    for i in range(args.repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(rollout(carry[0], carry[1], carry[3], jax.random.fold_in(key, i)))
        rates.append(args.num_envs * args.num_steps / (time.perf_counter() - start))
    return rates


def ascii_frame(state: TwoColorsState) -> str:
    """'A' agent, 'a' / 'b' keys of colour 0 / 1, 'G' goal, inside a '#' border."""
    grid = np.full(NUM_CELLS, ".")
    grid[int(state.goal)] = "G"
    for key_cell, char in zip(np.asarray(state.keys), "ab"):
        if key_cell != GONE:
            grid[key_cell] = char
    grid[int(state.agent)] = "A"
    border = "#" * (GRID_SIZE + 2)
    return "\n".join([border] + ["#" + "".join(row) + "#" for row in grid.reshape(GRID_SIZE, GRID_SIZE)] + [border])


def render(args: Args) -> float:
    step_fn = jax.jit(functools.partial(step, step_penalty=args.step_penalty, max_episode_steps=args.max_episode_steps))
    state, _ = jax.jit(reset)(jax.random.PRNGKey(args.seed))
    print(ascii_frame(state))
    episode_return, done = 0.0, False
    while not done:
        state, obs, reward, terminated, truncated = step_fn(state, scripted_policy(state, args.swapped), args.swapped)
        episode_return, done = episode_return + float(reward), bool(terminated | truncated)
        print(f"reward {float(reward):+.2f}\n" + ascii_frame(state))
    print(
        f"{'terminated' if bool(terminated) else 'truncated'} after {int(state.step_count)} moves, return {episode_return:.2f}"
    )
    return episode_return


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    if args.mode == "benchmark":
        rates = benchmark(args)
        print(f"two_colors_jax, batch {args.num_envs}, {args.num_steps} moves per call, {jax.devices()[0].platform}: ", end="")
        print(f"median {np.median(rates):,.0f} steps/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.repeats} calls)")
    else:
        render(args)
