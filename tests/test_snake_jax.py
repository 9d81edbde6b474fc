"""Rules, observation and EnvPool-style auto-reset of `snake_jax` (Bonnet et al., App. B.2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snake_jax import (
    SnakeState,
    SnakeVecEnv,
    envpool_step,
    make_vec_env,
    observe,
    reset,
    reset_state,
    step,
    step_autoreset,
)

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3


def make_state(cells, fruit, board_size=12, step_count=0, seed=0) -> SnakeState:
    """A state with the snake on `cells` (head first, tail last) and the fruit at `fruit` (row, col) or None."""
    body = np.zeros((board_size, board_size), reset_state(jax.random.PRNGKey(0), board_size).body.dtype)
    for i, (r, c) in enumerate(cells):
        body[r, c] = len(cells) - i
    fruit_index = board_size * board_size if fruit is None else fruit[0] * board_size + fruit[1]
    return SnakeState(
        body=jnp.asarray(body),
        head_row=jnp.int32(cells[0][0]),
        head_col=jnp.int32(cells[0][1]),
        fruit=jnp.int32(fruit_index),
        length=jnp.int32(len(cells)),
        step_count=jnp.int32(step_count),
        key=jax.random.PRNGKey(seed),
    )


def check_invariants(state: SnakeState):
    """Body values are exactly 1..length, the head holds length, the fruit lies on an empty cell."""
    body = np.asarray(state.body).astype(np.int64)
    board_size = body.shape[-1]
    length = int(state.length)
    assert sorted(body[body > 0].tolist()) == list(range(1, length + 1))
    assert body[int(state.head_row), int(state.head_col)] == length
    fruit = int(state.fruit)
    if length < board_size * board_size:
        assert 0 <= fruit < board_size * board_size
        assert body.ravel()[fruit] == 0, "fruit on the snake"
    else:
        assert fruit == board_size * board_size


def test_reset_is_length_one_with_fruit_elsewhere():
    for seed in range(20):
        state, obs = reset(jax.random.PRNGKey(seed))
        check_invariants(state)
        assert int(state.length) == 1 and int(state.step_count) == 0
        assert obs.shape == (5, 12, 12) and obs.dtype == jnp.float32
    heads = {int(reset(jax.random.PRNGKey(seed))[0].head_row) for seed in range(20)}
    assert len(heads) > 3, "start cell is not random"


def test_eating_grows_and_rewards():
    state = make_state([(5, 5), (5, 4), (5, 3)], fruit=(5, 6))
    state, obs, reward, terminated, truncated = step(state, RIGHT)
    assert float(reward) == 1.0 and not terminated and not truncated
    assert int(state.length) == 4
    body = np.asarray(state.body)
    # the tail stays put when eating: head 4 at the fruit, then 3, 2, 1
    assert body[5, 6] == 4 and body[5, 5] == 3 and body[5, 4] == 2 and body[5, 3] == 1
    assert int(state.fruit) != 5 * 12 + 6
    check_invariants(state)
    # and a plain move gives 0 and keeps the length
    state, _, reward, terminated, _ = step(state, DOWN)
    assert float(reward) == 0.0 and not terminated and int(state.length) == 4
    body = np.asarray(state.body)
    assert body[6, 6] == 4 and body[5, 6] == 3 and body[5, 3] == 0
    check_invariants(state)


@pytest.mark.parametrize(
    "head, action", [((0, 4), UP), ((4, 11), RIGHT), ((11, 4), DOWN), ((4, 0), LEFT), ((0, 0), LEFT), ((11, 11), DOWN)]
)
def test_leaving_the_board_terminates(head, action):
    state = make_state([head], fruit=(6, 6))
    next_state, obs, reward, terminated, truncated = step(state, action)
    assert terminated and not truncated and float(reward) == 0.0
    # the final observation shows the snake before the fatal move
    np.testing.assert_array_equal(np.asarray(next_state.body), np.asarray(state.body))
    assert obs[1, head[0], head[1]] == 1.0


def test_moving_inward_from_the_edge_is_fine():
    state = make_state([(0, 0)], fruit=(6, 6))
    for action in (RIGHT, DOWN):
        _, _, _, terminated, _ = step(state, action)
        assert not terminated


def test_hitting_the_body_terminates():
    # head (2, 2), body (2, 3), (3, 3), (3, 2), tail (3, 1): moving down hits (3, 2), which is not the tail
    state = make_state([(2, 2), (2, 3), (3, 3), (3, 2), (3, 1)], fruit=(8, 8))
    _, _, reward, terminated, truncated = step(state, DOWN)
    assert terminated and not truncated and float(reward) == 0.0
    # moving up is free
    _, _, _, terminated, _ = step(state, UP)
    assert not terminated


def test_moving_into_the_cell_the_tail_leaves_is_legal():
    # a 2 x 2 loop: head (2, 2), (2, 3), (3, 3), tail (3, 2); moving down enters the tail's cell as the tail leaves it
    state = make_state([(2, 2), (2, 3), (3, 3), (3, 2)], fruit=(8, 8))
    for _ in range(8):  # twice round the loop
        action = {(2, 2): DOWN, (3, 2): RIGHT, (3, 3): UP, (2, 3): LEFT}[(int(state.head_row), int(state.head_col))]
        state, _, reward, terminated, _ = step(state, action)
        assert not terminated and float(reward) == 0.0
        check_invariants(state)
    assert int(state.length) == 4 and (int(state.head_row), int(state.head_col)) == (2, 2)
    # a snake of length 2 may reverse: its head takes the tail's cell and the tail takes the head's
    state = make_state([(4, 4), (4, 5)], fruit=(8, 8))
    state, _, _, terminated, _ = step(state, RIGHT)
    assert not terminated
    assert np.asarray(state.body)[4, 5] == 2 and np.asarray(state.body)[4, 4] == 1


def test_filling_the_board_terminates():
    # 2 x 2: the snake holds three cells, the fruit the last one
    state = make_state([(0, 1), (0, 0), (1, 0)], fruit=(1, 1), board_size=2)
    state, obs, reward, terminated, truncated = step(state, DOWN)
    assert float(reward) == 1.0 and terminated and not truncated
    assert int(state.length) == 4 and int(state.fruit) == 4  # no fruit left on the board
    assert float(obs[3].sum()) == 0.0 and float(obs[0].sum()) == 4.0
    check_invariants(state)
    # 3 x 3, snake of 8 in a spiral, the fruit on the centre
    cells = [(1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2), (0, 1), (0, 0)]
    state = make_state(cells, fruit=(1, 1), board_size=3)
    state, _, reward, terminated, _ = step(state, RIGHT)
    assert float(reward) == 1.0 and terminated and int(state.length) == 9
    # one cell short of full is not a terminal
    state = make_state(cells[:-1], fruit=(1, 1), board_size=3)
    state, _, reward, terminated, _ = step(state, RIGHT)
    assert float(reward) == 1.0 and not terminated
    assert int(state.fruit) == 0  # the only free cell left
    check_invariants(state)


def loop_action(state):
    """Go round the 2 x 2 square (5, 5)-(6, 6) forever: never dies, never eats a fruit placed far away."""
    return {(5, 5): RIGHT, (5, 6): DOWN, (6, 6): LEFT, (6, 5): UP}[(int(state.head_row), int(state.head_col))]


def test_time_limit_truncates():
    max_steps = 7
    step_fn = jax.jit(functools.partial(step, max_episode_steps=max_steps))
    state = make_state([(5, 5)], fruit=(0, 0))
    for t in range(1, max_steps + 1):
        state, _, _, terminated, truncated = step_fn(state, loop_action(state))
        assert not terminated
        assert bool(truncated) == (t == max_steps), t
    assert int(state.step_count) == max_steps
    # a terminal on the last step is a termination, not a truncation
    state = make_state([(0, 3)], fruit=(6, 6), step_count=max_steps - 1)
    _, _, _, terminated, truncated = step_fn(state, UP)
    assert terminated and not truncated


def test_autoreset_starts_a_new_episode_but_reports_the_real_move():
    state = make_state([(0, 3), (1, 3)], fruit=(6, 6))
    new_state, obs, reward, terminated, truncated = step_autoreset(state, UP)
    assert terminated and not truncated and float(reward) == 0.0
    assert int(new_state.length) == 1 and int(new_state.step_count) == 0
    check_invariants(new_state)
    np.testing.assert_array_equal(obs, observe(new_state))
    # an eating move that does not end the episode is an ordinary step
    state = make_state([(5, 5)], fruit=(5, 6))
    new_state, _, reward, terminated, _ = step_autoreset(state, RIGHT)
    assert float(reward) == 1.0 and not terminated and int(new_state.length) == 2 and int(new_state.step_count) == 1
    # truncation resets too
    step_fn = jax.jit(functools.partial(step_autoreset, max_episode_steps=3))
    state = make_state([(5, 5)], fruit=(0, 0))
    for t in range(3):
        state, _, _, terminated, truncated = step_fn(state, loop_action(state))
    assert truncated and not terminated and int(state.step_count) == 0


def test_fruit_never_on_the_body_over_random_play():
    """Many random moves on a 4 x 4 board (fruit is eaten often there), checking every state."""
    num_envs, num_steps, board_size = 32, 300, 4
    states, _ = jax.vmap(functools.partial(reset, board_size=board_size))(jax.random.split(jax.random.PRNGKey(0), num_envs))

    def body(states, key):
        actions = jax.random.randint(key, (num_envs,), 0, 4)
        states, _, reward, terminated, truncated = jax.vmap(step_autoreset)(states, actions)
        return states, (states, reward, terminated)

    _, (traj, rewards, terminated) = jax.jit(lambda s, k: jax.lax.scan(body, s, jax.random.split(k, num_steps)))(
        states, jax.random.PRNGKey(1)
    )
    assert float(rewards.sum()) > 100, "too few fruits eaten for the check to mean anything"
    assert int(terminated.sum()) > 10
    assert int(traj.length.max()) >= 4
    body_np = np.asarray(traj.body).astype(np.int64).reshape(num_steps * num_envs, -1)
    fruit = np.asarray(traj.fruit).reshape(-1)
    length = np.asarray(traj.length).reshape(-1)
    assert np.all(body_np[np.arange(len(fruit)), fruit] == 0)
    assert np.all((body_np > 0).sum(axis=1) == length)
    assert np.all(body_np.max(axis=1) == length)
    head = np.asarray(traj.head_row).reshape(-1) * board_size + np.asarray(traj.head_col).reshape(-1)
    assert np.all(body_np[np.arange(len(head)), head] == length)


def test_fruit_is_uniform_over_free_cells():
    # on a 3 x 3 board the snake (0, 1), (0, 0), (1, 0) eats at (0, 2) and grows to 4 cells: 5 cells stay free
    cells = [(0, 1), (0, 0), (1, 0)]
    counts = np.zeros(9)
    step_fn = jax.jit(jax.vmap(step, in_axes=(0, None)))
    states = jax.vmap(lambda k: make_state(cells, fruit=(0, 2), board_size=3)._replace(key=k))(
        jax.random.split(jax.random.PRNGKey(3), 5000)
    )
    new_states, _, reward, _, _ = step_fn(states, RIGHT)
    assert np.all(np.asarray(reward) == 1.0)
    np.add.at(counts, np.asarray(new_states.fruit), 1)
    free = [4, 5, 6, 7, 8]  # (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)
    assert counts[[0, 1, 2, 3]].sum() == 0
    np.testing.assert_allclose(counts[free] / 5000, 0.2, atol=0.025)


def test_same_key_same_episode_and_different_keys_differ():
    def rollout(seed):
        state, obs = reset(jax.random.PRNGKey(seed))
        keys = jax.random.split(jax.random.PRNGKey(123), 200)

        def body(state, key):
            state, obs, reward, terminated, truncated = step_autoreset(state, jax.random.randint(key, (), 0, 4))
            return state, (obs, reward, terminated)

        return jax.lax.scan(body, state, keys)[1]

    run = jax.jit(rollout)
    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_plain_jit_and_vmap_agree():
    num_envs = 4
    states, _ = jax.vmap(reset)(jax.random.split(jax.random.PRNGKey(4), num_envs))
    actions = jnp.array([0, 1, 2, 3])
    for _ in range(3):  # a few moves, so that the states differ from a fresh reset
        batched = jax.vmap(step_autoreset)(states, actions)
        jitted = [jax.jit(step_autoreset)(jax.tree.map(lambda x: x[i], states), actions[i]) for i in range(num_envs)]
        plain = [step_autoreset(jax.tree.map(lambda x: x[i], states), actions[i]) for i in range(num_envs)]
        for i in range(num_envs):
            for b, j, p in zip(jax.tree.leaves(batched), jax.tree.leaves(jitted[i]), jax.tree.leaves(plain[i])):
                np.testing.assert_array_equal(b[i], j)
                np.testing.assert_array_equal(j, p)
        states = batched[0]
        actions = (actions + 1) % 4


def test_observation_channels_match_the_state():
    cells = [(2, 3), (2, 2), (3, 2), (4, 2)]
    state = make_state(cells, fruit=(7, 9))
    obs = np.asarray(observe(state))
    assert obs.shape == (5, 12, 12) and obs.dtype == np.float32
    body, head, tail, fruit, order = obs
    expected_body = np.zeros((12, 12))
    for r, c in cells:
        expected_body[r, c] = 1
    np.testing.assert_array_equal(body, expected_body)
    assert head.sum() == 1 and head[2, 3] == 1
    assert tail.sum() == 1 and tail[4, 2] == 1
    assert fruit.sum() == 1 and fruit[7, 9] == 1
    # order: 1 at the head, decreasing by 1 / length to 1 / length at the tail, 0 off the snake
    np.testing.assert_allclose([order[r, c] for r, c in cells], [1.0, 0.75, 0.5, 0.25])
    assert order.sum() == pytest.approx(2.5)
    # length 1: head and tail are the same cell
    obs = np.asarray(observe(make_state([(0, 0)], fruit=(1, 1))))
    assert obs[1, 0, 0] == obs[2, 0, 0] == obs[4, 0, 0] == 1.0 and obs[0].sum() == 1


def test_vec_env_spaces_and_info():
    envs = make_vec_env(num_envs=3, seed=0)
    assert isinstance(envs, SnakeVecEnv) and envs.num_envs == 3
    assert envs.observation_space.shape == (5, 12, 12) and envs.observation_space.dtype == np.float32
    assert envs.action_space.n == 4
    obs, info = envs.reset()
    assert isinstance(obs, np.ndarray) and obs.shape == (3, 5, 12, 12) and obs.dtype == np.float32
    assert envs.observation_space.contains(obs[0])
    np.testing.assert_array_equal(info["env_id"], [0, 1, 2])
    np.testing.assert_array_equal(info["elapsed_step"], [0, 0, 0])
    obs, reward, terminated, truncated, info = envs.step(np.array([1, 2, 3]))
    assert obs.shape == (3, 5, 12, 12) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool
    assert info["reward"].dtype == np.float32 and info["elapsed_step"].dtype == np.int32
    assert info["terminated"].dtype == np.int32
    np.testing.assert_array_equal(info["reward"], reward)
    np.testing.assert_array_equal(info["terminated"], terminated.astype(np.int32))


def test_vec_env_envpool_autoreset():
    """Done at step t: step t returns the final obs; step t + 1 ignores the action and returns a new episode's start."""
    num_envs = 4
    envs = SnakeVecEnv(num_envs, seed=0, board_size=6)
    obs, _ = envs.reset()
    done_at = np.full(num_envs, -1)
    prev_obs = obs
    for t in range(1, 12):  # always up: every snake reaches the top wall within 6 moves
        obs, reward, terminated, truncated, info = envs.step(np.full(num_envs, UP))
        for i in range(num_envs):
            if done_at[i] == -1 and terminated[i]:
                done_at[i] = t
                assert info["elapsed_step"][i] == t and info["terminated"][i] == 1 and not truncated[i]
                # the final observation: the snake just before the fatal move, its head on the top row
                np.testing.assert_array_equal(obs[i], prev_obs[i])
                assert obs[i, 1, 0].sum() == 1.0
            elif done_at[i] != -1 and t == done_at[i] + 1:
                # the reset step: action ignored, reward 0, not done, elapsed 0, a length-1 snake
                assert reward[i] == 0.0 and not terminated[i] and not truncated[i]
                assert info["elapsed_step"][i] == 0 and info["reward"][i] == 0.0
                assert obs[i, 0].sum() == 1.0 and obs[i, 1].sum() == 1.0 and obs[i, 3].sum() == 1.0
            elif done_at[i] != -1 and t == done_at[i] + 2:
                assert info["elapsed_step"][i] == 1  # the new episode's first move
        prev_obs = obs
    assert np.all(done_at > 0)


def test_envpool_step_ignores_the_action_of_an_env_being_reset():
    # two identical envs whose next move (right) eats; the first ended at the previous call and must restart instead
    state = make_state([(5, 5), (5, 4)], fruit=(5, 6), step_count=9)
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    states, obs, reward, terminated, truncated = envpool_step(
        states, jnp.array([True, False]), jnp.array([RIGHT, RIGHT]), max_episode_steps=100
    )
    np.testing.assert_array_equal(reward, [0.0, 1.0])
    np.testing.assert_array_equal(states.length, [1, 3])
    np.testing.assert_array_equal(states.step_count, [0, 10])
    assert not terminated.any() and not truncated.any()
    np.testing.assert_array_equal(obs[0], observe(jax.tree.map(lambda x: x[0], states)))


def test_vec_env_truncation_then_reset():
    envs = SnakeVecEnv(num_envs=5, seed=1, max_episode_steps=1)
    envs.reset()
    rng = np.random.default_rng(0)
    for t in range(6):
        obs, reward, terminated, truncated, info = envs.step(rng.integers(0, 4, size=5))
        if t % 2 == 0:  # every episode ends after its first move, by the wall or by the time limit
            assert np.all(terminated ^ truncated)
            np.testing.assert_array_equal(info["elapsed_step"], 1)
            assert truncated.any()
        else:
            assert not terminated.any() and not truncated.any() and not reward.any()
            np.testing.assert_array_equal(info["elapsed_step"], 0)


def test_vec_env_is_deterministic_in_its_seed():
    def run(seed):
        envs = make_vec_env(num_envs=8, seed=seed)
        out = [envs.reset()[0]]
        rng = np.random.default_rng(0)
        for _ in range(30):
            out.append(envs.step(rng.integers(0, 4, size=8))[0])
        return np.stack(out)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))
