"""Every numeric flag of every script set in turn to -1, 0, 10^9, 10^11 and 2^64 (a float one to -1, 0, 1e30, nan and
inf), every list and text flag given empty, on a tiny run (issues 23 and 34): does the script
train, refuse in one line before writing anything, or show a defect (a native crash, a traceback, NaN, something
written before a refusal)?

A value is first given to the script's own `check_args` in this process (instant): a one-line SystemExit there is a
refusal, and `check_args` runs before the script writes anything. A value it accepts runs the tiny job in a subprocess
for at most --timeout seconds; one that is still training then counts as training (a huge budget, say). Each outcome
is kept in --out (JSON, one entry per script, flag and value) and not run again, so the sweep can be stopped and
continued. The counts go to docs/long-runs.md.

    nice -n 10 python benchmark/flag_sweep.py                     # every script
    nice -n 10 python benchmark/flag_sweep.py --scripts drmg.py --timeout 60
    nice -n 10 python benchmark/flag_sweep.py --drivers           # the drivers' own flags only (about 5 minutes)

--drivers sweeps the flags of the drivers instead (benchmark/minatar.py, benchmark/gpu_check.py, benchmark/plot.py):
each numeric flag at -1, 0, 10^11 and 2^64 (a float one also at nan, inf and 1e30), each list and text flag empty. A
value is given to the driver's own checks in this process (minatar.py: check_args, then every cell's command checked
by its script's default_args and check_args; gpu_check.py and plot.py: check_args); one they refuse is then given to
the driver itself in a subprocess, in an empty working directory with its outputs under it, which must stop with exit
code 1, one line on stderr (the same line) and nothing written. A value they accept is not run (it would train):
"accepted". Their outcomes go to benchmark/results/flag_sweep_drivers.json (--drivers-out), keyed by the driver's path.
"""

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import List

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny job of each script: seconds of training on a CPU.
IMPALA_TINY = ["--env-id", "CartPole-v1", "--total-timesteps", "64", "--local-num-envs", "4", "--num-actor-threads", "1"]
IMPALA_TINY += ["--num-steps", "8", "--log-frequency", "1", "--save-every", "1"]
TINY = {
    "qr_impala.py": IMPALA_TINY,
    "drmg.py": IMPALA_TINY,
    "mg.py": IMPALA_TINY,
    "stacx.py": IMPALA_TINY,
    "mix_metagrad.py": [
        *["--total-timesteps", "96", "--num-envs", "4", "--num-steps", "4", "--log-frequency", "3", "--board-size", "6"],
        *["--inner-steps", "2", "--variance-points", "0"],
    ],
    "mrp_metagrad.py": ["--num-updates", "20", "--mc-samples", "4", "--inner-steps", "1", "2"],
}
# The values of each kind of flag: the first three are those of issue 23, the rest the extremes of issue 34.
VALUES = {
    "int": ["-1", "0", "1000000000", str(10**11), str(2**64)],
    "float": ["-1", "0", "1e30", "nan", "inf"],
    "list": [""],
    "text": [""],
}
COMMIT = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
# "+": the working tree differs from that commit (what ran is the commit and the changes beside it)
_DIRTY = ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]
COMMIT += "+" if subprocess.run(_DIRTY, capture_output=True, text=True).stdout.strip() else ""
# Filled in at startup from the other flags: a value given is overwritten (tests/test_flags.py lists them).
FILLED_IN = {"local_batch_size", "batch_size", "num_updates", "world_size"}


def flag(name: str) -> str:
    """tyro's spelling of a field: inner underscores become hyphens, a trailing one stays (--lambda_)."""
    return "--" + name.rstrip("_").replace("_", "-") + "_" * (len(name) - len(name.rstrip("_")))


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: list(TINY))
    """the scripts to sweep"""
    timeout: float = 120.0
    """seconds a tiny run may take; one still training then counts as training"""
    out: str = os.path.join(ROOT, "benchmark", "results", "flag_sweep.json")
    """the outcomes, kept between runs of the sweep"""
    dry_run: bool = False
    """only the in-process checks: list the values that check_args accepts (and so would run), run nothing"""
    drivers: bool = False
    """sweep the drivers' own flags (benchmark/minatar.py, gpu_check.py, plot.py) instead of the scripts'"""
    drivers_out: str = os.path.join(ROOT, "benchmark", "results", "flag_sweep_drivers.json")
    """the drivers' outcomes, kept between runs of the sweep"""


def swept_fields(script: str) -> list[tuple[str, str]]:
    """(field, 'int', 'float', 'list' or 'text') of every numeric, list and text field of the script's Args (Optional
    ones too), in order."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    found = []
    for s in args_class.body:
        if not isinstance(s, ast.AnnAssign):
            continue
        kind = ast.unparse(s.annotation).removeprefix("Optional[").removesuffix("]")
        kind = "list" if kind.startswith("List[") else "text" if kind == "str" else kind
        if kind in ("int", "float", "list", "text"):
            found.append((s.target.id, kind))
    return found


def precheck(script: str, flags: list[str]) -> str:
    """The script's own check_args on `flags`, in this process: '' if it accepts them, else the one line it stops with
    ('traceback: ...' if it fails in another way)."""
    sys.path.insert(0, ROOT)
    module = importlib.import_module(script[:-3])
    try:
        defaults = module.default_args(flags) if hasattr(module, "default_args") else module.Args()
        module.check_args(tyro.cli(module.Args, args=flags, default=defaults))
    except SystemExit as stop:
        line = str(stop.code)
        return line if "\n" not in line else "traceback: " + line.splitlines()[-1]
    except Exception as e:  # noqa: B902
        return f"traceback: {type(e).__name__}: {e}"
    return ""


def run_in_empty_directory(script: str, flags: list[str], timeout: float):
    """(the CompletedProcess of `script` with `flags` run on CPU in an empty directory, or None if it outran `timeout`;
    what it left in that directory)."""
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, os.path.join(ROOT, script), *flags]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        try:
            result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, []
        return result, os.listdir(cwd)


def outcome(script: str, flags: list[str], timeout: float) -> dict:
    refusal = precheck(script, flags)
    if refusal:
        kind = "defect: traceback" if refusal.startswith("traceback") else "refusal"
        return dict(kind=kind, line=refusal)
    result, written = run_in_empty_directory(script, flags, timeout)
    if result is None:
        return dict(kind="trains", line=f"still training after {timeout:g} s")
    stderr = result.stderr.strip().splitlines()
    if result.returncode < 0 or result.returncode > 128:
        return dict(kind="defect: native crash", line=f"exit {result.returncode}: {stderr[-1] if stderr else ''}")
    if result.returncode == 0:
        nan = "nan" in result.stdout.lower()
        return dict(kind="defect: NaN" if nan else "trains", line=result.stdout.strip().splitlines()[-1][:200])
    guard = "the last finite checkpoint" in result.stderr  # docs/long-runs.md's guard; mrp_metagrad.py saves no checkpoint
    guard |= script == "mrp_metagrad.py" and bool(re.fullmatch(r"n = \d+: non-finite .* stopped", stderr[-1] if stderr else ""))
    if "non-finite" in result.stderr and guard:
        return dict(kind="stopped by the non-finite guard", line=stderr[-1][:200])
    if "Traceback" in result.stderr:
        return dict(kind="defect: traceback", line=stderr[-1][:200])
    if written:
        return dict(kind="defect: written before refusal", line=f"{stderr[-1][:150]} (wrote {written})")
    return dict(kind="refusal", line=stderr[-1][:200] if stderr else f"exit {result.returncode}")


# The drivers: (their flags besides the one swept, with outputs relative to the working directory; {flag: kind}).
DRIVER_BASE = {
    "benchmark/minatar.py": ["--out-dir", "results", "--runs-dir", "runs", "--agents", "qr", "--games", "Breakout-MinAtar"],
    "benchmark/gpu_check.py": ["--out-dir", "check"],
    "benchmark/plot.py": ["logs", "--out", "plots/p"],
}
DRIVER_FLAGS = {
    "benchmark/minatar.py": dict(
        total_timesteps="int", jobs="int", bin_steps="int", bootstrap_reps="int", random_moves="int", seeds="ints",
        seeds_per_run="int",
        agents="list", games="list", flags="text", out_dir="text", runs_dir="text",
    ),
    "benchmark/gpu_check.py": dict(
        atari_seconds="float", overlap_seconds="float", random_seconds="float", minatar_seconds="float",
        update_repeats="int", minatar_seeds="ints", out_dir="text", env_id="text",
    ),
    "benchmark/plot.py": dict(bin_steps="int", labels="list", tag="text", out="text"),
}
EXTREMES = {
    "int": ["-1", "0", str(10**11), str(2**64)],
    "ints": ["-1", str(2**64), ""],
    "float": ["-1", "0", "1e30", "nan", "inf"],
    "list": [""],
    "text": [""],
}


def driver_flags(driver: str, name: str, value: str) -> list[str]:
    """The driver's base flags with `name` set to `value` ('' for a list: the flag given no values)."""
    base = list(DRIVER_BASE[driver])
    option = flag(name)
    if option in base:  # replace the base's value
        i = base.index(option)
        del base[i : i + 2]
    kind = DRIVER_FLAGS[driver][name]
    given = [option] if kind in ("list", "ints") and value == "" else [f"{option}={value}"]
    return [*base, *given]


def driver_precheck(driver: str, flags: list[str]) -> str:
    """The driver's own checks on `flags`, in this process: '' if they accept them, else the one line they stop with."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmark")]
    module = importlib.import_module(os.path.basename(driver)[:-3])
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)  # relative outputs land here, as in the subprocess
        try:
            parsed = tyro.cli(module.Args, args=flags)
            module.check_args(parsed)
            if hasattr(module, "check_flags"):
                module.check_flags(parsed)
        except SystemExit as stop:
            if stop.code == 2:  # tyro's parser: its box of text went to stderr
                return "refused by the parser"
            line = str(stop.code)
            return line if "\n" not in line else "traceback: " + line.splitlines()[-1]
        except Exception as e:  # noqa: B902
            return f"traceback: {type(e).__name__}: {e}"
        finally:
            os.chdir(here)
    return ""


def driver_outcome(driver: str, flags: list[str], timeout: float) -> dict:
    refusal = driver_precheck(driver, flags)
    if not refusal:
        return dict(kind="accepted", line="not run (minatar.py and gpu_check.py would train, plot.py would plot)")
    if refusal.startswith("traceback"):
        return dict(kind="defect: traceback", line=refusal)
    result, written = run_in_empty_directory(driver, flags, timeout)
    if result is None:
        return dict(kind="defect: no refusal", line=f"still running after {timeout:g} s")
    stderr = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if "Traceback" in result.stderr:
        return dict(kind="defect: traceback", line=stderr[-1][:200])
    if written:
        return dict(kind="defect: written before refusal", line=f"{stderr[-1][:150] if stderr else ''} (wrote {written})")
    if refusal == "refused by the parser":
        kind = "refusal" if result.returncode == 2 else f"defect: exit {result.returncode}"
        return dict(kind=kind, line="tyro's usage error")
    if result.returncode != 1 or stderr != [refusal]:
        return dict(kind="defect: not one line", line=f"exit {result.returncode}: {stderr[-3:]}")
    return dict(kind="refusal", line=refusal[:200])


def sweep_drivers(args: Args, results: dict):
    for driver, fields in DRIVER_FLAGS.items():
        for name, kind in fields.items():
            for value in EXTREMES[kind]:
                key = f"{driver} {flag(name)} {value or '(empty)'}"
                if key in results:
                    continue
                flags = driver_flags(driver, name, value)
                if args.dry_run:
                    refusal = driver_precheck(driver, flags)
                    print(f"{key}: {'refused: ' + refusal if refusal else 'accepted'}")
                    continue
                results[key] = dict(driver_outcome(driver, flags, args.timeout), commit=COMMIT)
                print(f"{key}: {results[key]['kind']}: {results[key]['line']}", flush=True)
                save(args, results)
    if args.dry_run:
        return
    mine = {k: r for k, r in results.items() if k.split()[0] in DRIVER_FLAGS}
    print(", ".join(f"{kind}: {n}" for kind, n in sorted(Counter(r["kind"] for r in mine.values()).items())))
    for key, r in sorted(mine.items()):
        if r["kind"].startswith("defect"):
            print(f"  {key}: {r['kind']}: {r['line']}")


def save(args: Args, results: dict):
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(args.out + ".tmp", args.out)


def main(args: Args):
    if args.drivers:
        args.out = args.drivers_out
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.drivers:
        return sweep_drivers(args, results)
    for script in args.scripts:
        for name, kind in swept_fields(script):
            if name in FILLED_IN and script != "mrp_metagrad.py":
                continue
            for value in VALUES[kind]:
                key = f"{script} {flag(name)} {value or '(empty)'}"
                if key in results:
                    continue
                given = [flag(name)] if kind == "list" else [f"{flag(name)}={value}"]  # a list given no values
                flags = [*TINY[script], *given]
                if args.dry_run:
                    refusal = precheck(script, flags)
                    print(f"{key}: {'refused: ' + refusal if refusal else 'accepted: would run'}")
                    continue
                results[key] = dict(outcome(script, flags, args.timeout), commit=COMMIT)
                print(f"{key}: {results[key]['kind']}: {results[key]['line']}", flush=True)
                save(args, results)
    if args.dry_run:
        return
    counts = Counter(r["kind"] for key, r in results.items() if key.split()[0] in args.scripts)
    print(", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items())))
    for key, r in sorted(results.items()):
        if r["kind"].startswith("defect") and key.split()[0] in args.scripts:
            print(f"  {key}: {r['kind']}: {r['line']}")


if __name__ == "__main__":
    main(tyro.cli(Args))
