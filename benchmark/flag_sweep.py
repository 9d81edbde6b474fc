"""Every numeric flag of every script set in turn to -1, 0 and a huge value on a tiny run (issue 23): does the script
train, refuse in one line before writing anything, or show a defect (a native crash, a traceback, NaN, something
written before a refusal)?

A value is first given to the script's own `check_args` in this process (instant): a one-line SystemExit there is a
refusal, and `check_args` runs before the script writes anything. A value it accepts runs the tiny job in a subprocess
for at most --timeout seconds; one that is still training then counts as training (a huge budget, say). Each outcome
is kept in --out (JSON, one entry per script, flag and value) and not run again, so the sweep can be stopped and
continued. The counts go to docs/long-runs.md.

    nice -n 10 python benchmark/flag_sweep.py                     # every script
    nice -n 10 python benchmark/flag_sweep.py --scripts drmg.py --timeout 60
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
HUGE = {"int": "1000000000", "float": "1e30"}
COMMIT = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
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


def numeric_fields(script: str) -> list[tuple[str, str]]:
    """(field, 'int' or 'float') of every numeric field of the script's Args (Optional ones too), in order."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    found = []
    for s in args_class.body:
        if not isinstance(s, ast.AnnAssign):
            continue
        kind = ast.unparse(s.annotation).removeprefix("Optional[").removesuffix("]")
        if kind in ("int", "float"):
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


def outcome(script: str, flags: list[str], timeout: float) -> dict:
    refusal = precheck(script, flags)
    if refusal:
        kind = "defect: traceback" if refusal.startswith("traceback") else "refusal"
        return dict(kind=kind, line=refusal)
    with tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        try:
            result = subprocess.run(
                [sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, env=env, capture_output=True, text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return dict(kind="trains", line=f"still training after {timeout:g} s")
        written = os.listdir(cwd)
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


def main(args: Args):
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    for script in args.scripts:
        for name, kind in numeric_fields(script):
            if name in FILLED_IN and script != "mrp_metagrad.py":
                continue
            for value in ["-1", "0", HUGE[kind]]:
                key = f"{script} {flag(name)} {value}"
                if key in results:
                    continue
                flags = [*TINY[script], flag(name), value]
                if args.dry_run:
                    refusal = precheck(script, flags)
                    print(f"{key}: {'refused: ' + refusal if refusal else 'accepted: would run'}")
                    continue
                results[key] = dict(outcome(script, flags, args.timeout), commit=COMMIT)
                print(f"{key}: {results[key]['kind']}: {results[key]['line']}", flush=True)
                with open(args.out + ".tmp", "w") as f:
                    json.dump(results, f, indent=1, sort_keys=True)
                os.replace(args.out + ".tmp", args.out)
    if args.dry_run:
        return
    counts = Counter(r["kind"] for key, r in results.items() if key.split()[0] in args.scripts)
    print(", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items())))
    for key, r in sorted(results.items()):
        if r["kind"].startswith("defect") and key.split()[0] in args.scripts:
            print(f"  {key}: {r['kind']}: {r['line']}")


if __name__ == "__main__":
    main(tyro.cli(Args))
