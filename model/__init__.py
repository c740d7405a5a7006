"""vitscale's single-device model code: ViT, BiT ResNets, hybrids, and their weight conversions.

Imports torch only. Start at `build_model(name, num_classes)`; the names and sizes are in
`model/registry.py`.
"""

from model.convert import adapt_pretrained, replace_head, resize_pos_embed
from model.flops import forward_flops
from model.masked_patch import masked_patch_loss, patch_color_targets, random_patch_mask
from model.registry import MODEL_NAMES, ModelSpec, build_model, model_spec
from model.resnet import ResNetV2, StdConv2d
from model.vit import VisionTransformer

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "ResNetV2",
    "StdConv2d",
    "VisionTransformer",
    "adapt_pretrained",
    "build_model",
    "forward_flops",
    "masked_patch_loss",
    "model_spec",
    "patch_color_targets",
    "random_patch_mask",
    "replace_head",
    "resize_pos_embed",
]
