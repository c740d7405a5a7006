"""The DeepSpeed side of a worker: the engine config derived from a run config, and the engine.

The recipe decides everything here: Adam(W) with the table's betas and decoupled weight decay,
gradient clipping at the table's norm, the global batch split into workers x micro-batch x
gradient accumulation, bf16 on GPUs and fp32 on CPUs, and the ZeRO stage. The learning rate
is set by the training loop each step (orchestrator/schedule.py), so a restarted run
recomputes it from the step counter alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from orchestrator.config import PretrainConfig


def uses_bf16(config: PretrainConfig, *, use_gpu: bool) -> bool:
    """bf16 arithmetic (fp32 masters): on GPUs unless the config says fp32; on CPUs if it says bf16."""
    return config.precision == "bf16" or (config.precision == "auto" and use_gpu)


def deepspeed_config(config: PretrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    """The engine's config. Fine-tuning trials (TrialConfig, optimizer "sgd") bring their own
    torch SGD instead of the "optimizer" block (build_engine)."""
    if config.optimizer == "sgd":
        # ZeRO partitions any torch optimizer's state; DeepSpeed only asks that one it has not
        # tested be allowed explicitly.
        return {**_engine_settings(config, use_gpu=use_gpu), "zero_allow_untested_optimizer": True}
    return {**_engine_settings(config, use_gpu=use_gpu), "optimizer": _adamw(config, use_gpu=use_gpu)}


def _adamw(config: PretrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    return {
        "type": "AdamW",
        "params": {
            "lr": config.base_lr,
            "betas": [config.adam_beta1, config.adam_beta2],
            "eps": 1e-8,
            "weight_decay": config.weight_decay,
            # On CPUs torch's AdamW avoids JIT-building DeepSpeed's CPU Adam; GPUs use
            # DeepSpeed's fused Adam in AdamW mode.
            "torch_adam": not use_gpu,
            # torch's fused CPU kernel: one pass over parameter, moments and gradient where
            # the default for CPU tensors (neither fused nor foreach) makes ~8 passes and
            # two temporaries of the parameters' size. ViT-S/16's update, ZeRO-1 (one flat
            # 22M-element fp32 partition), 2 cores: 86 -> 8 ms.
            **({} if use_gpu else {"fused": True}),
        },
    }


def _engine_settings(config: PretrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    return {
        "train_batch_size": config.global_batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.grad_clip_norm,
        # DeepSpeed's bf16 overflow check is a serial pass over every gradient before each
        # update: 16.7 ms of a 103 ms ViT-B/16 step (batch 256) on an H200, MFU 0.265 -> 0.309
        # without it. bf16 has fp32's range, so loss scaling needs no such check; the worker
        # checks the gradient norm DeepSpeed computes anyway for clipping after every update
        # and rolls back when an update made the parameters non-finite (train_loop.py).
        "bf16": {"enabled": uses_bf16(config, use_gpu=use_gpu), "check_grad_overflow": False},
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**12,  # our own metrics and logs report progress
        "wall_clock_breakdown": False,
    }


def cpu_collectives_through_gloo() -> None:
    """DeepSpeed's CPU communication op (a shared-memory all-reduce) is neither built nor
    loaded: a CPU run's collectives go through torch.distributed's gloo, the process group Ray
    Train (or init_one_rank) set up. DeepSpeed JIT-compiles that op in the first engine of each
    install, 30 s of the first worker's start on 2 cores (a fresh clone's dry run, CI's first
    engine), and loads it in every worker's start after that, for the few small collectives a
    step of vitscale's CPU runs makes (tests, dry runs, one-rank fine-tuning trials). DeepSpeed
    asks its table of compatible ops before it builds one, and keeps that table, so an op
    marked there is never built (deepspeed/comm/torch.py build_shm_op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_the_interpreters_ninja() -> None:
    """Puts this interpreter's bin folder first on PATH when it holds a `ninja` (the one pinned in
    constraints.txt). DeepSpeed JIT-builds its ops (FusedAdam on a GPU) in a process's first
    engine (torch.utils.cpp_extension, which runs the `ninja` found on PATH, into one cache
    folder per user). A second ninja on PATH (a system one: `python` run without its venv's bin,
    as `make` does) hashes the build log in another way, so each ninja rebuilds what the other
    built: ~30 s of a worker's start, in turn. One install, one ninja."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(here, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path if path else here


def init_one_rank(*, use_gpu: bool) -> None:
    """torch.distributed of this process alone, on a free loopback port (NCCL on GPU 0, gloo
    otherwise): what `build_engine` needs outside Ray Train (benchmarks, tests, a worker run
    by hand)."""
    import socket

    import deepspeed
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_gpu:
        torch.cuda.set_device(0)
    use_the_interpreters_ninja()
    if not use_gpu:
        cpu_collectives_through_gloo()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


# DeepSpeed (ZeRO's optimizer check and its gradient reduction) imports its Muon optimizer, and
# that module torch.compiles three functions at import: `torch.compile(fn)` loads the whole of
# torch._inductor, ~3 s of every worker's start on a CPU, for functions only Muon calls.
MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def import_muon_lazily() -> None:
    """Imports DeepSpeed's Muon modules with their `@compiler.compile()` deferred to each
    function's first call (what torch.compile does anyway: it compiles on the first call), so
    that a run without Muon never loads the compiler."""
    if all(name in sys.modules for name in MUON_MODULES):
        return
    import functools
    import importlib

    import torch
    from deepspeed.runtime import compiler

    def on_first_call(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)

        return call

    eager = compiler.compile
    compiler.compile = lambda: on_first_call
    try:
        for name in MUON_MODULES:
            importlib.import_module(name)
    finally:
        compiler.compile = eager


def build_engine(config: PretrainConfig, *, use_gpu: bool):
    """Model (same initial weights on every rank) wrapped by deepspeed.initialize, compiled
    when the config says so (the first steps then take the compile time)."""
    import deepspeed
    import torch

    from model import build_model

    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        config.num_classes,
        image_size=config.image_size,
        representation_size=config.representation_size if config.objective == "supervised" else None,
        dropout=config.dropout,
        masked_patch_prediction=config.objective == "masked-patch",
    )
    import_muon_lazily()
    use_the_interpreters_ninja()
    if not use_gpu:
        cpu_collectives_through_gloo()
    optimizer = None
    if config.optimizer == "sgd":  # a fine-tuning trial: from the exported weights, with SGD
        from orchestrator.checkpoint import load_exported_weights

        load_exported_weights(model, config.weights, sha256=config.weights_sha256)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.base_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=optimizer,
        config=deepspeed_config(config, use_gpu=use_gpu)
    )
    if config.torch_compile:
        # nn.Module.compile in place: the state dict keeps its keys, so checkpoints of compiled
        # and eager runs load into each other.
        engine.compile()
    return engine
