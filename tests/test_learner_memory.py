"""The learner's memory saving changes no number: --chunk-envs and the CPU convolution; the startup memory check."""

import os
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from helpers import only_run_dir, run_script, scalars
from learner_setup import MODULES, learner, random_batch, script_args

# Small frames take qr_impala.py through the ResNet and `cpu_conv` inside the scan; vector observations keep the
# meta-gradient scripts' second-order compilations short (their `cpu_conv` is checked on its own below).
SPACES = {"qr_impala": SimpleNamespace(shape=(4, 12, 12), dtype=np.dtype(np.uint8))}


@pytest.mark.parametrize("name", MODULES)
def test_chunked_update_equals_the_whole_batch_update(name):
    """Gradients and meta-gradients averaged over chunks of 2 envs are those of the whole batch (8 envs): same params,
    and, with SGD at learning rate 1 for eta, the same meta-gradient."""
    outputs = []
    space = SPACES.get(name, SimpleNamespace(shape=(5,), dtype=np.dtype(np.float32)))
    for chunk_envs in [0, 2]:
        args = script_args(name, "Breakout-v5", local_num_envs=8, num_actor_threads=1, num_steps=3, chunk_envs=chunk_envs)
        step, state, spec = learner(name, args, space, 4)
        if "meta" in state:
            state = dict(state, meta=TrainState.create(apply_fn=None, params=state["meta"].params, tx=optax.sgd(1.0)))
        batch = random_batch(spec, 4, seed=1)._replace(terminations=np.eye(3, 8, k=2, dtype=np.float32))
        outputs.append(jax.device_get(step(state, batch)))
        changed = optax.global_norm(jax.tree.map(jnp.subtract, outputs[-1][0]["agent"].params, state["agent"].params))
        assert changed > 1e-6, "the update must move the parameters"
    whole, chunked = outputs  # each (learner state, metrics, checks)
    close = lambda rtol: lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7)  # noqa: E731
    jax.tree.map(close(1e-4), whole[0]["agent"].params, chunked[0]["agent"].params)
    if "meta" in state:
        jax.tree.map(close(1e-3), whole[0]["meta"].params, chunked[0]["meta"].params)
        assert whole[1]["meta_grad_norm"] > 1e-6
    for key in ["loss", "entropy", "grad_norm"]:
        np.testing.assert_allclose(whole[1][key], chunked[1][key], rtol=1e-4, err_msg=key)
    assert not any(whole[-1]["non_finite"].values()) and not any(chunked[-1]["non_finite"].values())


def lax_conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def first_and_second_derivatives(conv, x, kernel, padding):
    """The gradient of a scalar of conv(x, kernel) and the gradient of a scalar of that gradient (the meta-gradient's
    order), with respect to x and the kernel."""

    def grads(x, kernel):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding))), argnums=(0, 1))(x, kernel)

    second = jax.grad(lambda x, k: sum(jnp.sum(jnp.cos(g) * g) for g in grads(x, k)), argnums=(0, 1))(x, kernel)
    return (conv(x, kernel, padding), *grads(x, kernel), *second)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 0), (0, 0)), ((2, 0), (1, 2))])
def test_cpu_conv_and_its_derivatives_equal_laxs(name, padding):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, kernel = jnp.asarray(rng.normal(size=(3, 7, 6, 4))), jnp.asarray(rng.normal(size=(3, 3, 4, 5)))
        ours = first_and_second_derivatives(MODULES[name].cpu_conv, x, kernel, padding)
        theirs = first_and_second_derivatives(lax_conv, x, kernel, padding)
        for a, b, what in zip(ours, theirs, ["value", "d/dx", "d/dkernel", "d2/dx", "d2/dkernel"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=what)


def test_a_cpu_conv_with_an_unflipped_kernel_is_caught(monkeypatch):
    """The check above has the power to see a wrong transposed convolution."""
    module = MODULES["drmg"]
    monkeypatch.setattr(module, "flipped", lambda kernel: kernel.swapaxes(2, 3))
    rng = np.random.default_rng(0)
    x, kernel = jnp.asarray(rng.normal(size=(2, 5, 5, 3))), jnp.asarray(rng.normal(size=(3, 3, 3, 2)))
    padding = ((1, 1), (1, 1))
    ours = first_and_second_derivatives(module.cpu_conv, x, kernel, padding)
    theirs = first_and_second_derivatives(lax_conv, x, kernel, padding)
    assert not np.allclose(ours[1], theirs[1], rtol=1e-3)


def test_the_networks_use_the_cpu_conv_on_cpu():
    for module in MODULES.values():
        layer = module.conv3x3(16)
        assert layer.conv_general_dilated is not None and jax.default_backend() == "cpu", module.__name__


@pytest.mark.parametrize("script", [f"{name}.py" for name in MODULES])
def test_a_step_that_cannot_fit_stops_before_anything_is_written(tmp_path, script):
    result = run_script(
        tmp_path,
        *["--env-id", "CartPole-v1", "--total-timesteps", "640", "--local-num-envs", "4", "--memory-limit-gib", "1e-3"],
        script=script,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Thread" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "learner step needs" in line]
    assert re.fullmatch(
        r"the learner step needs [\d.]+ MiB per learner device \(cpu\) and there are 1\.0 MiB: "
        r"lower --chunk-envs \(now 16\), --local-num-envs or --num-steps",
        line,
    ), line
    assert not os.path.exists(tmp_path / "runs")


def test_a_smoke_run_logs_the_time_breakdown_and_prints_at_the_first_update(tmp_path):
    result = run_script(
        tmp_path,
        *["--env-id", "CartPole-v1", "--total-timesteps", "1024", "--local-num-envs", "4", "--num-steps", "8"],
        *["--log-frequency", "100"],
        script="drmg.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update 1/16 " in result.stdout and "learner busy" in result.stdout and "learner step:" in result.stdout
    logged = scalars(only_run_dir(tmp_path))
    for tag in ["rollout_time", "params_queue_get_time", "env_time", "inference_time", "device_put_time"]:
        assert len(logged[f"stats/{tag}"]) == 16 and np.all(np.asarray(logged[f"stats/{tag}"]) >= 0), tag
    assert "stats/rollout_queue_put_time" in logged
    busy = logged["stats/learner_busy_fraction"]
    assert len(busy) == 2 and all(0 < b < 1 for b in busy)  # updates 1 and 16
    assert all(t > 0 for t in logged["stats/learner_update_time"] + logged["stats/rollout_queue_get_time"])


class FakeCompiled:
    """A compiled learner step that needs `needed` bytes by XLA's memory analysis."""

    def __init__(self, chunk_envs, needed):
        self.chunk_envs = chunk_envs
        self.analysis = SimpleNamespace(
            temp_size_in_bytes=needed, argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0
        )

    def memory_analysis(self):
        return self.analysis


# What a learner step needs at each --chunk-envs over 128 envs (0: all), in MiB: less for smaller chunks.
NEEDED_MIB = {0: 800, 64: 420, 32: 230, 16: 130, 8: 80, 4: 55, 2: 42, 1: 36}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize(
    "platform,chunk_envs,budget_mib,chosen",
    [
        ("gpu", None, 1000, [0]),  # the whole batch fits: one compilation
        ("gpu", None, 800, [0]),
        ("gpu", None, 799, [0, 64]),
        ("gpu", None, 200, [0, 64, 32, 16]),
        ("gpu", None, 36, [0, 64, 32, 16, 8, 4, 2, 1]),
        ("gpu", None, 35, "stop"),  # below the smallest chunk
        ("gpu", 8, 1000, [8]),  # an explicit value stays explicit, even where more would fit
        ("gpu", 8, 79, "stop"),
        ("cpu", None, 1000, [16]),  # on CPU the fastest there, not the largest that fits
        ("cpu", 0, 1000, [0]),
    ],
)
def test_the_automatic_chunk_is_the_largest_that_fits(name, platform, chunk_envs, budget_mib, chosen):
    module = MODULES[name]
    args = module.Args(local_num_envs=64, num_actor_threads=2, chunk_envs=chunk_envs, memory_limit_gib=budget_mib / 1024)
    tried = []

    def compile_at(chunk):
        tried.append(chunk)
        return FakeCompiled(chunk, NEEDED_MIB[chunk] * 2**20)

    device = SimpleNamespace(platform=platform, device_kind="fake")
    if chosen == "stop":
        with pytest.raises(SystemExit, match=r"^the learner step needs [\d.]+ MiB per learner device \(fake\) and there"):
            module.compile_learner_step(compile_at, args, [device])
        return
    compiled, chunk, line = module.compile_learner_step(compile_at, args, [device])
    assert tried == chosen and compiled.chunk_envs == chosen[-1] == chunk
    how = "given" if chunk_envs is not None else "CPU" if platform == "cpu" else "largest to fit"
    assert line.endswith(f"of {budget_mib / 1024:.1f} GiB, --chunk-envs {chosen[-1]} ({how})") or line.endswith(
        f"of {float(budget_mib):.1f} MiB, --chunk-envs {chosen[-1]} ({how})"
    ), line
