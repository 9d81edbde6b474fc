"""Every flag is checked, by construction: each field of every script's `Args` is read by its `check_args` (which runs
before anything is written), or ANY_VALUE says why any value of it is valid. A new flag in neither fails here."""

import ast
import os

import pytest
from helpers import ROOT

SCRIPTS = ["qr_impala.py", "drmg.py", "mg.py", "stacx.py", "mix_metagrad.py", "mrp_metagrad.py"]
# Fields that need no check, and why.
ANY_VALUE = {
    "wandb_project_name": "any string; used only with --track, by wandb",
    "wandb_entity": "any string or none; used only with --track, by wandb",
    "save_model": "a boolean",
    "anneal_lr": "a boolean",
    "overlap_envs": "a boolean",
    "network": "a Literal: tyro refuses any other value",
    "optimizer": "a Literal: tyro refuses any other value",
    "scalar_eta": "a boolean",
    "eta_embedding": "a boolean",
    "local_batch_size": "filled in at startup from the other flags: a given value is overwritten",
    "world_size": "filled in at startup from the other flags: a given value is overwritten",
}
# Per script: fields that are filled in at startup there (elsewhere they are real flags, checked).
FILLED_IN = {
    "qr_impala.py": {"batch_size", "num_updates"},
    "drmg.py": {"batch_size", "num_updates"},
    "mg.py": {"batch_size", "num_updates"},
    "stacx.py": {"batch_size", "num_updates"},
    "mix_metagrad.py": {"batch_size", "num_updates"},
}


def unchecked_fields(source: str, script: str) -> list[str]:
    """The Args fields of a script that its check_args never reads and that no list allows."""
    tree = ast.parse(source)
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields = [s.target.id for s in args_class.body if isinstance(s, ast.AnnAssign)]
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check_args")
    read = {n.attr for n in ast.walk(check) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args"}
    # names looked up with getattr(args, name) over a tuple of field names
    read |= {n.value for n in ast.walk(check) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    allowed = set(ANY_VALUE) | FILLED_IN.get(script, set())
    return [f for f in fields if f not in read and f not in allowed]


def source_of(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_checked_or_listed_as_free(script):
    assert unchecked_fields(source_of(script), script) == []


def test_a_check_taken_away_is_caught():
    source = source_of("drmg.py")
    line = '''    if not all(0 < x < np.inf for x in (args.rho_bar, args.c_bar, args.pg_rho_bar)):
        raise SystemExit("--rho-bar, --c-bar and --pg-rho-bar must be positive and finite")
'''
    assert source.count(line) == 1
    assert unchecked_fields(source.replace(line, ""), "drmg.py") == ["rho_bar", "c_bar", "pg_rho_bar"]
    new_flag = "    seed: int = 1\n"
    assert unchecked_fields(source.replace(new_flag, new_flag + "    new_flag: float = 0.5\n", 1), "drmg.py") == ["new_flag"]


def test_every_free_field_exists_somewhere():
    fields = set()
    for script in SCRIPTS:
        tree = ast.parse(source_of(script))
        args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
        fields |= {s.target.id for s in args_class.body if isinstance(s, ast.AnnAssign)}
    assert set(ANY_VALUE) <= fields, set(ANY_VALUE) - fields
