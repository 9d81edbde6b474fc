"""Episode boundaries, pinned with oracles that do not reuse the scripts' masking.

- The loss of each IMPALA-family script on a batch with terminations, a truncation and EnvPool reset steps inside the
  unroll equals the loss of the episodes cut apart by hand: each piece is evaluated as its own boundary-free rollout (a
  reset step is dropped; a truncated piece ends with its final observation, from which the unroll bootstraps; a
  terminated piece keeps its termination flag, the one flag the oracle shares with the scripts). Deliberately broken
  copies of the scripts (reset steps counted as transitions, truncations ignored) must fail it.
- The actor threads' bookkeeping with a scripted environment: resets, terminations, truncations, rewards, observations and
  every episode's return and length, logged by every actor thread at the episode's own global step, by hand.
- mix_metagrad.py's Snake rollouts against EnvPool's rule and its episode bookkeeping, one game at a time in plain Python.
"""

import os
import queue
import sys
import threading
import types
from collections import deque
from functools import partial
from types import SimpleNamespace

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mix_metagrad
import snake_jax
from helpers import IMPALA_FAMILY as MODULES
from helpers import ROOT
from learner_setup import learner, script_args

T, B, OBS_DIM, NUM_ACTIONS = 12, 2, 6, 3
# (env, first step, last step, how the piece ends); steps not in a piece are EnvPool reset steps (env 0: 4 and 9, env 1: 0)
PIECES = [(0, 0, 3, "terminated"), (0, 5, 8, "truncated"), (0, 10, 11, "open"), (1, 1, 11, "terminated")]


def batch(module, seed=0):
    rng = np.random.default_rng(seed)
    flags = np.zeros((3, T, B), np.float32)  # terminations, truncations, resets
    flags[0, 3, 0] = flags[0, 11, 1] = 1.0
    flags[1, 8, 0] = 1.0
    flags[2, [4, 9], 0] = flags[2, 0, 1] = 1.0
    rewards = rng.uniform(-1, 1, (T, B)).astype(np.float32) * (1 - flags[2])  # a reset step has no reward
    return module.Rollout(
        obs=jnp.asarray(rng.normal(size=(T + 1, B, OBS_DIM)).astype(np.float32)),
        actions=jnp.asarray(rng.integers(0, NUM_ACTIONS, (T, B))),
        behaviour_logits=jnp.asarray(rng.normal(size=(T, B, NUM_ACTIONS)).astype(np.float32)),
        rewards=jnp.asarray(rewards),
        terminations=jnp.asarray(flags[0]),
        truncations=jnp.asarray(flags[1]),
        resets=jnp.asarray(flags[2]),
    )


def piece(rollout, env, first, last, end):
    """Steps first..last of one env as a rollout of its own, bootstrapping from observation last + 1."""
    steps = slice(first, last + 1)
    zeros = jnp.zeros((last + 1 - first, 1))
    return type(rollout)(
        obs=rollout.obs[first : last + 2, env : env + 1],
        actions=rollout.actions[steps, env : env + 1],
        behaviour_logits=rollout.behaviour_logits[steps, env : env + 1],
        rewards=rollout.rewards[steps, env : env + 1],
        terminations=zeros.at[-1].set(1.0) if end == "terminated" else zeros,
        truncations=zeros,
        resets=zeros,
    )


def loss_functions(name, module):
    """{what: loss(rollout)} of a script's impala_loss (`module` may be a broken copy), with parameters and eta of
    the real script; eta's logits are perturbed so that the entries of per-quantile and per-head eta differ."""
    overrides = dict(num_quantiles=4) if name in ("qr_impala", "drmg") else {}
    args = script_args(name, "CartPole-v1", local_num_envs=B, num_actor_threads=1, num_steps=T, **overrides)
    space = SimpleNamespace(shape=(OBS_DIM,), dtype=np.dtype(np.float32))
    _, learner_state, _ = learner(name, args, space, NUM_ACTIONS)
    state = learner_state["agent"]
    if name == "qr_impala":
        return {"loss": lambda r: module.impala_loss(state.params, state.apply_fn, r, module.hyperparameters(args), args)[0]}
    rng = np.random.default_rng(1)
    logits = jax.tree.map(lambda x: x + rng.normal(scale=0.5, size=np.shape(x)).astype(np.float32), learner_state["meta"].params)
    etas = {"inner": module.hyperparameters(logits, args), "outer": module.reference_hyperparameters(args)}
    heads = {"inner": args.num_heads, "outer": 1} if name == "stacx" else {}  # stacx's outer loss: the main head
    extra = {what: [0] if name == "drmg" else [heads[what]] if name == "stacx" else [] for what in etas}
    functions = {
        f"{what} loss": partial(
            lambda eta, more, r: module.impala_loss(state.params, state.apply_fn, r, eta, args, *more)[0], eta, extra[what]
        )
        for what, eta in etas.items()
    }
    if name == "drmg":  # the n-step return ablation cuts its returns at the boundaries too
        functions["3-step inner loss"] = lambda r: module.impala_loss(state.params, state.apply_fn, r, etas["inner"], args, 3)[
            0
        ]
    return functions


def boundary_gaps(name, module):
    """{what: |loss of the batch - loss of its pieces|}; the losses are means over all T x B entries."""
    rollout = batch(MODULES[name])
    gaps = {}
    for what, loss in loss_functions(name, module).items():
        loss = jax.jit(loss)
        pieces = sum(loss(piece(rollout, *p)) * (p[2] + 1 - p[1]) for p in PIECES) / (T * B)
        gaps[what] = abs(float(loss(rollout)) - float(pieces)) / max(abs(float(pieces)), 1e-3)
    return gaps


@pytest.mark.parametrize("name", MODULES)
def test_the_loss_of_a_batch_is_the_loss_of_its_episodes_cut_apart(name):
    gaps = boundary_gaps(name, MODULES[name])
    assert max(gaps.values()) < 1e-5, gaps


BROKEN = {
    "reset steps counted": [("valid = 1.0 - rollout.resets", "valid = jnp.ones_like(rollout.resets)")],
    "truncations ignored": [("trace_masks = 1.0 - rollout.truncations", "trace_masks = jnp.ones_like(rollout.truncations)")],
}
BROKEN["both"] = BROKEN["reset steps counted"] + BROKEN["truncations ignored"]  # the mutant of issue 14


def broken_copy(name, replacements, monkeypatch):
    """The script's module, executed from its source with `replacements` made."""
    path = os.path.join(ROOT, f"{name}.py")
    with open(path) as f:
        source = f.read()
    for old, new in replacements:
        assert old in source, old
        source = source.replace(old, new)
    module = types.ModuleType(f"{name}_broken")
    module.__file__ = path
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source, path, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("breakage", BROKEN)
def test_the_boundary_test_catches_a_script_that_ignores_the_boundaries(name, breakage, monkeypatch):
    gaps = boundary_gaps(name, broken_copy(name, BROKEN[breakage], monkeypatch))
    assert min(gaps.values()) > 1e-3, gaps


# ---------------------------------------------------------------------------------------------------------------------
# The actors' bookkeeping


class ScriptedVecEnv:
    """Envs `first`, ... of two with EnvPool's auto-reset rule: env 0 terminates after 3 moves, env 1 is truncated after
    4. The k-th move of an episode gives reward k; the observation is (env, moves so far in the episode, episode
    number, 0)."""

    def __init__(self, num_envs, first):
        assert 0 <= first and first + num_envs <= 2
        self.num_envs, self.ids = num_envs, np.arange(first, first + num_envs)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.lengths, self.moves, self.episodes = np.array([3, 4])[self.ids], np.zeros(num_envs, int), np.zeros(num_envs, int)
        self.reset_now = np.zeros(num_envs, bool)

    def observe(self):
        return np.stack([self.ids, self.moves, self.episodes, np.zeros(self.num_envs)], axis=1).astype(np.float32)

    def reset(self):
        return self.observe(), {}

    def step(self, actions):
        n = self.num_envs
        reward, terminated, truncated = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        for i in range(n):
            if self.reset_now[i]:  # the action is ignored; the new episode's first observation
                self.moves[i], self.episodes[i] = 0, self.episodes[i] + 1
                continue
            self.moves[i] += 1
            reward[i] = self.moves[i]
            if self.moves[i] == self.lengths[i]:
                (terminated if self.ids[i] == 0 else truncated)[i] = True
        self.reset_now = terminated | truncated
        return self.observe(), reward, terminated, truncated, {"elapsed_step": self.moves.copy()}


class Recorder:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("thread,overlap", [(0, False), (1, False), (1, True)])
def test_the_actor_records_episode_ends_and_logs_every_episode_exactly(name, thread, overlap, monkeypatch):
    """Actor thread `thread` of two: what it records, and every episode it ends logged at that episode's global step;
    with --overlap-envs, its two envs in two vector envs of one each."""
    module = MODULES[name]
    args = module.Args(env_id="scripted_jax", local_num_envs=2, num_actor_threads=2, num_steps=6, overlap_envs=overlap)
    # the thread's envs, in one vector env or in two of one env each (seeds: the thread's, + 1 for the second)
    scripted = SimpleNamespace(make_vec_env=lambda num_envs, seed: ScriptedVecEnv(num_envs, seed - args.seed - thread))
    monkeypatch.setitem(sys.modules, "scripted_jax", scripted)
    args.num_updates, args.world_size = 2, 1
    space = SimpleNamespace(shape=(4,), dtype=np.dtype(np.float32))
    rollout_queue, writer, returns = run_actor(module, args, space, NUM_ACTIONS, thread, jax.random.PRNGKey(0))
    # each env step of this thread is one step of the 2 envs of each of the 2 threads: 4 global steps
    (step_1, first), (step_2, second) = rollout_queue.get(), rollout_queue.get()
    assert (step_1, step_2) == (24, 48)
    got = {k: np.concatenate([np.asarray(first[k][0]), np.asarray(second[k][0])]) for k in first if k != "obs"}
    # [env 0 over steps 0..11, env 1 over steps 0..11], by hand from the script of the environments above
    expected = dict(
        resets=[[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]],
        terminations=[[0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0], [0] * 12],
        truncations=[[0] * 12, [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]],
        rewards=[[1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0], [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]],
    )
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].T, value, err_msg=key)
    # moves so far at each stored observation: a reset step stores the final observation of the episode it ends
    moves = [[0, 1, 2, 3, 0, 1, 2], [2, 3, 0, 1, 2, 3, 0]], [[0, 1, 2, 3, 4, 0, 1], [1, 2, 3, 4, 0, 1, 2]]
    for env in range(2):
        for k, shards in enumerate([first, second]):
            np.testing.assert_array_equal(np.asarray(shards["obs"][0])[:, env, 1], moves[env][k], err_msg=f"env {env}")
    # episodes end at env steps 2 (env 0: return 1 + 2 + 3, 3 moves), 3 (env 1: 1 + 2 + 3 + 4, 4 moves), 6, 8 and 10;
    # the episode that ends at env step t is logged at global step 4 (t + 1)
    assert writer.scalars["charts/episodic_return"] == [(12, 6.0), (16, 10.0), (28, 6.0), (36, 10.0), (44, 6.0)]
    assert writer.scalars["charts/episodic_length"] == [(12, 3.0), (16, 4.0), (28, 3.0), (36, 4.0), (44, 3.0)]
    assert list(returns) == [6.0, 10.0, 6.0, 10.0, 6.0]
    last100 = writer.scalars.get("charts/avg_episodic_return_last100", [])
    assert last100 == ([(24, 8.0), (48, pytest.approx(7.6))] if thread == 0 else [])


def test_the_two_envpools_of_overlap_envs_are_the_envs_of_one_envpool():
    """--overlap-envs: each half's EnvPool is seeded so that its envs are those of one EnvPool of all of them (the same
    first observations, and after the same actions the same ones)."""
    module = MODULES["qr_impala"]
    space = SimpleNamespace(shape=(4,), dtype=np.dtype(np.float32))
    first_obs = []
    for overlap in (False, True):
        args = module.Args(env_id="CartPole-v1", local_num_envs=5, num_actor_threads=1, num_steps=3, overlap_envs=overlap)
        args.num_updates, args.world_size = 2, 1
        rollout_queue, _, _ = run_actor(module, args, space, 2, 0, jax.random.PRNGKey(0))
        first_obs.append(np.asarray(rollout_queue.get()[1]["obs"][0])[0])
    assert first_obs[0].shape == (5, 4) and len(np.unique(first_obs[0][:, 0])) == 5
    np.testing.assert_array_equal(first_obs[0], first_obs[1])


# ---------------------------------------------------------------------------------------------------------------------
# mix_metagrad.py's Snake rollouts


def mix_rollout_oracle(state, obs, actions, board, limit):
    """One game under EnvPool's rule, in plain Python from snake_jax's `step` and `reset`: after the move that ends an
    episode, the next step ignores its action and restarts the game (reward 0, a reset step, no move counted).
    Returns the observations before every step and after the last, rewards, terminations, truncations, reset steps,
    the final state and the (return, length) of every finished episode."""
    out = dict(obs=[obs], rewards=[], terminations=[], truncations=[], resets=[], episodes=[])
    reset_next, episode_return, episode_length = False, 0.0, 0
    step, reset = jax.jit(snake_jax.step, static_argnums=2), jax.jit(snake_jax.reset, static_argnums=1)
    for action in actions:
        out["resets"].append(reset_next)
        if reset_next:
            state, obs = reset(state.key, board)
            reward, terminated, truncated = 0.0, False, False
        else:
            state, obs, reward, terminated, truncated = step(state, action, limit)
            episode_length += 1
        episode_return += float(reward)
        reset_next = bool(terminated) or bool(truncated)
        if reset_next:
            out["episodes"].append((episode_return, episode_length))
            episode_return, episode_length = 0.0, 0
        for name, value in zip(("obs", "rewards", "terminations", "truncations"), (obs, reward, terminated, truncated)):
            out[name].append(value)
    return out, state


def immediate_reset(states, reset_now, actions, max_episode_steps):
    """A broken rule for mix_metagrad to use: the final move already restarts the game (no reset steps)."""
    return jax.vmap(partial(snake_jax.step_autoreset, max_episode_steps=max_episode_steps))(states, actions)


@pytest.mark.parametrize("broken", [False, True])
def test_mix_metagrad_snake_rollouts_follow_envpools_rule(broken, monkeypatch):
    """Two chained rollouts of 30 moves of 8 random games on a 5 x 5 board with a 12-move time limit: every observation,
    reward, end and reset step, the games' states and the episode statistics agree with the oracle, across
    terminations, truncations and reset steps; a rollout built on the immediate auto-reset rule fails the comparison."""
    num_envs, board, limit, num_steps = 8, 5, 12, 30
    if broken:
        monkeypatch.setattr(mix_metagrad.snake_jax, "envpool_step", immediate_reset)
    uniform = lambda params, obs: (jnp.zeros((obs.shape[0], snake_jax.NUM_ACTIONS)), jnp.zeros(obs.shape[0]))
    collect = jax.jit(partial(mix_metagrad.collect_snake, None, uniform, num_steps=num_steps, max_episode_steps=limit))
    carry = mix_metagrad.snake_reset(jax.random.PRNGKey(0), num_envs, board)
    start = jax.device_get((carry.state, carry.obs))
    rollouts, stats = [], np.zeros(3)
    for _ in range(2):
        rollout, carry, rollout_stats = collect(carry)
        rollouts.append(jax.device_get(rollout))
        stats += jax.device_get(rollout_stats)
    actions = np.concatenate([r.actions for r in rollouts])
    episodes, counts = [], np.zeros(3, int)
    try:
        for i in range(num_envs):
            single = lambda tree: jax.tree.map(lambda x: x[i], tree)
            expected, final_state = mix_rollout_oracle(*single(start), actions[:, i], board, limit)
            for k, r in enumerate(rollouts):
                steps = slice(k * num_steps, (k + 1) * num_steps)
                np.testing.assert_array_equal(r.obs[:, i], expected["obs"][k * num_steps : (k + 1) * num_steps + 1])
                for name in ("rewards", "terminations", "truncations", "resets"):
                    np.testing.assert_array_equal(getattr(r, name)[:, i], np.float32(expected[name][steps]), err_msg=name)
            jax.tree.map(np.testing.assert_array_equal, single(jax.device_get(carry.state)), jax.device_get(final_state))
            episodes += expected["episodes"]
            counts += [sum(expected["terminations"]), sum(expected["truncations"]), sum(expected["resets"])]
        np.testing.assert_allclose(stats, [sum(r for r, _ in episodes), sum(n for _, n in episodes), len(episodes)], rtol=1e-6)
    except AssertionError:
        assert broken
        return
    assert not broken, "the oracle missed a rollout without reset steps"
    assert np.all(counts > 5), counts  # terminations, truncations and reset steps all happened


def run_actor(module, args, observation_space, num_actions, thread, key):
    """Run actor thread `thread` of `module` to its last update (args.num_updates) with the network's initial policy:
    (its rollout queue, what it logged, the episode returns it kept)."""
    _, learner_state, _ = learner(module.__name__, args, observation_space, num_actions)
    inputs = module.policy_inputs(learner_state, args)
    rollout_queue, policy_queue, writer, returns = queue.Queue(), queue.Queue(), Recorder(), deque(maxlen=100)
    for _ in range(args.num_updates - 1):  # every update but the second takes a policy (Cleanba's rule)
        policy_queue.put(inputs)
    device = jax.devices()[0]
    doing = ["starting"] * args.num_actor_threads
    module.actor_loop(key, args, rollout_queue, policy_queue, writer, [device], thread, device, (0, 0), returns,
                      threading.Event(), doing)  # fmt: skip
    return rollout_queue, writer, returns
