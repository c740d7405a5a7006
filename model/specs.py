"""What each model name means, without torch: the names, the size table and `model_spec`.

`model/registry.py` has the table of every name and builds the models; this module is what
the run configs and command lines need to validate a name (they start in a fraction of a
second: torch takes ~3 s to import on a 2-core machine).
"""

from dataclasses import dataclass

MODEL_NAMES = (
    "ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "ViT-H/14",
    "R50x1", "R50x2", "R101x1", "R152x1", "R152x2",
    "R50+ViT-B/16", "R50+ViT-B/32", "R50+ViT-L/32", "R50+ViT-L/16",
    "ViT-Ti/16", "ViT-S/16", "ViT-S/32", "ViT-Mu/4",
)  # fmt: skip

# The one size table: transformer sizes (paper Table 1 plus debug twins) and ResNet depths.
SIZES = {
    "Mu": dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "R50": dict(block_counts=(3, 4, 6, 3)),
    "R101": dict(block_counts=(3, 4, 23, 3)),
    "R152": dict(block_counts=(3, 8, 36, 3)),
}



@dataclass(frozen=True)
class ModelSpec:
    """What a model name means. Transformer fields are None for ResNets and vice versa."""

    name: str
    family: str  # "vit", "resnet" or "hybrid"
    stride: int  # input pixels per token (ViT, hybrid) or per final feature (ResNet)
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None  # 1 for hybrids: 1x1 patches of the CNN feature map
    block_counts: tuple[int, ...] | None = None
    width_factor: int | None = None


def model_spec(name: str) -> ModelSpec:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    resnet, _, transformer = name.rpartition("+")
    if transformer.startswith("R"):  # a BiT ResNet, "R50x2"
        depth, width_factor = transformer.split("x")
        return ModelSpec(name, "resnet", stride=32, width_factor=int(width_factor), **SIZES[depth])
    size, number = transformer.removeprefix("ViT-").split("/")
    if not resnet:
        return ModelSpec(name, "vit", stride=int(number), patch_size=int(number), **SIZES[size])
    block_counts = SIZES[resnet]["block_counts"]
    if number == "16":  # paper: stage 4 removed, its blocks moved into stage 3
        block_counts = (*block_counts[:2], block_counts[2] + block_counts[3])
    return ModelSpec(
        name, "hybrid", stride=int(number), patch_size=1, block_counts=block_counts, width_factor=1, **SIZES[size]
    )
