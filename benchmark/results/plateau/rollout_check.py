"""Rollout alignment check (issue 31): the Rollout that qr_impala.py's own actor thread (`rollout`, with
`make_device_unroll`, as of d919d67) builds on Breakout-MinAtar, against the invariants the loss relies on:
behaviour_logits[t] are the policy's logits at obs[t] (the params it was given), a reset step follows a done step and
has reward 0, and no termination/truncation on a reset step. Random (initial) params, 3 unrolls of 32 envs x 200
steps. (The probe builds its Rollout with the same rule in `plateau_probe.build.unroll`.)

    python benchmark/results/plateau/rollout_check.py
"""
import dataclasses
import os
import queue
import sys
import threading
from collections import deque

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from plateau_probe import load_qr  # noqa: E402

import jax  # noqa: E402

qr, commit = load_qr("d919d67")
args = qr.default_args(["--env-id", "Breakout-MinAtar"])
args = dataclasses.replace(args, env_id="Breakout-MinAtar", num_steps=200, num_updates=3, world_size=1, queue_timeout=600.0)
device = jax.devices()[0]
rq, pq = queue.Queue(), queue.Queue()
network = qr.AgentNetwork(3, args.num_quantiles, args.network)
params = network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 10, 10), np.float32))
for _ in range(3):
    pq.put(params)
stop = threading.Event()
qr.rollout(jax.random.PRNGKey(1), args, rq, pq, qr.NoWriter(), [device], 0, device, (0, 0), deque(maxlen=100), stop, ["" ])
bad = 0
for _ in range(3):
    step, shards = rq.get_nowait()
    ro = {k: np.asarray(v[0]) for k, v in shards.items()}
    logits, _ = network.apply(params, ro["obs"][:-1].reshape((-1, 4, 10, 10)))
    err = np.abs(np.asarray(logits).reshape(ro["behaviour_logits"].shape) - ro["behaviour_logits"]).max()
    done = np.maximum(ro["terminations"], ro["truncations"])
    resets = ro["resets"]
    after_done = resets[1:] == done[:-1]
    r_on_reset = np.abs(ro["rewards"][resets > 0]).max() if resets.any() else 0.0
    ends_on_reset = (done * resets).sum()
    print(f"unroll to step {step}: |behaviour_logits - pi(obs[t])| max {err:.1e}; resets[t+1] == done[t] everywhere: "
          f"{bool(after_done.all())}; reset steps {int(resets.sum())}, |reward| on them max {r_on_reset}; done on a reset step {int(ends_on_reset)}; "
          f"episodes ended {int(done.sum())}")
    bad += (err > 1e-5) + (not after_done.all()) + (r_on_reset != 0) + (ends_on_reset != 0)
print("qr_impala.py at", commit[:10], "actor rollout invariants:", "OK" if bad == 0 else f"{bad} FAILED")
