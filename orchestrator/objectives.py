"""Training losses: sigmoid cross-entropy for multi-label corpora (JFT-style), softmax otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, *, multi_label: bool) -> torch.Tensor:
    """Mean loss over the batch.

    Args:
        targets: class indices (N,) for single-label data; multi-hot floats (N, C) when
            `multi_label`, whose loss sums the per-class sigmoid terms as big_vision does.
    """
    if multi_label:
        per_class = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
        return per_class.sum(dim=-1).mean()
    return F.cross_entropy(logits, targets)
