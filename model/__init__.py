"""vitscale's single-device model code: ViT, BiT ResNets, hybrids, and their weight conversions.

Start at `build_model(name, num_classes)`; the names and sizes are in `model/registry.py`.
The names below are imported on first use (PEP 562), so that `from model import model_spec`
(the run configs, every command line's argument check) does not import torch, which takes
~3 s on a 2-core machine: only `model/specs.py` is torch-free.
"""

import importlib

_WHERE = {
    "MODEL_NAMES": "model.specs",
    "ModelSpec": "model.specs",
    "model_spec": "model.specs",
    "build_model": "model.registry",
    "adapt_pretrained": "model.convert",
    "replace_head": "model.convert",
    "resize_pos_embed": "model.convert",
    "forward_flops": "model.flops",
    "masked_patch_loss": "model.masked_patch",
    "patch_color_targets": "model.masked_patch",
    "random_patch_mask": "model.masked_patch",
    "ResNetV2": "model.resnet",
    "StdConv2d": "model.resnet",
    "VisionTransformer": "model.vit",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
