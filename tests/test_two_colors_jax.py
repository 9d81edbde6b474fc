"""Rules, observation, global reward toggle and EnvPool-style auto-reset of `two_colors_jax` (DrMG paper §5.1)."""

import functools
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import only_run_dir, run_script, scalars

import two_colors_jax
from two_colors_jax import (
    GONE,
    GRID_SIZE,
    NUM_CELLS,
    OBS_SIZE,
    StepCounter,
    TwoColorsState,
    TwoColorsVecEnv,
    _jitted_batch_functions,
    distinct_cells,
    is_swapped,
    make_vec_env,
    observe,
    reset,
    scripted_policy,
    step,
    step_autoreset,
)

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3
PEN = 0.01
jstep = jax.jit(step, static_argnames=("step_penalty", "max_episode_steps"))


def cell(row, col):
    return row * GRID_SIZE + col


def make_state(agent, keys=((6, 6), (6, 0)), goal=(0, 6), held=-1, step_count=0, seed=0) -> TwoColorsState:
    """A state from (row, col) positions; a key given as None has been collected."""
    return TwoColorsState(
        agent=jnp.int32(cell(*agent)),
        keys=jnp.array([GONE if k is None else cell(*k) for k in keys], jnp.int32),
        goal=jnp.int32(cell(*goal)),
        held=jnp.int32(held),
        step_count=jnp.int32(step_count),
        key=jax.random.PRNGKey(seed),
    )


def stack(*states):
    return jax.tree.map(lambda *x: jnp.stack(x), *states)


def test_reset_places_four_distinct_cells_uniformly():
    num = 4000
    states, obs = jax.jit(jax.vmap(reset))(jax.random.split(jax.random.PRNGKey(0), num))
    cells = np.stack([states.agent, states.keys[:, 0], states.keys[:, 1], states.goal], axis=1)
    assert cells.min() >= 0 and cells.max() < NUM_CELLS
    assert all(len(set(row)) == 4 for row in cells.tolist()), "two objects on one cell"
    assert np.all(np.asarray(states.held) == -1) and np.all(np.asarray(states.step_count) == 0)
    assert obs.shape == (num, OBS_SIZE) and obs.dtype == jnp.float32
    for column in range(4):  # every object is uniform over the 49 cells
        counts = np.bincount(cells[:, column], minlength=NUM_CELLS)
        assert counts.min() > 0
        np.testing.assert_allclose(counts / num, 1 / NUM_CELLS, atol=0.012)


def test_distinct_cells_is_exact_on_a_tiny_grid():
    # 3 objects on 3 cells: every draw is a permutation, and all 6 occur about equally often
    words = jax.random.bits(jax.random.PRNGKey(1), (6000, 3), jnp.uint32)
    draws = np.asarray(jax.vmap(functools.partial(distinct_cells, num_cells=3))(words))
    assert np.all(np.sort(draws, axis=1) == [0, 1, 2])
    _, counts = np.unique(draws, axis=0, return_counts=True)
    assert len(counts) == 6
    np.testing.assert_allclose(counts / 6000, 1 / 6, atol=0.02)


@pytest.mark.parametrize(
    "colour, swapped, expected", [(0, False, 0.7), (1, False, 0.3), (0, True, 0.3), (1, True, 0.7)], ids=str
)
def test_collecting_a_key_gives_its_colour_reward_and_removes_both_keys(colour, swapped, expected):
    keys = [(6, 6), (6, 0)]
    keys[colour] = (3, 4)
    state = make_state(agent=(3, 3), keys=keys)
    state, obs, reward, terminated, truncated = jstep(state, RIGHT, swapped)
    assert float(reward) == pytest.approx(expected - PEN)
    assert not terminated and not truncated
    assert int(state.held) == colour and np.all(np.asarray(state.keys) == GONE)
    assert int(state.agent) == cell(3, 4)
    # holding a key, a cell where a key was is an ordinary cell: nothing more to collect
    state, _, reward, terminated, _ = jstep(state, LEFT, swapped)
    state, _, reward, terminated, _ = jstep(state, RIGHT, swapped)
    assert float(reward) == pytest.approx(-PEN) and not terminated and int(state.held) == colour


def test_goal_without_a_key_is_an_ordinary_cell():
    state = make_state(agent=(0, 5), goal=(0, 6))
    state, _, reward, terminated, truncated = jstep(state, RIGHT)
    assert float(reward) == pytest.approx(-PEN) and not terminated and not truncated
    assert int(state.agent) == cell(0, 6)
    # staying on the goal (into the wall) still does nothing
    state, _, reward, terminated, _ = jstep(state, UP)
    assert float(reward) == pytest.approx(-PEN) and not terminated and int(state.agent) == cell(0, 6)


@pytest.mark.parametrize("held", [0, 1])
def test_goal_with_a_key_gives_one_and_terminates(held):
    state = make_state(agent=(1, 6), keys=(None, None), goal=(0, 6), held=held, step_count=5)
    state, _, reward, terminated, truncated = jstep(state, UP)
    assert float(reward) == pytest.approx(1.0 - PEN) and terminated and not truncated
    assert int(state.step_count) == 6


def test_a_whole_episode_returns_key_plus_one_minus_the_penalties():
    state = make_state(agent=(3, 0), keys=((3, 2), (0, 0)), goal=(5, 2))
    rewards = []
    for action in [RIGHT, RIGHT, DOWN, DOWN]:
        state, _, reward, terminated, _ = jstep(state, action, False)
        rewards.append(float(reward))
    assert terminated
    np.testing.assert_allclose(rewards, [-PEN, 0.7 - PEN, -PEN, 1.0 - PEN], atol=1e-6)
    assert sum(rewards) == pytest.approx(1.7 - 4 * PEN)


@pytest.mark.parametrize("agent, action", [((0, 3), UP), ((3, 6), RIGHT), ((6, 3), DOWN), ((3, 0), LEFT), ((0, 0), UP)])
def test_walls_keep_the_agent_in_place(agent, action):
    state = make_state(agent=agent, keys=((5, 5), (5, 1)), goal=(1, 1))
    next_state, _, reward, terminated, _ = jstep(state, action)
    assert int(next_state.agent) == cell(*agent) and float(reward) == pytest.approx(-PEN) and not terminated


def test_horizon_truncates_and_a_terminal_on_the_last_step_is_a_termination():
    horizon = 7
    step_fn = jax.jit(functools.partial(step, max_episode_steps=horizon))
    state = make_state(agent=(3, 3))
    for t in range(1, horizon + 1):
        state, _, _, terminated, truncated = step_fn(state, UP if t % 2 else DOWN)
        assert not terminated and bool(truncated) == (t == horizon), t
    state = make_state(agent=(1, 6), keys=(None, None), goal=(0, 6), held=0, step_count=horizon - 1)
    _, _, _, terminated, truncated = step_fn(state, UP)
    assert terminated and not truncated


def test_step_penalty_and_horizon_are_arguments():
    state = make_state(agent=(3, 3))
    _, _, reward, _, truncated = jstep(state, UP, step_penalty=0.25, max_episode_steps=1)
    assert float(reward) == pytest.approx(-0.25) and truncated


def test_toggle_falls_exactly_at_the_step_count():
    steps = np.array([0, 99_999, 100_000, 199_999, 200_000, 300_000, 350_000])
    np.testing.assert_array_equal(is_swapped(steps), [False, False, True, True, False, True, True])
    np.testing.assert_array_equal(is_swapped(np.arange(8), 3), [0, 0, 0, 1, 1, 1, 0, 0])


def test_vec_env_toggles_inside_a_batch_at_its_global_step():
    """Four envs that each collect a key of colour 0 at global steps 99,998 to 100,001 (the period is 1e5)."""
    envs = TwoColorsVecEnv(4, seed=0, counter=StepCounter(99_998))
    envs.reset()
    envs._state = stack(*[make_state(agent=(3, 3), keys=((3, 4), (0, 0)))] * 4)
    _, reward, terminated, _, info = envs.step(np.full(4, RIGHT))
    np.testing.assert_array_equal(info["swapped"], [False, False, True, True])
    np.testing.assert_allclose(reward, np.array([0.7, 0.7, 0.3, 0.3]) - PEN, atol=1e-6)
    assert envs.counter.count == 100_002 and not terminated.any()


def test_instances_share_the_process_wide_counter_by_default():
    a, b = make_vec_env(3, seed=0), make_vec_env(5, seed=1)
    assert a.counter is b.counter is two_colors_jax.GLOBAL_STEP_COUNTER
    a.reset(), b.reset()
    start = a.counter.count
    a.step(np.zeros(3)), b.step(np.zeros(5)), a.step(np.zeros(3))
    assert a.counter.count == start + 11
    own = TwoColorsVecEnv(2, seed=0, counter=StepCounter())
    own.reset(), own.step(np.zeros(2))
    assert own.counter.count == 2 and a.counter.count == start + 11


def test_step_counter_is_thread_safe():
    counter = StepCounter()
    firsts = []

    def take():
        for _ in range(2000):
            firsts.append(counter.take(3))

    threads = [threading.Thread(target=take) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert counter.count == 24000 and sorted(firsts) == list(range(0, 24000, 3))


def test_defaults_can_be_set_by_environment_variables():
    env = dict(os.environ, TWO_COLORS_TOGGLE_PERIOD="5e3", TWO_COLORS_STEP_PENALTY="0.02", TWO_COLORS_MAX_EPISODE_STEPS="9")
    env["JAX_PLATFORMS"] = "cpu"
    code = "import two_colors_jax as t; e = t.make_vec_env(1, 0); print(e.toggle_period, e.step_penalty, e.max_episode_steps)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["5000", "0.02", "9"]
    assert (two_colors_jax.TOGGLE_PERIOD, two_colors_jax.STEP_PENALTY, two_colors_jax.MAX_EPISODE_STEPS) == (100_000, 0.01, 50)


def test_observation_matches_the_state():
    state = make_state(agent=(2, 3), keys=((2, 5), (6, 0)), goal=(0, 3))
    obs = np.asarray(observe(state))
    assert obs.shape == (OBS_SIZE,) and obs.dtype == np.float32
    planes, vector = obs[:-9].reshape(3, 13, 13), obs[-9:]
    assert planes.sum() == 3
    # centre (6, 6) is the agent: key 0 is 2 columns right, key 1 4 rows down and 3 columns left, the goal 2 rows up
    assert planes[0, 6, 8] == 1 and planes[1, 10, 3] == 1 and planes[2, 4, 6] == 1
    np.testing.assert_allclose(vector, [1, 1, 1, 0, 4 / 6, -2 / 6, 2 / 6, -3 / 6, 0], atol=1e-6)
    # once a key is held both key planes are empty and their offsets 0
    state = make_state(agent=(6, 6), keys=(None, None), goal=(0, 0), held=1)
    obs = np.asarray(observe(state))
    planes, vector = obs[:-9].reshape(3, 13, 13), obs[-9:]
    assert planes[:2].sum() == 0 and planes[2, 0, 0] == 1
    np.testing.assert_allclose(vector, [0, 0, 1, 0, 0, -1, 0, 0, -1], atol=1e-6)


def test_autoreset_starts_a_new_episode_but_reports_the_real_move():
    state = make_state(agent=(1, 6), keys=(None, None), goal=(0, 6), held=0, step_count=4)
    new_state, obs, reward, terminated, truncated = step_autoreset(state, UP)
    assert terminated and not truncated and float(reward) == pytest.approx(1.0 - PEN)
    assert int(new_state.step_count) == 0 and int(new_state.held) == -1 and np.all(np.asarray(new_state.keys) != GONE)
    np.testing.assert_array_equal(obs, observe(new_state))
    # a move that does not end the episode is an ordinary step
    state = make_state(agent=(3, 3), keys=((3, 4), (0, 0)))
    new_state, _, reward, terminated, _ = step_autoreset(state, RIGHT, True)
    assert float(reward) == pytest.approx(0.3 - PEN) and int(new_state.held) == 0 and int(new_state.step_count) == 1


def test_invariants_and_rewards_over_random_play():
    num_envs, num_steps, period = 32, 400, 3000

    def body(carry, key):
        states, global_step, returns = carry
        actions = jax.random.randint(key, (num_envs,), 0, 4)
        swapped = is_swapped(global_step + jnp.arange(num_envs), period)
        states, _, reward, terminated, truncated = jax.vmap(step_autoreset)(states, actions, swapped)
        done = terminated | truncated
        out = (states, reward, terminated, done, jnp.where(done, returns + reward, jnp.nan), swapped)
        return (states, global_step + num_envs, jnp.where(done, 0.0, returns + reward)), out

    states, _ = jax.vmap(reset)(jax.random.split(jax.random.PRNGKey(2), num_envs))
    run = jax.jit(lambda s, k: jax.lax.scan(body, (s, 0, jnp.zeros(num_envs)), jax.random.split(k, num_steps))[1])
    traj, rewards, terminated, done, returns, swapped = run(states, jax.random.PRNGKey(3))
    agent, keys, goal, held = (np.asarray(x).reshape(-1, *x.shape[2:]) for x in (traj.agent, traj.keys, traj.goal, traj.held))
    assert np.all(held[agent == goal] == -1)  # standing on the goal is possible without a key only: with one it ends
    for k in range(2):
        on_grid = keys[:, k] != GONE
        assert np.all(keys[on_grid, k] != agent[on_grid]) and np.all(keys[on_grid, k] != goal[on_grid])
    np.testing.assert_array_equal(held >= 0, np.all(keys == GONE, axis=1))
    both = np.all(keys != GONE, axis=1)
    assert np.all(keys[both, 0] != keys[both, 1])
    assert {round(float(r) + PEN, 4) for r in np.unique(np.asarray(rewards))} == {0.0, 0.3, 0.7, 1.0}
    assert int(terminated.sum()) > 25 and np.asarray(swapped).any() and not np.asarray(swapped).all()
    finished = np.asarray(returns)[np.asarray(done)]
    assert finished.max() <= 1.7 and finished.min() >= -50 * PEN - 1e-5


def test_scripted_colour_aware_policy_gets_about_1_7_and_the_wrong_colour_about_1_3():
    def episode(key, swapped, play_swapped):
        state, _ = reset(key)

        def body(carry, _):
            state, total, done = carry
            state, _, reward, terminated, truncated = step(state, scripted_policy(state, play_swapped), swapped)
            return (state, total + jnp.where(done, 0.0, reward), done | terminated | truncated), None

        return jax.lax.scan(body, (state, 0.0, False), None, length=50)[0][1]

    keys = jax.random.split(jax.random.PRNGKey(5), 300)
    run = jax.jit(jax.vmap(episode, in_axes=(0, None, None)))
    right, wrong = np.asarray(run(keys, True, True)), np.asarray(run(keys, True, False))
    # about 9.4 moves on average (two legs of mean Manhattan distance 4.7); a path that crosses the other key collects it
    assert 1.7 - 15 * PEN < right.mean() < 1.7 - 9 * PEN and right.max() <= 1.7 - 2 * PEN + 1e-6
    assert 1.3 - 15 * PEN < wrong.mean() < 1.3 - 5 * PEN and right.mean() - wrong.mean() > 0.3


def test_same_key_same_episode_and_different_keys_differ():
    def rollout(seed):
        state, obs = reset(jax.random.PRNGKey(seed))

        def body(state, key):
            state, obs, reward, terminated, truncated = step_autoreset(state, jax.random.randint(key, (), 0, 4))
            return state, (obs, reward, terminated)

        return jax.lax.scan(body, state, jax.random.split(jax.random.PRNGKey(123), 200))[1]

    run = jax.jit(rollout)
    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_plain_jit_and_vmap_agree():
    num_envs = 4
    states, _ = jax.vmap(reset)(jax.random.split(jax.random.PRNGKey(4), num_envs))
    actions, swapped = jnp.array([0, 1, 2, 3]), jnp.array([False, True, False, True])
    for _ in range(2):
        batched = jax.vmap(step_autoreset)(states, actions, swapped)
        for i in range(num_envs):
            one = jax.tree.map(lambda x: x[i], states)
            jitted = jax.jit(step_autoreset)(one, actions[i], swapped[i])
            plain = step_autoreset(one, actions[i], swapped[i])
            for b, j, p in zip(jax.tree.leaves(batched), jax.tree.leaves(jitted), jax.tree.leaves(plain)):
                np.testing.assert_array_equal(b[i], j)
                np.testing.assert_array_equal(j, p)
        states = batched[0]
        actions = (actions + 1) % 4


def test_vec_env_spaces_and_info():
    envs = make_vec_env(num_envs=3, seed=0)
    assert isinstance(envs, TwoColorsVecEnv) and envs.num_envs == 3
    assert envs.observation_space.shape == (OBS_SIZE,) and envs.observation_space.dtype == np.float32
    assert envs.action_space.n == 4
    obs, info = envs.reset()
    assert isinstance(obs, np.ndarray) and obs.shape == (3, OBS_SIZE) and obs.dtype == np.float32
    assert envs.observation_space.contains(obs[0]) and obs[:, -6:].min() < 0  # offsets are signed
    np.testing.assert_array_equal(info["env_id"], [0, 1, 2])
    np.testing.assert_array_equal(info["elapsed_step"], [0, 0, 0])
    obs, reward, terminated, truncated, info = envs.step(np.array([1, 2, 3]))
    assert obs.shape == (3, OBS_SIZE) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool
    assert info["reward"].dtype == np.float32 and info["elapsed_step"].dtype == np.int32
    assert info["terminated"].dtype == np.int32 and info["swapped"].dtype == bool
    np.testing.assert_array_equal(info["reward"], reward)


def test_vec_env_envpool_autoreset():
    """Done at step t: step t returns the final obs; step t + 1 ignores the action and returns a new episode's start."""
    envs = TwoColorsVecEnv(2, seed=0, counter=StepCounter())
    envs.reset()
    # env 0 opens the door with its next move (up); env 1 is one move from its key
    envs._state = stack(
        make_state(agent=(1, 6), keys=(None, None), goal=(0, 6), held=0, step_count=3),
        make_state(agent=(3, 3), keys=((2, 3), (6, 6)), goal=(0, 0)),
    )
    obs, reward, terminated, truncated, info = envs.step(np.array([UP, UP]))
    np.testing.assert_array_equal(terminated, [True, False])
    np.testing.assert_allclose(reward, [1.0 - PEN, 0.7 - PEN], atol=1e-6)
    np.testing.assert_array_equal(info["elapsed_step"], [4, 1])
    np.testing.assert_array_equal(info["terminated"], [1, 0])
    np.testing.assert_array_equal(obs[0], observe(make_state(agent=(0, 6), keys=(None, None), goal=(0, 6), held=0)))
    # the reset step: env 0 ignores its action, reward 0, not done, elapsed 0, both keys back; env 1 moves on
    obs, reward, terminated, truncated, info = envs.step(np.array([UP, DOWN]))
    assert reward[0] == 0.0 and not terminated[0] and not truncated[0] and info["elapsed_step"][0] == 0
    assert obs[0, -9:-6].tolist() == [1, 1, 1]
    assert reward[1] == pytest.approx(-PEN) and info["elapsed_step"][1] == 2
    _, _, _, _, info = envs.step(np.array([UP, DOWN]))
    assert info["elapsed_step"][0] == 1


def test_envpool_step_ignores_the_action_of_an_env_being_reset():
    state = make_state(agent=(3, 3), keys=((3, 4), (0, 0)), step_count=9)
    batch_step = _jitted_batch_functions(two_colors_jax.TOGGLE_PERIOD, PEN, 50)[1]  # what make_vec_env uses
    states, obs, reward, terminated, truncated, swapped = batch_step(
        stack(state, state), jnp.array([True, False]), jnp.array([RIGHT, RIGHT]), jnp.int32(0)
    )
    np.testing.assert_allclose(reward, [0.0, 0.7 - PEN], atol=1e-6)
    np.testing.assert_array_equal(states.step_count, [0, 10])
    np.testing.assert_array_equal(states.held, [-1, 0])
    assert not terminated.any() and not truncated.any()
    np.testing.assert_array_equal(obs[0], observe(jax.tree.map(lambda x: x[0], states)))


def test_vec_env_truncation_then_reset():
    envs = TwoColorsVecEnv(num_envs=5, seed=1, counter=StepCounter())
    envs.reset()
    rng = np.random.default_rng(0)
    for t in range(6):
        if t % 2 == 0:  # one move before the horizon (50) with no key held: the next move truncates
            envs._state = envs._state._replace(step_count=jnp.full(5, 49, jnp.int32))
        obs, reward, terminated, truncated, info = envs.step(rng.integers(0, 4, size=5))
        if t % 2 == 0:
            assert np.all(truncated) and not terminated.any()
            np.testing.assert_array_equal(info["elapsed_step"], 50)
        else:  # the reset step
            assert not terminated.any() and not truncated.any() and not reward.any()
            np.testing.assert_array_equal(info["elapsed_step"], 0)


def test_vec_env_is_deterministic_in_its_seed():
    def run(seed):
        envs = make_vec_env(num_envs=8, seed=seed, counter=StepCounter())
        out = [envs.reset()[0]]
        rng = np.random.default_rng(0)
        for _ in range(30):
            out.append(envs.step(rng.integers(0, 4, size=8))[0])
        return np.stack(out)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_qr_impala_smoke_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TWO_COLORS_TOGGLE_PERIOD", "100")  # several toggles inside the run
    flags = ["--env-id", "two_colors_jax", "--total-timesteps", "512", "--local-num-envs", "4", "--num-steps", "8"]
    result = run_script(tmp_path, *flags, "--log-frequency", "2", "--save-model", "--eval-episodes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(only_run_dir(tmp_path))
    assert "charts/episodic_return" in logged and np.all(np.isfinite(logged["charts/episodic_return"]))
    # an episode returns at most 1.7 and at least -T * r_pen
    assert max(logged["charts/episodic_return"]) <= 1.7 and min(logged["charts/episodic_return"]) >= -0.5 - 1e-5
    assert len(logged["eval/episodic_return"]) == 2


def test_figure_1_baselines_start_from_drmgs_eta():
    """benchmark/two_colors.py launches QR as DrMG({}) and MG with DrMG's initial gamma, lambda and loss weights; its
    check stops a comparison whose baselines start elsewhere."""
    import two_colors

    etas = two_colors.check_initial_eta(two_colors.Args())
    assert etas["qr"] == etas["drmg"]
    assert two_colors.command(two_colors.Args(), "qr", 1)[4].endswith("drmg.py")
    assert {k: v for k, v in etas["mg"].items() if k != "alpha"} == pytest.approx(
        {k: v for k, v in etas["drmg"].items() if k != "alpha"}, rel=1e-6
    )
    assert etas["drmg"]["lambda_"] == pytest.approx(0.99) and etas["drmg"]["w_pi"] == pytest.approx(0.99)
    with pytest.raises(SystemExit, match=r"qr does not start from DrMG's eta: lambda_ 1 \(DrMG 0.99\)"):
        two_colors.check_initial_eta(two_colors.Args(flags="--lambda_ 1.0", meta_flags="--lambda_ 0.99"))
