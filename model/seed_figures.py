"""The numbers behind the seed's Figure 7: what a ViT's position embeddings and attention learn.

    sim = position_similarity(model)                # [g*g, g, g]: patch p's cosine similarity with every patch
    neighbour_contrast(sim)                         # 4-neighbours' mean similarity minus distant pairs'
    mean_attention_distance(model, images)          # [layers, heads], in pixels

Works for every ViT and hybrid of the zoo (registry.py): the token grid and its stride in
pixels come from the model (a hybrid's tokens are its CNN's features, `image_size //
grid_size` pixels apart). The attention weights are recomputed from q and k, caught by a
forward hook on each block's qkv projection: the model itself calls
F.scaled_dot_product_attention, which never materialises them, and stays as it is.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_vit(model: nn.Module, what: str) -> None:
    if not (hasattr(model, "pos_embed") and hasattr(model, "grid_size") and hasattr(model, "blocks")):
        raise ValueError(f"{type(model).__name__} has no position embeddings or attention blocks, so no {what} "
                         f"(a BiT ResNet?): the figure is defined for the zoo's ViTs and hybrids")


def position_similarity(model: nn.Module) -> torch.Tensor:
    """[g*g, g, g]: for each patch position p (row-major), the cosine similarity of its
    position embedding with that of every position of the g x g grid. The class token's
    embedding is left out."""
    _check_vit(model, "position-embedding similarity")
    grid = model.grid_size
    embeddings = model.pos_embed.detach()[0, 1:].float()
    if embeddings.shape[0] != grid * grid:
        raise ValueError(f"{embeddings.shape[0]} patch position embeddings for a {grid}x{grid} grid")
    unit = F.normalize(embeddings, dim=-1)
    return (unit @ unit.T).reshape(grid * grid, grid, grid).cpu()


def _grid_coordinates(grid: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()


def neighbour_contrast(similarity: torch.Tensor) -> float:
    """Mean similarity of 4-neighbour position pairs minus the mean over pairs at least g/2
    apart (Euclidean, in patches). About 0 for unrelated embeddings; positive when nearby
    patches' embeddings are more alike than distant ones'. Needs g >= 3 (at g = 2 every pair
    is a neighbour or a diagonal)."""
    positions, grid, other = similarity.shape
    if grid != other or positions != grid * grid:
        raise ValueError(f"similarity of shape {tuple(similarity.shape)} is not [g*g, g, g]")
    if grid < 3:
        raise ValueError(f"a {grid}x{grid} grid has no distant pairs to contrast neighbours with; it needs g >= 3")
    flat = similarity.reshape(positions, positions).double()
    distance = torch.cdist(_grid_coordinates(grid), _grid_coordinates(grid))
    neighbours, distant = distance == 1, distance >= grid / 2
    return (flat[neighbours].mean() - flat[distant].mean()).item()


def patch_distances(grid: int, stride: float) -> torch.Tensor:
    """[g*g, g*g]: pixel distance between the centres of every two tokens of a g x g grid."""
    return torch.cdist(_grid_coordinates(grid), _grid_coordinates(grid)).float() * stride


def uniform_attention_distance(grid: int, stride: float) -> float:
    """The mean attention distance of a head that attends to every patch alike: a reference
    for 'global' attention."""
    return patch_distances(grid, stride).mean().item()


def attention_weights(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """An Attention module's qkv output [N, T, 3*D] -> its softmax weights [N, heads, T, T],
    as F.scaled_dot_product_attention forms them (scale 1/sqrt(head dim), no mask)."""
    batch, tokens, triple = qkv.shape
    qkv = qkv.float().reshape(batch, tokens, 3, num_heads, triple // (3 * num_heads))
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)


@torch.no_grad()
def mean_attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[layers, heads]: the attention-weighted mean pixel distance between query and key
    patches, averaged over the images and the query patches.

    The class token is left out as query and as key; each query's weights over the patch
    keys are renormalised to sum to 1, so the figure is a true weighted mean (a head that
    attends mostly to the class token is not made to look local). The model runs in eval
    mode (no dropout) and is put back as it was.
    """
    _check_vit(model, "attention distance")
    size = model.image_size
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"images of shape {tuple(images.shape)}; the model takes [N, 3, {size}, {size}]")
    if images.shape[0] == 0:
        raise ValueError("no images to average the attention over")
    distances = patch_distances(model.grid_size, size / model.grid_size)
    blocks = list(model.blocks)
    totals = torch.zeros(len(blocks), blocks[0].attn.num_heads, dtype=torch.float64)

    def hook(layer: int, num_heads: int):
        def record(module, inputs, output):
            weights = attention_weights(output, num_heads)[:, :, 1:, 1:]
            weights = weights / weights.sum(dim=-1, keepdim=True)
            per_query = (weights * distances.to(weights.device)).sum(dim=-1)  # [N, heads, P]
            totals[layer] += per_query.mean(dim=-1).sum(dim=0).double().cpu()
        return record

    handles = [block.attn.qkv.register_forward_hook(hook(i, block.attn.num_heads)) for i, block in enumerate(blocks)]
    was_training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(parameter.device, parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return (totals / images.shape[0]).float()
