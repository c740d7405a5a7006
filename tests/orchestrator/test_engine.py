"""The engine config with real DeepSpeed: its AdamW updates, overflow handling and the worker's
gradient-norm check, and torch_compile."""

import json
import os
import re
import sys

import pytest
import torch

from data_pipelines.augment import normalise
from model import patch_color_targets
from orchestrator.train_loop import model_input
from tests.conftest import run_process

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_worker.py")


def run_worker(config: str, *args: str, env: dict | None = None) -> dict:
    # A process of its own: DeepSpeed's process group would outlive the test in pytest's.
    proc = run_process([sys.executable, WORKER, config, *args], capture_output=True, text=True, timeout=300,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_a_cpu_engine_builds_no_op_and_puts_the_interpreters_ninja_first_whatever_path_says(tmp_path):
    """A CPU run's collectives go through gloo: DeepSpeed's CPU communication op is neither
    built (30 s of the first worker's start of an install here) nor loaded, and no ninja runs.
    Where DeepSpeed does JIT-build (FusedAdam on a GPU), the interpreter's own ninja comes first
    on PATH: another one (a system one) would hash the build log in its own way, and each would
    rebuild what the other built."""
    here = os.path.dirname(sys.executable)
    other, calls = tmp_path / "bin", tmp_path / "calls"
    other.mkdir()
    (other / "ninja").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {here}/ninja "$@"\n')
    (other / "ninja").chmod(0o755)
    result = run_worker("ninja", env=dict(os.environ, PATH=f"{other}{os.pathsep}{os.environ['PATH']}"))
    assert result == {"comm_op": False, "ninja": os.path.join(here, "ninja"), "first_on_path": here}
    assert not calls.exists(), calls.read_text()


@pytest.mark.parametrize("config", ["gpu-config", "cpu-config"])
def test_a_non_finite_gradient_norm_is_seen_after_the_update(config):
    result = run_worker(config)
    assert result["bf16"] == (config == "gpu-config")
    assert result["before_any_update"] and result["after_clean_update"]
    assert result["loss_finite"] and not result["after_nan_update"]
    # bf16 (GPUs): DeepSpeed's serial overflow check is off for speed, so it applies the update
    # and the parameters go non-finite: the worker rolls back. fp32 (CPUs): DeepSpeed skips it.
    assert result["parameters_finite"] == (config == "cpu-config")


def test_the_cpu_config_updates_as_torch_adamw_with_clipping_under_every_zero_stage():
    result = run_worker("adamw")
    assert sorted(result) == ["0", "1", "2", "3"]
    for stage, r in result.items():
        # torch's fused CPU kernel (orchestrator/engine.py), not the per-tensor default
        assert (r["optimizer"], r["fused"]) == ("AdamW", True), (stage, r)
        # every update clipped; the optimizer decays every parameter group by what the config asks
        assert r["min_norm"] > 1.0 and r["weight_decay"] == r["asked_weight_decay"] > 0, (stage, r)
        assert r["moved"] > 1e-2 and r["max_difference"] < 1e-6, (stage, r)


def test_torch_compile_compiles_the_model_in_place_and_an_eager_engine_loads_no_compiler():
    result = run_worker("compiled")
    assert result["is_compiled"] == {"False": False, "True": True}
    # Compiled in place, not wrapped: checkpoints of compiled and eager runs share their keys.
    assert result["same_keys"] and result["keys"] > 10
    # DeepSpeed imports its Muon optimizer, which torch.compiles at import: ~3 s of each
    # worker's start. build_engine defers those compiles to their first call.
    assert result["compiler_loaded"] == {"False": False, "True": True}
    assert result["muon_deferred"]


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_exported_weights_are_the_fp32_masters_of_a_bf16_run(zero_stage, tmp_path):
    result = run_worker("export", str(zero_stage), str(tmp_path))
    assert result["digest"] and result["keys"] and result["buffer"] and result["metadata"]
    assert result["same_digest"], "the same weights exported again gave another file"
    assert result["working_dtypes"] == ["torch.bfloat16"] and result["dtypes"] == ["torch.float32"]
    # Every parameter is DeepSpeed's fp32 master, and after three updates those are off the
    # bf16 grid the working copy rounds them to.
    assert result["masters"] and result["off_bf16"] == result["parameters"] == 6, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_batches_reach_the_model_as_the_float_batches_do(dtype):
    # What a GPU worker's loader (dtype="uint8": channels-last [B,3,S,S] uint8) hands _loss, and
    # what a CPU worker's (float32 in [-1, 1]) hands it, give the model the same input.
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    as_uint8 = pixels.permute(0, 3, 1, 2)
    as_float = normalise(pixels)
    got = model_input(as_uint8, torch.device("cpu"), dtype)
    assert got.dtype == dtype and torch.equal(got, model_input(as_float, torch.device("cpu"), dtype))
    # Masked-patch targets come from fp32 pixels either way.
    assert torch.equal(patch_color_targets(model_input(as_uint8, torch.device("cpu"), torch.float32), 4),
                       patch_color_targets(as_float, 4))


def test_a_worker_outside_ray_trains_checkpoints_and_resumes(tmp_path):
    # benchmarks/worker_step.py's CPU check: _Worker(under_ray=False) in processes of its own,
    # local-folder shards and checkpoints, a second worker resuming from the first's commit.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "worker_step.py")
    proc = run_process([sys.executable, script, "--cpu", "--steps", "6", "--image-size", "32", "--data-workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stdout
    assert re.search(r"^bench worker_step_vs_in_memory_step_cpu_check [\d.]+$", proc.stdout, re.M), proc.stdout
