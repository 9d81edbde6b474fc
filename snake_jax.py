"""Snake as a pure JAX environment (Bonnet et al., "One Step at a Time", arXiv 2111.00206, App. B.2), with an EnvPool-style
batched wrapper.

The snake starts with length 1 on a uniformly random cell of a `board_size` x `board_size` board (12 x 12 in the paper)
and one fruit lies on a uniformly random free cell. Eating the fruit gives reward 1, grows the snake by one cell and puts
a new fruit on a uniformly random free cell; every other step gives 0. The episode terminates when the head leaves the
board, runs into the body, or the snake fills the board; it is truncated (not terminated) after `max_episode_steps`
(5000) steps. The cell the tail leaves during a move counts as free. Maximum return: board_size**2 - 1 = 143.

State: one integer board `body` holding, for every snake cell, the number of moves until the tail leaves it (head =
length, ..., tail = 1, empty = 0). A move without eating is `max(body - 1, 0)` plus the new head; the tail is the cell
holding 1. No list of body cells is kept, searched or sorted.

Observation: float32, channels first, shape (5, board_size, board_size), every value in [0, 1]:
    0 body (every snake cell, head and tail included), 1 head, 2 tail, 3 fruit,
    4 order = body / length: 1 at the head, decreasing along the body to 1 / length at the tail; 0 on empty cells.
Actions: 0 up (row - 1), 1 right (col + 1), 2 down (row + 1), 3 left (col - 1).

Pure API (jit- and vmap-able; the board size is read from the state's shape, so only `reset` takes it):
    state, obs = reset(key, board_size=12)
    state, obs, reward, terminated, truncated = step(state, action, max_episode_steps=5000)
    state, obs, reward, terminated, truncated = step_autoreset(state, action, max_episode_steps=5000)
Batched, with EnvPool's auto-reset rule (jax_env_autoreset.py; reset_now: terminated | truncated of the previous call):
    states, obs, reward, terminated, truncated = envpool_step(states, reset_now, actions, max_episode_steps=5000)
Batched numpy API with EnvPool's gym interface and auto-reset rule (what `--env-id snake_jax` gives the IMPALA scripts):
    envs = make_vec_env(num_envs, seed); obs, info = envs.reset(); obs, reward, terminated, truncated, info = envs.step(a)

Run:
    python snake_jax.py --mode benchmark --num-envs 1024   # random-policy steps/s, fully on device
    python snake_jax.py --mode render --policy greedy      # an episode in the terminal (ASCII) and as videos/*.gif
"""

import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

import jax_env_autoreset

BOARD_SIZE = 12
MAX_EPISODE_STEPS = 5000
NUM_ACTIONS = 4
NUM_CHANNELS = 5
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int32)  # (d_row, d_col) of up, right, down, left


class SnakeState(NamedTuple):
    body: jax.Array  # (board, board) uint8 (int32 on boards over 255 cells): moves until the tail leaves the cell, 0 empty
    head_row: jax.Array  # () int32
    head_col: jax.Array  # () int32
    fruit: jax.Array  # () int32 flat index row * board + col; board**2 (off the board, no fruit) once the board is full
    length: jax.Array  # () int32
    step_count: jax.Array  # () int32 moves made in the current episode
    key: jax.Array  # PRNG key, replaced by fold_in(key, 0) at every move


def _random_words(key: jax.Array, num_words: int) -> tuple[jax.Array, jax.Array]:
    """The next key and `num_words` uniform uint32 words, from keys `fold_in(key, i)`, i = 0, 1, ...

    A derived key's data are uniform random bits (as with `split`), so two words come from one Threefry hash. On CPU
    each Threefry call is a small XLA loop: drawing through `randint` (three calls each) made random numbers the most
    expensive part of a move, and under vmap one `fold_in` per key runs faster than one `split` into several keys.
    """
    keys = [jax.random.fold_in(key, i) for i in range(1 + (num_words + 1) // 2)]
    return keys[0], jnp.concatenate([jax.random.key_data(k) for k in keys[1:]])[:num_words]


def _uniform_below(word: jax.Array, n) -> jax.Array:
    """An integer uniform on {0, ..., n - 1} from a uniform uint32 word (modulo bias < n / 2**32, i.e. < 4e-8 here)."""
    return (word % jnp.asarray(n).astype(jnp.uint32)).astype(jnp.int32)


def observe(state: SnakeState) -> jax.Array:
    """The 5 feature maps (body, head, tail, fruit, order), float32, shape (5, board, board)."""
    body = state.body
    board_size = body.shape[-1]
    cell = jnp.arange(board_size * board_size, dtype=jnp.int32).reshape(board_size, board_size)
    maps = [body > 0, body == state.length.astype(body.dtype), body == 1, cell == state.fruit]
    order = body.astype(jnp.float32) * (1.0 / state.length.astype(jnp.float32))
    return jnp.stack([m.astype(jnp.float32) for m in maps] + [order])


def _sample_free_cell(word: jax.Array, body: jax.Array, num_free: jax.Array) -> jax.Array:
    """Flat index of a uniformly random empty cell: the (k + 1)-th empty cell in row-major order, k ~ U{0, ..., num_free - 1}.

    One random word rather than one draw per cell. The k-th empty cell is found row first: counts of empty cells in
    rows 0..r, then in columns 0..c of the chosen row, each a masked sum over a small triangle. `jnp.cumsum` over the flat
    board (an associative scan) did the same at about three times the cost of the whole rest of a move on CPU.
    """
    board_size = body.shape[-1]
    k = _uniform_below(word, jnp.maximum(num_free, 1))
    idx = jnp.arange(board_size)
    at_or_before = idx[None, :] <= idx[:, None]  # [i, j] = j <= i
    free = (body == 0).astype(jnp.int32)
    row_free = free.sum(axis=1)
    row_cum = jnp.sum(jnp.where(at_or_before, row_free[None, :], 0), axis=1)  # empty cells in rows 0..i
    row = jnp.sum(row_cum <= k)  # the first row whose count passes k
    is_row = idx == row
    k_in_row = k - jnp.sum(jnp.where(is_row, row_cum - row_free, 0))
    free_in_row = jnp.sum(jnp.where(is_row[:, None], free, 0), axis=0)
    col_cum = jnp.sum(jnp.where(at_or_before, free_in_row[None, :], 0), axis=1)
    col = jnp.sum(col_cum <= k_in_row)
    return (row * board_size + col).astype(jnp.int32)


def _new_episode(key: jax.Array, words: jax.Array, board_size: int) -> SnakeState:
    """Snake of length 1 on a uniform cell, fruit on a uniform other cell, from two random words."""
    num_cells = board_size * board_size
    head = _uniform_below(words[0], num_cells)
    # every cell but the head is free, so an offset in [1, num_cells - 1] from the head is uniform over the free cells
    fruit = (head + 1 + _uniform_below(words[1], num_cells - 1)) % num_cells
    body_dtype = jnp.uint8 if num_cells <= 255 else jnp.int32  # a small board of body ages: less memory traffic per move
    cell = jnp.arange(num_cells, dtype=jnp.int32).reshape(board_size, board_size)
    body = (cell == head).astype(body_dtype)
    zero, one = jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32)
    return SnakeState(body, head // board_size, head % board_size, fruit, one, zero, key)


def reset_state(key: jax.Array, board_size: int = BOARD_SIZE) -> SnakeState:
    key, words = _random_words(key, 2)
    return _new_episode(key, words, board_size)


def reset(key: jax.Array, board_size: int = BOARD_SIZE) -> tuple[SnakeState, jax.Array]:
    """A new episode: (state, obs). `board_size` must be static under jit."""
    state = reset_state(key, board_size)
    return state, observe(state)


def step_state(
    state: SnakeState, action: jax.Array, max_episode_steps: int = MAX_EPISODE_STEPS, autoreset: bool = False
) -> tuple[SnakeState, jax.Array, jax.Array, jax.Array]:
    """One move without building the observation: (state, reward, terminated, truncated).

    With `autoreset`, a move that ends the episode returns the first state of a new episode instead.
    """
    body = state.body
    board_size = body.shape[-1]
    num_cells = board_size * board_size
    cell = jnp.arange(num_cells, dtype=jnp.int32).reshape(board_size, board_size)
    moves = jnp.asarray(MOVES)
    row = state.head_row + moves[action, 0]
    col = state.head_col + moves[action, 1]
    off_board = (row < 0) | (row >= board_size) | (col < 0) | (col >= board_size)
    head = jnp.clip(row, 0, board_size - 1) * board_size + jnp.clip(col, 0, board_size - 1)
    eat = ~off_board & (head == state.fruit)
    # the tail holds 1 and leaves its cell during the move unless the snake eats; the fruit never lies on the snake,
    # so the target cell holds 0 whenever the snake eats
    hit_body = body.ravel()[head] > 1
    dead = off_board | hit_body
    length = state.length + eat.astype(jnp.int32)
    terminated = dead | (length == num_cells)
    step_count = state.step_count + 1
    truncated = ~terminated & (step_count >= max_episode_steps)

    # Every body cell comes one move closer to being left (not when eating: the tail stays), then the head moves in.
    # A fatal move leaves the board as it was, so the final observation shows the snake just before it.
    new_body = jnp.where(eat | dead, body, jnp.maximum(body, 1) - 1)
    new_body = jnp.where((cell == head) & ~dead, length.astype(body.dtype), new_body)
    # The fruit draw only matters on a move that continues the episode and the reset draw only on one that ends it, so
    # they share the same two words.
    key, words = _random_words(state.key, 2)
    # a full board has no free cell left: the fruit goes off the board
    new_fruit = jnp.where(length == num_cells, num_cells, _sample_free_cell(words[0], new_body, num_cells - length))
    next_state = SnakeState(
        body=new_body,
        head_row=jnp.where(dead, state.head_row, row),
        head_col=jnp.where(dead, state.head_col, col),
        fruit=jnp.where(eat, new_fruit, state.fruit),
        length=length,
        step_count=step_count,
        key=key,
    )
    if autoreset:  # the same new episode as reset_state(state.key), from the words already drawn
        next_state = jax_env_autoreset.where_tree(terminated | truncated, _new_episode(key, words, board_size), next_state)
    return next_state, eat.astype(jnp.float32), terminated, truncated


def step(
    state: SnakeState, action: jax.Array, max_episode_steps: int = MAX_EPISODE_STEPS
) -> tuple[SnakeState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One move: (state, obs, reward, terminated, truncated). Do not step an episode that has ended."""
    state, reward, terminated, truncated = step_state(state, action, max_episode_steps)
    return state, observe(state), reward, terminated, truncated


def step_autoreset(
    state: SnakeState, action: jax.Array, max_episode_steps: int = MAX_EPISODE_STEPS
) -> tuple[SnakeState, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`step`, with an ended episode replaced at once by a new one (the Jumanji / gymnax convention).

    reward, terminated and truncated are those of the move just made. When that move ends the episode, state and obs
    are the new episode's first ones (the final observation is not returned; `SnakeVecEnv` keeps it, EnvPool-style).
    """
    state, reward, terminated, truncated = step_state(state, action, max_episode_steps, autoreset=True)
    return state, observe(state), reward, terminated, truncated


def envpool_step(states: SnakeState, reset_now: jax.Array, actions: jax.Array, max_episode_steps: int = MAX_EPISODE_STEPS):
    """Batched move with EnvPool's rule (`jax_env_autoreset.envpool_step`): envs that ended at the previous call ignore
    their action and restart. (states, obs, reward, terminated, truncated), leading axis B."""
    return jax_env_autoreset.envpool_step(
        functools.partial(step_state, max_episode_steps=max_episode_steps),
        functools.partial(reset_state, board_size=states.body.shape[-1]),
        observe,
        states,
        reset_now,
        actions,
    )


@functools.cache
def _jitted_batch_functions(board_size: int, max_episode_steps: int):
    """One compilation per setting, shared by every SnakeVecEnv (e.g. one per actor thread)."""
    batch_reset = jax.jit(jax.vmap(functools.partial(reset, board_size=board_size)))
    return batch_reset, jax.jit(functools.partial(envpool_step, max_episode_steps=max_episode_steps))


class SnakeVecEnv:
    """`num_envs` Snake games behind EnvPool's gym interface (`envpool.make(..., env_type="gym")`), numpy in and out.

    Auto-reset as in EnvPool: the step at which an env's episode ends returns that episode's final observation; the
    next `step` ignores that env's action and returns the first observation of a new episode, with reward 0,
    terminated and truncated False and info["elapsed_step"] 0. Each `step` is one jitted, vmapped call.

    For an actor that steps on device (the IMPALA-family scripts' `make_device_unroll`): `state` is the batch's
    (states, reset_now) after `reset`, and `batch_step(state, actions) -> (state, (obs, reward, terminated, truncated,
    elapsed_step))` the pure function that `step` runs, to be composed with a policy inside one jitted call.
    """

    def __init__(self, num_envs: int, seed: int, board_size: int = BOARD_SIZE, max_episode_steps: int = MAX_EPISODE_STEPS):
        self.num_envs = num_envs
        self.board_size = board_size
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0.0, 1.0, (NUM_CHANNELS, board_size, board_size), np.float32)
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.single_observation_space, self.single_action_space = self.observation_space, self.action_space
        self._key = jax.random.PRNGKey(seed)
        self._reset, self._step = _jitted_batch_functions(board_size, max_episode_steps)
        self._state, self._reset_now = None, None

    @property
    def state(self):
        return self._state, self._reset_now

    def batch_step(self, state, actions: jax.Array):
        """`step` as a pure function of (states, reset_now): (state, (obs, reward, terminated, truncated, elapsed))."""
        states, obs, reward, terminated, truncated = envpool_step(*state, actions, self.max_episode_steps)
        return (states, terminated | truncated), (obs, reward, terminated, truncated, states.step_count)

    def _info(self, reward, elapsed_step, terminated) -> dict:
        return {
            "reward": np.asarray(reward, np.float32),  # no reward clipping here: the same as the returned reward
            "elapsed_step": np.asarray(elapsed_step, np.int32),
            "terminated": np.asarray(terminated, np.int32),
            "env_id": np.arange(self.num_envs, dtype=np.int32),
        }

    def reset(self) -> tuple[np.ndarray, dict]:
        self._key, key = jax.random.split(self._key)
        self._state, obs = self._reset(jax.random.split(key, self.num_envs))
        self._reset_now = jnp.zeros(self.num_envs, bool)
        zeros = np.zeros(self.num_envs)
        return np.asarray(obs), self._info(zeros, zeros, zeros)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = jnp.asarray(np.asarray(actions).reshape(self.num_envs), jnp.int32)
        self._state, obs, reward, terminated, truncated = self._step(self._state, self._reset_now, actions)
        self._reset_now = terminated | truncated
        obs, reward, terminated, truncated, elapsed = jax.device_get(
            (obs, reward, terminated, truncated, self._state.step_count)
        )
        return obs, reward, terminated, truncated, self._info(reward, elapsed, terminated)

    def close(self):
        pass


def make_vec_env(num_envs: int, seed: int, **kwargs) -> SnakeVecEnv:
    """What the IMPALA-family scripts call for `--env-id snake_jax`; kwargs: board_size, max_episode_steps."""
    return SnakeVecEnv(num_envs, seed, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# `python snake_jax.py`: throughput of a random policy, or an episode shown in the terminal and saved as a GIF.


@dataclass
class Args:
    mode: Literal["benchmark", "render"] = "benchmark"
    """`benchmark`: random-policy steps/s on device; `render`: play one episode, print it as ASCII and save a GIF"""
    seed: int = 1
    """seed of the environments and of the policy"""
    board_size: int = BOARD_SIZE
    """the board is board_size x board_size (12 in the paper)"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """time limit of an episode (a truncation)"""
    num_envs: int = 1024
    """benchmark: batch size (envs stepped together by one vmapped call)"""
    num_steps: int = 100
    """benchmark: moves per timed call (a lax.scan, so one dispatch covers num_envs * num_steps steps)"""
    repeats: int = 10
    """benchmark: timed calls after the compiling one"""
    policy: Literal["random", "greedy"] = "greedy"
    """render: `random` (uniform actions) or `greedy` (toward the fruit, avoiding walls and body when it can)"""
    max_render_steps: int = 1000
    """render: stop the episode after this many moves"""
    frame_delay: float = 0.03
    """render: seconds between ASCII frames redrawn in place; 0 prints only the last frame"""
    video_dir: str = "videos"
    """render: the GIF goes here"""


def random_policy(key: jax.Array, state: SnakeState) -> jax.Array:
    return jax.random.randint(key, (), 0, NUM_ACTIONS)


def greedy_policy(key: jax.Array, state: SnakeState) -> jax.Array:
    """A toy policy: among the moves that do not die at once, the one that brings the head closest to the fruit."""
    board_size = state.body.shape[-1]
    rows = state.head_row + jnp.asarray(MOVES[:, 0])
    cols = state.head_col + jnp.asarray(MOVES[:, 1])
    on_board = (rows >= 0) & (rows < board_size) & (cols >= 0) & (cols < board_size)
    cell = jnp.clip(rows, 0, board_size - 1) * board_size + jnp.clip(cols, 0, board_size - 1)
    safe = on_board & (state.body.ravel()[cell] <= 1)
    distance = jnp.abs(rows - state.fruit // board_size) + jnp.abs(cols - state.fruit % board_size)
    noise = jax.random.uniform(key, (NUM_ACTIONS,))  # breaks ties at random
    return jnp.argmin(jnp.where(safe, distance, 10 * board_size) + noise)


def benchmark(args: Args) -> list[float]:
    """Random-policy steps/s with auto-reset, fully on device; the observations are carried so XLA must build them."""
    step_fn = functools.partial(step_autoreset, max_episode_steps=args.max_episode_steps)

    @jax.jit
    def rollout(states, obs, key):
        def one_step(carry, key):
            states, _, returns = carry
            actions = jax.random.randint(key, (args.num_envs,), 0, NUM_ACTIONS)
            states, obs, reward, terminated, truncated = jax.vmap(step_fn)(states, actions)
            return (states, obs, returns + reward), None

        returns = jnp.zeros(args.num_envs)
        return jax.lax.scan(one_step, (states, obs, returns), jax.random.split(key, args.num_steps))[0]

    key = jax.random.PRNGKey(args.seed)
    states, obs = jax.jit(jax.vmap(functools.partial(reset, board_size=args.board_size)))(jax.random.split(key, args.num_envs))
    carry = jax.block_until_ready(rollout(states, obs, key))  # compiles
    rates = []
    for i in range(args.repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(rollout(*carry[:2], jax.random.fold_in(key, i)))
        rates.append(args.num_envs * args.num_steps / (time.perf_counter() - start))
    return rates


def ascii_frame(obs: np.ndarray) -> str:
    """'@' head, 'o' body, '.' tail, '*' fruit, inside a '#' border."""
    board_size = obs.shape[-1]
    grid = np.full((board_size, board_size), " ")
    grid[obs[0] > 0] = "o"
    grid[obs[2] > 0] = "."
    grid[obs[1] > 0] = "@"
    grid[obs[3] > 0] = "*"
    border = "#" * (board_size + 2)
    return "\n".join([border] + ["#" + "".join(row) + "#" for row in grid] + [border])


def image_frame(obs: np.ndarray, cell_px: int = 24) -> np.ndarray:
    """RGB frame: the body shaded from bright (head) to dark (tail) by the order channel, the fruit red."""
    order = obs[4][..., None]
    rgb = np.where(obs[0][..., None] > 0, np.array([40, 90, 40]) + order * np.array([60, 165, 60]), np.array([25, 25, 35]))
    rgb = np.where(obs[1][..., None] > 0, np.array([250, 230, 80]), rgb)
    rgb = np.where(obs[3][..., None] > 0, np.array([230, 50, 50]), rgb)
    image = np.kron(rgb, np.ones((cell_px, cell_px, 1))).astype(np.uint8)
    image[::cell_px], image[:, ::cell_px] = 15, 15  # grid lines, so that neighbouring body cells stay apart
    return image


def render(args: Args) -> str:
    from PIL import Image

    policy = {"random": random_policy, "greedy": greedy_policy}[args.policy]
    step_fn = jax.jit(functools.partial(step, max_episode_steps=args.max_episode_steps))
    act = jax.jit(policy)
    key = jax.random.PRNGKey(args.seed)
    key, reset_key = jax.random.split(key)
    state, obs = jax.jit(reset, static_argnames="board_size")(reset_key, board_size=args.board_size)
    frames, episode_return, done, t = [np.asarray(obs)], 0.0, False, 0
    interactive = args.frame_delay > 0 and sys.stdout.isatty()
    while not done and t < args.max_render_steps:
        key, action_key = jax.random.split(key)
        state, obs, reward, terminated, truncated = step_fn(state, act(action_key, state))
        episode_return, done, t = episode_return + float(reward), bool(terminated | truncated), t + 1
        frames.append(np.asarray(obs))
        if interactive:
            print("\033[H\033[J" + ascii_frame(frames[-1]) + f"\nstep {t}  return {episode_return:.0f}", flush=True)
            time.sleep(args.frame_delay)
    end = "terminated" if bool(terminated) else "truncated" if bool(truncated) else "stopped"
    print(ascii_frame(frames[-1]) + f"\n{args.policy} policy: {end} after {t} steps, return {episode_return:.0f}")
    os.makedirs(args.video_dir, exist_ok=True)
    path = os.path.join(args.video_dir, f"snake_{args.policy}_seed{args.seed}.gif")
    images = [Image.fromarray(image_frame(f)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=60, loop=0)
    print(f"saved {path} ({len(images)} frames)")
    return path


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    if args.mode == "benchmark":
        rates = benchmark(args)
        print(f"snake_jax, batch {args.num_envs}, {args.num_steps} moves per call, {jax.devices()[0].platform}: ", end="")
        print(f"median {np.median(rates):,.0f} steps/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.repeats} calls)")
    else:
        render(args)
