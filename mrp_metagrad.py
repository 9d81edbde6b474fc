"""Monte Carlo n-step meta-gradients of per-state discounts on a 10-state Markov reward process (Bonnet et al., §3.3, App. B.1,
C.1; the MRP of Xu et al. 2018).

States s_0 .. s_9 are visited left to right, once per episode; even states give reward 0.1, odd states a reward drawn from
N(0, 1). A value network v_theta(s_i), MLP(1, 10, 10, 1), learns from the inner target g_eta(s_i) = sum_{j>=i}
gamma_j^(j-i+1) r_j with one meta-learnt discount gamma_i per state, all starting at 0.5 (App. C.1). The outer loss is
the MSE to the undiscounted Monte Carlo return, at theta_t^(n) after n inner Adam steps (eq. 5). theta_{t+1} is one
inner step on one batch (eq. 8); eta_{t+1} follows the meta-gradient averaged over many independent look-ahead chains
(eq. 9, paper: 256). Odd gamma_i should fall towards 0 (they only add noise) and even gamma_i rise towards 1, faster
with more inner steps (Fig. 4).

    python mrp_metagrad.py                                  # n = 1, 5, 10; prints the gammas, saves a plot and a CSV
    python mrp_metagrad.py --inner-steps 1 --num-updates 500 --mc-samples 64
"""

import atexit
import csv
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tensorboardX import SummaryWriter

NUM_STATES = 10


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

    # Algorithm (Bonnet et al. Table 2, Markov reward process column)
    num_updates: int = 2000
    """updates of theta and eta (paper: not given; our choice)"""
    learning_rate: float = 1e-3
    """Adam learning rate alpha of the value network (constant)"""
    batch_size: int = 32
    """episodes per batch (inner and outer)"""
    gamma: float = 0.5
    """initial value of every per-state discount gamma_i"""
    noise_std: float = 1.0
    """standard deviation of the odd states' rewards"""
    even_reward: float = 0.1
    """reward of the even states"""
    adam_eps_root: float = 1e-8
    """epsilon of Adam inside the square root: keeps the meta-gradient through Adam finite (must be > 0)"""

    # Meta-gradient
    inner_steps: List[int] = field(default_factory=lambda: [1, 5, 10])
    """n of the n-step meta-gradient (eq. 5, 9); one run per value"""
    mc_samples: int = 256
    """independent look-ahead chains averaged into each meta-gradient (eq. 9)"""
    meta_learning_rate: float = 2e-3
    """Adam learning rate beta of the gamma logits"""


# =====================================================================================================================
# ALGO LOGIC: the value network, the discounted and Monte Carlo targets, the n-step meta-gradient of the
# per-state discounts, and the jitted training run.
# =====================================================================================================================


class ValueNetwork(nn.Module):
    """MLP(1, 10, 10, 1) on the state index scaled to [0, 1] (the input encoding is our choice)."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(10)(x))
        x = nn.tanh(nn.Dense(10)(x))
        return nn.Dense(1)(x)[..., 0]


def sample_rewards(key, batch_size: int, args: Args):
    """[B, 10] rewards of one pass through the chain: 0.1 on even states, N(0, noise_std^2) on odd ones (App. B.1)."""
    noise = args.noise_std * jax.random.normal(key, (batch_size, NUM_STATES))
    return jnp.where(jnp.arange(NUM_STATES) % 2 == 0, args.even_reward, noise)


def discounted_targets(rewards, gammas):
    """g_eta(s_i) = sum_{j>=i} gamma_j^(j-i+1) r_j (App. C.1): each reward discounted by its own state's gamma."""
    i, j = jnp.arange(NUM_STATES)[:, None], jnp.arange(NUM_STATES)[None, :]
    powers = jnp.where(j >= i, gammas[None, :] ** jnp.maximum(j - i + 1, 1), 0.0)  # [i, j]
    return rewards @ powers.T


def monte_carlo_targets(rewards):
    """g_eta'(s_i) = sum_{j>=i} r_j, the undiscounted return (gamma' = lambda' = 1, App. C.1)."""
    return jnp.flip(jnp.cumsum(jnp.flip(rewards, -1), -1), -1)


def value_loss(params, apply_fn, targets):
    """MSE 1/2 (g - v_theta(s))^2 over the batch and the states (App. C.1); the targets carry no gradient to theta."""
    states = jnp.arange(NUM_STATES, dtype=targets.dtype)[:, None] / (NUM_STATES - 1)
    return 0.5 * jnp.mean((targets - apply_fn(params, states)) ** 2)


def inner_update(params, opt_state, tx, apply_fn, rewards, gammas):
    """theta^(j+1) = theta^(j) + Adam(grad L(theta^(j), eta, tau^(j))) (eq. 5)."""
    grads = jax.grad(value_loss)(params, apply_fn, discounted_targets(rewards, gammas))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def n_step_outer_loss(gamma_logits, params, opt_state, tx, apply_fn, key, n: int, args: Args):
    """L'(theta^(n), eta', tau^(n)) after n inner steps with eta, each on a fresh batch (eq. 5); eq. 9's sample."""
    gammas = jax.nn.sigmoid(gamma_logits)
    keys = jax.random.split(key, n + 1)

    def step(carry, key):
        params, opt_state = carry
        return inner_update(params, opt_state, tx, apply_fn, sample_rewards(key, args.batch_size, args), gammas), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), keys[:n])
    return value_loss(params, apply_fn, monte_carlo_targets(sample_rewards(keys[n], args.batch_size, args)))


def monte_carlo_meta_gradient(gamma_logits, params, opt_state, tx, apply_fn, key, n: int, args: Args):
    """grad_eta E[L'(theta^(n))] (eq. 9): the mean of `mc_samples` independent n-step meta-gradients."""
    grad_fn = jax.grad(n_step_outer_loss)
    keys = jax.random.split(key, args.mc_samples)
    grads = jax.vmap(lambda k: grad_fn(gamma_logits, params, opt_state, tx, apply_fn, k, n, args))(keys)
    return jnp.mean(grads, axis=0)


def make_optimizer(args: Args):
    """The inner optimiser: Adam with eps_root > 0, so that the meta-gradient through its steps stays finite."""
    return optax.adam(args.learning_rate, eps_root=args.adam_eps_root)


def make_train(args: Args, n: int):
    """Jit the whole run for one n: (key) -> per-update gammas [U, 10] and inner/outer losses [U]."""
    network = ValueNetwork()
    tx, meta_tx = make_optimizer(args), optax.adam(args.meta_learning_rate)

    @jax.jit
    def train(key):
        key, init_key = jax.random.split(key)
        params = network.init(init_key, jnp.zeros((1, 1)))
        gamma_logits = jnp.full(NUM_STATES, jnp.log(args.gamma) - jnp.log1p(-args.gamma))
        carry = (params, tx.init(params), gamma_logits, meta_tx.init(gamma_logits))

        def update(carry, key):
            params, opt_state, gamma_logits, meta_opt_state = carry
            batch_key, meta_key, eval_key = jax.random.split(key, 3)
            meta_grad = monte_carlo_meta_gradient(gamma_logits, params, opt_state, tx, network.apply, meta_key, n, args)
            rewards = sample_rewards(batch_key, args.batch_size, args)
            inner = value_loss(params, network.apply, discounted_targets(rewards, jax.nn.sigmoid(gamma_logits)))
            params, opt_state = inner_update(
                params, opt_state, tx, network.apply, rewards, jax.nn.sigmoid(gamma_logits)
            )  # eq. 8
            meta_updates, meta_opt_state = meta_tx.update(meta_grad, meta_opt_state)
            gamma_logits = optax.apply_updates(gamma_logits, meta_updates)
            # the agent's error against the true values E[sum_{j>=i} r_j]
            true_values = monte_carlo_targets(jnp.where(jnp.arange(NUM_STATES) % 2 == 0, args.even_reward, 0.0))
            mse = value_loss(params, network.apply, true_values[None])
            return (params, opt_state, gamma_logits, meta_opt_state), (jax.nn.sigmoid(gamma_logits), inner, 2 * mse)

        _, (gammas, inner_losses, mses) = jax.lax.scan(update, carry, jax.random.split(key, args.num_updates))
        return gammas, inner_losses, mses

    return train


# =====================================================================================================================
# TRY NOT TO MODIFY: plumbing (the plot, error reports, argument checks).
# =====================================================================================================================


def plot_gammas(trajectories: dict, path: str) -> bool:
    """Even and odd gamma_i against updates, one colour per n (Fig. 4 b, c). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for color, (n, gammas) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], trajectories.items()):
        for i in range(NUM_STATES):
            ax = axes[i % 2]
            ax.plot(gammas[:, i], color=color, alpha=0.8, label=f"n = {n}" if i < 2 else None)
    for ax, title in zip(axes, ["even states (should rise to 1)", "odd states (should fall to 0)"]):
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend()
    axes[0].set_ylabel("gamma_i")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def print_cause_first(kind, error, traceback):
    """One line of cause first, then the traceback."""
    print(f"{os.path.basename(sys.argv[0])}: {kind.__name__}: {error}", file=sys.stderr, flush=True)
    sys.__excepthook__(kind, error, traceback)


def least_bytes(args: Args) -> int:
    """Bytes that one run holds at least: its per-update outputs and keys, and in each update the rewards of every inner
    step of the --mc-samples look-ahead chains, which the meta-gradient keeps for its backward pass. In Python
    integers, before any array is made; the compiled run's check comes after."""
    outputs = args.num_updates * (NUM_STATES + 2 + 2) * 4
    return outputs + args.mc_samples * (max(args.inner_steps) + 1) * args.batch_size * NUM_STATES * 4


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


def check_args(args: Args):
    """Fail before anything is written, with a message that says what to change."""
    if not args.inner_steps:
        raise SystemExit("--inner-steps: give at least one n")
    if min(args.num_updates, args.batch_size, args.mc_samples, *args.inner_steps) < 1 or not 0 < args.gamma < 1:
        raise SystemExit("--num-updates, --batch-size, --mc-samples and --inner-steps must be positive; --gamma in (0, 1)")
    if not (abs(args.even_reward) <= 1e18 and 0 <= args.noise_std <= 1e18):
        raise SystemExit("--even-reward must lie in [-1e18, 1e18] and --noise-std in [0, 1e18]: squared returns stay finite in float32")
    if not 0 < args.adam_eps_root < np.inf:
        raise SystemExit("--adam-eps-root must be > 0 and finite: the meta-gradient differentiates through Adam's square root")
    if not 0 <= args.seed <= 2**31 - 1:
        raise SystemExit(f"--seed {args.seed}: must lie in [0, 2^31)")
    if not (0 < args.learning_rate < np.inf and 0 < args.meta_learning_rate < np.inf):
        raise SystemExit("--learning-rate and --meta-learning-rate must be positive and finite")
    if not args.exp_name or "/" in args.exp_name or os.sep in args.exp_name:
        raise SystemExit(f"--exp-name {args.exp_name!r} must be a file name, without a path separator")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights & Biases: pip install wandb")
    needed, available = least_bytes(args), available_memory(jax.devices()[0])
    if available is not None and needed > available:
        raise SystemExit(
            f"a run needs at least {needed / 2**30:.3g} GiB and the device has {available / 2**30:.1f} GiB: "
            "lower --num-updates, --batch-size, --mc-samples or --inner-steps"
        )
    run_root = "runs" if os.path.exists("runs") else "."
    if not (os.path.isdir(run_root) and os.access(run_root, os.W_OK)):
        raise SystemExit(f"cannot write the run directory: {os.path.abspath(run_root)} is not a writable directory")


# =====================================================================================================================
# MAIN: the runs of each n, the CSV and the plot.
# =====================================================================================================================


if __name__ == "__main__":
    sys.excepthook = print_cause_first
    args = tyro.cli(Args)
    check_args(args)
    stop_signal = []  # SIGINT, SIGTERM: finish the current n (one jitted run), write what is done, exit 128 + signum

    def request_stop(signum, frame):
        if stop_signal:  # a second signal: exit now
            print(f"{signal.Signals(signum).name}: exit now; the n being run is lost", flush=True)
            os._exit(128 + signum)
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # compiled before anything is written (the jitted calls reuse them): a run that cannot fit stops here, in one line
    trains = {n: make_train(args, n) for n in args.inner_steps}
    for n, train in trains.items():
        lower = "--num-updates, --batch-size, --mc-samples or --inner-steps"
        check_fits(train.lower(jax.random.PRNGKey(args.seed)).compile(), f"the run of n = {n}", lower)
    run_dir = make_run_dir(f"mrp__{args.exp_name}__{args.seed}__{int(time.time())}")
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
    trajectories = {}
    for n in args.inner_steps:
        if stop_signal:
            break
        start = time.time()
        gammas, inner_losses, mses = jax.device_get(trains[n](jax.random.PRNGKey(args.seed)))
        bad = ~(np.isfinite(gammas).all(-1) & np.isfinite(inner_losses) & np.isfinite(mses))
        if bad.any():
            raise SystemExit(f"n = {n}: non-finite gammas or losses from update {int(np.argmax(bad))}: stopped")
        trajectories[n] = gammas
        for u in range(0, args.num_updates, max(1, args.num_updates // 200)):
            for i in range(NUM_STATES):
                writer.add_scalar(f"meta/n{n}/gamma_{i}", gammas[u, i], u)
            writer.add_scalar(f"losses/n{n}/inner_loss", inner_losses[u], u)
            writer.add_scalar(f"losses/n{n}/value_mse", mses[u], u)
        final = " ".join(f"{g:.3f}" for g in gammas[-1])
        print(f"n = {n:2d} ({time.time() - start:.1f} s): final gammas [{final}]; value MSE {mses[-1]:.4f}")
        print(f"        even mean {gammas[-1, 0::2].mean():.3f}, odd mean {gammas[-1, 1::2].mean():.3f}")
    csv_path = os.path.join(run_dir, "gammas.csv")
    with open(csv_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["n", "update"] + [f"gamma_{i}" for i in range(NUM_STATES)])
        for n, gammas in trajectories.items():
            out.writerows([n, u] + [f"{g:.5f}" for g in row] for u, row in enumerate(gammas))
    plot_path = os.path.join(run_dir, "gammas.png")
    print(
        f"gamma trajectories: {csv_path}"
        + (f", plot {plot_path}" if plot_gammas(trajectories, plot_path) else " (no plot: matplotlib missing)")
    )
    if stop_signal:
        raise SystemExit(128 + stop_signal[0])
