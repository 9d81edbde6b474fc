"""The sibling rule: the four IMPALA-family scripts share their plumbing line for line. Every top-level definition that
two or more of them have is identical in all that have it (read with `ast`), unless OWN lists it with the reason; the
shared definitions come in the same order, under the same banners. mix_metagrad.py and mrp_metagrad.py copy the
family's definitions of the same name verbatim, unless TOY_OWN lists them. A copy with one shared line changed must fail."""

import ast
import os

import pytest
from helpers import IMPALA_FAMILY, ROOT

# Definitions that differ between the scripts by design, and why. Everything else they share must be identical.
OWN = {
    "Args": "each algorithm's flags",
    "check_args": "each algorithm checks its own flags",
    "AgentNetwork": "quantiles (qr_impala, drmg), a value conditioned on eta (mg), several heads (stacx)",
    "hyperparameters": "each algorithm's eta",
    "init_meta_params": "each algorithm's meta-parameters",
    "reference_hyperparameters": "each algorithm's outer-loss eta'",
    "impala_loss": "each algorithm's inner loss",
    "meta_gradient": "each algorithm's outer loss (DrMG: distributional, with BMG; MG: eta-conditioned; STACX: KL term)",
    "learner_step": "the meta step (qr_impala has none; stacx: one batch, or two halves with --two-halves)",
    "make_network": "each algorithm's network (quantiles, eta-conditioning, heads)",
    "init_params": "mg's network also takes the initial eta it is conditioned on",
    "make_learner_state": "qr_impala carries no meta-state",
    "policy_inputs": "mg's policy acts conditioned on eta",
    "policy_logits": "mg conditions the network on eta; in stacx the main head acts",
    "meta_scalars": "each algorithm's meta-parameters in TensorBoard (none in qr_impala)",
    "ALGO_ENV_DEFAULTS": "each algorithm's own defaults by family (DrMG's MinAtar meta learning rate; none in qr_impala)",
}


def definitions(source: str) -> list[tuple[str, str]]:
    """(name, source) of every top-level function, class and assignment, in file order; a definition's source has its
    decorators and the comment lines right above it."""
    lines, found = source.splitlines(), []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign):
            name = ast.unparse(node.targets[0])
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and lines[start - 1].startswith("#"):
            start -= 1
        found.append((name, "\n".join(lines[start : node.end_lineno])))
    return found


def banners(source: str) -> list[str]:
    """The section banners and the labelled blocks of __main__, in file order."""
    lines = source.splitlines()
    return [
        line
        for i, line in enumerate(lines)
        if line.startswith("    # --- ") or (line.startswith("# ") and 0 < i < len(lines) - 1 and "# ====" in lines[i - 1])
    ]


def sibling_differences(sources: dict) -> list[str]:
    """What breaks the sibling rule in {script: source}; empty if nothing does."""
    problems = []
    defs = {script: definitions(source) for script, source in sources.items()}
    texts = {script: dict(found) for script, found in defs.items()}
    names = {name for found in defs.values() for name, _ in found}
    for name in sorted(names - set(OWN)):
        having = [s for s in sources if name in texts[s]]
        if len(having) > 1 and len({texts[s][name] for s in having}) > 1:
            first = having[0]
            others = [s for s in having if texts[s][name] != texts[first][name]]
            problems.append(f"{name}: {first} and {', '.join(others)} differ (make them one, or list it in OWN with the reason)")
    shared = {name for name in names if all(name in texts[s] for s in sources)}
    orders = {s: [name for name, _ in defs[s] if name in shared] for s in sources}
    reference = next(iter(sources))
    problems += [f"{s}: the shared definitions come in another order than in {reference}" for s in sources if orders[s] != orders[reference]]
    marks = {s: banners(source) for s, source in sources.items()}
    problems += [f"{s}: its banners differ from {reference}'s" for s in sources if marks[s] != marks[reference]]
    return problems


def read_scripts(scripts=tuple(f"{name}.py" for name in IMPALA_FAMILY)):
    sources = {}
    for script in scripts:
        with open(os.path.join(ROOT, script)) as f:
            sources[script] = f.read()
    return sources


def mutated(sources, script, old, new):
    """`sources` with the one occurrence of `old` in `script` replaced by `new`."""
    assert sources[script].count(old) == 1, old
    return dict(sources, **{script: sources[script].replace(old, new)})


def test_the_four_scripts_share_their_definitions_order_and_banners():
    sources = read_scripts()
    assert sibling_differences(sources) == []
    assert len(banners(sources["drmg.py"])) >= 8  # five sections and three blocks of __main__
    shared = set.intersection(*({name for name, _ in definitions(s)} for s in sources.values())) - set(OWN)
    assert len(shared) >= 35, sorted(shared)  # the rule covers most of each script


def test_every_deliberate_difference_is_still_one():
    """An entry of OWN that has become identical in every script that has it belongs to the shared code again."""
    defs = {script: dict(definitions(source)) for script, source in read_scripts().items()}
    for name, reason in OWN.items():
        texts = {d[name] for d in defs.values() if name in d}
        assert len(texts) > 1, f"{name} is identical in every script now: remove it from OWN ({reason})"


@pytest.mark.parametrize(
    "script,old,new,named",
    [
        # one character of a shared function's body
        ("stacx.py", "return jax.tree.map(lambda x: x / (num_envs // size), total)", "return jax.tree.map(lambda x: x / (num_envs // size + 0), total)", "chunk_mean"),
        # the comment above a shared definition
        ("qr_impala.py", "# Flags that may differ from the checkpoint's", "# Flags that may change from the checkpoint's", "RESUME_FLAGS"),
        # a shared constant
        ("mg.py", "        learning_rate=4e-3,\n        rmsprop_eps=1e-5,", "        learning_rate=4e-3,\n        rmsprop_eps=1e-6,", "ENV_DEFAULTS"),
        # a banner
        ("drmg.py", "# --- shutdown:", "# --- the shutdown:", "banners"),
    ],
)
def test_one_changed_shared_line_is_caught(script, old, new, named):
    sources = mutated(read_scripts(), script, old, new)
    problems = sibling_differences(sources)
    assert any(named in p and script in p for p in problems), problems


def test_a_shared_definition_moved_elsewhere_is_caught():
    sources = read_scripts()
    source = sources["mg.py"]
    block = source[source.index("def learning_rate(") : source.index("def make_optimizer(")]
    source = source.replace(block, "")
    sources["mg.py"] = source.replace("def make_optimizer(", "def make_optimizer(", 1).replace(
        "\n\ndef make_meta_optimizer(", "\n\n" + block.rstrip() + "\n\n\ndef make_meta_optimizer(", 1
    )
    assert any("mg.py: the shared definitions come in another order" in p for p in sibling_differences(sources))


# mix_metagrad.py and mrp_metagrad.py are no IMPALA: they copy the family's plumbing where they have the same part, and
# share check_fits between them. Their own versions of a name, and why:
TOY_OWN = {
    "Args": "their own flags",
    "check_args": "their own flags",
    "least_bytes": "what each one's run holds",
    "Torso": "Snake's small convolutional torso",
    "AgentNetwork": "A2C's policy and value on Snake",
    "Rollout": "no behaviour logits: A2C is on-policy",
    "init_meta_params": "eta = {gamma, lambda, c_crit, c_entr}",
    "hyperparameters": "eta = {gamma, lambda, c_crit, c_entr}",
    "reference_hyperparameters": "eta = {gamma, lambda, c_crit, c_entr}",
    "make_optimizer": "Adam with eps_root, which the meta-gradient differentiates through",
    "inner_update": "an A2C step on a rollout (mix), a value step on a batch of MRP rewards (mrp)",
    "load_model": "mix_metagrad also returns the meta-parameters",
    "RESUME_FLAGS": "mix_metagrad has no actor threads nor devices to choose",
    "CHECKPOINT_FORMAT": "mix_metagrad's checkpoint keeps its own format",
    "resume_args": "mix_metagrad resumes one run: no --num-seeds group",
}


def toy_differences(sources: dict) -> list[str]:
    """What mix_metagrad.py or mrp_metagrad.py writes otherwise than the first script of `sources` ({script: source},
    the IMPALA family first) that has a definition of the same name, except TOY_OWN."""
    problems, seen = [], {}
    for script, source in sources.items():
        for name, text in definitions(source):
            toy = script in ("mix_metagrad.py", "mrp_metagrad.py")  # the family's own differences: OWN, above
            if toy and name in seen and name not in TOY_OWN and text != seen[name][1]:
                problems.append(f"{name}: {script} differs from {seen[name][0]} (copy it, or list it in TOY_OWN)")
            seen.setdefault(name, (script, text))
    return problems


def read_toys():
    return read_scripts(("qr_impala.py", "drmg.py", "mix_metagrad.py", "mrp_metagrad.py"))


def test_mix_and_mrp_copy_the_family_plumbing_verbatim():
    sources = read_toys()
    assert toy_differences(sources) == []
    mrp = {name for name, _ in definitions(sources["mrp_metagrad.py"])}
    assert {"available_memory", "make_run_dir", "print_cause_first", "check_fits"} <= mrp  # shared with qr_impala or mix_metagrad


@pytest.mark.parametrize(
    "script,old,new,named",
    [
        ("mix_metagrad.py", 'print(f"{taken} is another run\'s: this run writes to {path}")', 'print(f"{taken} is taken: this run writes to {path}")', "make_run_dir"),
        ("mrp_metagrad.py", "    needed -= analysis.alias_size_in_bytes\n", "", "check_fits"),
    ],
)
def test_a_changed_copy_in_mix_or_mrp_is_caught(script, old, new, named):
    sources = mutated(read_toys(), script, old, new)
    assert any(p.startswith(f"{named}: {script} differs") for p in toy_differences(sources)), toy_differences(sources)
