"""Model names -> architectures: the paper's Table 1, BiT ResNets, hybrids, and debug twins.

`build_model("ViT-B/16", num_classes=1000)` builds any name below. Names decode like
big_vision's `decode_variant`: the size token looks up SIZES, the number after "/" is the
ViT patch size, or for hybrids (R50+ViT-...) the CNN's total downsampling with 1x1 patches.
Parameter counts are at 224 px (ViT-Mu/4: 32 px) with a 1000-class head and no pre-logits.

| name         | family | layers       | width D | MLP  | heads | patch / stride | params |
|--------------|--------|--------------|---------|------|-------|----------------|--------|
| ViT-B/16     | ViT    | 12           | 768     | 3072 | 12    | 16 / 16        | 86.6M  |
| ViT-B/32     | ViT    | 12           | 768     | 3072 | 12    | 32 / 32        | 88.2M  |
| ViT-L/16     | ViT    | 24           | 1024    | 4096 | 16    | 16 / 16        | 304.3M |
| ViT-L/32     | ViT    | 24           | 1024    | 4096 | 16    | 32 / 32        | 306.5M |
| ViT-H/14     | ViT    | 32           | 1280    | 5120 | 16    | 14 / 14        | 632.0M |
| R50x1        | BiT    | (3,4,6,3)    | 64x1    | -    | -     | - / 32         | 25.5M  |
| R50x2        | BiT    | (3,4,6,3)    | 64x2    | -    | -     | - / 32         | 98.0M  |
| R101x1       | BiT    | (3,4,23,3)   | 64x1    | -    | -     | - / 32         | 44.5M  |
| R152x1       | BiT    | (3,8,36,3)   | 64x1    | -    | -     | - / 32         | 60.2M  |
| R152x2       | BiT    | (3,8,36,3)   | 64x2    | -    | -     | - / 32         | 236.3M |
| R50+ViT-B/16 | hybrid | (3,4,9) + 12 | 768     | 3072 | 12    | 1 / 16         | 98.7M  |
| R50+ViT-B/32 | hybrid | (3,4,6,3)+12 | 768     | 3072 | 12    | 1 / 32         | 110.9M |
| R50+ViT-L/32 | hybrid | (3,4,6,3)+24 | 1024    | 4096 | 16    | 1 / 32         | 329.0M |
| R50+ViT-L/16 | hybrid | (3,4,9) + 24 | 1024    | 4096 | 16    | 1 / 16         | 316.5M |
| ViT-Ti/16    | debug  | 12           | 192     | 768  | 3     | 16 / 16        | 5.7M   |
| ViT-S/16     | debug  | 12           | 384     | 1536 | 6     | 16 / 16        | 22.1M  |
| ViT-S/32     | debug  | 12           | 384     | 1536 | 6     | 32 / 32        | 22.9M  |
| ViT-Mu/4     | debug  | 2            | 64      | 256  | 2     | 4 / 4 (32 px)  | 0.17M  |

BiT "width" is the root width 64 * width factor; stage i has 256 * factor * 2**i outputs.
"""

import contextlib

import torch
from torch import nn

from model.resnet import ResNetFeatures, ResNetV2
from model.specs import MODEL_NAMES, SIZES, ModelSpec, model_spec  # noqa: F401  (re-exported)
from model.vit import VisionTransformer

# Weight Standardization epsilon of the ViT paper's official hybrid code, added to the standard
# deviation as its `weight_standardize` does (BiT: 1e-8 added to the variance).
HYBRID_STDCONV_EPS = 1e-5


def build_model(
    name: str,
    num_classes: int,
    image_size: int = 224,
    representation_size: int | None = None,
    dropout: float = 0.0,
    device: torch.device | str | None = None,
    masked_patch_prediction: bool = False,
) -> nn.Module:
    """Build the named model, mapping (N, 3, image_size, image_size) to (N, num_classes) logits.

    `device="meta"` builds without allocating memory (shapes, parameter counts, FLOPs).
    ResNets take any image size; ViTs need a multiple of the stride. `representation_size`
    adds the pre-logits layer and `masked_patch_prediction` the masked-patch head (ViTs only).
    """
    spec = model_spec(name)
    if spec.family == "resnet":
        for option, value, default in [
            ("representation_size", representation_size, None),
            ("dropout", dropout, 0.0),
            ("masked_patch_prediction", masked_patch_prediction, False),
        ]:
            if value != default:
                raise ValueError(f"{option}={value!r} is not supported for the ResNet {name}")
    if masked_patch_prediction and spec.family != "vit":
        raise ValueError(f"masked_patch_prediction is defined for plain ViTs only, not {name}")

    with torch.device(device) if device is not None else contextlib.nullcontext():
        if spec.family == "resnet":
            return ResNetV2(block_counts=spec.block_counts, width_factor=spec.width_factor, num_classes=num_classes)
        backbone = None
        if spec.family == "hybrid":
            # Post-activation units, as in the paper's official hybrid code and timm's port.
            backbone = ResNetFeatures(spec.block_counts, spec.width_factor, preact=False, eps=HYBRID_STDCONV_EPS)
        return VisionTransformer(
            image_size=image_size,
            patch_size=spec.patch_size,
            width=spec.width,
            depth=spec.depth,
            mlp_dim=spec.mlp_dim,
            num_heads=spec.num_heads,
            num_classes=num_classes,
            representation_size=representation_size,
            dropout=dropout,
            backbone=backbone,
            masked_patch_prediction=masked_patch_prediction,
        )
