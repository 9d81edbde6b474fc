"""Plateau probe (issue 31): QR-IMPALA on MinAtar in an on-device ("Anakin") loop, with diagnostics.

The pure pieces of `qr_impala.py` are loaded AS OF a fixed commit (`--commit`, default d919d67) from git, under
another module name, so that edits to the working tree never change these runs: `AgentNetwork`, `Rollout`,
`learner_step`, `make_optimizer`, `Args`/`default_args`, `distributional_vtrace`, `impala_loss`. The environment is
`minatar_jax.batch_reset/batch_step` (EnvPool's auto-reset rule) from the repository.

Per update: `num_steps` moves of the policy and the games in a `lax.scan`, building the same Rollout as the script's
actor thread (`rollout` + `make_device_unroll`: obs has T + 1 entries, `resets[t]` = the env was done at t - 1), then
one `learner_step` on it (no policy lag: the actor acts with the learner's latest params). `--updates-per-call`
updates run in one jitted `lax.scan`; between calls the host collects the finished episodes and writes the JSON
result atomically, so a killed run keeps its partial curve.

Diagnostics (every `--diag-every` updates, averaged per call): the behaviour policy's entropy, KL(mu || pi_new) of
the update on its batch, explained variance of the critic (quantile mean vs the v-trace return target, mean over
quantiles), advantage mean/std, gradient norms per top-level module of the loss's parts (policy, entropy, value) and
of the total, and the action histogram.

    python benchmark/plateau_probe.py --name base_s1 --env-id Breakout-MinAtar --total-timesteps 10000000
    python benchmark/plateau_probe.py --name adam --variant adam --learning-rate 5e-4
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import typing
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402

import minatar_jax  # noqa: E402

VARIANTS = {
    "adam": "Adam (eps 1e-5 unless --adam-eps) instead of RMSProp, same lr schedule and clipping",
    "wide256": "torso: conv 16 VALID -> Dense 256",
    "conv2": "torso: conv 32 SAME -> conv 32 VALID -> Dense 256",
    "mlp64": "torso: PPO's MLP 64x64 ReLU on flattened obs",
    "mlp256": "torso: MLP 256x256 ReLU on flattened obs (gymnax-blines)",
    "resnet": "torso: IMPALA's ResNet (the script's --network resnet)",
    "separate": "separate policy and value torsos (each the chosen torso)",
    "advnorm": "normalise the policy-gradient advantage over the batch (mean 0, std 1)",
    "scalar": "scalar critic: --num-quantiles 1 with the squared error 0.5 u^2 instead of the quantile Huber loss",
    "tanh": "the MLP torsos with tanh instead of ReLU (PureJaxRL's default activation)",
}


def load_qr(commit: str):
    """qr_impala.py of `commit`, written to a scratch file and imported under its own module name."""
    full = subprocess.check_output(["git", "-C", REPO, "rev-parse", commit], text=True).strip()
    text = subprocess.check_output(["git", "-C", REPO, "show", f"{full}:qr_impala.py"], text=True)
    scratch = os.environ.get("PLATEAU_TMP", "/work/plateau_tmp")
    os.makedirs(scratch, exist_ok=True)
    name = f"qr_impala_at_{full[:10]}"
    path = os.path.join(scratch, name + ".py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, full


# ---------------------------------------------------------------------------------------------------------------------
# Variants: replacements built in the probe only.


def make_torso(qr, kind: str, activation):
    class MLPTorso(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            x = activation(nn.Dense(self.width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
            return activation(nn.Dense(self.width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))

    class ConvTorso(nn.Module):
        convs: tuple  # (channels, padding) per layer
        width: int

        @nn.compact
        def __call__(self, x):
            x = jnp.transpose(x, (0, 2, 3, 1))
            for channels, padding in self.convs:
                x = nn.relu(qr.conv3x3(channels, padding=padding)(x))
            return nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))

    if kind == "minatar":
        return lambda: qr.Torso("minatar")
    if kind == "resnet":
        return lambda: qr.Torso("resnet")
    if kind == "wide256":
        return lambda: ConvTorso(((16, "VALID"),), 256)
    if kind == "conv2":
        return lambda: ConvTorso(((32, "SAME"), (32, "VALID")), 256)
    if kind == "mlp64":
        return lambda: MLPTorso(64)
    if kind == "mlp256":
        return lambda: MLPTorso(256)
    raise ValueError(kind)


def make_network(qr, num_actions, num_quantiles, torso_kind: str, separate: bool, activation):
    new_torso = make_torso(qr, torso_kind, activation)

    class ProbeNetwork(nn.Module):
        """AgentNetwork's heads (same initialisers) on the chosen torso; `separate`: one torso per head."""

        @nn.compact
        def __call__(self, obs):
            hidden_pi = new_torso()(obs)
            hidden_v = new_torso()(obs) if separate else hidden_pi
            logits = nn.Dense(num_actions, kernel_init=nn.initializers.orthogonal(0.01), name="policy_head")(hidden_pi)
            quantiles = nn.Dense(num_quantiles, kernel_init=nn.initializers.orthogonal(1.0), name="value_head")(hidden_v)
            return logits, quantiles

    if torso_kind == "minatar" and not separate:
        return qr.AgentNetwork(num_actions, num_quantiles, "minatar")  # the script's own network
    return ProbeNetwork()


def patch_module(qr, variants):
    """Replace module-level pieces of the loaded copy (only this process's copy) for the loss variants."""
    if "advnorm" in variants:
        original = qr.distributional_vtrace

        def normalised(*a, **k):
            returns, adv = original(*a, **k)
            return returns, (adv - adv.mean()) / (adv.std() + 1e-8)

        qr.distributional_vtrace = normalised
    if "scalar" in variants:
        def squared_error(quantiles, targets, kappa=1.0):
            u = targets[..., None, :] - quantiles[..., :, None]
            return jnp.mean(0.5 * u**2, axis=-1)

        qr.quantile_huber_loss = squared_error


def grad_norm_recorder():
    """First link of the optimiser chain: records the (unclipped) gradient norm of each top-level module in its state."""

    def norms(updates):
        top = updates["params"] if "params" in updates else updates
        return {k: optax.global_norm(v) for k, v in top.items()}

    def init(params):
        return jax.tree.map(lambda _: jnp.zeros(()), norms(params))

    def update(updates, state, params=None):
        return updates, norms(updates)

    return optax.GradientTransformation(init, update)


def make_tx(qr, args, variants, adam_eps):
    if "adam" in variants:
        schedule = partial(qr.learning_rate, args) if args.anneal_lr else args.learning_rate
        base = optax.chain(qr.clip_by_global_norm(args.max_grad_norm), optax.adam(schedule, eps=adam_eps))
    else:
        base = qr.make_optimizer(args)
    return optax.chain(grad_norm_recorder(), base)


# ---------------------------------------------------------------------------------------------------------------------
# The loop.


def build(qr, args, probe):
    env_id, T, B = args.env_id, args.num_steps, args.local_num_envs
    batch_step = partial(minatar_jax.batch_step, env_id)
    game, params_ = minatar_jax.make_game(env_id)
    num_actions = game.num_actions
    activation = jnp.tanh if "tanh" in probe.variants else nn.relu
    network = make_network(qr, num_actions, args.num_quantiles, probe.torso, "separate" in probe.variants, activation)

    def get_action(params, obs, key):  # the actor thread's get_action
        logits, _ = network.apply(params, obs)
        key, subkey = jax.random.split(key)
        return jax.random.categorical(subkey, logits), logits, key

    def unroll(params, env_carry):
        """T moves, the Rollout exactly as the actor thread stores it, and the finished episodes."""
        env_state, obs, reset_next, key, ep_return = env_carry

        def one_step(carry, _):
            env_state, obs, reset_next, key, ep_return = carry
            actions, logits, key = get_action(params, obs, key)
            env_state, (next_obs, reward, terminated, truncated, elapsed) = batch_step(env_state, actions)
            ep_return = ep_return + reward
            done = terminated | truncated
            out = dict(
                obs=obs, actions=actions, behaviour_logits=logits, resets=reset_next, rewards=reward,
                terminations=terminated, truncations=truncated,
                ep_done=done, ep_return=ep_return, ep_length=elapsed,
            )
            ep_return = jnp.where(done, 0.0, ep_return)
            return (env_state, next_obs, done, key, ep_return), out

        carry, out = jax.lax.scan(one_step, env_carry, length=T)
        f32 = lambda x: x.astype(jnp.float32)  # qr.learner_dtype: booleans and floats go to the learner as float32
        rollout = qr.Rollout(
            obs=jnp.concatenate([out["obs"], carry[1][None]], 0).astype(jnp.float32),
            actions=out["actions"].astype(jnp.int32),
            behaviour_logits=f32(out["behaviour_logits"]),
            rewards=f32(out["rewards"]),
            terminations=f32(out["terminations"]),
            truncations=f32(out["truncations"]),
            resets=f32(out["resets"]),
        )
        episodes = (out["ep_done"], out["ep_return"], out["ep_length"])
        return carry, rollout, episodes

    eta = qr.hyperparameters(args)

    def diagnostics(old_state, new_state, rollout):
        apply = old_state.apply_fn
        n1 = rollout.obs.shape[0]
        flat = rollout.obs.reshape((-1,) + rollout.obs.shape[2:])
        _, q_old = apply(old_state.params, flat)
        q_old = q_old.reshape(n1, B, -1)
        new_logits, _ = apply(new_state.params, flat)
        new_logits = new_logits.reshape(n1, B, -1)[:-1]
        valid = 1.0 - rollout.resets
        nvalid = jnp.maximum(valid.sum(), 1.0)
        mmean = lambda x: jnp.sum(valid * x) / nvalid
        log_mu = jax.nn.log_softmax(rollout.behaviour_logits)
        log_pi = jax.nn.log_softmax(new_logits)
        kl = mmean(jnp.sum(jnp.exp(log_mu) * (log_mu - log_pi), -1))
        entropy_mu = mmean(-jnp.sum(jnp.exp(log_mu) * log_mu, -1))
        log_pi_a = jnp.take_along_axis(log_pi, rollout.actions[..., None], -1)[..., 0]
        log_mu_a = jnp.take_along_axis(log_mu, rollout.actions[..., None], -1)[..., 0]
        # the loss's own targets, with the old params (those of the update)
        logits_old, _ = apply(old_state.params, flat)
        log_old = jax.nn.log_softmax(logits_old.reshape(n1, B, -1)[:-1])
        log_old_a = jnp.take_along_axis(log_old, rollout.actions[..., None], -1)[..., 0]
        discounts = (1.0 - rollout.terminations) * valid
        returns, adv = qr.distributional_vtrace(
            q_old[:-1], q_old[-1], jnp.clip(rollout.rewards, -1.0, 1.0), discounts, 1.0 - rollout.truncations,
            log_old_a - log_mu_a, eta["gamma"], eta["lambda_"], eta["alpha"], args.rho_bar, args.c_bar, args.pg_rho_bar,
        )
        value = q_old[:-1].mean(-1)
        target = returns.mean(-1)
        var_t = mmean(target**2) - mmean(target) ** 2
        res = target - value
        var_r = mmean(res**2) - mmean(res) ** 2
        adv_mean = mmean(adv)
        adv_std = jnp.sqrt(jnp.maximum(mmean(adv**2) - adv_mean**2, 0.0))
        quantile_spread = mmean(q_old[:-1].max(-1) - q_old[:-1].min(-1))
        hist = jnp.sum(valid[..., None] * jax.nn.one_hot(rollout.actions, log_mu.shape[-1]), (0, 1)) / nvalid
        # gradient norms of the loss's parts, per top-level module, at the old params
        def part(name):
            def f(p):
                return qr.impala_loss(p, apply, rollout, eta, args)[1][name]
            g = jax.grad(f)(old_state.params)
            top = g["params"]
            return {k: optax.global_norm(v) for k, v in top.items()}
        gparts = {
            "policy": jax.tree.map(lambda x: args.policy_coef * x, part("policy_loss")),
            "entropy": jax.tree.map(lambda x: args.ent_coef * x, part("entropy")),
            "value": part("value_loss"),
        }
        return dict(
            kl=kl, entropy_mu=entropy_mu, explained_variance=1.0 - var_r / jnp.maximum(var_t, 1e-8),
            value_mean=mmean(value), target_mean=mmean(target), target_std=jnp.sqrt(jnp.maximum(var_t, 0.0)),
            adv_mean=adv_mean, adv_std=adv_std, adv_abs=mmean(jnp.abs(adv)), adv_pos=mmean((adv > 0).astype(jnp.float32)),
            quantile_spread=quantile_spread, action_hist=hist, grad_parts=gparts,
            grad_total=new_state.opt_state[0],
        )

    def update(carry, i):
        agent_state, env_carry = carry
        env_carry, rollout, episodes = unroll(agent_state.params, env_carry)
        new_state, metrics, checks = qr.learner_step(agent_state, rollout, args, axis_name=None)
        shape = jax.eval_shape(diagnostics, agent_state, new_state, rollout)
        diag = jax.lax.cond(
            i % probe.diag_every == 0,
            lambda: diagnostics(agent_state, new_state, rollout),
            lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape),
        )
        return (new_state, env_carry), (metrics, checks["non_finite"], diag, episodes)

    @partial(jax.jit, donate_argnums=(0,), static_argnums=(2,))
    def train_chunk(carry, start, length):
        # the last call runs only the updates left: the lr schedule reaches 0 at num_updates and must not go past it
        return jax.lax.scan(update, carry, start + jnp.arange(length))

    def init(seed):
        key = jax.random.PRNGKey(seed)
        key, network_key, action_key = jax.random.split(key, 3)
        _, reset_key = jax.random.split(jax.random.PRNGKey(seed))  # MinAtarVecEnv.reset's key
        env_state, obs = minatar_jax.batch_reset(env_id, reset_key, B)
        params = network.init(network_key, obs[:1])
        agent_state = TrainState.create(apply_fn=network.apply, params=params, tx=make_tx(qr, args, probe.variants, probe.adam_eps))
        env_carry = (env_state, obs, jnp.zeros(B, bool), action_key, jnp.zeros(B, jnp.float32))
        return agent_state, env_carry

    return init, train_chunk, num_actions


def to_py(x):
    if isinstance(x, dict):
        return {k: to_py(v) for k, v in x.items()}
    x = np.asarray(x)
    return x.tolist() if x.ndim else float(x)


def main():
    probe_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe_parser.add_argument("--name", required=True, help="result: benchmark/results/plateau/<name>.json")
    probe_parser.add_argument("--commit", default="d919d67", help="the commit of qr_impala.py to load")
    probe_parser.add_argument("--variant", action="append", default=[], help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    probe_parser.add_argument("--updates-per-call", type=int, default=100)
    probe_parser.add_argument("--diag-every", type=int, default=20)
    probe_parser.add_argument("--adam-eps", type=float, default=1e-5)
    probe_parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmark", "results", "plateau"))
    probe, rest = probe_parser.parse_known_args()
    probe.variants = [v for vs in probe.variant for v in vs.split(",") if v]
    for v in probe.variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: {sorted(VARIANTS)}")
    torsos = [v for v in probe.variants if v in ("wide256", "conv2", "mlp64", "mlp256", "resnet")]
    probe.torso = torsos[-1] if torsos else "minatar"

    qr, commit = load_qr(probe.commit)
    # every scalar field of the script's Args is a flag here, with the script's MinAtar defaults
    parser = argparse.ArgumentParser()
    for f in dataclasses.fields(qr.Args):
        flag = "--" + f.name.rstrip("_").replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.type in (int, float, str, "int", "float", "str") or typing.get_origin(f.type) is typing.Literal:
            t = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(flag, dest=f.name, type=str if typing.get_origin(t) is typing.Literal else t, default=None)
    given = parser.parse_args(rest)
    env_id = given.env_id or "Breakout-MinAtar"
    args = qr.default_args(["--env-id", env_id])
    args = dataclasses.replace(args, **{k: v for k, v in vars(given).items() if v is not None and k != "env_id"}, env_id=env_id)
    if "scalar" in probe.variants:
        args = dataclasses.replace(args, num_quantiles=1)
    batch = args.local_num_envs * args.num_steps
    args = dataclasses.replace(
        args, num_actor_threads=1, world_size=1, local_batch_size=batch, batch_size=batch,
        num_updates=args.total_timesteps // batch,
    )
    patch_module(qr, probe.variants)

    init, train_chunk, num_actions = build(qr, args, probe)
    carry = init(args.seed)
    os.makedirs(probe.out_dir, exist_ok=True)
    out_path = os.path.join(probe.out_dir, probe.name + ".json")
    episodes = []  # (global step at its end, return, length)
    curves = []
    result = dict(
        name=probe.name, command="python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        qr_impala_commit=commit, variants=probe.variants, torso=probe.torso, args=dataclasses.asdict(args),
        jax=jax.__version__, backend=jax.default_backend(), nice=os.nice(0), xla_flags=os.environ.get("XLA_FLAGS"),
    )
    start_time = time.time()
    compile_seconds = None
    update = 0
    while update < args.num_updates:
        t0 = time.time()
        carry, (metrics, nonfinite, diag, eps) = train_chunk(
            carry, jnp.asarray(update), min(probe.updates_per_call, args.num_updates - update)
        )
        metrics, nonfinite, diag, eps = jax.device_get((metrics, nonfinite, diag, eps))
        if compile_seconds is None:
            compile_seconds = time.time() - t0
            train_start = time.time()
            steps_at_train_start = (update + probe.updates_per_call) * batch
        done, rets, lens = eps  # [U, T, B]
        U = done.shape[0]
        for u in range(U):
            for t in range(args.num_steps):
                idx = np.nonzero(done[u, t])[0]
                step = (update + u) * batch + (t + 1) * args.local_num_envs
                episodes += [(step, float(rets[u, t, i]), int(lens[u, t, i])) for i in idx]
        update += U
        global_step = update * batch
        sel = ((update - U) + np.arange(U)) % probe.diag_every == 0
        point = dict(global_step=global_step, **{k: float(np.mean(v)) for k, v in metrics.items()})
        d = jax.tree.map(lambda x: np.mean(x[sel], axis=0), diag)
        point.update(to_py(d))
        recent = [e for e in episodes if e[0] > global_step - U * batch]
        point["episode_return"] = float(np.mean([e[1] for e in recent])) if recent else None
        point["episode_length"] = float(np.mean([e[2] for e in recent])) if recent else None
        point["episodes"] = len(recent)
        point["non_finite"] = bool(np.any([np.any(v) for v in jax.tree.leaves(nonfinite)]))
        curves.append(point)
        elapsed = time.time() - start_time
        trained = time.time() - train_start
        sps = (global_step - steps_at_train_start) / trained if trained > 0 and global_step > steps_at_train_start else None
        rets_all = np.array([e[1] for e in episodes]) if episodes else np.zeros(0)
        steps_all = np.array([e[0] for e in episodes]) if episodes else np.zeros(0)
        bins = {}
        for b in range(1, int(np.ceil(global_step / 500_000)) + 1):
            m = (steps_all > (b - 1) * 500_000) & (steps_all <= b * 500_000)
            if m.any():
                bins[f"{b * 0.5:g}M"] = float(rets_all[m].mean())
        def last10(upto):
            r = rets_all[steps_all <= upto]
            return float(r[-max(1, len(r) // 10):].mean()) if len(r) else None
        result.update(
            seconds=elapsed, compile_seconds=compile_seconds, sps=sps, global_step=global_step,
            updates=update, num_episodes=len(episodes), return_per_0_5M=bins,
            final_return_last10pct=last10(global_step),
            last10pct_at={f"{m}M": last10(m * 1_000_000) for m in (1, 2, 5, 10) if global_step >= m * 1_000_000},
            finished=update >= args.num_updates, stopped_non_finite=point["non_finite"], curves=curves,
        )
        with open(out_path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out_path + ".tmp", out_path)
        print(
            f"{global_step:>9d} steps  ret {point['episode_return'] if point['episode_return'] is None else round(point['episode_return'], 2)}"
            f"  len {point['episode_length'] and round(point['episode_length'], 1)}  H {point['entropy']:.3f}  KL {point['kl']:.2e}"
            f"  EV {point['explained_variance']:.2f}  adv {point['adv_mean']:+.3f}/{point['adv_std']:.3f}"
            f"  acts {np.round(point['action_hist'], 2).tolist()}  SPS {sps and int(sps)}",
            flush=True,
        )
        if point["non_finite"]:
            print("non-finite: stopped", flush=True)
            break
    print(json.dumps({k: result[k] for k in ("name", "final_return_last10pct", "last10pct_at", "sps", "seconds")}))


if __name__ == "__main__":
    main()
