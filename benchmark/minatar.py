"""The DrMG paper's comparison on MinAtar: QR, DrMG, MG and STACX (and DrMG's ablations) over games and seeds.

Protocol (DrMG paper §5.3): QR is DrMG({}), `drmg.py --meta-learn none`, the same agent at DrMG's initial eta with
nothing meta-learnt; MG and STACX start from DrMG's initial gamma, lambda and loss weights (0.99 w', `initial_eta`
checks it before anything runs; MG has no leaky v-trace). Every agent runs with the scripts' MinAtar defaults
(`ENV_DEFAULTS`) and the same --flags.

Each run works in runs/minatar_benchmark/{agent}/{game}_seed{seed} (its TensorBoard log, not kept) and, once it has
finished, leaves its results in {out_dir}/{agent}/{game}_seed{seed}.json: the command, steps, wall time and SPS, every
episode's return binned by --bin-steps, the mean return of the last 10% of its episodes, and the first and last logged
value of each meta-parameter. A run with results is not run again, so the grid can be stopped and continued; results
made with other flags are refused (use another --out-dir). The summary ({out_dir}/summary.md, one plot per game
{out_dir}/{game}.png, all games in {out_dir}/minatar.png; the same names prefixed "ablations_" for a grid with an
ablation agent):
    - per game and agent, the final return (mean of the last 10% of episodes), mean and std over seeds;
    - across games, the interquartile mean of normalised scores (0: a random policy's return, measured here and kept in
      {out_dir}/random.json; 1: gymnax's PPO reference at 10M steps) with 95% stratified bootstrap confidence intervals
      (rliable, Agarwal et al. 2021), over the games where every agent has all its seeds;
    - how far each agent's meta-parameters moved (mean over seeds and over a vector's entries).

    nice -n 10 python benchmark/minatar.py                                     # the table: 4 agents, 2 games, 3 seeds
    nice -n 10 python benchmark/minatar.py --agents drmg drmg_eta1 drmg_scalar drmg_nstep3 --games Breakout-MinAtar
    python benchmark/minatar.py --no-run                                       # the summary of what is there
"""

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grid import ROOT, binned, episodic_returns, eta_mismatch, initial_eta, latest_log, run_commands  # noqa: E402

LABELS = {
    "qr": "QR",
    "drmg": "DrMG",
    "mg": "MG",
    "stacx": "STACX",
    "drmg_eta1": "DrMG(eta1)",
    "drmg_scalar": "DrMG(eta-bar)",
    "drmg_nstep3": "DrMG + 3-step",
}
# agent: (script, its own flags). MG's and STACX's loss weights are set from DrMG's by `agent_flags`.
AGENTS = {
    "qr": ("drmg", ["--meta-learn", "none"]),
    "drmg": ("drmg", []),
    "mg": ("mg", []),
    "stacx": ("stacx", []),
    "drmg_eta1": ("drmg", ["--meta-learn", "eta1"]),
    "drmg_scalar": ("drmg", ["--scalar-eta"]),
    "drmg_nstep3": ("drmg", ["--n-step", "3"]),
}
# gymnax's PPO checkpoints after 10M steps (gymnax README): the 1 of the normalised score.
PPO_10M = {"Asterix-MinAtar": 15.0, "Breakout-MinAtar": 28.0, "Freeway-MinAtar": 58.0, "SpaceInvaders-MinAtar": 131.0}


@dataclass
class Args:
    agents: List[str] = field(default_factory=lambda: ["qr", "drmg", "mg", "stacx"])
    """the agents (keys of AGENTS)"""
    games: List[str] = field(default_factory=lambda: ["Breakout-MinAtar", "SpaceInvaders-MinAtar"])
    """MinAtar games of gymnax"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per agent, game and seed"""
    total_timesteps: int = 2_000_000
    """environment steps per run"""
    flags: str = ""
    """flags given to every script after its MinAtar defaults, e.g. --flags='--local-num-envs 32'"""
    jobs: int = 1
    """runs at the same time (each run uses every core it can: 1 on a small machine)"""
    run: bool = True
    """run what is missing (--no-run: only the summary)"""
    bin_steps: int = 50_000
    """the stored curves average the episodic returns in bins of this many steps"""
    out_dir: str = os.path.join(ROOT, "benchmark", "results", "minatar")
    """where the per-run results, random.json, summary.md and the plots go"""
    runs_dir: str = os.path.join(ROOT, "runs", "minatar_benchmark")
    """where the runs work"""
    bootstrap_reps: int = 50_000
    """bootstrap resamples of rliable's confidence intervals"""
    random_moves: int = 10_000
    """moves of each of 256 envs that measure a random policy's return on a game (once: kept in random.json)"""


def check_args(args: Args):
    unknown = [a for a in args.agents if a not in AGENTS]
    if unknown:
        raise SystemExit(f"--agents: unknown {unknown}; one of {sorted(AGENTS)}")
    sys.path.insert(0, ROOT)
    import minatar_jax

    games = [g for g in args.games if g not in minatar_jax.GAMES]
    if games:
        raise SystemExit(f"--games: unknown {games}; one of {list(minatar_jax.GAMES)}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds: at least one seed, none twice (got {args.seeds})")
    if min(args.total_timesteps, args.bin_steps, args.jobs, args.bootstrap_reps, args.random_moves) < 1:
        raise SystemExit("--total-timesteps, --bin-steps, --jobs, --bootstrap-reps and --random-moves must be positive")


def agent_flags(args: Args, agent: str, game: str) -> tuple[str, list[str]]:
    """(script, flags) of an agent on a game, without seed and budget. MG's fixed loss weights are DrMG's initial
    w = w' x weight_init; STACX gets DrMG's w' and weight_init (its own default w'_v is 0.25)."""
    script, own = AGENTS[agent]
    shared = ["--env-id", game, *shlex.split(args.flags)]
    if script in ("mg", "stacx"):
        reference = drmg_args(shared)
        scale = reference.weight_init if script == "mg" else 1.0
        weights = dict(value_coef=reference.value_coef, policy_coef=reference.policy_coef, ent_coef=reference.ent_coef)
        own = own + [f"--{k.replace('_', '-')}={v * scale!r}" for k, v in weights.items()]
        if script == "stacx":
            own += [f"--weight-init={reference.weight_init!r}"]
    return script, [*shared, *own]


def drmg_args(flags: list[str]):
    sys.path.insert(0, ROOT)
    import drmg

    return tyro.cli(drmg.Args, args=flags, default=drmg.default_args(flags))


def check_initial_eta(args: Args) -> dict:
    """{(agent, game): eta}: every agent starts from DrMG's eta on every game (MG without alpha), or one line."""
    etas = {}
    for game in args.games:
        game_etas = {agent: initial_eta(*agent_flags(args, agent, game)) for agent in args.agents}
        reference = initial_eta(*agent_flags(args, "drmg", game))
        mismatch = eta_mismatch(game_etas, reference, no_alpha=("mg",))
        if mismatch:
            raise SystemExit(f"{game}: {mismatch}")
        etas.update({(agent, game): eta for agent, eta in game_etas.items()})
    return etas


def result_path(args: Args, agent: str, game: str, seed: int) -> str:
    return os.path.join(args.out_dir, agent, f"{game}_seed{seed}.json")


def run_command(args: Args, agent: str, game: str, seed: int) -> list[str]:
    script, flags = agent_flags(args, agent, game)
    flags = [*flags, "--seed", str(seed), "--total-timesteps", str(args.total_timesteps), "--save-every", "0"]
    return [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags]


def shown_command(cmd: list[str]) -> str:
    """The command as a user types it in the repository root."""
    return " ".join(["python", os.path.relpath(cmd[1], ROOT), *map(shlex.quote, cmd[2:])])


def meta_parameters(work_dir: str) -> dict:
    """{name: {"initial", "final"}} of every logged meta-parameter (mean over a vector's entries; min and max too)."""
    accumulator = latest_log(work_dir)
    entries = {}
    for tag in accumulator.Tags()["scalars"] if accumulator else []:
        match = re.fullmatch(r"meta/([^/]+)(?:/[qh]\d+)?", tag)
        if match and match.group(1) != "grad_norm":
            values = [e.value for e in accumulator.Scalars(tag)]
            entries.setdefault(match.group(1), []).append((values[0], values[-1]))
    return {
        name: dict(
            initial=float(np.mean([v[0] for v in values])),
            final=float(np.mean([v[1] for v in values])),
            final_min=float(min(v[1] for v in values)),
            final_max=float(max(v[1] for v in values)),
        )
        for name, values in sorted(entries.items())
    }


def final_return(returns: np.ndarray) -> float:
    """The mean return of the last 10% of a run's episodes (at least one)."""
    return float(np.mean(returns[-max(1, len(returns) // 10) :]))


def collect(args: Args, agent: str, game: str, seed: int, work_dir: str, seconds: float) -> dict:
    steps, returns = episodic_returns(work_dir)
    accumulator = latest_log(work_dir)
    sps = [e.value for e in accumulator.Scalars("charts/SPS")] if "charts/SPS" in accumulator.Tags()["scalars"] else []
    import jax

    return dict(
        agent=agent,
        game=game,
        seed=seed,
        command=shown_command(run_command(args, agent, game, seed)),
        flags=args.flags,
        total_timesteps=args.total_timesteps,
        last_step=int(steps[-1]) if len(steps) else 0,
        episodes=len(returns),
        final_return=final_return(returns) if len(returns) else float("nan"),
        wall_seconds=round(seconds, 1),
        sps=float(sps[-1]) if sps else float("nan"),
        bin_steps=args.bin_steps,
        curve=[None if np.isnan(v) else round(float(v), 4) for v in binned(steps, returns, args.bin_steps, args.total_timesteps)],
        meta=meta_parameters(work_dir),
        versions=dict(python=platform.python_version(), jax=jax.__version__, machine=f"{os.cpu_count()} CPUs", commit=commit()),
    )


def commit() -> str:
    """The git commit of the scripts that ran ('+' if the working tree differs from it), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load(path: str):
    with open(path) as f:
        return json.load(f)


def run_missing(args: Args):
    """Run every (agent, game, seed) without results, --jobs at a time; write each one's results when it ends."""
    jobs = []
    for game in args.games:
        for seed in args.seeds:
            for agent in args.agents:
                path = result_path(args, agent, game, seed)
                if os.path.exists(path):
                    kept = load(path)
                    if kept["flags"] != args.flags or kept["total_timesteps"] != args.total_timesteps:
                        raise SystemExit(
                            f"{path} was made with --flags '{kept['flags']}' --total-timesteps {kept['total_timesteps']}: "
                            "use another --out-dir"
                        )
                    continue
                work_dir = os.path.join(args.runs_dir, agent, f"{game}_seed{seed}")
                jobs.append(((agent, game, seed), ["nice", "-n", "10", *run_command(args, agent, game, seed)], work_dir))
    print(f"{len(jobs)} runs to do, {args.jobs} at a time", flush=True)

    def on_done(name, work_dir, returncode, seconds):
        if returncode != 0:
            return
        agent, game, seed = name
        result = collect(args, agent, game, seed, work_dir, seconds)
        path = result_path(args, agent, game, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"    {LABELS[agent]} {game} seed {seed}: final return {result['final_return']:.2f}, {result['sps']:.0f} SPS")

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    run_commands([(name, cmd, work_dir) for name, cmd, work_dir in jobs], args.jobs, env, on_done)


def random_returns(args: Args) -> dict:
    """{game: mean return of a uniformly random policy}, measured once over 256 envs x --random-moves moves (at least
    1,000 episodes on every game with the default) and kept in {out_dir}/random.json."""
    path = os.path.join(args.out_dir, "random.json")
    kept = load(path) if os.path.exists(path) else {}
    missing = [g for g in args.games if g not in kept]
    if missing:
        import jax
        import jax.numpy as jnp

        sys.path.insert(0, ROOT)
        import minatar_jax

        for game in missing:
            num_envs, num_steps = 256, args.random_moves
            num_actions = minatar_jax.make_game(game)[0].num_actions

            def one_step(carry, key, game=game):
                env_state, running, total, count = carry
                actions = jax.random.randint(key, (num_envs,), 0, num_actions)
                env_state, (_, reward, terminated, truncated, _) = minatar_jax.batch_step(game, env_state, actions)
                running = running + reward
                done = terminated | truncated
                return (env_state, jnp.where(done, 0.0, running), total + jnp.sum(running * done), count + jnp.sum(done)), None

            key = jax.random.PRNGKey(0)
            carry = (minatar_jax.batch_reset(game, key, num_envs)[0], jnp.zeros(num_envs), 0.0, 0)
            (_, _, total, count), _ = jax.jit(lambda c, k: jax.lax.scan(one_step, c, k))(carry, jax.random.split(key, num_steps))
            kept[game] = dict(mean_return=float(total / count), episodes=int(count), moves=num_envs * num_steps)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(kept, f, indent=1)
    return {g: kept[g]["mean_return"] for g in args.games}


def iqm_with_ci(scores: dict, reps: int) -> dict:
    """{agent: (IQM, low, high)} of normalised scores [runs, games]: rliable's stratified bootstrap, 95% intervals."""
    from rliable import library as rly
    from rliable import metrics

    point, interval = rly.get_interval_estimates(
        scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps, random_state=np.random.RandomState(0)
    )
    return {a: (float(point[a][0]), float(interval[a][0, 0]), float(interval[a][1, 0])) for a in scores}


def stem(args: Args) -> str:
    """The prefix of this grid's summary and plots: none for the table's agents (QR, DrMG, MG, STACX), "ablations_" for a
    grid with an ablation, so that it never overwrites the table's files."""
    return "" if set(args.agents) <= set(Args().agents) else "ablations_"


def summarise(args: Args) -> str:
    results = {}
    for agent in args.agents:
        for game in args.games:
            for seed in args.seeds:
                path = result_path(args, agent, game, seed)
                if os.path.exists(path):
                    results[agent, game, seed] = load(path)
    if not results:
        raise SystemExit(f"no results under {args.out_dir} for this grid")
    random = random_returns(args)
    lines = [
        "# MinAtar: " + ", ".join(LABELS[a] for a in args.agents),
        "",
        f"Final return (mean of the last 10% of episodes) after {args.total_timesteps:,} steps, mean ± std over seeds (n);",
        "a random policy's return and gymnax's PPO reference after 10M steps beside it.",
        "",
        "| game | " + " | ".join(LABELS[a] for a in args.agents) + " | random | PPO (10M) |",
        "|---|" + "---|" * (len(args.agents) + 2),
    ]
    for game in args.games:
        cells = []
        for agent in args.agents:
            values = [results[agent, game, s]["final_return"] for s in args.seeds if (agent, game, s) in results]
            cells.append(f"{np.mean(values):.2f} ± {np.std(values):.2f} ({len(values)})" if values else "–")
        lines.append(f"| {game} | " + " | ".join(cells) + f" | {random[game]:.2f} | {PPO_10M[game]:g} |")
    complete = [g for g in args.games if all((a, g, s) in results for a in args.agents for s in args.seeds)]
    if complete:
        scores = {
            LABELS[a]: np.array(
                [
                    [(results[a, g, s]["final_return"] - random[g]) / (PPO_10M[g] - random[g]) for g in complete]
                    for s in args.seeds
                ]
            )
            for a in args.agents
        }
        lines += [
            "",
            f"Interquartile mean of normalised scores over {', '.join(complete)} ({len(args.seeds)} seeds; 0: random, 1:",
            f"PPO at 10M steps), 95% stratified bootstrap confidence interval (rliable, {args.bootstrap_reps:,} resamples):",
            "",
            "| agent | IQM | 95% CI |",
            "|---|---|---|",
        ]
        for label, (iqm, low, high) in iqm_with_ci(scores, args.bootstrap_reps).items():
            lines.append(f"| {label} | {iqm:.3f} | [{low:.3f}, {high:.3f}] |")
    moved = []
    for agent in args.agents:
        runs = [r for r in results.values() if r["agent"] == agent and r["meta"]]
        names = sorted({n for r in runs for n in r["meta"]})
        cells = []
        for name in names:
            pairs = [(r["meta"][name]["initial"], r["meta"][name]["final"]) for r in runs if name in r["meta"]]
            if any(abs(b - a) > 0 for a, b in pairs):
                cells.append(f"{name} {np.mean([p[0] for p in pairs]):.4g} → {np.mean([p[1] for p in pairs]):.4g}")
        if cells:
            moved.append(f"- {LABELS[agent]}: " + ", ".join(cells))
    if moved:
        lines += ["", "Meta-parameters, first logged → last (mean over runs and over a vector's entries):", "", *moved]
    commands = sorted({r["command"].replace(f"--seed {r['seed']}", "--seed S") for r in results.values()})
    lines += ["", "Commands (S: the seed):", "", "```", *commands, "```", ""]
    summary = "\n".join(lines)
    with open(os.path.join(args.out_dir, f"{stem(args)}summary.md"), "w") as f:
        f.write(summary)
    try:
        plot(args, results)
    except ImportError:
        print("matplotlib is not installed: no plot")
    return summary


def plot(args: Args, results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, game):
        for agent in args.agents:
            curves = [np.array(r["curve"], float) for (a, g, _), r in sorted(results.items()) if a == agent and g == game]
            if not curves:
                continue
            curves = np.stack(curves)
            centres = (np.arange(curves.shape[1]) + 0.5) * args.bin_steps
            with np.errstate(invalid="ignore"):
                line = ax.plot(centres, np.nanmean(curves, 0), label=f"{LABELS[agent]} ({len(curves)})")[0]
                ax.fill_between(centres, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
        ax.set_title(game, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"episodic return ({args.bin_steps:,}-step bins)")
        ax.legend(fontsize=8)

    for game in args.games:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, game)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, f"{stem(args)}{game}.png"), dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(args.games), figsize=(5 * len(args.games), 3.8), squeeze=False)
    for ax, game in zip(axes[0], args.games):
        draw(ax, game)
    fig.suptitle("MinAtar: mean over seeds, band min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, f"{stem(args)}minatar.png"), dpi=110)
    plt.close(fig)


def main(args: Args):
    warnings.simplefilter("ignore", RuntimeWarning)  # means of empty bins
    check_args(args)
    for (agent, game), eta in check_initial_eta(args).items():
        if game == args.games[0]:
            print(f"{LABELS[agent]} starts from " + ", ".join(f"{k}={v:.6g}" for k, v in eta.items()))
    if args.run:
        start = time.time()
        run_missing(args)
        print(f"grid done in {time.time() - start:.0f} s")
    print(summarise(args))


if __name__ == "__main__":
    main(tyro.cli(Args))
