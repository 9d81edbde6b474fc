"""n-step and kappa-mixed meta-gradients for A2C (Bonnet et al., "One Step at a Time", arXiv 2111.00206).

A2C whose hyperparameters eta = {gamma, lambda, c_crit, c_entr} are meta-learnt. At every update, from theta_t, n inner
updates with the same eta_t, each on a fresh rollout collected with the current inner parameters (eq. 5); the outer
loss (policy gradient with fixed gamma', lambda') at theta_t^(n) gives the n-step meta-gradient, or, with --mix, the
kappa-weighted mixture of the outer losses at theta_t^(1), ..., theta_t^(n) gives the mixed one (eq. 10). theta_{t+1} =
theta_t^(1): the agent's own update never changes, only the meta-gradient does. --inner-steps 0 is A2C with fixed eta.

The environment is Snake in pure JAX (`snake_jax`, the paper's 12 x 12 game), so the whole run is jitted: rollouts,
inner updates and meta-updates sit in a `lax.scan`, and the look-ahead rollouts step a copy of the environment state (a
pure value), chained: tau^(j+1) starts where tau^(j) stopped; the real environments then continue from where the real
rollout tau^(0) stopped.

    python mix_metagrad.py --inner-steps 3                          # 3-step meta-gradient on Snake
    python mix_metagrad.py --inner-steps 5 --mix                    # 5-mix, kappa = 1 - 1/5 (eq. 10)
    python mix_metagrad.py --inner-steps 0                          # baseline: fixed hyperparameters
    python mix_metagrad.py --inner-steps 1 --variance-points 10     # + meta-gradient std of every estimator (Table 1)
"""

import atexit
import hashlib
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Callable, List, NamedTuple, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from tensorboardX import SummaryWriter

import snake_jax


# =====================================================================================================================
# FLAGS: the experiment's settings.
# =====================================================================================================================


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    track: bool = False
    """track the run with Weights & Biases (pip install wandb): the TensorBoard scalars, the flags and this file"""
    wandb_project_name: str = "metagrad-jax"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user)"""
    save_model: bool = False
    """kept for CleanRL's users: the checkpoint `runs/{run_name}/{exp_name}.flax_model` is always saved"""
    save_every: int = 1000
    """write the checkpoint after the chunk that reaches every this many updates (0: only at the end and when stopped)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint: its run directory, flags (bar the budget and logging), states and step"""
    log_frequency: int = 50
    """updates per jitted chunk of the training scan; progress is printed and logged after each chunk"""

    # Environment
    env_id: str = "snake_jax"
    """the environment: `snake_jax` only (the look-ahead rollouts step copies of its pure JAX state)"""
    board_size: int = 12
    """side of the board (Bonnet et al. App. B.2: 12)"""
    max_episode_steps: int = 5000
    """episodes are truncated after this many moves (App. B.2: 5000)"""

    # Algorithm (Bonnet et al. Table 2, Snake column)
    total_timesteps: int = 20_000_000
    """agent steps of the real rollouts (paper: not given; our choice)"""
    learning_rate: float = 6e-4
    """Adam learning rate alpha of the inner update"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    num_envs: int = 32
    """parallel environments: the batch size (and the meta batch size) of Table 2"""
    num_steps: int = 20
    """unroll length of a rollout (paper: not given; our choice)"""
    gamma: float = 0.99
    """initial discount factor gamma"""
    lambda_: float = 0.99
    """initial lambda of the lambda-return"""
    crit_coef: float = 0.5
    """initial critic loss weight c_crit"""
    ent_coef: float = 0.01
    """initial entropy bonus weight c_entr"""
    max_grad_norm: float = 10.0
    """clip the inner gradient to this global norm"""
    adam_eps: float = 1e-8
    """epsilon of Adam (outside the square root)"""
    adam_eps_root: float = 1e-8
    """epsilon of Adam inside the square root: keeps the meta-gradient through Adam finite (must be > 0)"""

    # Meta-gradient
    inner_steps: int = 1
    """n, the inner updates the meta-gradient looks ahead through (eq. 5); 0: fixed hyperparameters (the baseline)"""
    mix: bool = False
    """mix the i-step meta-gradients, i = 1..n, with weights kappa^(i-1) (eq. 10)"""
    kappa: Optional[float] = None
    """kappa of eq. 10 in [0, 1]; default: (1 - kappa)^-1 = n"""
    outer_gamma: float = 0.99
    """gamma' of the outer loss"""
    outer_lambda: float = 0.99
    """lambda' of the outer loss"""
    meta_learning_rate: float = 1e-3
    """Adam learning rate beta of the meta-parameter logits"""
    meta_grad_clip: float = 0.1
    """clip the meta-gradient to this global norm"""

    # Variance mode (Table 1, second row)
    variance_points: int = 0
    """K: points, evenly spread after the first log-frequency updates up to the end, at which the meta-gradient std of
    every estimator is measured (0: off)"""
    variance_samples: int = 96
    """M: meta-gradients per point and estimator (paper: 96 at 300 points)"""
    variance_batch: int = 1
    """meta-gradients computed at once (vmapped) while measuring the variance: each chain has its own parameters, so
    vmapping turns the convolutions into grouped ones, very slow on CPU; raise it on a GPU"""
    variance_nstep: List[int] = field(default_factory=lambda: [1, 3, 5, 10])
    """n-step estimators whose std is measured (Table 1); 1 must be among them (the normaliser)"""
    variance_mix: List[int] = field(default_factory=lambda: [3, 5])
    """n-mix estimators (eq. 10, kappa = 1 - 1/n) whose std is measured (Table 1)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch of one rollout (envs x steps)"""
    num_updates: int = 0
    """the number of updates of theta"""


# =====================================================================================================================
# ALGO LOGIC: the network, the lambda-return and A2C loss, eta, the n-step and mixed meta-gradients.
# =====================================================================================================================


def max_pool_2x2(x):
    """Max-pool, window and stride 2 ("SAME": odd sides padded), as a reshape and a max: on CPU its gradient costs about
    half of `nn.max_pool`'s (XLA's select-and-scatter)."""
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Torso(nn.Module):
    """Paper 003 App. C.3 for images (C, H, W): 2 x (conv 3x3 stride 1, 32 maps + max-pool 2), Dense 40; a 2-layer MLP
    of width 40 for vector observations (the tests' small problems)."""

    @nn.compact
    def __call__(self, x):
        if x.ndim == 4:
            x = jnp.transpose(x, (0, 2, 3, 1))
            for _ in range(2):
                x = nn.relu(nn.Conv(32, kernel_size=(3, 3), strides=(1, 1), padding="SAME")(x))
                x = max_pool_2x2(x)
            x = x.reshape((x.shape[0], -1))
        else:
            x = nn.relu(nn.Dense(40)(x))
        return nn.relu(nn.Dense(40)(x))


class AgentNetwork(nn.Module):
    """Actor head MLP(30, A) and critic head MLP(30, 1) on a shared torso (App. C.3)."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        hidden = Torso()(obs)
        logits = nn.Dense(self.num_actions)(nn.relu(nn.Dense(30)(hidden)))
        value = nn.Dense(1)(nn.relu(nn.Dense(30)(hidden)))[..., 0]
        return logits, value


class Rollout(NamedTuple):
    """Time-major unroll of T steps; `obs` has T + 1 entries, the last one for bootstrapping. EnvPool's auto-reset rule
    (`snake_jax.envpool_step`): the step at which an episode ends returns its final observation, the next step is a
    reset step (no transition)."""

    obs: jnp.ndarray  # [T + 1, B, ...]
    actions: jnp.ndarray  # [T, B]
    rewards: jnp.ndarray  # [T, B], unclipped
    terminations: jnp.ndarray  # [T, B], the episode terminated at this step
    truncations: jnp.ndarray  # [T, B], the episode was cut by the time limit at this step
    resets: jnp.ndarray  # [T, B], the env restarted at this step: no real transition, the action was ignored


def lambda_returns(values, bootstrap_value, rewards, discounts, trace_masks, gamma, lambda_):
    """TD(lambda) returns G_t = r_t + gamma d_t [(1 - lambda m_t) V(S_t+1) + lambda m_t G_t+1] (Bonnet et al. App. C.2).

    values V(S_t): [T, B]; bootstrap_value V(S_T): [B]; rewards, discounts d_t (0 where the episode terminates at t),
    trace_masks m_t (0 where the traces must stop at t: a truncation, bootstrap from V(S_t+1) alone): [T, B].
    The caller passes values that carry no gradient to the parameters being trained (see `a2c_loss`); gamma and
    lambda_ stay differentiable.
    """
    next_values = jnp.concatenate([values[1:], bootstrap_value[None]], axis=0)

    def backward(next_return, xs):
        reward, discount, trace_mask, next_value = xs
        lambda_t = lambda_ * trace_mask
        g = reward + gamma * discount * ((1 - lambda_t) * next_value + lambda_t * next_return)
        return g, g

    _, returns = jax.lax.scan(backward, bootstrap_value, (rewards, discounts, trace_masks, next_values), reverse=True)
    return returns


def a2c_loss(params, apply_fn, rollout: Rollout, eta, target_params=None):
    """L(theta, eta, tau) of Bonnet et al. App. C.2: policy gradient + c_crit critic loss - c_entr entropy, on lambda-returns.

    The return targets and the advantage's baseline come from `target_params` (default: stop_gradient(params)), so
    grad_theta treats them as constants while eta stays live in the targets. The inner update passes target_params =
    theta as a separate argument: its gradient is the same, but the meta-gradient then also sees how theta^(j) moves the
    targets of step j + 1 (the exact Jacobian of the update map; a stop_gradient would drop that term for n > 1).
    The outer loss L'(theta', eta', tau') is this function with eta' = {gamma', lambda', c_crit = 0, c_entr = 0} and the
    default targets: its gradient is the policy-gradient term alone, the advantage a constant (App. C.2).
    """
    num_steps, num_envs = rollout.actions.shape
    obs = rollout.obs.reshape((-1,) + rollout.obs.shape[2:])
    logits, values = apply_fn(params, obs)
    logits = logits.reshape(num_steps + 1, num_envs, -1)[:-1]
    values = values.reshape(num_steps + 1, num_envs)
    if target_params is None:
        target_values = jax.lax.stop_gradient(values)
    else:
        target_values = apply_fn(target_params, obs)[1].reshape(num_steps + 1, num_envs)
    log_pi = jax.nn.log_softmax(logits)
    log_pi_a = jnp.take_along_axis(log_pi, rollout.actions[..., None], axis=-1)[..., 0]
    # A reset step is no transition: it must not bootstrap into the new episode nor enter the losses.
    valid = 1.0 - rollout.resets
    returns = lambda_returns(
        target_values[:-1],
        target_values[-1],
        jnp.clip(rollout.rewards, -1.0, 1.0),
        (1.0 - rollout.terminations) * valid,
        1.0 - rollout.truncations,
        eta["gamma"],
        eta["lambda_"],
    )
    advantages = returns - target_values[:-1]  # g_eta - v: no gradient to theta, eta's stays live
    policy_loss = -jnp.mean(valid * advantages * log_pi_a)
    value_loss = 0.5 * jnp.mean(valid * (returns - values[:-1]) ** 2)
    entropy = jnp.mean(valid * -jnp.sum(jax.nn.softmax(logits) * log_pi, axis=-1))
    loss = policy_loss + eta["c_crit"] * value_loss - eta["c_entr"] * entropy
    return loss, dict(loss=loss, policy_loss=policy_loss, value_loss=value_loss, entropy=entropy)


def logit(p):
    return jnp.log(p) - jnp.log1p(-p)


def init_meta_params(args: Args):
    """Logits of eta = {gamma, lambda, c_crit, c_entr}, each sigma(logit) starting at its Table 2 value."""
    return dict(
        gamma=logit(jnp.asarray(args.gamma, jnp.float32)),
        lambda_=logit(jnp.asarray(args.lambda_, jnp.float32)),
        c_crit=logit(jnp.asarray(args.crit_coef, jnp.float32)),
        c_entr=logit(jnp.asarray(args.ent_coef, jnp.float32)),
    )


def hyperparameters(meta_params):
    """eta from its logits: every meta-parameter is a sigmoid, in (0, 1)."""
    return {name: jax.nn.sigmoid(value) for name, value in meta_params.items()}


def reference_hyperparameters(args: Args):
    """eta' of the outer loss: fixed gamma', lambda'; the outer loss is the policy-gradient term alone."""
    return dict(gamma=args.outer_gamma, lambda_=args.outer_lambda, c_crit=0.0, c_entr=0.0)


def mixing_weights(n: int, kappa: Optional[float] = None, mix: bool = True) -> np.ndarray:
    """Weights of L'(theta^(1)), ..., L'(theta^(n)): eq. 10 with --mix, else the n-step meta-gradient (eq. 5) [0, .., 1].

    Eq. 10: (1 - kappa) / (1 - kappa^n) kappa^(i-1), i.e. kappa^(i-1) / sum_j kappa^(j-1), which also covers kappa = 1
    (equal weights); kappa defaults to 1 - 1/n, so (1 - kappa)^-1 = n.
    """
    if not mix:
        return np.eye(n)[-1]
    kappa = 1.0 - 1.0 / n if kappa is None else kappa
    weights = np.power(float(kappa), np.arange(n, dtype=np.float64))  # 0^0 = 1: kappa = 0 is the 1-step meta-gradient
    return weights / weights.sum()


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm, whose derivative stays finite at a zero gradient (optax's is NaN there: the norm's
    square root): a meta-gradient differentiates through this step, and a batch of reset steps alone has gradient 0.
    The norm gets 1e-30 under its root, below float32's resolution of any gradient that is not 0: the same values."""

    def update(updates, state, params=None):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(updates)) + 1e-30)
        return jax.tree.map(lambda t: jnp.where(norm < max_norm, t, (t / norm) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(args: Args):
    """Adam with eps_root > 0 (a finite second derivative for the meta-gradient), global-norm clipping, linear annealing."""

    def linear_schedule(count):
        # the look-ahead steps of the last n - 1 updates run past num_updates: they keep the schedule's last value
        return args.learning_rate * (1.0 - jnp.minimum(count, args.num_updates - 1) / args.num_updates)

    learning_rate = linear_schedule if args.anneal_lr else args.learning_rate
    return optax.chain(
        clip_by_global_norm(args.max_grad_norm),
        optax.adam(learning_rate, eps=args.adam_eps, eps_root=args.adam_eps_root),
    )


def inner_update(params, opt_state, tx, apply_fn, rollout: Rollout, eta):
    """theta^(j+1) = theta^(j) + Adam(grad_theta L(theta^(j), eta, tau^(j))) (eq. 5, third line), differentiable in eta."""
    grads, metrics = jax.grad(a2c_loss, has_aux=True)(params, apply_fn, rollout, eta, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads, metrics


class FirstStep(NamedTuple):
    """The first inner update, which is also the real one: theta_{t+1} = theta_t^(1)."""

    params: dict
    opt_state: tuple
    grads: dict
    metrics: dict


def lookahead_outer_losses(
    meta_params, agent_state: TrainState, rollout: Rollout, collect: Callable, collect_carry, n: int, every_step: bool, args
):
    """From theta_t^(0) = theta_t and tau^(0) = `rollout`, n inner updates with eta_t, each followed by a fresh rollout
    tau^(j) ~ pi(theta^(j)) from `collect(stop_gradient(theta^(j)), carry) -> (tau^(j), carry)` (eq. 5).

    Returns the outer losses L'(theta^(i), eta', tau^(i)) for i = 1..n ([n]) when `every_step` (what eq. 10 mixes), else
    the last one only ([1]); and the first inner update (stop-gradiented).
    """
    eta, eta_ref = hyperparameters(meta_params), reference_hyperparameters(args)

    def step(carry, _):
        params, opt_state, tau, collect_carry = carry
        params, opt_state, grads, metrics = inner_update(params, opt_state, agent_state.tx, agent_state.apply_fn, tau, eta)
        tau, collect_carry = collect(jax.lax.stop_gradient(params), collect_carry)
        outer = a2c_loss(params, agent_state.apply_fn, tau, eta_ref)[0] if every_step else jnp.zeros(())
        return (params, opt_state, tau, collect_carry), (outer, FirstStep(params, opt_state, grads, metrics))

    init = (agent_state.params, agent_state.opt_state, rollout, collect_carry)
    (params_n, _, tau_n, _), (outer_losses, steps) = jax.lax.scan(step, init, None, length=n)
    if not every_step:
        outer_losses = a2c_loss(params_n, agent_state.apply_fn, tau_n, eta_ref)[0][None]  # L'(theta^(n), eta', tau^(n))
    first = jax.lax.stop_gradient(jax.tree.map(lambda x: x[0], steps))
    return outer_losses, first


def meta_objective(meta_params, agent_state, rollout, collect, collect_carry, weights, args, every_step=None):
    """sum_i w_i L'(theta_t^(i)): its eta-gradient is the n-step (eq. 5) or the kappa-mixed (eq. 10) meta-gradient.

    `every_step` (static): evaluate every L'(theta^(i)); by default only when a weight other than the last is non-zero.
    """
    every_step = bool(np.count_nonzero(weights[:-1])) if every_step is None else every_step
    losses, first = lookahead_outer_losses(
        meta_params, agent_state, rollout, collect, collect_carry, len(weights), every_step, args
    )
    weights = jnp.asarray(weights if every_step else weights[-1:], losses.dtype)
    return jnp.sum(weights * losses), (first, losses)


def per_step_meta_gradients(meta_params, agent_state, rollout, collect, collect_carry, n: int, args):
    """The i-step meta-gradients grad_eta L'(theta^(i)), i = 1..n, of one look-ahead chain: {name: [n]} (forward mode,
    |eta| = 4 tangents). The n-step one is row n; the kappa-mix one is the eq. 10 weighted sum of rows 1..n."""
    f = lambda mp: lookahead_outer_losses(mp, agent_state, rollout, collect, collect_carry, n, True, args)[0]
    return jax.jacfwd(f)(meta_params)


def meta_update(agent_state, meta_state, rollout, collect, collect_carry, weights, args):
    """One real update theta_{t+1} = theta_t^(1) with the same inner gradient, and one meta step on eta's logits."""
    meta_grads, (first, outer_losses) = jax.grad(meta_objective, has_aux=True)(
        meta_state.params, agent_state, rollout, collect, collect_carry, weights, args
    )
    metrics = dict(first.metrics, grad_norm=optax.global_norm(first.grads), outer_loss=outer_losses[-1])
    metrics["meta_grad_norm"] = optax.global_norm(meta_grads)
    agent_state = agent_state.replace(step=agent_state.step + 1, params=first.params, opt_state=first.opt_state)
    meta_state = meta_state.apply_gradients(grads=meta_grads)
    metrics["saturated"] = saturated(meta_state.params, meta_grads)
    return agent_state, meta_state, metrics


def fixed_update(agent_state, meta_state, rollout, args):
    """--inner-steps 0: A2C with the initial, fixed eta."""
    params, opt_state, grads, metrics = inner_update(
        agent_state.params,
        agent_state.opt_state,
        agent_state.tx,
        agent_state.apply_fn,
        rollout,
        hyperparameters(meta_state.params),
    )
    agent_state = agent_state.replace(step=agent_state.step + 1, params=params, opt_state=opt_state)
    return agent_state, meta_state, dict(metrics, grad_norm=optax.global_norm(grads))


# ---------------------------------------------------------------------------------------------------------------------
# Snake: pure environment, the whole loop jitted.


# =====================================================================================================================
# ACTOR-LEARNER LOOP: Snake's rollouts and the jitted training chunk (one loop: actor and learner in one call),
# then the meta-gradient variance probe of Table 1.
# =====================================================================================================================


class EnvCarry(NamedTuple):
    """A batch of Snake games and what a rollout needs to continue them: copying it copies the environments."""

    state: snake_jax.SnakeState  # [B]
    obs: jnp.ndarray  # [B, 5, H, W]
    reset_now: jnp.ndarray  # [B] the episode ended at the last step: this step restarts it (EnvPool's rule)
    episode_return: jnp.ndarray  # [B]
    episode_length: jnp.ndarray  # [B]
    key: jnp.ndarray


def snake_reset(key, num_envs: int, board_size: int) -> EnvCarry:
    key, reset_key = jax.random.split(key)
    state, obs = jax.vmap(partial(snake_jax.reset, board_size=board_size))(jax.random.split(reset_key, num_envs))
    zeros = jnp.zeros(num_envs)
    return EnvCarry(state, obs, jnp.zeros(num_envs, bool), zeros, zeros, key)


def collect_snake(params, apply_fn, carry: EnvCarry, num_steps: int, max_episode_steps: int):
    """A rollout of `num_steps` moves of every game with pi_theta: (Rollout, carry, episode stats)."""

    def one_step(carry: EnvCarry, _):
        key, action_key = jax.random.split(carry.key)
        logits, _ = apply_fn(params, carry.obs)
        action = jax.random.categorical(action_key, logits)
        state, obs, reward, terminated, truncated = snake_jax.envpool_step(
            carry.state, carry.reset_now, action, max_episode_steps
        )
        done = terminated | truncated
        episode_return = carry.episode_return + reward
        episode_length = carry.episode_length + (~carry.reset_now)
        stats = (jnp.sum(jnp.where(done, episode_return, 0.0)), jnp.sum(jnp.where(done, episode_length, 0.0)), jnp.sum(done))
        transition = (carry.obs, action, reward, terminated, truncated, carry.reset_now)
        carry = EnvCarry(state, obs, done, jnp.where(done, 0.0, episode_return), jnp.where(done, 0.0, episode_length), key)
        return carry, (transition, stats)

    carry, ((obs, actions, rewards, terminations, truncations, resets), stats) = jax.lax.scan(
        one_step, carry, None, length=num_steps
    )
    to_float = lambda x: x.astype(jnp.float32)
    rollout = Rollout(
        jnp.concatenate([obs, carry.obs[None]]),
        actions,
        rewards,
        to_float(terminations),
        to_float(truncations),
        to_float(resets),
    )
    return rollout, carry, jax.tree.map(jnp.sum, stats)


def make_snake_train_chunk(args: Args, weights: Optional[np.ndarray]):
    """Jit `args.log_frequency` updates in one lax.scan: real rollout, look-ahead on a copy of the games, meta step."""
    collect = partial(collect_snake, num_steps=args.num_steps, max_episode_steps=args.max_episode_steps)

    def update(carry, _):
        agent_state, meta_state, env = carry
        rollout, env, stats = collect(agent_state.params, agent_state.apply_fn, env)
        if weights is None:
            agent_state, meta_state, metrics = fixed_update(agent_state, meta_state, rollout, args)
        else:
            key, lookahead_key = jax.random.split(env.key)
            env = env._replace(key=key)
            lookahead = lambda params, c: collect(params, agent_state.apply_fn, c)[:2]
            agent_state, meta_state, metrics = meta_update(
                agent_state, meta_state, rollout, lookahead, env._replace(key=lookahead_key), weights, args
            )
        metrics["meta"] = hyperparameters(meta_state.params)
        return (agent_state, meta_state, env), (metrics, stats)

    @jax.jit
    def train_chunk(agent_state, meta_state, env):
        (agent_state, meta_state, env), (metrics, stats) = jax.lax.scan(
            update, (agent_state, meta_state, env), None, length=args.log_frequency
        )
        return agent_state, meta_state, env, jax.tree.map(jnp.mean, metrics), jax.tree.map(jnp.sum, stats)

    return train_chunk


def variance_estimators(args: Args):
    """(n, mix) of every estimator of the variance mode: Table 1's columns by default."""
    return [(n, False) for n in args.variance_nstep] + [(n, True) for n in args.variance_mix]


def make_variance_probe(args: Args):
    """Jit: M meta-gradient chains of n_max look-ahead steps from the current state, each with its own keys (its own real
    rollout tau^(0) from a copy of the games, its own look-ahead); returns the i-step meta-gradients, [M, n_max, |eta|]."""
    collect = partial(collect_snake, num_steps=args.num_steps, max_episode_steps=args.max_episode_steps)
    n_max = max(n for n, _ in variance_estimators(args))

    @jax.jit
    def probe(agent_state, meta_params, env: EnvCarry, key):
        def one(sample_key):
            rollout_key, lookahead_key = jax.random.split(sample_key)
            rollout, env_after, _ = collect(agent_state.params, agent_state.apply_fn, env._replace(key=rollout_key))
            lookahead = lambda params, c: collect(params, agent_state.apply_fn, c)[:2]
            grads = per_step_meta_gradients(
                meta_params, agent_state, rollout, lookahead, env_after._replace(key=lookahead_key), n_max, args
            )
            return jnp.stack([grads[name] for name in sorted(grads)], axis=-1)

        keys = jax.random.split(key, args.variance_samples)
        return jax.lax.map(one, keys, batch_size=args.variance_batch)

    return probe


def normalised_meta_gradient_std(per_step_grads: np.ndarray, estimators, kappa=None):
    """Table 1, second row, at one point: per_step_grads [M, n_max, |eta|] -> {estimator: std of each meta-parameter
    over the M samples divided by the 1-step std, averaged over the meta-parameters}."""
    per_step_grads = np.asarray(per_step_grads, np.float64)
    stds = {}
    for n, mix in estimators:
        grads = np.einsum("i,mik->mk", mixing_weights(n, kappa, mix), per_step_grads[:, :n])
        stds[estimator_name(n, mix)] = grads.std(axis=0, ddof=1)
    base = stds[estimator_name(1, False)]
    return {name: float(np.mean(std / base)) for name, std in stds.items()}


def estimator_name(n: int, mix: bool) -> str:
    return f"{n}-mix" if mix else f"{n}-step"


# =====================================================================================================================
# TRY NOT TO MODIFY: plumbing (argument checks, checkpoints and resume, guards, logging), written as in the
# IMPALA-family scripts where they have the same part.
# =====================================================================================================================


def check_args(args: Args):
    """Fail before anything is written, with a message that says what to change."""
    if args.env_id != "snake_jax":
        raise SystemExit(f"--env-id {args.env_id}: only snake_jax, a pure JAX game whose state the look-ahead rollouts copy")
    if args.inner_steps < 0:
        raise SystemExit("--inner-steps must be >= 0 (0: fixed hyperparameters)")
    if args.max_episode_steps < 1:
        raise SystemExit("--max-episode-steps must be >= 1")
    if args.mix and args.inner_steps < 1:
        raise SystemExit("--mix needs --inner-steps >= 1")
    if args.kappa is not None and not (0 <= args.kappa <= 1):
        raise SystemExit("--kappa must lie in [0, 1]")
    if args.kappa is not None and not args.mix:
        raise SystemExit("--kappa only applies with --mix")
    if min(args.num_envs, args.num_steps, args.log_frequency, args.variance_samples, args.variance_batch) < 1:
        raise SystemExit("--num-envs, --num-steps, --log-frequency, --variance-samples and --variance-batch must be positive")
    if args.variance_samples < 2:
        raise SystemExit("--variance-samples must be at least 2 (a standard deviation)")
    if args.variance_points < 0:
        raise SystemExit("--variance-points must be >= 0")
    if args.variance_points and (1 not in args.variance_nstep or min(args.variance_nstep + args.variance_mix) < 1):
        raise SystemExit("--variance-nstep must contain 1 (the normaliser) and every n must be >= 1")
    if not 0 <= args.adam_eps_root < np.inf:
        raise SystemExit("--adam-eps-root must be >= 0 and finite")
    if args.adam_eps_root <= 0 and args.inner_steps > 0:
        raise SystemExit("--adam-eps-root must be > 0: the meta-gradient differentiates through Adam's square root")
    for name in ("gamma", "lambda_", "crit_coef", "ent_coef"):
        if not 0 < getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} is a sigmoid of a logit here: it must lie in (0, 1)")
    if not (0 <= args.outer_gamma <= 1 and 0 <= args.outer_lambda <= 1):
        raise SystemExit("--outer-gamma and --outer-lambda must lie in [0, 1]")
    if args.board_size < 2:
        raise SystemExit("--board-size must be at least 2")
    if args.save_every < 0 or args.total_timesteps < 1:
        raise SystemExit("--save-every must be >= 0 and --total-timesteps >= 1")
    if not 0 <= args.seed <= 2**31 - 1:
        raise SystemExit(f"--seed {args.seed}: must lie in [0, 2^31)")
    if args.total_timesteps // (args.num_envs * args.num_steps) > 2**31 - 1:  # the optimisers count their steps in int32
        raise SystemExit(f"--total-timesteps {args.total_timesteps}: more than 2^31 - 1 updates")
    for spec in fields(args):  # XLA takes shapes and loop counts as int32
        value = getattr(args, spec.name)
        too_big = [x for x in (value if isinstance(value, list) else [value]) if type(x) is int and x > 2**31 - 1]
        if too_big and spec.name != "total_timesteps":
            raise SystemExit(f"--{spec.name.replace('_', '-')} {too_big[0]}: at most 2^31 - 1")
    if not args.exp_name or "/" in args.exp_name or os.sep in args.exp_name:
        raise SystemExit(f"--exp-name {args.exp_name!r} must be a file name, without a path separator")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights & Biases: pip install wandb")
    positive = ("learning_rate", "adam_eps", "max_grad_norm", "meta_learning_rate", "meta_grad_clip")
    if not all(0 < getattr(args, name) < np.inf for name in positive):
        raise SystemExit(
            "--learning-rate, --adam-eps, --max-grad-norm, --meta-learning-rate, --meta-grad-clip: positive, finite"
        )
    needed, available = least_bytes(args), available_memory(jax.devices()[0])
    if available is not None and needed > available:
        raise SystemExit(
            f"one update needs at least {needed / 2**30:.3g} GiB and the device has {available / 2**30:.1f} GiB: lower "
            "--num-envs, --num-steps, --board-size, --inner-steps, or in the variance mode --variance-batch, --variance-samples"
        )
    run_root = "runs" if os.path.exists("runs") else "."
    if not args.resume and not (os.path.isdir(run_root) and os.access(run_root, os.W_OK)):
        raise SystemExit(f"cannot write the run directory: {os.path.abspath(run_root)} is not a writable directory")
    if args.resume and not os.access(os.path.dirname(os.path.abspath(args.resume)), os.W_OK):
        raise SystemExit(f"cannot write the run directory of --resume {args.resume}")


def least_bytes(args: Args) -> int:
    """Bytes that the training step holds at least: the observations that one update keeps for its meta-gradient (the
    real rollout and the --inner-steps look-ahead ones; in the variance mode, --variance-batch chains of the longest n,
    and the probe's keys and meta-gradients). In Python integers, before any array is made; the compiled chunk's check
    comes after."""
    rollout = args.num_envs * args.num_steps * snake_jax.NUM_CHANNELS * args.board_size**2 * 4
    n_max = max(n for n, _ in variance_estimators(args)) if args.variance_points else 0
    probe = args.variance_samples * (2 + 4 * n_max) * 4 if args.variance_points else 0
    return rollout * max(args.inner_steps + 1, args.variance_batch * (n_max + 1)) + probe


def check_fits(compiled, what: str, lower: str):
    """Stop in one line if `compiled` needs more than the device has: XLA's temporaries, arguments and outputs, less
    what they share, against what the device has free (on CPU, the machine's available RAM)."""
    analysis = compiled.memory_analysis()
    needed = sum(getattr(analysis, f"{kind}_size_in_bytes") for kind in ("temp", "argument", "output"))
    needed -= analysis.alias_size_in_bytes
    available = available_memory(jax.devices()[0])
    if available is not None and needed > available:
        raise SystemExit(f"{what} needs {needed / 2**30:.1f} GiB and the device has {available / 2**30:.1f} GiB: lower {lower}")


def available_memory(device: jax.Device) -> Optional[int]:
    """Bytes the learner can still take on `device`: the accelerator's free memory, or the machine's available RAM."""
    if device.platform != "cpu":
        stats = device.memory_stats()
        return stats["bytes_limit"] - stats["bytes_in_use"] if stats and "bytes_limit" in stats else None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def local_copy(tree):
    """This process's copy of (replicated) arrays as numpy, also of arrays that span several processes."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x, tree)


# Which script wrote a checkpoint, and in which format (raise it when what save_checkpoint writes changes).
SCRIPT = os.path.basename(__file__)
CHECKPOINT_FORMAT = 1


class ForeignCheckpoint(ValueError):
    """A checkpoint that another script wrote, or this one in another format."""


def make_run_dir(run_name: str, create: bool = True) -> str:
    """runs/{run_name}, created here and by no other run: if another run has taken the name (the same flags started in
    the same second), runs/{run_name}-2, -3, ..., said in one line. Only the process that writes creates it."""
    path = os.path.join("runs", run_name)
    if not create:
        return path
    os.makedirs("runs", exist_ok=True)
    for k in range(2, 10_000):
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            taken, path = path, os.path.join("runs", f"{run_name}-{k}")
            print(f"{taken} is another run's: this run writes to {path}")
    raise SystemExit(f"no free run directory for {run_name} in runs/")


def save_checkpoint(path: str, args: Args, **state):
    """Write args and `state` (train states, update, global step, keys, returns) atomically: a crash or a full disk
    mid-write leaves the previous checkpoint intact and no partial file."""
    tmp_path = f"{path}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            saved = dict(local_copy(state), args=json.dumps(asdict(args)), script=SCRIPT, format=CHECKPOINT_FORMAT)
            f.write(flax.serialization.to_bytes(saved))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise SystemExit(f"could not write the checkpoint {path}: {e.strerror or e}") from None


def load_checkpoint(path: str) -> dict:
    """What `save_checkpoint` wrote, as state dicts, with `args` an Args; ForeignCheckpoint if this script did not write
    it, or wrote it in another format."""
    with open(path, "rb") as f:
        saved = flax.serialization.msgpack_restore(f.read())
    script = saved.get("script", "another program") if isinstance(saved, dict) else "another program"
    if script != SCRIPT:
        raise ForeignCheckpoint(f"it was written by {script}")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ForeignCheckpoint(f"it has format {saved.get('format')}, this {SCRIPT} reads format {CHECKPOINT_FORMAT}")
    return dict(saved, args=Args(**json.loads(saved["args"])))


def load_model(path: str):
    """Return (args, params, meta_params) of a checkpoint."""
    saved = load_checkpoint(path)
    return saved["args"], saved["agent_state"]["params"], saved["meta_state"]["params"]


# Flags that may differ from the checkpoint's when a run resumes: its budget and logging, not what it learns.
RESUME_FLAGS = ("resume", "total_timesteps", "save_model", "save_every", "track", "wandb_project_name", "wandb_entity")


def given_flags(argv: Sequence[str]) -> set:
    """The Args fields that `argv` names (`--no-x` names x), whatever their values: a resume checks each of them."""
    names, given = {f.name for f in fields(Args)}, set()
    for token in argv:
        name = token[2:].split("=")[0].replace("-", "_") if token.startswith("--") else ""
        given |= {name, name.removeprefix("no_")} & names
    return given


def resume_args(args: Args, given: set):
    """(the checkpoint's flags with the RESUME_FLAGS this command gives, the checkpoint); one line if it cannot resume.
    Any other flag given (`given_flags`) must equal the checkpoint's, even where it equals the default."""
    try:
        saved = load_checkpoint(args.resume)
    except ForeignCheckpoint as e:
        raise SystemExit(f"--resume {args.resume}: not a checkpoint of {SCRIPT}: {e}") from None
    except Exception as e:  # noqa: B902 (a missing file, not a checkpoint at all, another script's flags)
        raise SystemExit(f"--resume {args.resume}: not a checkpoint of {SCRIPT} ({e})") from None
    for name in sorted(given - set(RESUME_FLAGS)):
        if getattr(args, name) != getattr(saved["args"], name):
            raise SystemExit(f"--resume continues a run with its own flags: --{name.replace('_', '-')} cannot change")
    return replace(saved["args"], **{name: getattr(args, name) for name in given & set(RESUME_FLAGS)}), saved


def non_finite(**trees):
    """Inside jit: for each tree, whether any of its entries is NaN or infinite."""
    return {
        name: ~jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)], bool))
        for name, tree in trees.items()
    }


def saturated(meta_params, meta_grads):
    """Inside jit: for each meta-parameter, whether an entry's sigmoid is within 1e-6 of 0 or 1 with a zero meta-gradient."""
    return {k: jnp.any((jnp.abs(jax.nn.sigmoid(v) - 0.5) > 0.5 - 1e-6) & (meta_grads[k] == 0)) for k, v in meta_params.items()}


def fingerprint(tree) -> str:
    """A short hash of the arrays' bytes: runs that end with the same parameters print the same fingerprint."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def print_cause_first(kind, error, traceback):
    """One line of cause first, then the traceback."""
    print(f"{os.path.basename(sys.argv[0])}: {kind.__name__}: {error}", file=sys.stderr, flush=True)
    sys.__excepthook__(kind, error, traceback)


# =====================================================================================================================
# MAIN: setup, the training loop, shutdown.
# =====================================================================================================================


if __name__ == "__main__":
    sys.excepthook = print_cause_first
    args = tyro.cli(Args)
    args, saved = resume_args(args, given_flags(sys.argv[1:])) if args.resume else (args, None)
    check_args(args)
    stop_signal = []

    def request_stop(signum, frame):
        """SIGINT, SIGTERM: finish the current chunk, save the checkpoint, exit 128 + signum; a second one exits now."""
        if stop_signal:
            print(f"{signal.Signals(signum).name}: exit now; the work since the last checkpoint is lost", flush=True)
            os._exit(128 + signum)
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    args.batch_size = args.num_envs * args.num_steps
    args.num_updates = max(1, args.total_timesteps // args.batch_size)
    if args.log_frequency > args.num_updates:  # a chunk longer than the run would add updates (and their memory)
        print(f"--log-frequency {args.log_frequency} is more than the run's {args.num_updates} updates: one chunk of them")
        args.log_frequency = args.num_updates
    # whole jitted chunks: round up to a multiple of --log-frequency
    args.num_updates = -(-args.num_updates // args.log_frequency) * args.log_frequency
    weights = None if args.inner_steps == 0 else mixing_weights(args.inner_steps, args.kappa, args.mix)

    key = jax.random.PRNGKey(args.seed)
    key, network_key, env_key, probe_key = jax.random.split(key, 4)
    network = AgentNetwork(snake_jax.NUM_ACTIONS)
    sample_obs = jnp.zeros((1, snake_jax.NUM_CHANNELS, args.board_size, args.board_size))
    agent_state = TrainState.create(
        apply_fn=network.apply, params=network.init(network_key, sample_obs), tx=make_optimizer(args)
    )
    meta_state = TrainState.create(
        apply_fn=None,
        params=init_meta_params(args),
        tx=optax.chain(optax.clip_by_global_norm(args.meta_grad_clip), optax.adam(args.meta_learning_rate)),
    )

    env = snake_reset(env_key, args.num_envs, args.board_size)
    train_chunk = make_snake_train_chunk(args, weights)
    probe = make_variance_probe(args) if args.variance_points else None
    # compiled before anything is written (the jitted calls reuse it): a chunk that cannot fit stops here, in one line
    check_fits(
        train_chunk.lower(agent_state, meta_state, env).compile(),
        "the training chunk",
        "--num-envs, --num-steps, --board-size, --inner-steps or --log-frequency",
    )
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if args.resume else make_run_dir(run_name)
    checkpoint_path = os.path.join(run_dir, f"{args.exp_name}.flax_model")
    print(f"run {run_dir}: {args.num_updates} updates of {args.batch_size} steps; meta-gradient weights {weights}")

    if args.track:  # before the writer: wandb mirrors what the TensorBoard writer logs
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=os.path.basename(run_dir),
            save_code=True,
        )
    writer = SummaryWriter(run_dir)
    atexit.register(writer.close)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    )

    num_chunks = -(-args.num_updates // args.log_frequency)
    # the variance is measured after chunks 1..num_chunks, evenly spread, never before the first real update
    points = min(args.variance_points, num_chunks)  # more points than chunks: one after every chunk
    probe_chunks = set(np.linspace(1, num_chunks, points).round().astype(int)) if args.variance_points else set()
    variance_rows = []
    returns_history = []
    global_step, update = 0, 0
    if saved:  # the games continue exactly where they stopped: their state is in the checkpoint
        agent_state = flax.serialization.from_state_dict(agent_state, saved["agent_state"])
        meta_state = flax.serialization.from_state_dict(meta_state, saved["meta_state"])
        update, global_step, probe_key = int(saved["update"]), int(saved["global_step"]), saved["probe_key"]
        returns_history = [tuple(row) for row in saved["returns"]]
        variance_rows = json.loads(saved["variance"])
        env = flax.serialization.from_state_dict(env, saved["env"])
        print(f"resumed from {args.resume} at update {update}, global step {global_step}")

    def training_state():
        return dict(
            agent_state=agent_state,
            meta_state=meta_state,
            update=update,
            global_step=global_step,
            probe_key=probe_key,
            returns=np.asarray(returns_history, np.float64).reshape(-1, 2),
            variance=json.dumps(variance_rows),
            env=env,
        )

    start_time, start_step, last_save = time.time(), global_step, update
    warned = set()  # saturated meta-parameters, each reported once
    for chunk in range(update // args.log_frequency, num_chunks):
        chunk_start = update
        agent_state, meta_state, env, metrics, stats = train_chunk(agent_state, meta_state, env)
        metrics, stats = jax.device_get((metrics, stats))
        update += args.log_frequency
        global_step = update * args.batch_size
        failed = non_finite(loss=metrics["loss"], parameters=agent_state.params, meta_parameters=meta_state.params)
        failed = [name for name, bad in jax.device_get(failed).items() if bad]
        if failed:
            last = checkpoint_path if os.path.exists(checkpoint_path) else "none was written"
            raise SystemExit(
                f"non-finite {' and '.join(failed)} in updates {chunk_start + 1}-{update}: stopped; "
                f"the last finite checkpoint: {last}"
            )
        for meta_name, flag in metrics.pop("saturated", {}).items():
            if flag and meta_name not in warned:
                warned.add(meta_name)
                message = f"meta-parameter {meta_name} saturated in updates {chunk_start + 1}-{update}: "
                message += "a sigmoid within 1e-6 of 0 or 1, meta-gradient 0"
                print(f"warning: {message}")
                writer.add_text("warnings", message, global_step)
        if chunk + 1 in probe_chunks:  # after real updates: a fresh Adam's first step is ~sign(g), an artefact here
            probe_key, key_k = jax.random.split(probe_key)
            per_step = np.asarray(probe(agent_state, meta_state.params, env, key_k))
            ratios = normalised_meta_gradient_std(per_step, variance_estimators(args))
            variance_rows.append(ratios)
            for name, value in ratios.items():
                writer.add_scalar(f"variance/{name}", value, global_step)
            print(f"variance at step {global_step}: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
        sps = int((global_step - start_step) / (time.time() - start_time))
        return_sum, length_sum, episodes = stats
        if episodes:
            returns_history.append((global_step, return_sum / episodes))
            writer.add_scalar("charts/episodic_return", return_sum / episodes, global_step)
            writer.add_scalar("charts/episodic_length", length_sum / episodes, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        lr = (
            args.learning_rate * (1.0 - min(update, args.num_updates) / args.num_updates)
            if args.anneal_lr
            else args.learning_rate
        )
        writer.add_scalar("charts/learning_rate", lr, global_step)
        for name, value in metrics.pop("meta").items():
            writer.add_scalar(f"meta/{name.rstrip('_')}", value, global_step)
        if "meta_grad_norm" in metrics:
            writer.add_scalar("meta/grad_norm", metrics.pop("meta_grad_norm"), global_step)
        for name, value in metrics.items():
            writer.add_scalar(f"losses/{name}", value, global_step)
        meta = hyperparameters(meta_state.params)
        print(
            f"update {min(update, args.num_updates)}/{args.num_updates} global_step={global_step} SPS={sps} "
            f"episodic_return={return_sum / max(episodes, 1):.2f} ({int(episodes)} episodes) "
            + " ".join(f"{k.rstrip('_')}={float(v):.4f}" for k, v in meta.items())
        )
        if args.save_every and update - last_save >= args.save_every:
            save_checkpoint(checkpoint_path, args, **training_state())
            last_save = update
        if stop_signal:
            break

    if variance_rows:
        names = list(variance_rows[0])
        mean = {name: float(np.mean([row[name] for row in variance_rows])) for name in names}
        std = {name: float(np.std([row[name] for row in variance_rows])) for name in names}
        print(
            "normalised meta-gradient std over %d points: " % len(variance_rows)
            + " ".join(f"{k}={mean[k]:.2f}" for k in names)
        )
        with open(os.path.join(run_dir, "variance.json"), "w") as f:
            json.dump(dict(points=variance_rows, mean=mean, std_over_points=std), f, indent=1)
    tail = [r for _, r in returns_history[-max(1, len(returns_history) // 10) :]]
    print(f"final episodic_return (mean of the last {len(tail)} logs) {np.mean(tail) if tail else float('nan'):.2f}")
    save_checkpoint(checkpoint_path, args, **training_state())
    print(f"checkpoint saved to {checkpoint_path}")
    print(f"final parameters after update {update}: sha256 {fingerprint(agent_state.params)}")
    if stop_signal:
        name = signal.Signals(stop_signal[0]).name
        print(f"stopped by {name} after update {update}; continue with --resume {checkpoint_path}")
        raise SystemExit(128 + stop_signal[0])
