"""`jax_env_autoreset`, the auto-reset rules of the JAX environments, against EnvPool's rule written as a plain loop over
single environments: on a toy environment (where deliberately broken rules must fail the comparison), and through
`snake_jax.envpool_step` and `two_colors_jax.envpool_step`."""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_env_autoreset
import snake_jax
import two_colors_jax

NUM_ENVS, NUM_MOVES = 8, 40


class Walk(NamedTuple):
    """A toy environment: a walk on the integers that terminates at |position| >= 3 and is truncated after 5 moves."""

    position: jax.Array
    step_count: jax.Array
    key: jax.Array


def walk_reset_state(key):
    return Walk(jax.random.randint(key, (), -2, 3), jnp.int32(0), jax.random.fold_in(key, 1))


def walk_step_state(state, action):
    """Actions 0, 1, 2 move by -1, 0, +1; the reward is the new position; the key changes at every move (as Snake's)."""
    position = state.position + action - 1
    terminated = jnp.abs(position) >= 3
    truncated = ~terminated & (state.step_count + 1 >= 5)
    return (
        Walk(position, state.step_count + 1, jax.random.fold_in(state.key, 0)),
        position.astype(jnp.float32),
        terminated,
        truncated,
    )


def walk_observe(state):
    return jnp.stack([state.position, state.step_count]).astype(jnp.float32)


def walk_step(state, action):
    state, reward, terminated, truncated = walk_step_state(state, action)
    return state, walk_observe(state), reward, terminated, truncated


def walk_reset(key):
    state = walk_reset_state(key)
    return state, walk_observe(state)


def envpool_oracle(step, reset, states, actions, step_args=()):
    """EnvPool's rule for one env at a time: after a move that ends the episode, the next call ignores the action and
    returns reset(state.key) with reward 0, not terminated, not truncated. Returns [(state, obs, reward, terminated,
    truncated) of every env] per move."""
    reset_next, moves = [False] * len(states), []
    for t, row in enumerate(actions):
        outputs = []
        for i, action in enumerate(row):
            if reset_next[i]:
                states[i], obs = reset(states[i].key)
                reward, terminated, truncated = 0.0, False, False
            else:
                states[i], obs, reward, terminated, truncated = step(states[i], action, *[a[t][i] for a in step_args])
            reset_next[i] = bool(terminated) or bool(truncated)
            outputs.append((states[i], obs, reward, terminated, truncated))
        moves.append(outputs)
    return moves


def assert_rule_is_envpools(batched_step, step, reset, states, actions, step_args=(), first_steps=None):
    """`batched_step(states, reset_now, actions[t])` (with `first_steps[t]` after them if given) over the moves equals
    the oracle; returns the counts of terminations, truncations and reset steps seen."""
    singles = [jax.tree.map(lambda x, i=i: x[i], jax.device_get(states)) for i in range(NUM_ENVS)]
    expected = envpool_oracle(step, reset, singles, actions, step_args)
    reset_now, counts = jnp.zeros(NUM_ENVS, bool), np.zeros(3, int)
    for t, row in enumerate(actions):
        extra = () if first_steps is None else (first_steps[t],)
        states, *out = batched_step(states, reset_now, jnp.asarray(row), *extra)
        got = jax.device_get((jax.tree.leaves(states), out))
        for i, (state_i, *out_i) in enumerate(jax.device_get(expected[t])):
            for ours, theirs in zip(jax.tree.leaves(state_i) + out_i, [x[i] for x in got[0] + got[1]], strict=True):
                np.testing.assert_array_equal(theirs, ours, err_msg=f"move {t}, env {i}")
        counts += [int(got[1][2].sum()), int(got[1][3].sum()), int(np.sum(reset_now))]
        reset_now = out[2] | out[3]
    return counts


def random_actions(num_actions, seed=1):
    return np.random.default_rng(seed).integers(0, num_actions, size=(NUM_MOVES, NUM_ENVS)).astype(np.int32)


def walk_case(rule):
    states = jax.vmap(walk_reset_state)(jax.random.split(jax.random.PRNGKey(0), NUM_ENVS))
    batched = jax.jit(partial(rule, walk_step_state, walk_reset_state, walk_observe))
    return assert_rule_is_envpools(batched, jax.jit(walk_step), jax.jit(walk_reset), states, random_actions(3))


def test_envpool_step_is_envpools_rule_on_a_toy_environment():
    assert np.all(walk_case(jax_env_autoreset.envpool_step) > 10)  # terminations, truncations and reset steps happened


def immediate_reset(step_state, reset_state, observe, states, reset_now, actions):
    """Jumanji / gymnax: the final move already returns the new episode; no reset steps."""
    out = jax.vmap(lambda s, a: step_state(s, a))(states, actions)
    states = jax_env_autoreset.where_tree(out[2] | out[3], jax.vmap(reset_state)(states.key), out[0])
    return states, jax.vmap(observe)(states), *out[1:]


def reset_step_keeps_the_reward(step_state, reset_state, observe, states, reset_now, actions):
    states_, obs, _, terminated, truncated = jax_env_autoreset.envpool_step(
        step_state, reset_state, observe, states, reset_now, actions
    )
    return states_, obs, jax.vmap(step_state)(states, actions)[1], terminated, truncated


def reset_from_the_moved_key(step_state, reset_state, observe, states, reset_now, actions):
    moved_keys = jax.vmap(step_state)(states, actions)[0].key
    return jax_env_autoreset.envpool_step(
        step_state, reset_state, observe, states._replace(key=moved_keys), reset_now, actions
    )


def reset_step_reports_the_end(step_state, reset_state, observe, states, reset_now, actions):
    out = jax_env_autoreset.envpool_step(step_state, reset_state, observe, states, reset_now, actions)
    moved = jax.vmap(step_state)(states, actions)
    return *out[:3], moved[2], moved[3]


@pytest.mark.parametrize(
    "broken", [immediate_reset, reset_step_keeps_the_reward, reset_from_the_moved_key, reset_step_reports_the_end]
)
def test_the_oracle_catches_a_broken_rule(broken):
    with pytest.raises(AssertionError):
        walk_case(broken)


def test_where_tree_selects_whole_states_for_a_scalar_or_a_batch_mask():
    a = Walk(jnp.arange(3), jnp.zeros(3, jnp.int32), jnp.ones((3, 2), jnp.uint32))
    b = Walk(-jnp.arange(3), jnp.ones(3, jnp.int32), jnp.zeros((3, 2), jnp.uint32))
    picked = jax_env_autoreset.where_tree(jnp.array([True, False, True]), a, b)
    np.testing.assert_array_equal(picked.position, [0, -1, 2])
    np.testing.assert_array_equal(picked.key, [[1, 1], [0, 0], [1, 1]])
    one = jax.tree.map(lambda x: x[1], (a, b))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, jax_env_autoreset.where_tree(jnp.bool_(True), *one), one[0]))


def test_snake_envpool_step_is_envpools_rule():
    board, limit = 5, 12
    states = jax.vmap(partial(snake_jax.reset_state, board_size=board))(jax.random.split(jax.random.PRNGKey(0), NUM_ENVS))
    counts = assert_rule_is_envpools(
        jax.jit(partial(snake_jax.envpool_step, max_episode_steps=limit)),
        jax.jit(partial(snake_jax.step, max_episode_steps=limit)),
        jax.jit(partial(snake_jax.reset, board_size=board)),
        states,
        random_actions(snake_jax.NUM_ACTIONS),
    )
    assert np.all(counts > 3), counts


def test_two_colors_envpool_step_is_envpools_rule_with_the_toggle_inside_a_batch():
    toggle, limit = 3, 6
    states = jax.vmap(two_colors_jax.reset_state)(jax.random.split(jax.random.PRNGKey(0), NUM_ENVS))
    first_steps = [jnp.int32(t * NUM_ENVS % (2 * toggle)) for t in range(NUM_MOVES)]
    swapped = [np.asarray(two_colors_jax.is_swapped(int(f) + np.arange(NUM_ENVS), toggle)) for f in first_steps]
    batched = jax.jit(partial(two_colors_jax.envpool_step, toggle_period=toggle, step_penalty=0.01, max_episode_steps=limit))
    counts = assert_rule_is_envpools(
        lambda *a: batched(*a)[:5],
        jax.jit(partial(two_colors_jax.step, step_penalty=0.01, max_episode_steps=limit)),
        jax.jit(two_colors_jax.reset),
        states,
        random_actions(two_colors_jax.NUM_ACTIONS),
        step_args=(swapped,),
        first_steps=first_steps,
    )
    assert counts[1] > 3 and counts[2] > 3, counts  # truncations and reset steps (terminations are rare at random)
