"""Forward FLOPs per image, counted by torch on the meta device (no memory, no compute).

FLOPs here are 2 x multiply-accumulates, as torch.utils.flop_counter counts them; the
paper's "compute per image" figures are MACs, so halve these to compare. Only matmuls,
convolutions and attention are counted (norms, activations and pooling are not, nor are
they in the paper's figures).
"""

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from model.registry import build_model


def forward_flops(model_or_name: nn.Module | str, image_size: int = 224) -> int:
    """Forward FLOPs (2 x MACs) for one image of image_size x image_size pixels.

    A name is built with a 1000-class head; a module is evaluated on meta copies of its
    parameters and buffers, so it is neither moved nor changed.
    """
    if isinstance(model_or_name, str):
        model = build_model(model_or_name, num_classes=1000, image_size=image_size, device="meta")
    else:
        model = model_or_name
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    images = torch.empty(1, 3, image_size, image_size, device="meta")
    # On meta, scaled_dot_product_attention decomposes into two counted bmm's; on CPU its fused
    # kernel would go uncounted.
    with FlopCounterMode(display=False) as counter:
        functional_call(model, meta_state, (images,))
    return counter.get_total_flops()
