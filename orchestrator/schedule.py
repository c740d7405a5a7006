"""The paper's learning-rate schedule: linear warm-up, then linear or cosine decay to zero.

Pretraining warms up for 10k steps (PAPER.md); fine-tuning uses cosine decay. The function is
pure so that a restarted run recomputes the same rate from the step counter alone.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, decay: str) -> float:
    """The rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return base_lr * (1.0 - progress)
    if decay == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}; valid: linear, cosine")
