"""The DrMG paper's comparison on MinAtar: QR, DrMG, MG, STACX and the fixed-eta controls MG({}) and STACX({}) (and
DrMG's ablations) over games and seeds.

Protocol (DrMG paper §5.3): every meta agent has a twin, the same command with `--meta-learn none` (TWINS): QR is
DrMG({}), `drmg.py --meta-learn none`, the same agent at DrMG's initial eta with nothing meta-learnt; MG({}) and
STACX({}) are MG and STACX at their initial eta. MG and STACX (and their twins) start from DrMG's initial gamma, lambda
and loss weights (0.99 w', `initial_eta` checks it before anything runs; MG has no leaky v-trace). Every agent runs
with the scripts' MinAtar defaults (`ENV_DEFAULTS`) and the same --flags.

Each run works in runs/minatar_benchmark/{agent}/{game}_seed{seed} (its TensorBoard log, not kept) and, once it has
finished, leaves its results in {out_dir}/{agent}/{game}_seed{seed}.json: the command, steps, wall time and SPS, every
episode's return binned by --bin-steps, the mean return of the last 10% of its episodes, and the first and last logged
value of each meta-parameter (a run shorter than one bin has one bin). A run with results is not run again, so the grid
can be stopped and continued; results made with other flags are refused (use another --out-dir). Before the first run,
the grid's flags and every cell's command are checked (the command by its script's own default_args and check_args),
so that a bad --flags stops the grid once, in one line, before anything is written.

Runs end with the driver (benchmark/children.py): stopped by a signal or an exception, it says which runs it stopped;
killed (kill -9), the kernel kills them. Each cell runs under a lock ({out_dir}/{agent}/{game}_seed{seed}.lock, and one
beside its work directory), which the kernel releases if the driver dies: a second driver on the same --out-dir skips
the cells the first is running and says so, so every cell runs once. Results are written atomically. A result file
that cannot be read back (truncated, not JSON, missing a field, another cell's) is named in one line with what to do
(move it aside: the cell then runs again) and left out, and the rest is run and summarised (--no-run too). A run whose
result cannot be collected keeps its work directory, renamed {work_dir}.uncollected-TIME, and says so. The summary ({out_dir}/summary.md, one plot per game
{out_dir}/{game}.png, all games in {out_dir}/minatar.png; the same names prefixed "ablations_" for a grid with an
ablation agent), deterministic for the same results:
    - per game and agent, the final return (mean of the last 10% of episodes): mean and sample std (ddof = 1) over
      seeds, and their number; then each run's, marked where it is below the random policy's (a collapsed seed);
    - across games, the interquartile mean of normalised scores (0: a random policy's return, measured here and kept in
      {out_dir}/random.json; 1: gymnax's PPO reference at 10M steps) with 95% stratified bootstrap confidence intervals
      (rliable, Agarwal et al. 2021), over the games where every agent has all its seeds;
    - on the same scores, the probability of improvement P(X > Y) with its 95% stratified bootstrap confidence interval
      (rliable) of each meta agent over its twin, of DrMG over MG and over STACX, and of DrMG over each of its ablations
      (IMPROVEMENTS: the pairs whose two agents are in the grid); then the same on each game alone, without interval;
    - how far each agent's meta-parameters moved (mean over seeds and over a vector's entries);
    - the commands, and the results copied from an earlier grid of the same runs, if any: such a file keeps its own
      command and flags in `adopted_from` (path, flags) and carries this grid's --flags.

    nice -n 10 python benchmark/minatar.py         # the table: 6 agents, 4 games, 3 seeds, 10M steps
    nice -n 10 python benchmark/minatar.py --agents drmg drmg_eta1 drmg_scalar drmg_nstep3 --games Breakout-MinAtar
    # the older table (4 agents, 2 games, 3 seeds, 2M steps), in benchmark/results/minatar:
    nice -n 10 python benchmark/minatar.py --agents qr drmg mg stacx --games Breakout-MinAtar SpaceInvaders-MinAtar \\
        --total-timesteps 2000000 --out-dir benchmark/results/minatar
    python benchmark/minatar.py --no-run           # the summary of what is there

On a GPU (the command for the rest of a device's time, after benchmark/gpu_check.py), --seeds-per-run N trains the
consecutive seeds of one (agent, game) in one process, the script's --num-seeds N --seed FIRST (one program trains them
all at once; each seed still has its own run directory and TensorBoard log), and each seed's result is collected from
its own run into the same per-seed result file as a run of that seed alone (the command in it is that seed's own; it
also records seeds_per_run), so that the GPU's cells and the CPU's are one grid: a cell done either way is skipped by
the other. The runs get JAX_PLATFORMS=cpu unless it is set: set it. One run at a time (each process takes most of the
GPU's memory), the results where the machine sends them back; then copy {out_dir}/{agent}/*.json into the grid's
--out-dir (the flags and --total-timesteps must be the grid's):
    JAX_PLATFORMS=cuda python benchmark/minatar.py --agents qr --seeds 1 2 3 --seeds-per-run 3 --jobs 1 \\
        --out-dir $OUT/minatar_10m
A group whose cells another driver is running or has finished does not start; its other cells run after the rest, in
groups of the consecutive seeds left (run_missing).
"""

import contextlib
import glob
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from children import CellLock  # noqa: E402
from grid import ROOT, binned, episodic_returns, eta_mismatch, initial_eta, latest_log, run_commands, shown  # noqa: E402

LABELS = {
    "qr": "QR",
    "drmg": "DrMG",
    "mg": "MG",
    "stacx": "STACX",
    "mg_fixed": "MG({})",
    "stacx_fixed": "STACX({})",
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
    "mg_fixed": ("mg", ["--meta-learn", "none"]),
    "stacx_fixed": ("stacx", ["--meta-learn", "none"]),
    "drmg_eta1": ("drmg", ["--meta-learn", "eta1"]),
    "drmg_scalar": ("drmg", ["--scalar-eta"]),
    "drmg_nstep3": ("drmg", ["--n-step", "3"]),
}
# meta agent: its fixed-eta twin, the same command with --meta-learn none.
TWINS = {"drmg": "qr", "mg": "mg_fixed", "stacx": "stacx_fixed"}
# The table's agents (the default) and DrMG's ablations (a grid with one summarises under "ablations_").
TABLE = ["qr", "drmg", "mg", "stacx", "mg_fixed", "stacx_fixed"]
ABLATIONS = ["drmg_eta1", "drmg_scalar", "drmg_nstep3"]
# (X, Y) of the probability of improvement P(X > Y), in the summary's order: each meta agent over its twin, DrMG over
# MG and over STACX, DrMG over each ablation.
IMPROVEMENTS = [*TWINS.items(), ("drmg", "mg"), ("drmg", "stacx"), *(("drmg", a) for a in ABLATIONS)]
# The most seeds of one run (--seeds-per-run).
MAX_SEEDS_PER_RUN = 256
# gymnax's PPO checkpoints after 10M steps (gymnax README): the 1 of the normalised score.
PPO_10M = {"Asterix-MinAtar": 15.0, "Breakout-MinAtar": 28.0, "Freeway-MinAtar": 58.0, "SpaceInvaders-MinAtar": 131.0}


@dataclass
class Args:
    agents: List[str] = field(default_factory=lambda: list(TABLE))
    """the agents (keys of AGENTS)"""
    games: List[str] = field(
        default_factory=lambda: ["Breakout-MinAtar", "SpaceInvaders-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar"]
    )
    """MinAtar games of gymnax"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per agent, game and seed"""
    total_timesteps: int = 10_000_000
    """environment steps per run"""
    flags: str = ""
    """flags given to every script after its MinAtar defaults, e.g. --flags='--local-num-envs 32'"""
    jobs: int = 1
    """runs at the same time (each run uses every core it can: 1 on a small machine)"""
    run: bool = True
    """run what is missing (--no-run: only the summary)"""
    bin_steps: int = 50_000
    """the stored curves average the episodic returns in bins of this many steps"""
    out_dir: str = os.path.join(ROOT, "benchmark", "results", "minatar_10m")
    """where the per-run results, random.json, summary.md and the plots go"""
    runs_dir: str = os.path.join(ROOT, "runs", "minatar_benchmark")
    """where the runs work"""
    bootstrap_reps: int = 50_000
    """bootstrap resamples of rliable's confidence intervals"""
    random_moves: int = 10_000
    """moves of each of 256 envs that measure a random policy's return on a game (once: kept in random.json)"""
    seeds_per_run: int = 1
    """the most seeds of one (agent, game) trained in one process (the script's --num-seeds, its seeds consecutive):
    more than 1 on a GPU, where one program trains them all at once"""


def check_args(args: Args):
    """The grid's own flags, before anything is written: one line naming the flag at fault."""
    for name in ("agents", "games", "seeds"):
        values = getattr(args, name)
        if not values or len(set(values)) != len(values):
            raise SystemExit(f"--{name}: at least one, none twice (got {values})")
    unknown = [a for a in args.agents if a not in AGENTS]
    if unknown:
        raise SystemExit(f"--agents: unknown {unknown}; one of {sorted(AGENTS)}")
    sys.path.insert(0, ROOT)
    import minatar_jax

    games = [g for g in args.games if g not in minatar_jax.GAMES]
    if games:
        raise SystemExit(f"--games: unknown {games}; one of {list(minatar_jax.GAMES)}")
    if min(args.total_timesteps, args.bin_steps, args.jobs, args.bootstrap_reps, args.random_moves) < 1:
        raise SystemExit("--total-timesteps, --bin-steps, --jobs, --bootstrap-reps and --random-moves must be positive")
    if not 1 <= args.seeds_per_run <= MAX_SEEDS_PER_RUN:
        raise SystemExit(f"--seeds-per-run {args.seeds_per_run}: must lie in [1, {MAX_SEEDS_PER_RUN}]")
    for name, most in (("total_timesteps", 10**15), ("bin_steps", 10**15), ("bootstrap_reps", 10**6), ("random_moves", 10**6)):
        if getattr(args, name) > most:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: at most {most:,}")
    for name in ("out_dir", "runs_dir"):
        path = getattr(args, name)
        if not path.strip():
            raise SystemExit(f"--{name.replace('_', '-')}: give a directory (got {path!r})")
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
            raise SystemExit(f"--{name.replace('_', '-')} {path}: {existing} is not a writable directory")
    try:
        shlex.split(args.flags)
    except ValueError as error:
        raise SystemExit(f"--flags {args.flags!r}: {error}") from None


def check_flags(args: Args):
    """Every cell's command checked once, up front, by its script's own default_args and check_args (what the script
    runs first, before it writes anything), in a temporary working directory as the run's: one line if one refuses."""
    sys.path.insert(0, ROOT)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        try:
            for game in args.games:  # MG's and STACX's loss weights are read from DrMG's parse of the flags
                refusal = script_refusal("drmg", ["--env-id", game, *shlex.split(args.flags)], check=False)
                if refusal and any(AGENTS[a][0] in ("mg", "stacx") for a in args.agents):
                    raise SystemExit(
                        f"--flags {args.flags!r}: drmg.py (whose loss weights MG and STACX take) refuses them: {refusal}"
                    )
            for agent in args.agents:
                for game in args.games:
                    for seed in args.seeds:
                        command = run_command(args, agent, game, seed)
                        script, flags = os.path.basename(command[1])[: -len(".py")], command[2:]
                        refusal = script_refusal(script, flags)
                        if refusal:
                            cell = f"{agent} on {game}, seed {seed}"
                            raise SystemExit(f"--flags {args.flags!r}: {script}.py refuses {cell}: {refusal}")
            cells = [(agent, game, seed) for agent in args.agents for game in args.games for seed in args.seeds]
            for agent, game, seeds in plan(cells, args.seeds_per_run):
                if len(seeds) > 1:  # --num-seeds, as the runs of the whole grid would have it
                    command = group_command(args, agent, game, seeds)
                    script, flags = os.path.basename(command[1])[: -len(".py")], command[2:]
                    refusal = script_refusal(script, flags)
                    if refusal:
                        run = f"{agent} on {game}, seeds {seeds[0]}-{seeds[-1]} in one run"
                        raise SystemExit(f"--seeds-per-run {args.seeds_per_run}: {script}.py refuses {run}: {refusal}")
        finally:
            os.chdir(here)


def script_refusal(script: str, flags: list[str], check: bool = True) -> str:
    """'' if the script's own parser (and check_args, with `check`) accept `flags`, else one line of what they say."""
    import importlib

    module = importlib.import_module(script)
    output = io.StringIO()
    try:
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
            parsed = tyro.cli(module.Args, args=flags, default=module.default_args(flags))
    except SystemExit:  # tyro's box of text: its informative lines
        lines = [line.strip(" -─│╭╮╰╯|") for line in output.getvalue().splitlines()]
        lines = [line for line in lines if line and not line.startswith("For full helptext")]
        return "; ".join(lines[1:] or lines)[:300] or "the script's parser refuses them"
    if not check:
        return ""
    try:
        module.check_args(parsed)
    except SystemExit as stop:
        return str(stop.code).splitlines()[-1] if stop.code not in (None, 0) else ""
    except Exception as error:  # noqa: BLE001  (a script's check that fails in another way is named, not shown as a traceback)
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return ""


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
    """{(agent, game): eta}: every agent starts from DrMG's eta on every game (MG and MG({}) without alpha), or one
    line. The eta is read from each script's Args and meta-parameter functions, as its run starts from, whether or not
    it meta-learns."""
    etas = {}
    no_alpha = tuple(a for a in args.agents if AGENTS[a][0] == "mg")
    for game in args.games:
        game_etas = {agent: initial_eta(*agent_flags(args, agent, game)) for agent in args.agents}
        reference = initial_eta(*agent_flags(args, "drmg", game))
        mismatch = eta_mismatch(game_etas, reference, no_alpha=no_alpha)
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


def collect(args: Args, agent: str, game: str, seed: int, work_dir: str, seconds: float, seeds_per_run: int = 1) -> dict:
    """A finished run's result, read from its TensorBoard log, whatever its budget (one bin at least). Its command is
    the seed's own, whether or not it trained with other seeds in one process (`seeds_per_run` says)."""
    accumulator = latest_log(work_dir)
    if accumulator is None:
        raise RuntimeError(f"no TensorBoard log under {os.path.join(work_dir, 'runs')}")
    steps, returns = episodic_returns(work_dir)
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
        seeds_per_run=seeds_per_run,
        versions=dict(
            python=platform.python_version(),
            jax=jax.__version__,
            machine=f"{os.cpu_count()} CPUs",
            jax_platforms=os.environ.get("JAX_PLATFORMS", "cpu"),  # what the runs were given (run_missing)
            commit=commit(),
        ),
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


# What the grid reads back from a result: {key: the types it may have}.
RESULT_KEYS = dict(
    agent=str, game=str, seed=int, command=str, flags=str, total_timesteps=int, final_return=(int, float),
    curve=list, meta=dict, sps=(int, float), episodes=int, bin_steps=int,
)


class Damaged(Exception):
    """A result file that cannot be read back: its one line names it and says what to do."""


def load_result(path: str, agent: str, game: str, seed: int) -> dict:
    """The result of a cell; Damaged (one line: the file, what is wrong, what to do) if it is unreadable, incomplete or
    another cell's."""

    def damaged(what: str):
        return Damaged(
            f"{path}: {what}; move it aside (mv {shlex.quote(path)} {shlex.quote(path + '.damaged')}) and the cell runs again"
        )

    try:
        result = load(path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise damaged(f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:100]})") from None
    if not isinstance(result, dict):
        raise damaged(f"not a result (a JSON {type(result).__name__})")
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise damaged(f"incomplete (no {', '.join(missing)})")
    wrong = [k for k, kind in RESULT_KEYS.items() if isinstance(result[k], bool) or not isinstance(result[k], kind)]
    if wrong:
        raise damaged(f"incomplete (wrong type of {', '.join(wrong)})")
    if (result["agent"], result["game"], result["seed"]) != (agent, game, seed):
        raise damaged(f"the result of {result['agent']} on {result['game']}, seed {result['seed']}")
    return result


def read_results(args: Args) -> tuple[dict, dict]:
    """({(agent, game, seed): result} of every cell with a readable result, {path: its one line} of every damaged one)."""
    results, damaged = {}, {}
    for game in args.games:
        for seed in args.seeds:
            for agent in args.agents:
                path = result_path(args, agent, game, seed)
                if os.path.exists(path):
                    try:
                        results[agent, game, seed] = load_result(path, agent, game, seed)
                    except Damaged as error:
                        damaged[path] = str(error)
    return results, damaged


def write_json(path: str, value):
    """value as JSON at path, atomically: a reader sees the earlier file or the whole new one, never a part."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cell_name(agent: str, game: str, seed: int) -> str:
    return f"{agent} {game} seed {seed}"


def plan(cells: list, seeds_per_run: int) -> list:
    """The runs of `cells` [(agent, game, seed)]: [(agent, game, [seeds])]. One seed per run with --seeds-per-run 1,
    in the order given; else, for each (agent, game) in the order given, its seeds sorted and cut into runs of
    consecutive seeds, at most `seeds_per_run` each (1 2 3 5 by 2: 1 2, 3, 5)."""
    if seeds_per_run == 1:
        return [(agent, game, [seed]) for agent, game, seed in cells]
    seeds = {}
    for agent, game, seed in cells:
        seeds.setdefault((agent, game), []).append(seed)
    runs = []
    for (agent, game), chosen in seeds.items():
        chosen = sorted(chosen)
        group = [chosen[0]]
        for seed in chosen[1:]:
            if seed == group[-1] + 1 and len(group) < seeds_per_run:
                group.append(seed)
            else:
                runs.append((agent, game, group))
                group = [seed]
        runs.append((agent, game, group))
    return runs


def group_command(args: Args, agent: str, game: str, seeds: list) -> list[str]:
    """The command of a run of consecutive seeds: the first seed's, with --num-seeds (the script gives seed s its own
    run directory, runs/{env_id}__{exp_name}__{s}__{time}); one seed's own command for one seed."""
    command = run_command(args, agent, game, seeds[0])
    if len(seeds) > 1:
        at = command.index("--seed") if "--seed" in command else len(command)
        command[at:at] = ["--num-seeds", str(len(seeds))]
    return command


def seed_work_dir(args: Args, agent: str, game: str, seed: int) -> str:
    return os.path.join(args.runs_dir, agent, f"{game}_seed{seed}")


def run_work_dir(args: Args, agent: str, game: str, seeds: list) -> str:
    """Where a run works: its seed's work directory, or for several seeds {game}_seeds{first}-{last}."""
    if len(seeds) == 1:
        return seed_work_dir(args, agent, game, seeds[0])
    return os.path.join(args.runs_dir, agent, f"{game}_seeds{seeds[0]}-{seeds[-1]}")


def run_name(agent: str, game: str, seeds: list) -> tuple:
    """A run's name, as run_commands prints it: (agent, game, seed), or (agent, game, "seeds first-last")."""
    return (agent, game, seeds[0]) if len(seeds) == 1 else (agent, game, f"seeds {seeds[0]}-{seeds[-1]}")


def move_seed_run(group_dir: str, seed_dir: str, seed: int):
    """A run of several seeds leaves seed s's run directory in group_dir/runs/*__{s}__{time}: moved to
    seed_dir/runs/, where one seed's run leaves it, so that it is collected (and kept) as one seed's run is."""
    os.makedirs(os.path.join(seed_dir, "runs"), exist_ok=True)
    for run in glob.glob(os.path.join(group_dir, "runs", "*")):
        if re.search(rf"__{seed}__\d+(-\d+)?$", os.path.basename(run)):
            os.replace(run, os.path.join(seed_dir, "runs", os.path.basename(run)))


def run_missing(args: Args):
    """Run every (agent, game, seed) without results, --jobs at a time; write each one's results when it ends.

    A cell runs under a lock ({out_dir}/{agent}/{game}_seed{seed}.lock, and {work_dir}.lock for its work directory):
    a cell another driver is running is skipped, and said so; the kernel releases a dead driver's lock. A damaged
    result file is named and its cell left alone.

    With --seeds-per-run N > 1 the cells of one (agent, game) whose seeds are consecutive run in groups of up to N
    seeds in one process (`plan`, `group_command`), which works in {runs_dir}/{agent}/{game}_seeds{first}-{last}; a
    group takes the locks of all its cells (and of each seed's work directory, and its own). Once it has ended, each
    seed's run directory is moved into that seed's work directory and collected from there, into the same result file
    as a run of that seed alone (its command: the seed's own; `seeds_per_run`: the seeds of its process; its wall
    time: the group's). A group some of whose cells another driver is running or has finished does not start: its
    other cells are put back and run after the rest, planned again (in groups of the consecutive seeds left)."""
    results, damaged = read_results(args)
    for line in damaged.values():
        print(line, flush=True)
    cells = []
    for game in args.games:
        for seed in args.seeds:
            for agent in args.agents:
                path = result_path(args, agent, game, seed)
                kept = results.get((agent, game, seed))
                if kept is not None:
                    if kept["flags"] != args.flags or kept["total_timesteps"] != args.total_timesteps:
                        raise SystemExit(
                            f"{path} was made with --flags '{kept['flags']}' --total-timesteps {kept['total_timesteps']}: "
                            "use another --out-dir"
                        )
                    continue
                if path in damaged:
                    continue
                cells.append((agent, game, seed))
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    locks, planned, put_back = {}, {}, []

    def jobs_of(cells: list) -> list:
        jobs = []
        for agent, game, seeds in plan(cells, args.seeds_per_run):
            name = run_name(agent, game, seeds)
            planned[name] = (agent, game, seeds)
            command = ["nice", "-n", "10", *group_command(args, agent, game, seeds)]
            jobs.append((name, command, run_work_dir(args, agent, game, seeds)))
        return jobs

    def on_start(name, work_dir):
        agent, game, seeds = planned[name]
        taken, others = [], []  # (seed, its locks) of the cells this run takes; the seeds of the cells it cannot
        for seed in seeds:
            path = result_path(args, agent, game, seed)
            seed_dir = seed_work_dir(args, agent, game, seed)
            cell, place = CellLock(path[: -len(".json")] + ".lock"), CellLock(seed_dir.rstrip(os.sep) + ".lock")
            if not cell.acquire():
                holder = cell.holder()
                print(f"skip {cell_name(agent, game, seed)}: another driver (PID {holder}) is running it (lock {cell.path})", flush=True)
            elif os.path.exists(path):
                cell.release()
                print(f"skip {cell_name(agent, game, seed)}: another driver has finished it ({path})", flush=True)
            elif not place.acquire():
                cell.release()
                print(
                    f"skip {cell_name(agent, game, seed)}: another driver (PID {place.holder()}) works in {seed_dir} "
                    "(another --out-dir with the same --runs-dir: give each grid its own --runs-dir)",
                    flush=True,
                )
            else:
                taken.append((seed, [cell, place]))
                continue
            others.append(seed)
        held = [lock for _, cell_locks in taken for lock in cell_locks]
        if len(seeds) > 1 and not others:  # the group's own work directory
            place = CellLock(work_dir.rstrip(os.sep) + ".lock")
            if place.acquire():
                held.append(place)
            else:
                others = seeds
                taken = []
                print(f"skip {shown(name)}: another driver (PID {place.holder()}) works in {work_dir}", flush=True)
        if others:
            for lock in held:
                lock.release()
            if len(seeds) > 1 and taken:
                put_back.extend((agent, game, seed) for seed, _ in taken)
                print(f"{shown(name)}: seeds {' '.join(str(seed) for seed, _ in taken)} run later, without the others", flush=True)
            return False
        locks[name] = held
        for seed in seeds:  # what is there is an ended run's: no live run works in it
            shutil.rmtree(seed_work_dir(args, agent, game, seed), ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        return True

    def on_done(name, work_dir, returncode, seconds):
        try:
            if returncode == 0:
                agent, game, seeds = planned[name]
                for seed in seeds:
                    seed_dir = seed_work_dir(args, agent, game, seed)
                    if len(seeds) > 1:
                        move_seed_run(work_dir, seed_dir, seed)
                    save((agent, game, seed), seed_dir, seconds, len(seeds), log_dir=work_dir)
        finally:
            for lock in locks.pop(name, ()):
                lock.release()

    def save(cell, work_dir, seconds, seeds_per_run, log_dir):
        agent, game, seed = cell
        try:
            result = collect(args, agent, game, seed, work_dir, seconds, seeds_per_run)
        except Exception as error:  # noqa: BLE001  (the run is kept where the next run of the cell cannot remove it)
            kept = f"{work_dir}.uncollected-{time.strftime('%Y%m%d-%H%M%S')}"
            try:
                os.replace(work_dir, kept)
            except OSError:
                kept = work_dir
            log = "" if log_dir == work_dir else f" (the output of its run of {seeds_per_run} seeds: {log_dir}/stdout.log)"
            print(
                f"    {cell_name(*cell)}: trained, but its result could not be collected ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}); its log and TensorBoard files are kept in {kept}{log}",
                flush=True,
            )
            return
        path = result_path(args, agent, game, seed)
        write_json(path, result)
        print(f"    {LABELS[agent]} {game} seed {seed}: final return {result['final_return']:.2f}, {result['sps']:.0f} SPS")

    jobs = jobs_of(cells)
    grouped = f" ({len(cells)} cells, up to {args.seeds_per_run} seeds per run)" if args.seeds_per_run > 1 else ""
    print(f"{len(jobs)} runs to do, {args.jobs} at a time{grouped}; the runs' JAX_PLATFORMS={env['JAX_PLATFORMS']}", flush=True)
    try:
        while jobs:
            run_commands(jobs, args.jobs, env, on_done, on_start)
            jobs, put_back[:] = jobs_of(put_back), []
            if jobs:
                print(f"{len(jobs)} runs of the seeds put back", flush=True)
    finally:
        for cell_locks in locks.values():
            for lock in cell_locks:
                lock.release()
    return damaged


def random_returns(args: Args) -> dict:
    """{game: mean return of a uniformly random policy}, measured once over 256 envs x --random-moves moves (at least
    1,000 episodes on every game with the default) and kept in {out_dir}/random.json."""
    path = os.path.join(args.out_dir, "random.json")
    try:
        kept = load(path) if os.path.exists(path) else {}
        if not (isinstance(kept, dict) and all(isinstance(kept[g]["mean_return"], (int, float)) for g in kept)):
            raise ValueError("not a {game: {mean_return}} table")
    except (OSError, ValueError, KeyError, TypeError):
        print(f"{path}: unreadable or incomplete: measured again", flush=True)
        kept = {}
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
        write_json(path, kept)
    return {g: kept[g]["mean_return"] for g in args.games}


@contextlib.contextmanager
def seeded(seed: int = 0):
    """numpy's global generator seeded for the block and given back its state after: rliable's bootstrap resamples
    with np.random.choice, whatever random_state it is given."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def interval_estimates(scores: dict, func, reps: int) -> dict:
    """{key: (point, low, high)} of func on each entry of scores (an array, or a tuple of arrays resampled each on its
    own): rliable's stratified bootstrap over runs within each game, 95% percentile intervals, a fixed random state."""
    from rliable import library as rly

    with seeded(0), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch's: random_state is deprecated
        point, interval = rly.get_interval_estimates(scores, func, reps=reps, random_state=np.random.RandomState(0))
    return {k: (float(point[k][0]), float(interval[k][0, 0]), float(interval[k][1, 0])) for k in scores}


def iqm_with_ci(scores: dict, reps: int) -> dict:
    """{agent: (IQM, low, high)} of normalised scores [runs, games]: rliable's stratified bootstrap, 95% intervals."""
    from rliable import metrics

    return interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps)


def improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[P(X > Y)] of scores x [runs, games] and y [runs, games]: on each game, the fraction of pairs of a run of x and a
    run of y where x's is higher (ties count half), averaged over the games. rliable's
    metrics.probability_of_improvement (Mann-Whitney's U / (n_x n_y) per game), without its scipy call per game."""
    difference = x[:, None, :] - y[None, :, :]
    return np.array([np.mean((difference > 0) + 0.5 * (difference == 0))])


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int) -> tuple[float, float, float]:
    """(P(X > Y), low, high) of scores x [runs, games] and y [runs, games]: `improvement` with rliable's 95% stratified
    bootstrap interval, x's and y's runs resampled independently within each game (rliable's README)."""
    return interval_estimates({"": (np.asarray(x, float), np.asarray(y, float))}, improvement, reps)[""]


def stem(args: Args) -> str:
    """The prefix of this grid's summary and plots: none for a grid of the table's agents (TABLE), "ablations_" for a
    grid with an ablation, so that it never overwrites the table's files."""
    return "" if set(args.agents) <= set(TABLE) else "ablations_"


def summarise(args: Args, quiet: bool = False) -> str:
    """The summary of the grid's readable results (a damaged file is named in one line, unless `quiet`, and left out)."""
    results, damaged = read_results(args)
    for line in [] if quiet else damaged.values():
        print(line, flush=True)
    if not results:
        raise SystemExit(f"no results under {args.out_dir} for this grid")
    random = random_returns(args)
    lines = [
        "# MinAtar: " + ", ".join(LABELS[a] for a in args.agents),
        "",
        f"Final return (mean of the last 10% of episodes) after {args.total_timesteps:,} steps: mean ± sample std (ddof = 1)",
        "over seeds (n; – for the std of one seed);",
        "a random policy's return and gymnax's PPO reference after 10M steps beside it.",
        "",
        "| game | " + " | ".join(LABELS[a] for a in args.agents) + " | random | PPO (10M) |",
        "|---|" + "---|" * (len(args.agents) + 2),
    ]
    seeds = []  # each run's final return, so that a collapsed seed is seen, not only a wide std
    for game in args.games:
        cells, runs = [], []
        for agent in args.agents:
            done = [s for s in args.seeds if (agent, game, s) in results]
            values = [results[agent, game, s]["final_return"] for s in done]
            std = f"{np.std(values, ddof=1):.2f}" if len(values) > 1 else "–"
            cells.append(f"{np.mean(values):.2f} ± {std} ({len(values)})" if values else "–")
            if values:
                shown = [f"{v:.2f}" + (" (below random)" if v < random[game] else "") for v in values]
                runs.append(f"{LABELS[agent]} " + ", ".join(shown) + f" (seeds {', '.join(map(str, done))})")
        lines.append(f"| {game} | " + " | ".join(cells) + f" | {random[game]:.2f} | {PPO_10M[game]:g} |")
        if runs:
            seeds.append(f"- {game}: " + "; ".join(runs))
    lines += ["", "Final return of each run:", "", *seeds]
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
        pairs = [(x, y) for x, y in IMPROVEMENTS if x in args.agents and y in args.agents]
        if pairs:
            lines += [
                "",
                "Probability of improvement P(X > Y) on the same scores: on each game, the chance that a run of X scores",
                "higher than a run of Y (ties count half), averaged over the games; 95% stratified bootstrap confidence",
                f"interval (rliable, {args.bootstrap_reps:,} resamples):",
                "",
                "| X over Y | P(X > Y) | 95% CI |",
                "|---|---|---|",
            ]
            for x, y in pairs:
                point, low, high = probability_of_improvement(scores[LABELS[x]], scores[LABELS[y]], args.bootstrap_reps)
                lines.append(f"| {LABELS[x]} over {LABELS[y]} | {point:.3f} | [{low:.3f}, {high:.3f}] |")
            lines += [
                "",
                f"The same on each game alone: the share of the {len(args.seeds)} x {len(args.seeds)} pairs of seeds where X's",
                "run ends higher (ties count half); no interval, so few runs a game separate little:",
                "",
                "| X over Y | " + " | ".join(complete) + " |",
                "|---|" + "---|" * len(complete),
            ]
            for x, y in pairs:
                per_game = [improvement(scores[LABELS[x]][:, [j]], scores[LABELS[y]][:, [j]])[0] for j in range(len(complete))]
                lines.append(f"| {LABELS[x]} over {LABELS[y]} | " + " | ".join(f"{p:.3f}" for p in per_game) + " |")
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
    adopted = [(k, r["adopted_from"]) for k, r in sorted(results.items()) if isinstance(r.get("adopted_from"), dict)]
    if adopted:  # results copied from another grid whose run was this cell's (the same script, code, seed and settings)
        lines += ["Results copied from an earlier grid of the same runs (`adopted_from` in the file; its command ran):", ""]
        for (agent, game, seed), source in adopted:
            lines.append(f"- {LABELS[agent]} on {game}, seed {seed}: {source.get('path')} (--flags '{source.get('flags')}')")
        lines += [""]
    summary = "\n".join(lines)
    path = os.path.join(args.out_dir, f"{stem(args)}summary.md")
    with open(path + f".{os.getpid()}.tmp", "w") as f:
        f.write(summary)
    os.replace(path + f".{os.getpid()}.tmp", path)
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
            with warnings.catch_warnings():  # a bin where no seed's episode ended is NaN: a gap in the curve
                warnings.simplefilter("ignore", RuntimeWarning)
                line = ax.plot(centres, np.nanmean(curves, 0), label=f"{LABELS[agent]} ({len(curves)})")[0]
                ax.fill_between(centres, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
        if game in PPO_10M:
            ax.axhline(PPO_10M[game], color="0.4", ls="--", lw=1, label="PPO at 10M (gymnax)")
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
    check_flags(args)
    for (agent, game), eta in check_initial_eta(args).items():
        if game == args.games[0]:
            print(f"{LABELS[agent]} starts from " + ", ".join(f"{k}={v:.6g}" for k, v in eta.items()))
    damaged = {}
    if args.run:
        start = time.time()
        damaged = run_missing(args)
        print(f"grid done in {time.time() - start:.0f} s")
    print(summarise(args, quiet=bool(damaged)))
    for line in damaged.values():  # again, after the runs' output
        print(line, flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
