"""Pure functions that turn a pre-trained state dict into one a fine-tuning model accepts.

Fine-tuning (paper section 4.1, 3.2) runs at a higher resolution with a new head: the learned
position embeddings are resized in 2-D, and the head (with its pre-logits layer) is replaced
by one zero-initialised linear layer. None of these functions mutate their inputs.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KEYS = ("head.weight", "head.bias")
PRE_LOGITS_PREFIX = "pre_logits."
# Pre-training-only parameters that a fine-tuning model built without them does not take.
MASKED_PATCH_KEYS = ("mask_token", "masked_patch_head.weight", "masked_patch_head.bias")


def resize_pos_embed(
    posemb: torch.Tensor, new_grid: int | tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """(1, prefix + g*g, D) position embeddings -> (1, prefix + h*w, D) for a new (h, w) grid.

    The prefix (class token) embeddings are kept as they are; the grid is resized with 2-D
    bilinear interpolation (align_corners=False).
    """
    height, width = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    old_size = math.isqrt(grid.shape[1])
    if old_size**2 != grid.shape[1]:
        raise ValueError(f"position embeddings hold {grid.shape[1]} grid tokens, not a square grid")
    grid = grid.reshape(1, old_size, old_size, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, height * width, -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def replace_head(state_dict: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Drop the pre-logits layer and put a zero-initialised `num_classes` head in place of the old one."""
    old_weight = state_dict["head.weight"]
    in_features = state_dict.get(PRE_LOGITS_PREFIX + "0.weight", old_weight).shape[1]
    new_state = {key: value for key, value in state_dict.items() if not key.startswith(PRE_LOGITS_PREFIX)}
    new_state["head.weight"] = old_weight.new_zeros(num_classes, in_features)
    new_state["head.bias"] = old_weight.new_zeros(num_classes)
    return new_state


def adapt_pretrained(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Return `state_dict` changed so that `model.load_state_dict(..., strict=True)` accepts it.

    Resizes the position embeddings to the model's grid, replaces the head when the class
    count or the pre-logits layer differ, and drops masked-patch-prediction parameters the
    model lacks. Anything else that does not fit is left for load_state_dict to report.
    """
    target = model.state_dict()
    adapted = {key: value for key, value in state_dict.items() if key in target or key not in MASKED_PATCH_KEYS}

    has_pre_logits = any(key.startswith(PRE_LOGITS_PREFIX) for key in adapted)
    same_head = adapted["head.weight"].shape == target["head.weight"].shape
    if any(key.startswith(PRE_LOGITS_PREFIX) for key in target):
        # Only a checkpoint of the very same head can feed a model that keeps pre-logits.
        if not (has_pre_logits and same_head):
            raise ValueError("the model has a pre-logits head the checkpoint cannot fill; build it without one")
    elif has_pre_logits or not same_head:
        adapted = replace_head(adapted, num_classes=target["head.weight"].shape[0])

    if "pos_embed" in target and adapted["pos_embed"].shape != target["pos_embed"].shape:
        # The class token is the only prefix token; the model's grid is square.
        new_grid = math.isqrt(target["pos_embed"].shape[1] - 1)
        adapted["pos_embed"] = resize_pos_embed(adapted["pos_embed"], new_grid, num_prefix_tokens=1)
    return adapted
