"""How fast one actor thread steps EnvPool with the policy: this working tree's with and without --overlap-envs, and
another commit's (with its default), in one run.

The actor thread of a script (`actor_loop`) runs --updates unrolls with a fixed policy (the initial network's: no
learner, so the learner's speed does not enter), after one unroll that compiles the policy; beside it, the EnvPool of
the same envs stepped with random actions and no policy (EnvPool's own rate). Versions alternate, --repeats times, and
the median is kept. Per version: env steps/s, and per unroll the `stats/` the thread logs (env_time: waiting for
EnvPool; inference_time: the policy). Results go to --out (JSON).

    nice -n 10 python benchmark/actor_sps.py --baseline HEAD~1     # qr_impala.py: this tree's with and without --overlap-envs, HEAD~1's
"""

import importlib.util
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

import jax
import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    script: str = "qr_impala"
    """the script whose actor thread runs (qr_impala, drmg, mg or stacx)"""
    baseline: str = "HEAD"
    """the git commit whose version of the script runs beside this working tree's"""
    env_id: str = "Breakout-v5"
    """an EnvPool environment"""
    local_num_envs: int = 16
    """envs of the thread"""
    num_steps: int = 20
    """steps of an unroll"""
    envpool_threads: int = 0
    """EnvPool's threads (0: its default)"""
    updates: int = 10
    """unrolls timed per repeat"""
    repeats: int = 3
    """alternating repeats of each version (the median is kept)"""
    out: str = os.path.join(ROOT, "benchmark", "results", "actor_sps_cpu.json")
    """where the results go"""


class Recorder:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append(float(value))


def load_script(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def actor_rate(module, args: Args, overlap: bool) -> dict:
    """Env steps/s of the module's actor thread over args.updates unrolls after a first one, and its mean stats."""
    run = module.Args(
        env_id=args.env_id, local_num_envs=args.local_num_envs, num_actor_threads=1, num_steps=args.num_steps,
        envpool_threads=args.envpool_threads, **(dict(overlap_envs=overlap) if hasattr(module.Args, "overlap_envs") else {}),
    )  # fmt: skip
    run.world_size, run.num_updates = 1, args.updates + 1
    envs = module.make_env(args.env_id, 0, 1, run)
    network = module.make_network(envs.action_space.n, run)
    obs = np.zeros((1,) + envs.observation_space.shape, envs.observation_space.dtype)
    state = module.make_learner_state(network.apply, module.init_params(network, jax.random.PRNGKey(0), obs, run), run)
    inputs = module.policy_inputs(state, run)
    rollouts, policies, writer = queue.Queue(), queue.Queue(), Recorder()
    for _ in range(run.num_updates):
        policies.put(inputs)
    times = []

    class Timed(queue.Queue):
        def put(self, item, *a, **k):
            times.append(time.perf_counter())
            return rollouts.put(item, *a, **k)

    device = jax.devices()[0]
    module.actor_loop(
        jax.random.PRNGKey(0), run, Timed(), policies, writer, [device], 0, device, (0, 0), deque(maxlen=100),
        threading.Event(), ["starting"],
    )  # fmt: skip
    steps = args.updates * args.local_num_envs * args.num_steps
    stats = {k.removeprefix("stats/"): float(np.mean(v[1:])) for k, v in writer.scalars.items() if k.startswith("stats/")}
    return dict(sps=steps / (times[-1] - times[0]), **{k: stats[k] for k in ("env_time", "inference_time", "rollout_time")})


def envpool_rate(module, args: Args) -> float:
    """Env steps/s of the same EnvPool stepped with random actions, no policy."""
    run = module.Args(env_id=args.env_id, local_num_envs=args.local_num_envs, envpool_threads=args.envpool_threads)
    envs = module.make_env(args.env_id, 0, args.local_num_envs, run)
    envs.reset()
    rng = np.random.default_rng(0)
    n = envs.action_space.n
    for _ in range(args.num_steps):
        envs.step(rng.integers(0, n, args.local_num_envs))
    start = time.perf_counter()
    for _ in range(args.updates * args.num_steps):
        envs.step(rng.integers(0, n, args.local_num_envs))
    return args.updates * args.num_steps * args.local_num_envs / (time.perf_counter() - start)


def main(args: Args):
    with tempfile.TemporaryDirectory() as tmp:
        source = subprocess.run(
            ["git", "show", f"{args.baseline}:{args.script}.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        path = os.path.join(tmp, f"{args.script}_baseline.py")
        with open(path, "w") as f:
            f.write(source)
        tree = load_script(os.path.join(ROOT, f"{args.script}.py"), f"{args.script}_tree")
        versions = {
            "this tree": (tree, False),
            "this tree, --overlap-envs": (tree, True),
            args.baseline: (load_script(path, f"{args.script}_baseline"), False),
        }
        runs = {name: [] for name in versions}
        envpool = []
        for repeat in range(args.repeats):
            for name, (module, overlap) in versions.items():
                runs[name].append(actor_rate(module, args, overlap))
                print(f"repeat {repeat + 1}, {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()), flush=True)
            envpool.append(envpool_rate(tree, args))
            print(f"repeat {repeat + 1}, EnvPool random actions: {envpool[-1]:.0f} SPS", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    result = dict(
        command="python benchmark/actor_sps.py " + " ".join(sys.argv[1:]),
        settings=vars(args),
        medians=medians,
        envpool_random_sps=statistics.median(envpool),
        ratios=dict(
            overlap=medians["this tree, --overlap-envs"]["sps"] / medians["this tree"]["sps"],
            tree_to_baseline=medians["this tree"]["sps"] / medians[args.baseline]["sps"],
        ),
        runs=runs,
        versions=dict(python=platform.python_version(), jax=jax.__version__, cpus=os.cpu_count(), head=commit),
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, m in medians.items():
        print(f"{name}: {m['sps']:.0f} SPS, per unroll env {m['env_time']:.3f} s, inference {m['inference_time']:.3f} s")
    print(f"EnvPool random actions: {result['envpool_random_sps']:.0f} SPS; ratios {result['ratios']}")


if __name__ == "__main__":
    main(tyro.cli(Args))
