"""The DeepSpeed side of a worker: the engine config derived from a run config, and the engine.

The recipe decides everything here: Adam(W) with the table's betas and decoupled weight decay,
gradient clipping at the table's norm, the global batch split into workers x micro-batch x
gradient accumulation, bf16 on GPUs and fp32 on CPUs, and the ZeRO stage. The learning rate
is set by the training loop each step (orchestrator/schedule.py), so a restarted run
recomputes it from the step counter alone.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import PretrainConfig


def deepspeed_config(config: PretrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    return {
        "train_batch_size": config.global_batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.grad_clip_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.base_lr,
                "betas": [config.adam_beta1, config.adam_beta2],
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                # On CPUs torch's AdamW avoids JIT-building DeepSpeed's CPU Adam; GPUs use
                # DeepSpeed's fused Adam in AdamW mode.
                "torch_adam": not use_gpu,
            },
        },
        "bf16": {"enabled": use_gpu},
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**12,  # our own metrics and logs report progress
        "wall_clock_breakdown": False,
    }


def build_engine(config: PretrainConfig, *, use_gpu: bool):
    """Model (same initial weights on every rank) wrapped by deepspeed.initialize."""
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
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(config, use_gpu=use_gpu)
    )
    return engine
