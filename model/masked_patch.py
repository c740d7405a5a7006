"""Masked patch prediction, the paper's self-supervised objective (section 4.6, appendix B.1.2).

Half of the patch embeddings are corrupted (of those: 80% become a learned [mask]
embedding, 10% another random patch's embedding, 10% stay as they are) and the model
predicts each corrupted patch's 3-bit mean colour, one of 512 classes.
`VisionTransformer.forward_masked` runs the model; these are the pure pieces around it.
"""

import torch
import torch.nn.functional as F

NUM_COLOR_CLASSES = 512  # 3 bits for each of R, G, B


def random_patch_mask(
    batch: int,
    num_patches: int,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch, num_patches) bool mask with exactly round(ratio * num_patches) True per row."""
    num_masked = round(ratio * num_patches)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # a random permutation of 0..P-1 per row
    return rank < num_masked


def patch_color_targets(
    images: torch.Tensor,
    patch_size: int,
    bits: int = 3,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """(N, 3, H, W) images -> (N, P) long colour classes in [0, 2**(3*bits)), patches row-major.

    Each channel's mean over the patch is scaled from value_range to [0, 1] and cut into
    2**bits equal bins; the class is r * 2**(2*bits) + g * 2**bits + b.
    """
    low, high = value_range
    mean_colour = F.avg_pool2d(images.float(), patch_size)  # (N, 3, h, w)
    levels = 2**bits
    unit = (mean_colour - low) / (high - low)
    quantised = (unit * levels).floor().clamp(0, levels - 1).long()
    r, g, b = quantised.flatten(2).unbind(1)
    return (r * levels + g) * levels + b


def corrupt_patch_embeddings(
    patches: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupt the (N, P, D) patch embeddings where the (N, P) mask is True.

    Of the masked positions, 80% get mask_token, 10% a patch embedding drawn uniformly from
    the whole batch, 10% are left unchanged. Returns a new tensor.
    """
    batch, num_patches, width = patches.shape
    choice = torch.rand(batch, num_patches, generator=generator, device=patches.device)
    use_mask_token = mask & (choice < 0.8)
    use_random_patch = mask & (choice >= 0.8) & (choice < 0.9)
    source = torch.randint(batch * num_patches, (batch, num_patches), generator=generator, device=patches.device)
    random_patches = patches.reshape(-1, width)[source]
    corrupted = torch.where(use_random_patch[..., None], random_patches, patches)
    return torch.where(use_mask_token[..., None], mask_token.to(patches.dtype).expand_as(patches), corrupted)


def masked_patch_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, P, C) logits against (N, P) targets over the masked positions."""
    return F.cross_entropy(logits[mask].float(), targets[mask])
