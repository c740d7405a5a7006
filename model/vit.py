"""The Vision Transformer of Dosovitskiy et al. (arXiv:2010.11929), plain and hybrid.

Plain ViT: a strided conv cuts the image into patches. Hybrid: a CNN backbone produces a
feature map and the same conv, with 1x1 "patches", projects it to tokens. Everything after
the patch embedding is shared, and so is the masked-patch-prediction forward used for the
paper's self-supervised pre-training (the loss and targets live in `masked_patch.py`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.masked_patch import NUM_COLOR_CLASSES, corrupt_patch_embeddings


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # The paper drops out after dense layers only, never the attention weights.
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_dropout(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.gelu(self.fc1(x)))
        return self.dropout(self.fc2(x))


class Block(nn.Module):
    """Pre-LN encoder block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: (N, 3, image_size, image_size) images -> (N, num_classes) logits.

    Args:
        patch_size: side of a patch in pixels, or of a patch of the backbone's feature map
            (1 for the paper's hybrids).
        width: hidden size D; depth: number of blocks; mlp_dim: MLP hidden size.
        representation_size: if set, a Linear(D, representation_size) + tanh "pre-logits"
            layer sits between the class token and the head (the paper's pre-training head).
        dropout: rate after every dense layer except qkv, and after adding position
            embeddings.
        backbone: CNN for a hybrid; must expose `out_channels` and `stride` (see ResNetFeatures).
        masked_patch_prediction: add the [mask] embedding and the 512-way colour head used
            by `forward_masked`.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        mlp_dim: int,
        num_heads: int,
        num_classes: int,
        representation_size: int | None = None,
        dropout: float = 0.0,
        backbone: nn.Module | None = None,
        masked_patch_prediction: bool = False,
    ):
        super().__init__()
        stride = patch_size * (backbone.stride if backbone is not None else 1)
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the token stride {stride}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // stride
        self.num_patches = self.grid_size**2
        self.backbone = backbone
        in_channels = backbone.out_channels if backbone is not None else 3
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width))
        self.pos_dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, mlp_dim, num_heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        if representation_size is not None:
            self.pre_logits = nn.Sequential(nn.Linear(width, representation_size), nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(representation_size or width, num_classes)
        if masked_patch_prediction:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            self.masked_patch_head = nn.Linear(width, NUM_COLOR_CLASSES)
        self._init_weights()

    def _init_weights(self) -> None:
        # big_vision / timm "jax" init: xavier-uniform dense layers, near-zero MLP biases,
        # lecun-normal patch embedding, and a zero head so training starts from uniform logits.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.mlp.fc1.bias, std=1e-6)
            nn.init.normal_(block.mlp.fc2.bias, std=1e-6)
        fan_in = self.patch_embed.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)
            nn.init.zeros_(self.masked_patch_head.weight)
            nn.init.zeros_(self.masked_patch_head.bias)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, P, D) patch embeddings, before position embeddings.

        The patch embedding is a conv whose stride is its kernel, i.e. one matrix product over
        the flattened patches, and is computed as one (the conv's weights, so checkpoints are
        unchanged): on an H200, ViT-B/16 bf16 batch 256, cuDNN's conv with its layout changes
        took 3.9 ms of fwd+bwd, the GEMM 0.7 ms (the whole fwd+bwd 78.7 -> 75.7 ms eager,
        63.7 -> 60.4 ms compiled).
        """
        x = self.backbone(images) if self.backbone is not None else images
        n, c, h, w = x.shape
        p = self.patch_embed.kernel_size[0]
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
        return F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, P, D) patch embeddings -> (N, 1 + P, D) final representations, class token first."""
        cls_token = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls_token, patches], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.pos_dropout(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(self.embed_patches(images))
        return self.head(self.pre_logits(tokens[:, 0]))

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masked patch prediction: (N, 3, H, W) images, (N, P) bool mask -> (N, P, 512) logits.

        The patch embeddings at masked positions are corrupted (80% [mask], 10% another
        patch's embedding, 10% kept) before position embeddings are added; every patch
        token's output is classified into the 512 3-bit mean colours.
        """
        if not hasattr(self, "mask_token"):
            raise ValueError("forward_masked needs a model built with masked_patch_prediction=True")
        patches = corrupt_patch_embeddings(self.embed_patches(images), mask, self.mask_token, generator)
        return self.masked_patch_head(self.encode(patches)[:, 1:])
