"""The auto-reset rules of the pure JAX environments (`snake_jax.py`, `two_colors_jax.py`), written once.

An environment module gives pure functions `step_state(state, action, ...) -> (state, reward, terminated, truncated)`,
`reset_state(key) -> state` and `observe(state) -> obs`; every state carries its PRNG key as `state.key`, and a new
episode is always drawn from the key of the state the environment was in, `reset_state(state.key)`.

- Immediate auto-reset (the Jumanji / gymnax convention, the environments' `step_autoreset`): the move that ends an
  episode reports its reward, terminated and truncated, and returns the first state of the new episode. `where_tree`.
- EnvPool's rule (`envpool.make(..., env_type="gym")`, the environments' `envpool_step` and vector envs): the move that
  ends an episode returns its final state (from which a truncated episode bootstraps); at the next step that env
  ignores its action and restarts: the new episode's first state, reward 0, terminated and truncated False. The
  caller carries `reset_now = terminated | truncated` from one step to the next. `envpool_step`.
- EnvPool's rule over a library's immediate auto-reset (gymnax's `env.step`, which `minatar_jax.py` wraps): the move
  that ends an episode reports the final observation and keeps the new episode the library already drew; the next
  step shows that episode's first observation without moving. `envpool_step_over_autoreset`.
"""

import jax
import jax.numpy as jnp


def where_tree(mask: jax.Array, on_true, on_false):
    """`jnp.where(mask, on_true, on_false)` on every leaf of two states; `mask` is a scalar or indexes the leaves' leading
    axes (a batch of states: shape [B])."""
    return jax.tree.map(
        lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b), on_true, on_false
    )


def envpool_step(step_state, reset_state, observe, states, reset_now: jax.Array, actions: jax.Array, *step_args):
    """One batched move under EnvPool's rule: (states, obs, reward, terminated, truncated), each with leading axis B.

    Args:
        step_state, reset_state, observe: the environment's pure functions for one env (vmapped here); bind static
            settings (time limit, board size, ...) with `functools.partial` first.
        states: the batch of states, leading axis B.
        reset_now: [B] bool, the env's episode ended at the previous step: this step restarts it.
        actions: [B]; ignored where `reset_now`.
        *step_args: more per-env inputs of `step_state`, leading axis B (two_colors_jax's `swapped`).
    Returns:
        The envs that restart: the state and observation of `reset_state(state.key)`, reward 0, terminated and
        truncated False. The others: the move's state (its final one if the move ends the episode), observation,
        reward, terminated and truncated.
    """
    stepped, reward, terminated, truncated = jax.vmap(step_state)(states, actions, *step_args)
    states = where_tree(reset_now, jax.vmap(reset_state)(states.key), stepped)
    reward = jnp.where(reset_now, 0.0, reward)
    return states, jax.vmap(observe)(states), reward, terminated & ~reset_now, truncated & ~reset_now


def envpool_step_over_autoreset(step_autoreset, observe, states, reset_now: jax.Array, actions: jax.Array):
    """`envpool_step`'s rule for an environment whose own step resets at once (gymnax, Jumanji), left unchanged.

    Args:
        step_autoreset: one env's `(state, action) -> (state, final_obs, reward, terminated, truncated)` with immediate
            auto-reset: where the move ends the episode, `state` is already the new episode's first state and
            `final_obs` the ended episode's last observation (else `final_obs` is `observe(state)`). Vmapped here.
        observe: one env's `state -> obs`.
        states, reset_now, actions: as `envpool_step`.
    Returns:
        (states, obs, reward, terminated, truncated), leading axis B. The envs that restart keep their state (the new
        episode, already drawn) and show its first observation, reward 0, terminated and truncated False; the others
        move and show the move's observation: the final one where the move ends the episode.
    """
    stepped, final_obs, reward, terminated, truncated = jax.vmap(step_autoreset)(states, actions)
    states = where_tree(reset_now, states, stepped)
    obs = where_tree(reset_now, jax.vmap(observe)(states), final_obs)
    reward = jnp.where(reset_now, 0.0, reward)
    return states, obs, reward, terminated & ~reset_now, truncated & ~reset_now
