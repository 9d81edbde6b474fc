"""Training SPS of qr_impala.py against EnvPool's random-action rate for the same envs and threads (the loop's ceiling).

    python benchmark/qr_impala_sps.py --env-id Breakout-v5 --total-timesteps 200000

Both are measured in this one run, one after the other. The training rate is the steady-state rate between the first
and the last SPS log of the run (compilation excluded); extra flags after `--` go to qr_impala.py.
"""

import glob
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from qr_impala import Args as TrainArgs  # noqa: E402
from qr_impala import make_env  # noqa: E402


@dataclass
class Args:
    env_id: str = "Breakout-v5"
    """the environment of both measurements"""
    total_timesteps: int = 200_000
    """agent steps of the training run"""
    local_num_envs: int = 64
    """environments per actor thread (qr_impala.py's default)"""
    num_actor_threads: int = 2
    """actor threads, each with its own EnvPool (qr_impala.py's default)"""
    envpool_threads: int = 0
    """EnvPool worker threads per actor thread (0: EnvPool's default)"""
    random_seconds: float = 30.0
    """how long to step EnvPool with random actions"""
    extra: List[str] = field(default_factory=list)
    """further flags for qr_impala.py, e.g. --extra --learner-device-ids 0 1"""


def training_sps(args: Args) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, os.path.join(ROOT, "qr_impala.py"), "--env-id", args.env_id]
        command += ["--total-timesteps", str(args.total_timesteps), "--local-num-envs", str(args.local_num_envs)]
        command += ["--num-actor-threads", str(args.num_actor_threads), "--envpool-threads", str(args.envpool_threads)]
        command += ["--log-frequency", "5", *args.extra]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=cwd, check=True)
        (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
        accumulator = EventAccumulator(run_dir)
        accumulator.Reload()
        events = accumulator.Scalars("charts/SPS")
        if len(events) < 2:
            raise SystemExit("the training run logged SPS fewer than twice: raise --total-timesteps")
        return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def random_action_sps(args: Args) -> float:
    train_args = TrainArgs(env_id=args.env_id, envpool_threads=args.envpool_threads)
    counts = [0] * args.num_actor_threads
    deadline = [0.0]
    ready = threading.Barrier(args.num_actor_threads + 1)

    def actor(thread_id):
        envs = make_env(args.env_id, thread_id, args.local_num_envs, train_args)
        envs.reset()
        rng = np.random.default_rng(thread_id)
        ready.wait()
        while time.time() < deadline[0]:
            envs.step(rng.integers(0, envs.action_space.n, size=args.local_num_envs, dtype=np.int32))
            counts[thread_id] += args.local_num_envs

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(args.num_actor_threads)]
    for thread in threads:
        thread.start()
    deadline[0] = time.time() + 1e9
    ready.wait()
    start = time.time()
    deadline[0] = start + args.random_seconds
    for thread in threads:
        thread.join()
    return sum(counts) / (time.time() - start)


if __name__ == "__main__":
    args = tyro.cli(Args)
    train = training_sps(args)
    ceiling = random_action_sps(args)
    print(f"env {args.env_id}: {args.num_actor_threads} actor threads x {args.local_num_envs} envs")
    print(f"qr_impala.py training SPS (steady state): {train:,.0f}")
    print(f"EnvPool random-action SPS (same envs and threads): {ceiling:,.0f}")
    print(f"ratio training / random: {train / ceiling:.3f}")
