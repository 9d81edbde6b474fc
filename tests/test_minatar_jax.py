"""`minatar_jax`, gymnax's MinAtar games behind EnvPool's interface, against gymnax's own `env.step` driven one env at a
time by a plain loop that lays EnvPool's rule over it; deliberately broken rules must fail the same comparison."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_env_autoreset
import minatar_jax

NUM_ENVS, NUM_MOVES, LIMIT = 3, 200, 25  # a time limit of 25 moves, so that truncations happen among the moves


def oracle(env_id, seed, actions, max_steps_in_episode):
    """EnvPool's rule over gymnax's `env.reset` and `env.step`, one env at a time: per move and env (obs, reward,
    terminated, truncated, reset step), and each env's ended episodes as (return, length).

    Keys as minatar_jax documents them: env i starts from split(split(PRNGKey(seed))[1], B)[i] =: k, resets with
    split(k)[1] and keeps split(k)[0]; a move splits the env's key into (its next key, the key of `env.step`)."""
    env, params = minatar_jax.make_game(env_id, max_steps_in_episode)
    step, reset = jax.jit(env.step), jax.jit(env.reset)
    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(seed))[1], NUM_ENVS)
    envs = []
    for key in keys:
        key, reset_key = jax.random.split(key)
        envs.append(dict(key=key, state=reset(reset_key, params)[1], reset_next=False, ret=0.0, length=0, pending=None))
    moves, episodes = [], [[] for _ in range(NUM_ENVS)]
    for row in actions:
        outputs = []
        for i, e in enumerate(envs):
            if e["reset_next"]:
                obs, reward, terminated, truncated, was_reset = e["pending"], 0.0, False, False, True
            else:
                e["key"], step_key = jax.random.split(e["key"])
                obs_next, e["state"], reward, terminated, truncated, info = step(step_key, e["state"], int(row[i]), params)
                reward, terminated, truncated, was_reset = float(reward), bool(terminated), bool(truncated), False
                obs, e["pending"] = info["final_observation"], obs_next  # gymnax returns the new episode's first obs
                e["ret"], e["length"] = e["ret"] + reward, e["length"] + 1
                if terminated or truncated:
                    episodes[i].append((e["ret"], e["length"]))
                    e["ret"], e["length"] = 0.0, 0
            e["reset_next"] = terminated or truncated
            outputs.append((np.moveaxis(np.asarray(obs), -1, 0), reward, terminated, truncated, was_reset))
        moves.append(outputs)
    return moves, episodes


def adapter_outputs(env_id, seed, actions, max_steps_in_episode, rule=None):
    """The same moves through MinAtarVecEnv's numpy interface (or `rule` in place of EnvPool's), and each env's ended
    episodes as the IMPALA scripts' actors log them: returns summed until terminated | truncated, info["elapsed_step"]."""
    envs = minatar_jax.make_vec_env(env_id, NUM_ENVS, seed, max_steps_in_episode=max_steps_in_episode)
    if rule is not None:
        envs._step = jax.jit(partial(broken_batch_step, rule, env_id, max_steps_in_episode=max_steps_in_episode))
    obs, _ = envs.reset()
    returns, reset_next, moves, episodes = np.zeros(NUM_ENVS), np.zeros(NUM_ENVS, bool), [], [[] for _ in range(NUM_ENVS)]
    for row in actions:
        obs, reward, terminated, truncated, info = envs.step(row)
        moves.append([(obs[i], reward[i], terminated[i], truncated[i], reset_next[i]) for i in range(NUM_ENVS)])
        returns += reward
        done = terminated | truncated
        for i in np.flatnonzero(done):
            episodes[i].append((returns[i], info["elapsed_step"][i]))
        returns[done], reset_next = 0.0, done
    assert obs.shape == (NUM_ENVS,) + envs.observation_space.shape and obs.dtype == np.float32
    return moves, episodes


def broken_batch_step(rule, env_id, env_state, actions, max_steps_in_episode=0):
    games, obs, reward, terminated, truncated = rule(
        partial(minatar_jax.step_autoreset, env_id, max_steps_in_episode=max_steps_in_episode),
        partial(minatar_jax.observe, env_id, max_steps_in_episode=max_steps_in_episode),
        env_state.games,
        env_state.reset_now,
        actions,
    )
    elapsed = jnp.where(env_state.reset_now, 0, env_state.elapsed_step + 1)
    return minatar_jax.EnvState(games, terminated | truncated, elapsed), (obs, reward, terminated, truncated, elapsed)


def compare(env_id, seed=3, rule=None, max_steps_in_episode=LIMIT):
    num_actions = minatar_jax.make_game(env_id)[0].num_actions
    actions = np.random.default_rng(seed).integers(0, num_actions, size=(NUM_MOVES, NUM_ENVS)).astype(np.int32)
    expected, expected_episodes = oracle(env_id, seed, actions, max_steps_in_episode)
    got, got_episodes = adapter_outputs(env_id, seed, actions, max_steps_in_episode, rule)
    counts = np.zeros(4, int)
    for t, (row_expected, row_got) in enumerate(zip(expected, got)):
        for i, (ours, theirs) in enumerate(zip(row_got, row_expected)):
            for name, a, b in zip(("obs", "reward", "terminated", "truncated", "reset"), ours, theirs):
                np.testing.assert_array_equal(a, b, err_msg=f"{env_id}: {name} of move {t}, env {i}")
            counts += [theirs[1] != 0, theirs[2], theirs[3], theirs[4]]
    for i in range(NUM_ENVS):
        np.testing.assert_allclose(
            np.asarray(got_episodes[i]), np.asarray(expected_episodes[i]), err_msg=f"episodes of env {i}"
        )
    return counts


@pytest.mark.parametrize("env_id", minatar_jax.GAMES)
def test_adapter_is_gymnax_step_under_envpools_rule(env_id):
    rewards, terminations, truncations, resets = compare(env_id)
    assert truncations > 0 and resets > 0, (env_id, truncations, resets)
    if env_id != "Freeway-MinAtar":  # Freeway's episodes end only by the time limit; a crossing takes over 25 moves
        assert rewards > 0 and terminations > 0, (env_id, rewards, terminations)


def immediate_reset(step_autoreset, observe, states, reset_now, actions):
    """gymnax's own rule: the final move already shows the new episode; no reset steps."""
    stepped, _, reward, terminated, truncated = jax.vmap(step_autoreset)(states, actions)
    return stepped, jax.vmap(observe)(stepped), reward, terminated, truncated


def reset_step_moves(step_autoreset, observe, states, reset_now, actions):
    """The reset step moves the new episode instead of only showing it."""
    stepped, obs, reward, terminated, truncated = jax_env_autoreset.envpool_step_over_autoreset(
        step_autoreset, observe, states, jnp.zeros_like(reset_now), actions
    )
    return stepped, obs, jnp.where(reset_now, 0.0, reward), terminated & ~reset_now, truncated & ~reset_now


def truncation_as_termination(step_autoreset, observe, states, reset_now, actions):
    states, obs, reward, terminated, truncated = jax_env_autoreset.envpool_step_over_autoreset(
        step_autoreset, observe, states, reset_now, actions
    )
    return states, obs, reward, terminated | truncated, jnp.zeros_like(truncated)


@pytest.mark.parametrize("broken", [immediate_reset, reset_step_moves, truncation_as_termination])
def test_the_comparison_catches_a_broken_rule(broken):
    with pytest.raises(AssertionError):
        compare("Breakout-MinAtar", rule=broken)


def test_gymnax_default_time_limits_and_shapes():
    shapes = {g: minatar_jax.make_vec_env(g, 2, 0).observation_space.shape for g in minatar_jax.GAMES}
    assert shapes == {g: (c, 10, 10) for g, c in zip(minatar_jax.GAMES, (4, 6, 4, 7))}
    limits = [minatar_jax.make_game(g)[1].max_steps_in_episode for g in minatar_jax.GAMES]
    assert limits == [1000, 1000, 1000, 2500]
