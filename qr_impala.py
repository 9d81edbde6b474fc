"""QR-IMPALA: IMPALA actor-critic with a quantile (distributional) critic and no meta-learning.

The "QR" baseline of Distributional Meta-Gradient RL (Yin, Yan, Xu, ICLR 2023, openreview.net/forum?id=LGkmUauBUL),
i.e. DrMG({}):
the critic learns N quantiles of the return (eq. 1-3) towards the distributional lambda-return with v-trace (eq. 9-10),
the actor follows the quantile-averaged advantage (eq. 11). Actors and learner run as in IMPALA / Cleanba: actor threads
step EnvPool, the learner trains on its own device(s), and the actor always acts one update behind the learner.

    python qr_impala.py --env-id Breakout-v5
    python qr_impala.py --env-id CartPole-v1 --total-timesteps 150000
"""

import atexit
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import List, Literal, NamedTuple, Optional, Sequence, Tuple

# Actors and the learner share the accelerator with EnvPool; do not let XLA take all of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import envpool
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter


# =====================================================================================================================
# FLAGS: `Args` is this algorithm's; ENV_DEFAULTS and default_args are shared plumbing (change in all four).
# =====================================================================================================================


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    num_seeds: int = 1
    """JAX environments: train the seeds --seed ... --seed + N - 1 as N independent agents in one program (vmapped),
    each with its own run directory, TensorBoard log and checkpoint"""
    track: bool = False
    """track the run with Weights & Biases (pip install wandb): the TensorBoard scalars, the flags and this file"""
    wandb_project_name: str = "metagrad-jax"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user)"""
    save_model: bool = False
    """evaluate the saved model at the end (the checkpoint `runs/{run_name}/{exp_name}.flax_model` is always saved)"""
    save_every: int = 1000
    """write the checkpoint every this many learner updates (0: only at the end and when the run is stopped)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint: its run directory, flags (bar those of devices and budget), states, step"""
    eval_episodes: int = 10
    """number of episodes of the evaluation of the saved model"""
    log_frequency: int = 10
    """print progress and log losses every this many learner updates; the on-device loop of a JAX environment makes this
    many updates per call, the host visiting between calls to log, save and answer signals"""
    queue_timeout: float = 3600.0
    """seconds the learner and the actors wait for each other before the run stops, saying which actor is stuck"""

    # Environment
    env_id: str = "Breakout-v5"
    """an EnvPool id (Atari `*-v5`, or one with vector observations such as `CartPole-v1`), a MinAtar game of gymnax
    (`Breakout-MinAtar`, `SpaceInvaders-MinAtar`, `Asterix-MinAtar`, `Freeway-MinAtar`) or a JAX environment module"""
    max_episode_steps: int = 27000
    """Atari episodes are cut after this many agent steps (108,000 frames at action repeat 4, DrMG paper §5.2)"""
    noop_max: int = 30
    """Atari: up to this many no-op actions at the start of an episode (§5.2)"""
    envpool_threads: int = 0
    """EnvPool worker threads per actor thread (0: EnvPool's default)"""
    overlap_envs: bool = False
    """actor threads: step the envs as two EnvPools of half of them each, the policy acting on one half while the other
    steps (Sebulba's overlap; 1.17x one EnvPool's env steps/s on a 2-core CPU, benchmark/actor_sps.py)"""
    network: Literal["auto", "resnet", "minatar"] = "auto"
    """the torso of image observations: IMPALA's ResNet, MinAtar's network, or auto: MinAtar's below 32 x 32 pixels"""

    # Algorithm
    total_timesteps: int = 50_000_000
    """total agent steps (200M frames at action repeat 4)"""
    learning_rate: float = 6e-4
    """RMSProp learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    local_num_envs: int = 64
    """environments per actor thread"""
    num_actor_threads: int = 2
    """actor threads per actor device"""
    num_steps: int = 20
    """unroll length of a rollout"""
    num_quantiles: int = 32
    """N, the number of quantiles of the critic (paper: not given; our choice)"""
    gamma: float = 0.99
    """discount factor, the same for every quantile"""
    lambda_: float = 1.0
    """trace-bootstrapping lambda of the return, the same for every quantile (1: plain v-trace)"""
    alpha: float = 1.0
    """leaky v-trace mixing alpha (1: plain v-trace)"""
    rho_bar: float = 1.0
    """v-trace clipping threshold of the importance ratios on the TD errors"""
    c_bar: float = 1.0
    """v-trace clipping threshold of the importance ratios on the traces"""
    pg_rho_bar: float = 1.0
    """clipping threshold of the importance ratio of the policy gradient (c-bar of eq. 11)"""
    huber_kappa: float = 1.0
    """kappa of the quantile Huber loss (eq. 2); 0: the plain quantile regression loss |tau - 1{u < 0}| |u| (eq. 1)"""
    value_coef: float = 0.5
    """w_Z, weight of the quantile value loss (of each quantile; the loss averages over quantiles)"""
    policy_coef: float = 1.0
    """w_pi, weight of the policy-gradient loss"""
    ent_coef: float = 0.01
    """w_H, weight of the entropy bonus"""
    max_grad_norm: float = 40.0
    """the maximum norm of the gradient"""
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """the agent's optimiser: RMSProp (the papers') or Adam (b1 0.9, b2 0.999, bias-corrected)"""
    rmsprop_eps: float = 0.01
    """epsilon of RMSProp (inside the square root)"""
    rmsprop_decay: float = 0.99
    """decay of RMSProp"""
    adam_eps: float = 1e-5
    """epsilon of Adam (outside the square root)"""
    adam_eps_root: float = 1e-12
    """epsilon of Adam inside the square root: the meta-gradient differentiates through Adam's step, and the root's
    derivative is infinite at 0 (a parameter whose gradient is 0); 1e-12 keeps it finite, far below --adam-eps"""

    # Devices
    actor_device_ids: List[int] = field(default_factory=lambda: [0])
    """the (local) device ids that actor threads use"""
    learner_device_ids: List[int] = field(default_factory=lambda: [0])
    """the (local) device ids that the learner shards its batch across"""
    chunk_envs: Optional[int] = None
    """the learner computes its losses on at most this many envs at a time: less memory, more sequential work (0: all;
    unset: on an accelerator the largest chunk whose learner step fits its memory, up to all; on CPU 16)"""
    memory_limit_gib: float = 0.0
    """memory of a learner device for the startup check, in GiB (0: what the device reports, or the free RAM on CPU)"""
    distributed: bool = False
    """initialise `jax.distributed` to train with several processes or hosts"""
    coordinator_address: Optional[str] = None
    """with --distributed: host:port of process 0 (unset: JAX's cluster auto-detection, e.g. under SLURM)"""
    num_processes: Optional[int] = None
    """with --distributed: the number of processes (unset: auto-detection)"""
    process_id: Optional[int] = None
    """with --distributed: the index of this process (unset: auto-detection)"""

    # to be filled in runtime
    local_batch_size: int = 0
    """the learner batch on this process (envs x steps)"""
    batch_size: int = 0
    """the learner batch over all processes (envs x steps)"""
    num_updates: int = 0
    """the number of learner updates"""
    world_size: int = 0
    """the number of processes"""


# The defaults that differ by environment family; where each comes from: docs/minatar.md.
CPU_CHUNK_ENVS = 16  # --chunk-envs on CPU when unset: the fastest there (benchmark/update_time.py)
MAX_QUANTILES = 1024  # --num-quantiles at most: 1024^2 pairs x 20 steps x 16 envs is 1.3 GB of the quantile loss
ENV_DEFAULTS = {
    "-MinAtar": dict(
        total_timesteps=10_000_000,
        local_num_envs=32,
        num_actor_threads=1,
        num_steps=20,
        optimizer="adam",
        learning_rate=4e-3,
        rmsprop_eps=1e-5,
        ent_coef=0.03,
    ),
}

# This algorithm's own defaults by family, over ENV_DEFAULTS'.
ALGO_ENV_DEFAULTS = {}  # no meta step: nothing of its own by family


def default_args(argv: Sequence[str]) -> Args:
    """Args() with the defaults of the family of the `--env-id` that `argv` names (ENV_DEFAULTS, then this algorithm's
    ALGO_ENV_DEFAULTS); the flags of `argv` still win, and `--help` after `--env-id Breakout-MinAtar` shows them."""
    env_id = Args.env_id
    for i, flag in enumerate(argv):
        if flag.split("=")[0] in ("--env-id", "--env_id"):
            env_id = flag.split("=", 1)[1] if "=" in flag else argv[i + 1] if i + 1 < len(argv) else env_id
    family = [d for defaults in (ENV_DEFAULTS, ALGO_ENV_DEFAULTS) for suffix, d in defaults.items() if env_id.endswith(suffix)]
    return replace(Args(), **{k: v for d in family for k, v in d.items()})


# =====================================================================================================================
# ALGO LOGIC: the network, the returns and losses, eta, the meta-gradient and the learner step.
# The torso, Rollout, split_halves, chunk_mean, non_finite and the optimiser are shared: change them in all four.
# =====================================================================================================================


def conv3x3(channels: int, padding: str = "SAME"):
    """A 3x3 convolution layer ("SAME" or "VALID"): flax's on accelerators, through `cpu_conv` on CPU (same parameters)."""
    if jax.default_backend() != "cpu":
        return nn.Conv(channels, kernel_size=(3, 3), padding=padding)
    pads = ((1, 1),) * 2 if padding == "SAME" else ((0, 0),) * 2
    return nn.Conv(
        channels, (3, 3), padding=padding, conv_general_dilated=lambda x, kernel, *_, **__: cpu_conv(x, kernel, pads)
    )


class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        inputs = x
        x = nn.relu(x)
        x = conv3x3(self.channels)(x)
        x = nn.relu(x)
        x = conv3x3(self.channels)(x)
        return x + inputs


class ConvSequence(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        x = conv3x3(self.channels)(x)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
        x = ResidualBlock(self.channels)(x)
        return ResidualBlock(self.channels)(x)


class Torso(nn.Module):
    """Image observations (C, H, W): IMPALA's deep ResNet, or MinAtar's network for small grids (`--network`); a two-layer
    MLP for vector observations."""

    network: str = "auto"

    @nn.compact
    def __call__(self, x):
        if x.dtype == jnp.uint8:
            x = x.astype(jnp.float32) / 255.0
        if x.ndim == 4 and (self.network == "minatar" or (self.network == "auto" and x.shape[-1] < 32)):
            # MinAtar's network (Young & Tian 2019, §4): one 3x3 convolution with 16 channels, stride 1, no padding,
            # then a fully connected layer of 128 units, ReLUs after both.
            x = nn.relu(conv3x3(16, padding="VALID")(jnp.transpose(x, (0, 2, 3, 1))))
            return nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        if x.ndim == 4:
            x = jnp.transpose(x, (0, 2, 3, 1))
            for channels in (16, 32, 32):
                x = ConvSequence(channels)(x)
            x = nn.relu(x).reshape((x.shape[0], -1))
            return nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.relu(nn.Dense(256)(x))


class AgentNetwork(nn.Module):
    """Policy logits and the N quantile values Z_theta(s) of the return."""

    num_actions: int
    num_quantiles: int
    torso: str = "auto"  # --network

    @nn.compact
    def __call__(self, obs):
        hidden = Torso(self.torso)(obs)
        logits = nn.Dense(self.num_actions, kernel_init=nn.initializers.orthogonal(0.01))(hidden)
        quantiles = nn.Dense(self.num_quantiles, kernel_init=nn.initializers.orthogonal(1.0))(hidden)
        return logits, quantiles


class Rollout(NamedTuple):
    """Time-major unroll of T steps; `obs` has T + 1 entries, the last one for bootstrapping."""

    obs: jnp.ndarray  # [T + 1, B, ...]
    actions: jnp.ndarray  # [T, B]
    behaviour_logits: jnp.ndarray  # [T, B, A]
    rewards: jnp.ndarray  # [T, B], unclipped
    terminations: jnp.ndarray  # [T, B], the episode terminated at this step
    truncations: jnp.ndarray  # [T, B], the episode was cut by the time limit at this step
    resets: jnp.ndarray  # [T, B], EnvPool reset the env at this step: no real transition, the action was ignored


def quantile_midpoints(num_quantiles: int) -> jnp.ndarray:
    """tau_i = (2i - 1) / 2N, i = 1..N."""
    return (2 * jnp.arange(num_quantiles) + 1) / (2.0 * num_quantiles)


def quantile_huber_loss(quantiles, targets, kappa: float = 1.0):
    """Quantile Huber loss of each source quantile (eq. 1-3), averaged over the target atoms.

    quantiles: [..., N] predictions Z_i at midpoints tau_i; targets: [..., M] target atoms (stop their gradient
    outside). Returns [..., N]: mean_j |tau_i - 1{u < 0}| Huber_kappa(u) with u = target_j - Z_i; kappa = 0 gives the
    quantile regression loss |tau_i - 1{u < 0}| |u| of eq. 1 (Huber_kappa would vanish).
    """
    taus = quantile_midpoints(quantiles.shape[-1])
    u = targets[..., None, :] - quantiles[..., :, None]  # [..., N, M]
    abs_u = jnp.abs(u)
    huber = abs_u if kappa == 0 else jnp.where(abs_u <= kappa, 0.5 * u**2, kappa * (abs_u - 0.5 * kappa))  # eq. 1, 2
    weight = jnp.abs(taus[:, None] - jax.lax.stop_gradient((u < 0).astype(u.dtype)))  # eq. 3
    return jnp.mean(weight * huber, axis=-1)


def distributional_vtrace(
    quantiles,
    bootstrap_quantiles,
    rewards,
    discounts,
    trace_masks,
    log_rhos,
    gamma,
    lambda_,
    alpha,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    pg_rho_bar: float = 1.0,
):
    """Distributional lambda-return with (leaky) v-trace, each quantile column on its own (eq. 9-10), and A_Z (eq. 11).

    quantiles Z(S_t): [T, B, N]; bootstrap_quantiles Z(S_T): [B, N]; rewards, discounts (0 where the episode ends by
    termination at t, else 1), trace_masks (0 where the traces must stop at t: a truncation; else 1), log_rhos
    log pi/mu: [T, B]; gamma, lambda_: [N] per quantile; alpha: scalar. Quantile q bootstraps from quantile q.
    Values and importance ratios are stop-gradiented; gamma, lambda_ and alpha stay differentiable.
    Returns (Gamma [T, B, N], A_Z [T, B]).
    """
    quantiles, bootstrap_quantiles = jax.lax.stop_gradient((quantiles, bootstrap_quantiles))
    rhos = jnp.exp(jax.lax.stop_gradient(log_rhos))[..., None]
    # Leaky v-trace (Zahavy et al. 2020) mixes clipped and unclipped ratios; alpha = 1 is IMPALA's v-trace.
    clipped_rhos = alpha * jnp.minimum(rho_bar, rhos) + (1 - alpha) * rhos
    cs = lambda_ * trace_masks[..., None] * (alpha * jnp.minimum(c_bar, rhos) + (1 - alpha) * rhos)
    gammas = gamma * discounts[..., None]  # [T, B, N]
    next_quantiles = jnp.concatenate([quantiles[1:], bootstrap_quantiles[None]], axis=0)
    # The paper typesets eq. 10 with c in front of delta; as IMPALA, rho weighs delta and lambda * c the traces.
    deltas = clipped_rhos * (rewards[..., None] + gammas * next_quantiles - quantiles)

    def backward(acc, xs):
        delta, gamma_t, c_t = xs
        acc = delta + gamma_t * c_t * acc
        return acc, acc

    _, corrections = jax.lax.scan(backward, jnp.zeros_like(bootstrap_quantiles), (deltas, gammas, cs), reverse=True)
    returns = quantiles + corrections  # eq. 10
    # Eq. 9, first line: Gamma_t = r_t + gamma [(1 - lambda) Z(S_t+1) + lambda Gamma_t+1]; at the end of the unroll
    # and where traces stop, bootstrap from Z(S_t+1) alone.
    lambdas = lambda_ * trace_masks[..., None]
    next_returns = jnp.concatenate([returns[1:], bootstrap_quantiles[None]], axis=0)
    q_estimates = rewards[..., None] + gammas * ((1 - lambdas) * next_quantiles + lambdas * next_returns)
    pg_advantages = jnp.minimum(pg_rho_bar, rhos[..., 0]) * jnp.mean(q_estimates - quantiles, axis=-1)  # A_Z, eq. 11
    return returns, pg_advantages


def split_halves(rollout: Rollout):
    """The two halves tau_1, tau_2 of the learner batch, split along the env axis (DrMG paper §5.2)."""
    half = rollout.actions.shape[1] // 2
    return jax.tree.map(lambda x: x[:, :half], rollout), jax.tree.map(lambda x: x[:, half:], rollout)


def chunk_mean(fn, rollout: Rollout, chunk_envs: Optional[int]):
    """fn(rollout) computed on at most `chunk_envs` envs at a time and averaged over the chunks (--chunk-envs).

    fn returns means over its rollout's T x B entries, so the mean over equal chunks is its value on the whole batch.
    The chunks run one after the other in a lax.scan, so only one chunk's activations are alive at once. The chunk
    size is the largest divisor of B not above `chunk_envs`; 0: the whole batch at once, without a scan; None: 16.
    """
    num_envs, chunk_envs = rollout.actions.shape[1], CPU_CHUNK_ENVS if chunk_envs is None else chunk_envs
    size = max(d for d in range(1, min(chunk_envs, num_envs) + 1) if num_envs % d == 0) if chunk_envs else num_envs
    if size == num_envs:
        return fn(rollout)
    chunks = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0], num_envs // size, size) + x.shape[2:]), 0, 1), rollout)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, jax.tree.map(lambda x: x[0], chunks)))
    total, _ = jax.lax.scan(lambda total, chunk: (jax.tree.map(jnp.add, total, fn(chunk)), None), zeros, chunks)
    return jax.tree.map(lambda x: x / (num_envs // size), total)


def hyperparameters(args: Args):
    """eta = {gamma, lambda, alpha, w_Z, w_pi, w_H} of eq. 9-11; constants here, one gamma, lambda and w_Z per quantile."""
    n = args.num_quantiles
    return dict(
        gamma=jnp.full((n,), args.gamma),
        lambda_=jnp.full((n,), args.lambda_),
        alpha=jnp.asarray(args.alpha),
        w_z=jnp.full((n,), args.value_coef),
        w_pi=jnp.asarray(args.policy_coef),
        w_h=jnp.asarray(args.ent_coef),
    )


def impala_loss(params, apply_fn, rollout: Rollout, eta, args: Args):
    """L = w_pi L_pi + w_H L_H + w_Z L_Z on one batch (eq. 11), with the hyperparameters eta."""
    num_steps, num_envs = rollout.actions.shape
    logits, quantiles = apply_fn(params, rollout.obs.reshape((-1,) + rollout.obs.shape[2:]))
    logits = logits.reshape(num_steps + 1, num_envs, -1)[:-1]
    quantiles = quantiles.reshape(num_steps + 1, num_envs, -1)
    log_pi = jax.nn.log_softmax(logits)
    log_pi_a = jnp.take_along_axis(log_pi, rollout.actions[..., None], axis=-1)[..., 0]
    log_mu_a = jnp.take_along_axis(jax.nn.log_softmax(rollout.behaviour_logits), rollout.actions[..., None], axis=-1)[..., 0]
    # A reset step is no transition: it must not bootstrap into the new episode nor enter the losses.
    valid = 1.0 - rollout.resets
    discounts = (1.0 - rollout.terminations) * valid
    trace_masks = 1.0 - rollout.truncations
    returns, pg_advantages = distributional_vtrace(
        quantiles[:-1],
        quantiles[-1],
        jnp.clip(rollout.rewards, -1.0, 1.0),  # reward clipping for learning (§5.2)
        discounts,
        trace_masks,
        log_pi_a - log_mu_a,
        eta["gamma"],
        eta["lambda_"],
        eta["alpha"],
        args.rho_bar,
        args.c_bar,
        args.pg_rho_bar,
    )
    # Means over all T x B entries (reset steps count as zeros) keep the loss additive across devices and halves.
    value_loss = jnp.mean(valid * jnp.mean(eta["w_z"] * quantile_huber_loss(quantiles[:-1], returns, args.huber_kappa), -1))
    # A_Z is built from stop-gradiented values and ratios: no gradient to theta, but eta's gradient stays (eq. 11).
    policy_loss = -jnp.mean(valid * pg_advantages * log_pi_a)
    entropy = jnp.mean(valid * -jnp.sum(jax.nn.softmax(logits) * log_pi, axis=-1))
    loss = eta["w_pi"] * policy_loss - eta["w_h"] * entropy + value_loss  # eq. 11, L_H as an entropy bonus
    return loss, dict(loss=loss, value_loss=value_loss, policy_loss=policy_loss, entropy=entropy)


def device_mean(tree, axis_name: Optional[str]):
    """The mean of `tree` over the learner devices (the shard_map axis `axis_name`); `tree` itself without one (None)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def non_finite(**trees):
    """Inside jit: for each tree, whether any of its entries is NaN or infinite."""
    return {
        name: ~jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)], bool))
        for name, tree in trees.items()
    }


def learner_step(learner_state: dict, rollout: Rollout, args: Args, axis_name: Optional[str] = "learner"):
    """One gradient step from the two halves of this device's batch, gradients averaged over learner devices.
    Returns the new learner state, the metrics that are logged and the checks that stop the run (`non_finite`)."""
    agent_state = learner_state["agent"]
    halves = [
        chunk_mean(
            lambda chunk: jax.grad(impala_loss, has_aux=True)(
                agent_state.params, agent_state.apply_fn, chunk, hyperparameters(args), args
            ),
            half,
            args.chunk_envs,
        )
        for half in split_halves(rollout)
    ]
    grads, metrics = jax.tree.map(lambda *h: sum(h) / len(h), *halves)
    grads, metrics = device_mean((grads, metrics), axis_name)
    metrics["grad_norm"] = optax.global_norm(grads)
    agent_state = agent_state.apply_gradients(grads=grads)
    checks = dict(non_finite=non_finite(loss=metrics["loss"], gradients=grads, parameters=agent_state.params))
    return dict(learner_state, agent=agent_state), metrics, checks


def make_learner_step(args: Args, mesh: Mesh):
    """Jit `learner_step`, the batch sharded along envs over the learner devices and the learner state replicated."""
    sharded = jax.shard_map(
        partial(learner_step, args=args), mesh=mesh, in_specs=(P(), P(None, "learner")), out_specs=(P(), P(), P()), check_vma=False
    )
    return jax.jit(sharded)


def make_network(num_actions: int, args: Args) -> nn.Module:
    """The agent's network for `num_actions` actions."""
    return AgentNetwork(num_actions, args.num_quantiles, args.network)


def init_params(network: nn.Module, key, obs, args: Args):
    """The network's initial parameters from a batch of observations."""
    return network.init(key, obs)


def make_learner_state(apply_fn, params, args: Args) -> dict:
    """What the learner carries from one update to the next: the agent's train state."""
    return dict(agent=TrainState.create(apply_fn=apply_fn, params=params, tx=make_optimizer(args)))


def policy_inputs(learner_state: dict, args: Args) -> dict:
    """What the policy acts with: the agent's parameters."""
    return dict(params=learner_state["agent"].params)


def policy_logits(network: nn.Module, inputs: dict, obs):
    """The behaviour policy's logits of a batch of observations."""
    return network.apply(inputs["params"], obs)[0]


def meta_scalars(meta: dict, args: Args) -> dict:
    """TensorBoard's meta/ tags and values of the learnt meta-parameters: QR learns none."""
    return {}


def learning_rate(args: Args, count):
    """The agent's learning rate after `count` updates: annealed linearly to 0 with --anneal-lr, constant otherwise."""
    return args.learning_rate * (1.0 - count / args.num_updates) if args.anneal_lr else args.learning_rate


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm, whose derivative stays finite at a zero gradient (optax's is NaN there: the norm's
    square root): a meta-gradient differentiates through this step, and a batch of reset steps alone has gradient 0.
    The norm gets 1e-30 under its root, below float32's resolution of any gradient that is not 0: the same values."""

    def update(updates, state, params=None):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(updates)) + 1e-30)
        return jax.tree.map(lambda t: jnp.where(norm < max_norm, t, (t / norm) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(args: Args):
    """The agent's optimiser: RMSProp or Adam (`--optimizer`) on the globally clipped gradient."""
    schedule = partial(learning_rate, args) if args.anneal_lr else args.learning_rate
    if args.optimizer == "adam":
        adam = optax.adam(schedule, eps=args.adam_eps, eps_root=args.adam_eps_root)
        return optax.chain(clip_by_global_norm(args.max_grad_norm), adam)
    return optax.chain(
        clip_by_global_norm(args.max_grad_norm),
        optax.rmsprop(schedule, decay=args.rmsprop_decay, eps=args.rmsprop_eps),
    )


# =====================================================================================================================
# THE LOOPS: for a JAX environment the whole loop on device (Podracer's Anakin); for EnvPool actor threads that feed
# the learner (Sebulba, Cleanba's loop). The same `learner_step` in both. Shared: change in all four.
# =====================================================================================================================


def make_env(env_id: str, seed: int, num_envs: int, args: Args):
    """EnvPool with the DrMG Atari setting (DrMG paper §5.2); MinAtar through gymnax (`minatar_jax.py`); JAX environments
    (`snake_jax`, ...) by module name."""
    if env_id.endswith("-MinAtar"):
        return importlib.import_module("minatar_jax").make_vec_env(env_id, num_envs=num_envs, seed=seed)
    if env_id.endswith("_jax"):
        return importlib.import_module(env_id).make_vec_env(num_envs=num_envs, seed=seed)
    kwargs = {}
    if "noop_max" in envpool.make_spec(env_id).config._fields:  # Atari
        kwargs = dict(
            episodic_life=False,
            reward_clip=False,  # the learner clips; the game score is logged unclipped
            repeat_action_probability=0.0,
            noop_max=args.noop_max,
            max_episode_steps=args.max_episode_steps,
            stack_num=4,
            img_height=84,
            img_width=84,
            gray_scale=True,
            frame_skip=4,
        )
    return envpool.make(
        env_id,
        env_type="gym",
        num_envs=num_envs,
        batch_size=num_envs,
        num_threads=args.envpool_threads,
        seed=seed,
        **kwargs,
    )


def is_jax_env(env_id: str) -> bool:
    """Whether `--env-id` is a JAX environment (MinAtar, `*_jax`): with a pure `batch_step` it trains on device."""
    return env_id.endswith(("-MinAtar", "_jax"))


class RunState(NamedTuple):
    """What the on-device loop carries from one update to the next, for one seed; the checkpoint keeps all of it, so a
    resumed run continues bit for bit."""

    learner: dict  # the learner state
    env_state: object  # the JAX environment's state, leaves [B, ...]
    obs: jax.Array  # [B, ...] the observations the next step acts on
    resets: jax.Array  # [B] bool: the env's episode ended at the last step, so the next step restarts it
    action_keys: jax.Array  # [B, 2] each env's PRNG key of its actions
    episode_returns: jax.Array  # [B] each env's return of its episode so far


def on_device_update(run: RunState, batch_step, network: nn.Module, args: Args, axis_name: Optional[str]):
    """One update of the on-device loop: --num-steps steps of the policy and the environment's pure
    `batch_step(env_state, actions) -> (env_state, (obs, reward, terminated, truncated, elapsed))` in a lax.scan, the
    same Rollout an actor thread would send, then `learner_step` on it. Returns the new RunState, the update's metrics
    and checks, and its steps' episode ends: (ended, episodic return, episodic length), each [T, B]."""
    inputs = policy_inputs(run.learner, args)

    def env_step(carry, _):
        env_state, obs, resets, keys, returns = carry
        keys, action_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        logits = policy_logits(network, inputs, obs)
        actions = jax.vmap(jax.random.categorical)(action_keys, logits).astype(jnp.int32)
        env_state, (next_obs, reward, terminated, truncated, elapsed) = batch_step(env_state, actions)
        returns, ended = returns + reward, terminated | truncated
        step = (obs, actions, logits, reward, terminated, truncated, resets, ended, returns, elapsed)
        return (env_state, next_obs, ended, keys, jnp.where(ended, 0.0, returns)), step

    carry = (run.env_state, run.obs, run.resets, run.action_keys, run.episode_returns)
    (env_state, obs, resets, keys, returns), steps = jax.lax.scan(env_step, carry, length=args.num_steps)
    step_obs, actions, logits, rewards, terminated, truncated, step_resets, ended, episodic_returns, elapsed = steps
    as_float = lambda x: x.astype(jnp.float32)  # noqa: E731 (what an actor thread sends the learner)
    rollout = Rollout(
        obs=jnp.concatenate([step_obs, obs[None]]),
        actions=actions,
        behaviour_logits=logits,
        rewards=as_float(rewards),
        terminations=as_float(terminated),
        truncations=as_float(truncated),
        resets=as_float(step_resets),
    )
    learner, metrics, checks = learner_step(run.learner, rollout, args, axis_name)
    return RunState(learner, env_state, obs, resets, keys, returns), (metrics, checks, (ended, episodic_returns, elapsed))


# The sharding of a RunState: the learner state replicated, the environments split along their axis (after the seeds').
RUN_SPECS = RunState(*[P()] + [P(None, "learner")] * 5)


def make_on_device_train(args: Args, mesh: Mesh, batch_step, network: nn.Module, num_updates: int):
    """Jit `num_updates` on-device updates of every seed: a lax.scan over the updates, vmapped over the seeds (the
    RunState's leading axis), the envs split over the learner devices and the gradients averaged over them.
    runs -> (runs, (metrics [S, K], checks [S, K], episode ends [S, K, T, B]))."""

    def train(runs, axis_name="learner"):
        update = partial(on_device_update, batch_step=batch_step, network=network, args=args, axis_name=axis_name)
        scan = partial(jax.lax.scan, lambda run, _: update(run), length=num_updates)
        if jax.tree.leaves(runs)[0].shape[0] == 1:  # one seed: not vmapped (XLA:CPU runs a vmapped network slower)
            return jax.tree.map(lambda x: x[None], scan(jax.tree.map(lambda x: x[0], runs)))
        return jax.vmap(scan)(runs)

    if mesh.size == 1:  # no collective to make: without shard_map, about 7% faster on a 2-core CPU
        return jax.jit(partial(train, axis_name=None))
    out_specs = (RUN_SPECS, (P(), P(), P(None, None, None, "learner")))
    return jax.jit(jax.shard_map(train, mesh=mesh, in_specs=(RUN_SPECS,), out_specs=out_specs, check_vma=False))


def new_run(args: Args, seed: int, network: nn.Module, obs_sample, on_device: bool) -> dict:
    """A seed's fresh start: its learner state from the seed's network key (the same for both loops), and on device its
    RunState (its learner state apart: `learner` {}), the environments reset from the seed, their action keys from its
    actor key."""
    network_key, actor_key = jax.random.split(jax.random.PRNGKey(seed), 3)[1:]
    learner = make_learner_state(network.apply, init_params(network, network_key, obs_sample, args), args)
    if not on_device:
        return dict(learner=learner, actor_key=actor_key)
    num_envs = args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids)
    envs = make_env(args.env_id, seed + jax.process_index() * 1000, num_envs, args)
    obs, _ = envs.reset()
    action_keys = jax.random.split(jax.random.fold_in(actor_key, jax.process_index()), num_envs)
    zeros = np.zeros(num_envs, np.float32)
    run = RunState({}, envs.state, jnp.asarray(obs), jnp.zeros(num_envs, bool), action_keys, jnp.asarray(zeros))
    return dict(learner=learner, run=run, batch_step=envs.batch_step, actor_key=actor_key)


def learner_dtype(dtype):
    """The actors send booleans and floats to the learner as float32."""
    return np.dtype(np.float32) if dtype == bool or np.dtype(dtype).kind == "f" else np.dtype(dtype)


def rollout_spec(args: Args, observation_space, num_actions: int, sharding) -> Rollout:
    """Shapes and dtypes of the learner's batch over all processes, as the actor threads fill it."""
    T, B = args.num_steps, args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids) * args.world_size
    spec = partial(jax.ShapeDtypeStruct, sharding=sharding)
    return Rollout(
        obs=spec((T + 1, B) + observation_space.shape, learner_dtype(observation_space.dtype)),
        actions=spec((T, B), np.int32),
        behaviour_logits=spec((T, B, num_actions), np.float32),
        **{name: spec((T, B), np.float32) for name in ("rewards", "terminations", "truncations", "resets")},
    )


def wait_on(queue_operation, stop: threading.Event, timeout: float, what: str):
    """Retry a blocking queue get or put every second until it succeeds; None once `stop` is set; TimeoutError after
    `timeout` seconds, saying `what` did not come."""
    start = time.time()
    while not stop.is_set():
        try:
            return queue_operation(timeout=1.0)
        except (queue.Empty, queue.Full):
            if time.time() - start > timeout:
                raise TimeoutError(f"{what} for {timeout:g} s")
    return None


def send(envs, actions):
    """Start a step of `envs`: EnvPool runs it in its own threads until `receive`; another vector env runs it here."""
    if hasattr(envs, "send"):
        envs.send(actions)
    else:
        envs.stepped = envs.step(actions)


def receive(envs):
    """(obs, rewards, terminations, truncations, episode lengths) of the step sent to `envs`, in the order of its envs."""
    obs, reward, terminated, truncated, info = envs.recv() if hasattr(envs, "recv") else envs.stepped
    order = np.argsort(info["env_id"]) if "env_id" in info else np.arange(len(reward))
    return obs[order], reward[order], terminated[order].astype(bool), truncated[order].astype(bool), info["elapsed_step"][order]


def actor_loop(
    key: jax.random.PRNGKey,
    args: Args,
    rollout_queue: queue.Queue,
    policy_queue: queue.Queue,
    writer: SummaryWriter,
    learner_devices: Sequence[jax.Device],
    thread_index: int,
    actor_device: jax.Device,
    start: Tuple[int, int],
    recent_returns: deque,
    stop: threading.Event,
    doing: List[str],
):
    """An actor thread: step its EnvPool with the latest policy it was given (`policy_inputs`), put each unroll on
    `rollout_queue`, from update and global step `start` until the last update or `stop`; `doing[thread_index]` says
    what it is doing.

    With --overlap-envs its envs are two EnvPools of half of them each (Podracer's Sebulba): while one half steps, in
    EnvPool's threads, the policy acts on the other, so the environments and the policy's inference overlap. Half h's
    seed is the thread's + h x the first half's size: env i has the seed it would have in one EnvPool of all of them."""
    num_envs = args.local_num_envs
    halves = [slice(0, (num_envs + 1) // 2), slice((num_envs + 1) // 2, num_envs)]
    halves = halves if args.overlap_envs and num_envs > 1 else [slice(0, num_envs)]
    seed = args.seed + jax.process_index() * 1000 + thread_index
    pools = [make_env(args.env_id, seed + part.start, part.stop - part.start, args) for part in halves]
    network = make_network(pools[0].action_space.n, args)
    # global steps per env step of this thread: every env of every actor thread of every process steps once meanwhile
    steps_per_tick = num_envs * args.num_actor_threads * len(args.actor_device_ids) * args.world_size

    @jax.jit
    def get_action(inputs, obs, key):
        key, subkey = jax.random.split(key)
        logits = policy_logits(network, inputs, obs)
        return jax.random.categorical(subkey, logits), logits, key

    episode_returns = np.zeros(num_envs)
    obs = np.concatenate([envs.reset()[0] for envs in pools])
    reset_next = np.zeros(num_envs, dtype=bool)  # EnvPool resets an env on the step after it is done
    start_update, global_step = start
    for update in range(start_update + 1, args.num_updates + 1):
        rollout_start = time.time()
        # Rollout k acts with the policy of update k - 2, whatever the speed of the hardware (Cleanba's rule): the
        # first two rollouts use the initial policy; the learner computes update k - 1 while rollout k runs.
        if update != start_update + 2:
            doing[thread_index] = "waiting for parameters from the learner"
            inputs = wait_on(policy_queue.get, stop, args.queue_timeout, "no parameters from the learner")
            if inputs is None:
                return
        policy_queue_get_time = time.time() - rollout_start
        env_time = inference_time = 0.0
        T = args.num_steps
        storage = dict(
            obs=np.zeros((T + 1, *obs.shape), obs.dtype),
            actions=[[None] * len(pools) for _ in range(T)],
            behaviour_logits=[[None] * len(pools) for _ in range(T)],
            rewards=np.zeros((T, num_envs), np.float32),
            terminations=np.zeros((T, num_envs), bool),
            truncations=np.zeros((T, num_envs), bool),
            resets=np.zeros((T, num_envs), bool),
        )
        finished = []  # (global step at its end, return, length) of every episode that ends in this unroll
        doing[thread_index] = "stepping its environments"
        for t in range(T + 1):
            for h, (envs, part) in enumerate(zip(pools, halves)):
                if t > 0:  # this half's step t - 1 ran while the policy acted on the other half
                    env_start = time.time()
                    obs[part], reward, terminated, truncated, lengths = receive(envs)
                    env_time += time.time() - env_start
                    storage["rewards"][t - 1, part] = reward
                    storage["terminations"][t - 1, part] = terminated
                    storage["truncations"][t - 1, part] = truncated
                    episode_returns[part] += reward
                    done = terminated | truncated
                    end_step = global_step + t * steps_per_tick
                    finished += [(end_step, r, n) for r, n in zip(episode_returns[part][done], lengths[done])]
                    episode_returns[part] = np.where(done, 0.0, episode_returns[part])
                    reset_next[part] = done
                if t == T:
                    continue
                if stop.is_set():
                    return
                inference_start = time.time()
                actions, logits, key = get_action(inputs, jax.device_put(obs[part], actor_device), key)
                actions = np.asarray(actions)
                inference_time += time.time() - inference_start
                storage["obs"][t, part] = obs[part]
                storage["actions"][t][h], storage["behaviour_logits"][t][h] = actions, logits
                storage["resets"][t, part] = reset_next[part]
                send(envs, actions)
        storage["obs"][T] = obs
        for name in ("actions", "behaviour_logits"):
            storage[name] = [np.concatenate([np.asarray(x) for x in halves_at_t]) for halves_at_t in storage[name]]
        global_step += args.num_steps * steps_per_tick
        # Stack and send each learner device its share of the envs now, while the learner is busy.
        device_put_start = time.time()
        shards = {}
        for name, values in storage.items():
            values = np.stack([np.asarray(v) for v in values]) if isinstance(values, list) else values
            values = values.astype(learner_dtype(values.dtype))
            shards[name] = [
                jax.device_put(v, d) for v, d in zip(np.split(values, len(learner_devices), axis=1), learner_devices)
            ]
        device_put_time = time.time() - device_put_start
        doing[thread_index] = "waiting for the learner to take its rollout"
        wait_on(partial(rollout_queue.put, (global_step, shards)), stop, args.queue_timeout, "the learner took no rollout")
        rollout_queue_put_time = time.time() - device_put_start - device_put_time
        if thread_index == 0:
            writer.add_scalar("stats/rollout_time", time.time() - rollout_start, global_step)
            writer.add_scalar("stats/params_queue_get_time", policy_queue_get_time, global_step)
            writer.add_scalar("stats/env_time", env_time, global_step)
            writer.add_scalar("stats/inference_time", inference_time, global_step)
            writer.add_scalar("stats/device_put_time", device_put_time, global_step)
            writer.add_scalar("stats/rollout_queue_put_time", rollout_queue_put_time, global_step)
        for end_step, episodic_return, episodic_length in finished:  # every episode of every thread, at its own step
            recent_returns.append(episodic_return)
            writer.add_scalar("charts/episodic_return", episodic_return, end_step)
            writer.add_scalar("charts/episodic_length", episodic_length, end_step)
        if thread_index == 0 and recent_returns:
            writer.add_scalar("charts/avg_episodic_return_last100", np.mean(recent_returns), global_step)
    doing[thread_index] = "done"


class Actors:
    """The actor threads of the actor-learner loop, one per actor device and thread, each with a queue for its rollouts
    and one for the policy it acts with. `next_batch()`: one rollout of every thread, joined along the envs into the
    learner's sharded batch; `hand_out(learner_state)`: the new policy to every thread; `close()`: stop and join them.
    A failed actor stops the run with its error; one that is stuck past --queue-timeout, with what it is doing."""

    def __init__(self, args: Args, learner_state, key, start, writer, recent_returns, stop, mesh, local_devices):
        self.args, self.stop, self.mesh, self.local_devices = args, stop, mesh, local_devices
        self.learner_devices = [local_devices[d] for d in args.learner_device_ids]
        self.errors, self.rollout_queues, self.policy_queues, self.threads = queue.Queue(), [], [], []
        self.doing = ["starting"] * (len(args.actor_device_ids) * args.num_actor_threads)
        for d_idx, d_id in enumerate(args.actor_device_ids):
            for thread_id in range(args.num_actor_threads):
                self.rollout_queues.append(queue.Queue(maxsize=1))
                self.policy_queues.append(queue.Queue(maxsize=1))
                self.policy_queues[-1].put(jax.device_put(self.local_policy(learner_state), local_devices[d_id]))
                key, thread_key = jax.random.split(key)
                loop_args = dict(key=thread_key, args=args, rollout_queue=self.rollout_queues[-1])
                loop_args.update(policy_queue=self.policy_queues[-1], writer=writer, learner_devices=self.learner_devices)
                loop_args.update(thread_index=d_idx * args.num_actor_threads + thread_id, actor_device=local_devices[d_id])
                loop_args.update(start=start, recent_returns=recent_returns, stop=stop, doing=self.doing)
                thread = threading.Thread(target=self.run, kwargs=loop_args, name=f"actor thread {len(self.threads)}")
                thread.daemon = True
                thread.start()
                self.threads.append(thread)

    def run(self, **loop_args):
        """`actor_loop`; its exception goes to `errors`, with which the learner stops the run instead of waiting forever."""
        try:
            actor_loop(**loop_args)
        except BaseException as e:  # noqa: B902
            self.errors.put((threading.current_thread().name, e))

    def local_policy(self, learner_state):
        """The policy's inputs of a replicated learner state, as this process's arrays."""
        return jax.tree.map(lambda x: x.addressable_shards[0].data, policy_inputs(learner_state, self.args))

    def wait(self, thread_index: int, operation, what: str):
        """`operation` on a thread's queue, retried every second; None once the run is asked to stop; a failed actor, or
        one that is stuck past --queue-timeout, stops the run."""
        start = time.time()
        while not self.stop.is_set():
            if not self.errors.empty():
                thread_name, error = self.errors.get()
                raise RuntimeError(f"{thread_name} failed: {type(error).__name__}: {error}") from error
            try:
                return operation(timeout=1.0)
            except (queue.Empty, queue.Full):
                if time.time() - start > self.args.queue_timeout:
                    doing = self.doing[thread_index]
                    raise TimeoutError(f"actor thread {thread_index} {what} for {self.args.queue_timeout:g} s: it is {doing}")
        return None

    def next_batch(self):
        """(global step after it, the learner's batch): one rollout of every thread, joined on each learner device along
        the envs; None once the run is asked to stop."""
        rollouts = [self.wait(i, q.get, "sent no rollout") for i, q in enumerate(self.rollout_queues)]
        if self.stop.is_set():
            return None
        sharding = NamedSharding(self.mesh, P(None, "learner"))

        def join(name):
            arrays = [
                jnp.concatenate([shards[name][i] for _, shards in rollouts], axis=1) for i in range(len(self.learner_devices))
            ]
            shape = arrays[0].shape
            global_shape = (shape[0], shape[1] * self.mesh.size) + shape[2:]
            return jax.make_array_from_single_device_arrays(global_shape, sharding, arrays)

        return rollouts[0][0], Rollout(**{name: join(name) for name in Rollout._fields})

    def hand_out(self, learner_state):
        """The policy of `learner_state` to every thread, on its actor device."""
        inputs = self.local_policy(learner_state)
        for i, q in enumerate(self.policy_queues):
            device = self.local_devices[self.args.actor_device_ids[i // self.args.num_actor_threads]]
            self.wait(i, partial(q.put, jax.device_put(inputs, device)), "took no parameters")

    def close(self):
        """Stop the threads and let them close their environments; a stuck one is left to end with the process."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


# =====================================================================================================================
# TRY NOT TO MODIFY: shared plumbing (argument checks, the CPU convolution, memory, checkpoints and resume,
# devices, logging, evaluation). Identical in the four scripts but where tests/test_siblings.py lists a difference:
# change in all four.
# =====================================================================================================================


def check_args(args: Args):
    """Fail before anything is written, with a message that says what to change."""
    minatar_games = ("Breakout-MinAtar", "SpaceInvaders-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar")  # minatar_jax.GAMES
    if not args.env_id.endswith("_jax") and args.env_id not in (*envpool.list_all_envs(), *minatar_games):
        close = difflib.get_close_matches(args.env_id, (*envpool.list_all_envs(), *minatar_games), n=5)
        raise SystemExit(f"unknown --env-id {args.env_id!r}; EnvPool and MinAtar ids close to it: {close}")
    if args.env_id.endswith("_jax") and not args.env_id.isidentifier():
        raise SystemExit(f"--env-id {args.env_id!r}: a JAX environment is a module name, without dots or a path")
    if args.env_id.endswith("_jax") and importlib.util.find_spec(args.env_id) is None:
        raise SystemExit(f"--env-id {args.env_id!r}: no JAX environment module of that name")
    for name in ("actor_device_ids", "learner_device_ids"):
        ids = getattr(args, name)
        if not ids or min(ids) < 0 or len(set(ids)) < len(ids):
            raise SystemExit(f"--{name.replace('_', '-')} {ids}: device indices must be >= 0 and distinct")
    if (args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids)) % (2 * len(args.learner_device_ids)):
        raise SystemExit("envs per process must split into two equal halves on every learner device")
    if min(args.num_quantiles, args.num_steps, args.local_num_envs, args.num_actor_threads) < 1:
        raise SystemExit("--num-quantiles, --num-steps, --local-num-envs and --num-actor-threads must be positive")
    if args.num_quantiles > MAX_QUANTILES:  # before compiling: a learner step at 10^6 quantiles takes minutes to refuse
        raise SystemExit(
            f"--num-quantiles {args.num_quantiles}: at most {MAX_QUANTILES} (the quantile loss compares every pair, "
            "N^2 numbers per step of each env)"
        )
    if not (0 <= args.gamma <= 1 and 0 <= args.lambda_ <= 1 and 0 <= args.alpha <= 1):
        raise SystemExit("--gamma, --lambda_ and --alpha must lie in [0, 1]")
    if not 0 <= args.huber_kappa < np.inf:
        raise SystemExit(f"--huber-kappa {args.huber_kappa}: must be >= 0 (0: the plain quantile loss of eq. 1)")
    if not all(0 < x < np.inf for x in (args.rho_bar, args.c_bar, args.pg_rho_bar)):
        raise SystemExit("--rho-bar, --c-bar and --pg-rho-bar must be positive and finite")
    if not all(0 <= x < np.inf for x in (args.value_coef, args.policy_coef, args.ent_coef, args.memory_limit_gib)):
        raise SystemExit("--value-coef, --policy-coef, --ent-coef and --memory-limit-gib must be >= 0 and finite")
    if args.chunk_envs is not None and args.chunk_envs < 0:
        raise SystemExit(f"--chunk-envs {args.chunk_envs}: must be >= 0 (0: the whole batch at once)")
    if args.noop_max < 0 or args.envpool_threads < 0 or args.max_episode_steps < 1:
        raise SystemExit("--noop-max and --envpool-threads must be >= 0 and --max-episode-steps >= 1")
    if args.envpool_threads > args.local_num_envs:  # EnvPool aborts natively on absurd counts; more are idle anyway
        raise SystemExit(f"--envpool-threads {args.envpool_threads}: at most --local-num-envs ({args.local_num_envs})")
    last_seed = args.seed + args.num_seeds + 1000 * (args.num_processes or 1) + args.num_actor_threads * len(args.actor_device_ids)
    if args.seed < 0 or last_seed > 2**31 - 1:  # EnvPool takes its seed as a C int
        raise SystemExit(f"--seed {args.seed}: the run's seeds (--seed + its seeds, processes and actor threads) must lie in [0, 2^31)")
    envs_steps = args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids) * args.num_steps
    if args.total_timesteps // max(1, envs_steps) > 2**31 - 1:  # the optimiser counts its steps in int32
        raise SystemExit(f"--total-timesteps {args.total_timesteps}: more than 2^31 - 1 updates of {envs_steps} steps")
    for spec in fields(args):  # EnvPool takes its sizes as C ints and XLA its shapes and loop counts as int32
        value = getattr(args, spec.name)
        too_big = [x for x in (value if isinstance(value, list) else [value]) if type(x) is int and x > 2**31 - 1]
        if too_big and spec.name != "total_timesteps":
            raise SystemExit(f"--{spec.name.replace('_', '-')} {too_big[0]}: at most 2^31 - 1")
    if args.num_seeds < 1 or (args.num_seeds > 1 and not is_jax_env(args.env_id)):
        raise SystemExit(f"--num-seeds {args.num_seeds}: at least 1, and more than 1 only for a JAX environment (MinAtar, *_jax)")
    if args.track and args.num_seeds > 1:
        raise SystemExit(f"--track follows one run in Weights & Biases: --num-seeds {args.num_seeds} needs --num-seeds 1")
    if args.log_frequency < 1 or args.eval_episodes < 1 or args.save_every < 0 or args.total_timesteps < 1:
        raise SystemExit("--log-frequency, --eval-episodes and --total-timesteps must be >= 1, --save-every >= 0")
    if not args.exp_name or "/" in args.exp_name or os.sep in args.exp_name:
        raise SystemExit(f"--exp-name {args.exp_name!r} must be a file name, without a path separator")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights & Biases: pip install wandb")
    if not all(
        0 < x < np.inf for x in (args.learning_rate, args.rmsprop_eps, args.adam_eps, args.max_grad_norm, args.queue_timeout)
    ):
        raise SystemExit(
            "--learning-rate, --rmsprop-eps, --adam-eps, --max-grad-norm and --queue-timeout must be positive and finite"
        )
    if not 0 <= args.rmsprop_decay < 1:
        raise SystemExit("--rmsprop-decay must lie in [0, 1)")
    if not 0 <= args.adam_eps_root < np.inf:
        raise SystemExit(f"--adam-eps-root {args.adam_eps_root}: must be >= 0 and finite")
    if not args.distributed and (args.coordinator_address or args.num_processes is not None or args.process_id is not None):
        raise SystemExit("--coordinator-address, --num-processes and --process-id go with --distributed")
    if (args.num_processes is not None and args.num_processes < 1) or not 0 <= (args.process_id or 0) < (args.num_processes or 2**62):
        raise SystemExit(f"--num-processes {args.num_processes}, --process-id {args.process_id}: need 0 <= id < processes")
    run_root = "runs" if os.path.exists("runs") else "."
    if not args.resume and not (os.path.isdir(run_root) and os.access(run_root, os.W_OK)):
        raise SystemExit(f"cannot write the run directory: {os.path.abspath(run_root)} is not a writable directory")
    if args.resume and not os.access(os.path.dirname(os.path.abspath(args.resume)), os.W_OK):
        raise SystemExit(f"cannot write the run directory of --resume {args.resume}")


def canonical_conv(x, kernel, padding):
    """Stride-1 convolution of NHWC `x` with an HWIO `kernel`; `padding`: (low, high) per spatial axis."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def flipped(kernel):
    """The kernel of the transposed convolution: spatially flipped, input and output channels swapped."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def transposed_padding(kernel, padding):
    return tuple((size - 1 - low, size - 1 - high) for size, (low, high) in zip(kernel.shape[:2], padding))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_conv(x, kernel, padding):
    """`canonical_conv` whose gradients of every order are canonical convolutions too.

    XLA:CPU puts only the convolutions outside loops in the canonical form of its fast kernels; the gradient
    convolutions that JAX emits run 10-30x slower inside the learner's scan over env chunks (jax#12868).
    """
    return canonical_conv(x, kernel, padding)


def cpu_conv_fwd(x, kernel, padding):
    return cpu_conv(x, kernel, padding), (x, kernel)


def cpu_conv_bwd(padding, residuals, dy):
    x, kernel = residuals
    return cpu_conv(dy, flipped(kernel), transposed_padding(kernel, padding)), cpu_conv_kernel_grad(x, dy, padding)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_conv_kernel_grad(x, dy, padding):
    """d <dy, cpu_conv(x, kernel)> / d kernel, as a canonical convolution whose channels are the batch axis."""
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return canonical_conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), ((0, 0), (0, 0))).transpose(1, 2, 0, 3)


def cpu_conv_kernel_grad_fwd(x, dy, padding):
    return cpu_conv_kernel_grad(x, dy, padding), (x, dy)


def cpu_conv_kernel_grad_bwd(padding, residuals, d_kernel):
    x, dy = residuals
    return cpu_conv(dy, flipped(d_kernel), transposed_padding(d_kernel, padding)), cpu_conv(x, d_kernel, padding)


cpu_conv.defvjp(cpu_conv_fwd, cpu_conv_bwd)
cpu_conv_kernel_grad.defvjp(cpu_conv_kernel_grad_fwd, cpu_conv_kernel_grad_bwd)


def available_memory(device: jax.Device) -> Optional[int]:
    """Bytes the learner can still take on `device`: the accelerator's free memory, or the machine's available RAM."""
    if device.platform != "cpu":
        stats = device.memory_stats()
        return stats["bytes_limit"] - stats["bytes_in_use"] if stats and "bytes_limit" in stats else None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def learner_memory(compiled, args: Args, learner_devices: Sequence[jax.Device]) -> Tuple[int, Optional[int]]:
    """(bytes the compiled learner step needs per learner device, bytes it may take there: --memory-limit-gib, else what
    the device reports free, or on CPU a host device's share of the available RAM; None where that is unknown)."""
    analysis = compiled.memory_analysis()
    needed = sum(getattr(analysis, f"{kind}_size_in_bytes") for kind in ("temp", "argument", "output"))
    needed -= analysis.alias_size_in_bytes
    available = args.memory_limit_gib * 2**30 or available_memory(learner_devices[0])
    if available is not None and learner_devices[0].platform == "cpu" and not args.memory_limit_gib:
        available //= len(learner_devices)  # host devices share the RAM
    return needed, available


def check_params_fit(init, args: Args, learner_devices: Sequence[jax.Device]):
    """Stop in one line, before anything is allocated or written, if the copies of the network's parameters
    (`init()`'s, read without running it: the parameters, their gradients, RMSProp's one state or Adam's two) cannot
    fit a learner device; the compiled learner step's check comes after."""
    copies = 4 if args.optimizer == "adam" else 3
    needed = copies * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(init)))
    available = args.memory_limit_gib * 2**30 or available_memory(learner_devices[0])
    if available is not None and needed > available:
        raise SystemExit(
            f"the network's parameters need {needed / 2**30:.1f} GiB ({copies} copies) and a learner device "
            f"({learner_devices[0].device_kind}) has {available / 2**30:.1f} GiB: lower the flags that size the network"
        )


def compile_learner_step(compile_at, args: Args, learner_devices: Sequence[jax.Device]):
    """(the compiled update, its --chunk-envs, a line on its chunk and memory); `compile_at(chunk_envs)` compiles the
    learner step, or the on-device loop's call, at a chunk.

    At --chunk-envs when it is given. Unset, on CPU at 16 (the fastest there: benchmark/update_time.py); on an
    accelerator at the largest chunk whose step fits the learner device: the whole batch, else half of it, a quarter,
    down to one env. Stops in one line, before anything is written, if even the last one tried does not fit."""
    envs = args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids) // len(learner_devices)
    if args.chunk_envs is not None or learner_devices[0].platform == "cpu":
        chunks = [CPU_CHUNK_ENVS if args.chunk_envs is None else args.chunk_envs]
    else:
        chunks = [0] + [envs >> k for k in range(1, envs.bit_length())]
    gib = lambda x: f"{x / 2**30:.1f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"  # noqa: E731
    for chunk_envs in chunks:
        compiled = compile_at(chunk_envs)
        needed, available = learner_memory(compiled, args, learner_devices)
        if available is None or needed <= available:
            how = "given" if args.chunk_envs is not None else "CPU" if learner_devices[0].platform == "cpu" else "largest to fit"
            there = gib(available) if available is not None else "unknown"
            return compiled, chunk_envs, f"learner step: {gib(needed)} per device of {there}, --chunk-envs {chunk_envs} ({how})"
    raise SystemExit(
        f"the learner step needs {gib(needed)} per learner device ({learner_devices[0].device_kind}) and there are "
        f"{gib(available)}: lower --chunk-envs (now {chunk_envs}), --local-num-envs or --num-steps"
    )


class NoWriter:
    """The TensorBoard writer of the processes other than process 0: they log nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    add_text = close = add_scalar


def local_copy(tree):
    """This process's copy of (replicated) arrays as numpy, also of arrays that span several processes."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x, tree)


# Which script wrote a checkpoint, and in which format (raise it when what save_checkpoint writes changes).
SCRIPT = os.path.basename(__file__)
CHECKPOINT_FORMAT = 2


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
    """(args, the network, the policy's inputs) of a checkpoint."""
    saved = load_checkpoint(path)
    args = saved["args"]
    envs = make_env(args.env_id, 0, 1, args)
    network = make_network(envs.action_space.n, args)
    obs = np.array([envs.observation_space.sample()])
    learner = make_learner_state(network.apply, init_params(network, jax.random.PRNGKey(0), obs, args), args)
    return args, network, policy_inputs(flax.serialization.from_state_dict(learner, saved["learner_state"]), args)


# Flags that may differ from the checkpoint's when a run resumes: where and how it runs, not what it learns.
RESUME_FLAGS = (
    *("resume", "total_timesteps", "save_model", "save_every", "eval_episodes", "log_frequency", "queue_timeout"),
    *("envpool_threads", "actor_device_ids", "learner_device_ids", "chunk_envs", "memory_limit_gib"),
    *("distributed", "coordinator_address", "num_processes", "process_id", "track", "wandb_project_name", "wandb_entity"),
)


def given_flags(argv: Sequence[str]) -> set:
    """The Args fields that `argv` names (`--no-x` names x), whatever their values: a resume checks each of them."""
    names, given = {f.name for f in fields(Args)}, set()
    for token in argv:
        name = token[2:].split("=")[0].replace("-", "_") if token.startswith("--") else ""
        given |= {name, name.removeprefix("no_")} & names
    return given


def resume_args(args: Args, given: set):
    """(the checkpoint's flags with the RESUME_FLAGS this command gives, the checkpoints of its seeds: of every run of
    its --num-seeds group, in seed order); one line if it cannot resume. Any other flag given (`given_flags`) must equal
    the checkpoint's, even where it equals the default."""

    def load(path):
        try:
            return load_checkpoint(path)
        except ForeignCheckpoint as e:
            raise SystemExit(f"--resume {path}: not a checkpoint of {SCRIPT}: {e}") from None
        except Exception as e:  # noqa: B902 (a missing file, not a checkpoint at all, another script's flags)
            raise SystemExit(f"--resume {path}: not a checkpoint of {SCRIPT} ({e})") from None

    saved = load(args.resume)
    saved.setdefault("group", json.dumps([os.path.basename(os.path.dirname(os.path.abspath(args.resume)))]))
    runs_dir, name = os.path.dirname(os.path.dirname(os.path.abspath(args.resume))), os.path.basename(args.resume)
    group = [
        saved if run == os.path.basename(os.path.dirname(os.path.abspath(args.resume))) else load(os.path.join(runs_dir, run, name))
        for run in json.loads(saved["group"])
    ]
    for name in sorted(given - set(RESUME_FLAGS)):
        if getattr(args, name) != getattr(saved["args"], name):
            raise SystemExit(f"--resume continues a run with its own flags: --{name.replace('_', '-')} cannot change")
    if len({int(s["update"]) for s in group}) > 1:
        raise SystemExit(f"--resume {args.resume}: the runs of its --num-seeds group stopped at different updates")
    return replace(saved["args"], **{name: getattr(args, name) for name in given & set(RESUME_FLAGS)}), group


def check_devices(args: Args, local_devices: Sequence[jax.Device]):
    """Device ids in range, before anything is written."""
    for name in ("actor_device_ids", "learner_device_ids"):
        if max(getattr(args, name)) >= len(local_devices):
            raise SystemExit(
                f"--{name.replace('_', '-')} {getattr(args, name)}: this process has {len(local_devices)} devices"
            )


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


class StopRequest:
    """SIGINT and SIGTERM. The first asks the run to stop at the host's next visit (after the current update, or the
    on-device loop's current call), save its checkpoint and exit 128 + signum; a second one exits at once, losing the
    work since the last checkpoint, and so does one before the run directory exists (while the update compiles, say)."""

    def __init__(self):
        self.event, self.signum, self.run_dir = threading.Event(), None, None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.run_dir is None:
            print(f"{name}: exit now, before the run started: nothing was written", flush=True)
            os._exit(128 + signum)
        if self.signum is not None:
            print(f"{name}: exit now; the work since the last checkpoint is lost", flush=True)
            os._exit(128 + signum)
        print(f"{name}: the run stops after the current update (a second signal exits now)", flush=True)
        self.signum = signum
        self.event.set()


def process_part(x):
    """This process's part of an array as numpy: a replicated one whole, one split along the envs (axis 1, after the
    seeds') as the envs of this process's devices, in order."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    shards = {tuple(s.start or 0 for s in shard.index): shard.data for shard in x.addressable_shards}
    parts = [np.asarray(shards[index]) for index in sorted(shards)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def stop_if_non_finite(checks, first_update: int, checkpoint_path: str, seeds: Sequence[int]):
    """Stop the run, naming the first update (and seed) whose loss, gradients or parameters are not finite; the last
    checkpoint is the last finite one. `checks["non_finite"]`: {name: flags [seeds, updates]} from update `first_update`."""
    flags = {name: np.asarray(bad).reshape(len(seeds), -1) for name, bad in jax.device_get(checks["non_finite"]).items()}
    any_bad = np.any(np.stack(list(flags.values())), axis=0)  # [seeds, updates]
    if any_bad.any():
        k = int(np.argmax(any_bad.any(axis=0)))
        seed_index = int(np.argmax(any_bad[:, k]))
        failed = [name for name, bad in flags.items() if bad[seed_index, k]]
        last = checkpoint_path if os.path.exists(checkpoint_path) else "none was written"
        which = f" of seed {seeds[seed_index]}" if len(seeds) > 1 else ""
        raise SystemExit(
            f"non-finite {' and '.join(failed)} at update {first_update + k}{which}: stopped; the last finite checkpoint: {last}"
        )


def report_saturated(checks, update: int, global_step: int, writer, reported: set):
    """Warn once per meta-parameter whose sigmoid is within 1e-6 of 0 or 1 with a zero meta-gradient
    (`checks["saturated"]`: {name: flags, any shape}), on the console and in TensorBoard's text."""
    for name, flags in jax.device_get(checks.get("saturated", {})).items():
        if np.any(flags) and name not in reported:
            reported.add(name)
            message = f"meta-parameter {name} saturated at update {update}: a sigmoid within 1e-6 of 0 or 1, meta-gradient 0"
            print(f"warning: {message}")
            writer.add_text("warnings", message, global_step)


def log_update(writer, args: Args, update: int, global_step: int, metrics: dict, stats: dict):
    """The update's scalars: the learning rate, the losses (losses/), the learnt meta-parameters (meta/) and the loop's
    timings (charts/SPS, stats/)."""
    metrics = dict(metrics)
    writer.add_scalar("charts/learning_rate", learning_rate(args, update), global_step)
    for tag, value in meta_scalars(metrics.pop("meta", {}), args).items():
        writer.add_scalar(tag, value, global_step)
    if "meta_grad_norm" in metrics:
        writer.add_scalar("meta/grad_norm", metrics.pop("meta_grad_norm"), global_step)
    for name, value in metrics.items():
        writer.add_scalar(f"losses/{name}", value, global_step)
    for tag, value in stats.items():
        writer.add_scalar(tag, value, global_step)


def log_episodes(writer, episodes, step_before: int, envs_per_step: int, recent_returns: deque):
    """Every episode that ended in the on-device loop's call, at its own global step, and the mean return of the last
    100. episodes: (ended, return, length), each [updates, T, B] of one seed; step_before: the global step before the
    call; envs_per_step: the global steps of one step of every env (the envs of every process)."""
    ended, returns, lengths = (np.asarray(x) for x in episodes)
    num_steps = ended.shape[1]
    for k, t, b in zip(*np.nonzero(ended)):
        end_step = step_before + (k * num_steps + t + 1) * envs_per_step
        recent_returns.append(float(returns[k, t, b]))
        writer.add_scalar("charts/episodic_return", returns[k, t, b], end_step)
        writer.add_scalar("charts/episodic_length", lengths[k, t, b], end_step)
    if recent_returns:
        step_after = step_before + ended.shape[0] * num_steps * envs_per_step
        writer.add_scalar("charts/avg_episodic_return_last100", np.mean(recent_returns), step_after)


def evaluate(model_path: str, eval_episodes: int, seed: int = 0):
    """Run the saved policy for `eval_episodes` episodes, one env each; return their unclipped returns."""
    args, network, inputs = load_model(model_path)
    envs = make_env(args.env_id, seed, eval_episodes, args)
    act = jax.jit(lambda p, o, k: jax.random.categorical(k, policy_logits(network, p, o)))
    key = jax.random.PRNGKey(seed)
    obs, _ = envs.reset()
    returns, episodic_returns = np.zeros(eval_episodes), np.full(eval_episodes, np.nan)
    while np.isnan(episodic_returns).any():
        key, subkey = jax.random.split(key)
        actions = act(inputs, obs, subkey)
        obs, reward, terminated, truncated, _ = envs.step(np.asarray(actions))
        returns += reward
        done = (terminated | truncated) & np.isnan(episodic_returns)
        episodic_returns[done] = returns[done]
    return episodic_returns


# =====================================================================================================================
# MAIN: setup, then the loop (on device for a JAX environment, actor threads for EnvPool), then shutdown.
# =====================================================================================================================

if __name__ == "__main__":
    # --- setup: flags, signals, devices, each seed's start, the compiled update, the run directories and writers
    sys.excepthook = print_cause_first
    args = tyro.cli(Args, default=default_args(sys.argv[1:]))
    args, saved = resume_args(args, given_flags(sys.argv[1:])) if args.resume else (args, [])
    check_args(args)
    stop = StopRequest()
    if args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # processes on CPUs reduce through gloo
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    local_devices = jax.local_devices()
    check_devices(args, local_devices)
    args.world_size = jax.process_count()
    args.local_batch_size = args.local_num_envs * args.num_actor_threads * len(args.actor_device_ids) * args.num_steps
    args.batch_size = args.local_batch_size * args.world_size
    args.num_updates = max(1, args.total_timesteps // args.batch_size)
    learner_devices = [local_devices[d] for d in args.learner_device_ids]
    global_learner_devices = [
        jax.devices()[d + p * len(local_devices)] for p in range(args.world_size) for d in args.learner_device_ids
    ]
    mesh = Mesh(np.array(global_learner_devices), ("learner",))
    seeds = [args.seed + i for i in range(args.num_seeds)]

    envs = make_env(args.env_id, args.seed, 1, args)
    on_device = is_jax_env(args.env_id) and hasattr(envs, "batch_step")  # a JAX env without a pure step: actor threads
    if len(seeds) > 1 and not on_device:
        raise SystemExit(f"--num-seeds {len(seeds)}: {args.env_id} has no pure batch_step to train on device")
    network = make_network(envs.action_space.n, args)
    obs_sample = np.array([envs.observation_space.sample()])
    check_params_fit(partial(init_params, network, jax.random.PRNGKey(0), obs_sample, args), args, learner_devices)
    observation_space, num_actions = envs.observation_space, envs.action_space.n
    del envs
    starts = [new_run(args, seed, network, obs_sample, on_device) for seed in seeds]
    update, global_step, recent_returns = 0, 0, [deque(maxlen=100) for _ in seeds]
    keep_envs = on_device and args.world_size == 1  # with several processes each has its own envs: they restart
    if saved:
        update, global_step = int(saved[0]["update"]), int(saved[0]["global_step"])
        for start, checkpoint, returns in zip(starts, saved, recent_returns):
            start["learner"] = flax.serialization.from_state_dict(start["learner"], checkpoint["learner_state"])
            if keep_envs:
                start["run"] = flax.serialization.from_state_dict(start["run"], checkpoint["run"])
            start["actor_key"] = jax.random.fold_in(checkpoint["actor_key"], update)
            returns.extend(checkpoint["returns"])

    def put(tree, spec):
        """Host arrays onto the learner mesh: this process's part of an array sharded by `spec`."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(x)), tree)

    if on_device:  # every seed's RunState stacked along a leading axis, the envs split over the learner devices
        seed_runs = [jax.tree.leaves(start["run"]._replace(learner=start["learner"])) for start in starts]
        stacked = jax.tree.unflatten(jax.tree.structure(starts[0]["run"]._replace(learner=starts[0]["learner"])), [np.stack(x) for x in zip(*seed_runs)])
        runs = RunState(*[put(part, spec) for part, spec in zip(stacked, RUN_SPECS)])
        batch_step, calls = starts[0]["batch_step"], max(1, min(args.log_frequency, args.num_updates - update))

        def compile_at(chunk_envs):
            return make_on_device_train(replace(args, chunk_envs=chunk_envs), mesh, batch_step, network, calls).lower(runs).compile()

    else:
        learner_state = put(starts[0]["learner"], P())
        spec = rollout_spec(args, observation_space, num_actions, NamedSharding(mesh, P(None, "learner")))

        def compile_at(chunk_envs):
            return make_learner_step(replace(args, chunk_envs=chunk_envs), mesh).lower(learner_state, spec).compile()

    loop = "on device (the policy, the environment and the learner in one program)" if on_device else "actor threads"
    print(f"compiling the learner step for a batch of {args.local_batch_size} steps, the loop {loop} ...", flush=True)
    update_fn, chunk_envs, memory = compile_learner_step(compile_at, args, learner_devices)
    # Created only now that the startup checks have passed, and exclusively: simultaneous runs never share one.
    if args.resume:
        run_dirs = [os.path.join(os.path.dirname(os.path.dirname(args.resume)), run) for run in json.loads(saved[0]["group"])]
    else:
        stamp = int(time.time())
        run_dirs = [make_run_dir(f"{args.env_id}__{args.exp_name}__{s}__{stamp}", jax.process_index() == 0) for s in seeds]
    stop.run_dir = run_dirs[0]
    checkpoint_paths = [os.path.join(run_dir, f"{args.exp_name}.flax_model") for run_dir in run_dirs]
    print(f"run {', '.join(run_dirs)}: {args.num_updates} updates of {args.batch_size} steps; learner devices {global_learner_devices}")
    print(memory)
    if args.total_timesteps < args.batch_size:
        print(f"--total-timesteps {args.total_timesteps} is less than one batch: the run makes 1 update of {args.batch_size} steps")
    if saved:
        restart = "" if keep_envs else "; environments restart"
        print(f"resumed from {args.resume} at update {update}, global step {global_step}{restart}")

    if args.track and jax.process_index() == 0:  # before the writer: wandb mirrors what the TensorBoard writer logs
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=os.path.basename(run_dirs[0]),
            save_code=True,
        )
    writers = [SummaryWriter(run_dir) if jax.process_index() == 0 else NoWriter() for run_dir in run_dirs]
    for seed, writer in zip(seeds, writers):
        table = "\n".join(f"|{key}|{value}|" for key, value in vars(replace(args, seed=seed, num_seeds=1)).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    atexit.register(lambda: [writer.close() for writer in writers])
    reported = [set() for _ in seeds]  # saturated meta-parameters, each reported once per run

    def save_checkpoints():
        """Every seed's checkpoint: its learner state, on device its environments, its step, keys and last returns."""
        if jax.process_index() != 0:
            return
        host = jax.tree.map(process_part, runs if on_device else learner_state)
        for i, path in enumerate(checkpoint_paths):
            state = jax.tree.map(lambda x: x[i], host) if on_device else host
            state = dict(learner_state=state.learner, run=state._replace(learner={})) if on_device else dict(learner_state=state)
            save_checkpoint(
                path,
                args,
                **state,
                update=update,
                global_step=global_step,
                actor_key=starts[i]["actor_key"],
                returns=np.asarray(recent_returns[i], np.float64),
                group=json.dumps([os.path.basename(run_dir) for run_dir in run_dirs]),
            )

    # --- the loop. On device: each call makes --log-frequency updates of every seed (unrolls and learner steps); between
    # calls the host logs every episode at its own step and the losses, saves the checkpoints and answers signals. With
    # actor threads: get a batch, update, hand the new policy out, log, save.
    start_time, start_step = time.time(), global_step
    if on_device:
        train = {calls: update_fn}
        run_args = replace(args, chunk_envs=chunk_envs)

        def start_call(runs, done: int):
            """Start the next call after `done` updates (JAX returns at once): (its updates, its outputs), None at the end."""
            if done >= args.num_updates or stop.event.is_set():
                return None
            calls = min(args.log_frequency, args.num_updates - done)
            if calls not in train:  # the run's last call, shorter
                train[calls] = make_on_device_train(run_args, mesh, batch_step, network, calls)
            return calls, train[calls](runs)

        in_flight, call_start = start_call(runs, update), time.time()
        while in_flight is not None:
            calls, (next_runs, (metrics, checks, episodes)) = in_flight
            # The device goes on with the next call while the host reads, checks and logs this one.
            in_flight = start_call(next_runs, update + calls)
            metrics, checks, episodes = jax.device_get(metrics), jax.device_get(checks), jax.tree.map(process_part, episodes)
            call_time, call_start = time.time() - call_start, time.time()
            stop_if_non_finite(checks, update + 1, checkpoint_paths[0], seeds)
            runs = next_runs  # checked: what a checkpoint may hold
            step_before, update, global_step = global_step, update + calls, global_step + calls * args.batch_size
            sps = int((global_step - start_step) / (time.time() - start_time))
            stats = {"charts/SPS": sps, "stats/update_time": call_time / calls}
            for i, writer in enumerate(writers):
                pick = partial(jax.tree.map, lambda x: x[i])
                log_episodes(writer, pick(episodes), step_before, args.batch_size // args.num_steps, recent_returns[i])
                report_saturated(pick(checks), update, global_step, writer, reported[i])
                log_update(writer, args, update, global_step, jax.tree.map(lambda x: x[i, -1], metrics), stats)
            returns = " ".join(f"{np.mean(r):.2f}" if r else "-" for r in recent_returns)
            print(
                f"update {update}/{args.num_updates} global_step={global_step} SPS={sps}"
                + (f" ({sps * len(seeds)} for {len(seeds)} seeds)" if len(seeds) > 1 else "")
                + f" loss={np.mean(metrics['loss'][:, -1]):.4f} entropy={np.mean(metrics['entropy'][:, -1]):.3f} return={returns}"
            )
            if args.save_every and update // args.save_every > (update - calls) // args.save_every:
                save_checkpoints()
    else:
        actors = Actors(args, learner_state, starts[0]["actor_key"], (update, global_step), writers[0], recent_returns[0], stop.event, mesh, local_devices)
        atexit.register(actors.close)
        learner_time = learner_wait_time = 0.0  # since the last log
        start_update = last_log = update
        while update < args.num_updates:
            wait_start = time.time()
            batch = actors.next_batch()
            if batch is None:
                break
            global_step, rollout = batch
            update_start = time.time()
            learner_state, metrics, checks = update_fn(learner_state, rollout)
            jax.block_until_ready(metrics)
            update += 1
            learner_wait_time += update_start - wait_start
            learner_time += time.time() - update_start
            stop_if_non_finite(checks, update, checkpoint_paths[0], seeds)
            report_saturated(checks, update, global_step, writers[0], reported[0])
            if update <= args.num_updates - 2:  # rollout k + 2 acts with this policy; later rollouts do not exist
                actors.hand_out(learner_state)
            if (update - start_update) % args.log_frequency == 0 or update in (start_update + 1, args.num_updates):
                sps = int((global_step - start_step) / (time.time() - start_time))
                busy = learner_time / (learner_time + learner_wait_time)
                metrics = jax.device_get(metrics)
                stats = {"charts/SPS": sps, "stats/learner_busy_fraction": busy}
                stats["stats/learner_update_time"] = learner_time / (update - last_log)
                stats["stats/rollout_queue_get_time"] = learner_wait_time / (update - last_log)
                log_update(writers[0], args, update, global_step, metrics, stats)
                print(
                    f"update {update}/{args.num_updates} global_step={global_step} SPS={sps} learner busy {busy:.0%} "
                    f"loss={metrics['loss']:.4f} entropy={metrics['entropy']:.3f}"
                )
                learner_time, learner_wait_time, last_log = 0.0, 0.0, update
            if args.save_every and update % args.save_every == 0:
                save_checkpoints()
        actors.close()

    # --- shutdown: the last checkpoints, the exit code of a stop signal, the evaluation of --save-model
    save_checkpoints()
    if jax.process_index() == 0:
        print(f"checkpoint saved to {', '.join(checkpoint_paths)}")
    final = jax.tree.map(process_part, runs.learner if on_device else learner_state)
    for i, seed in enumerate(seeds):
        params = jax.tree.map(lambda x: x[i], final["agent"].params) if on_device else final["agent"].params
        print(f"final parameters after update {update}" + (f" of seed {seed}" if len(seeds) > 1 else "") + f": sha256 {fingerprint(params)}")
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name} after update {update}; continue with --resume {checkpoint_paths[0]}")
        raise SystemExit(128 + stop.signum)
    if args.save_model and jax.process_index() == 0:
        for path, writer in zip(checkpoint_paths, writers):
            episodic_returns = evaluate(path, args.eval_episodes, seed=args.seed)
            for idx, episodic_return in enumerate(episodic_returns):
                writer.add_scalar("eval/episodic_return", episodic_return, idx)
            which = f" of {path}" if len(seeds) > 1 else ""
            print(f"evaluation over {args.eval_episodes} episodes{which}: mean return {np.mean(episodic_returns):.2f}")
