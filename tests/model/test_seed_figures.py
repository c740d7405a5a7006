"""The seed's Figure 7 numbers (model/seed_figures.py) on every ViT and hybrid of the zoo, on CPU.

Run: .venv/bin/python -m pytest tests/model/test_seed_figures.py -q

The zoo's models are built at a 3x3 token grid with their real patch embedding,
backbone, width and heads, but only their first two blocks (the paper's sizes take minutes to
initialise on CPU; the figures treat every block alike). Known values: hand-made position
embeddings, and attention forced uniform, whose mean distance follows from the grid alone.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import MODEL_NAMES, build_model, model_spec
from model.seed_figures import (attention_weights, mean_attention_distance, neighbour_contrast, patch_distances,
                                position_similarity, uniform_attention_distance)

TRANSFORMERS = [name for name in MODEL_NAMES if model_spec(name).family != "resnet"]


def zoo_model(name: str, grid: int) -> torch.nn.Module:
    """`name` at a grid x grid token grid, two blocks, N(0, 0.02) weights and unit norm scales
    (N(0, 0.02) scales shrink a ResNet's activations into subnormals, slow on CPU), on CPU."""
    spec = model_spec(name)
    model = build_model(name, num_classes=3, image_size=grid * spec.stride, device="meta")
    model.blocks = model.blocks[:2]
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0, 0.02, generator=generator)
    return model.eval()


def row_column_embeddings(grid: int, width: int) -> torch.Tensor:
    """(1, 1 + g*g, width): patch (r, c) -> one-hot(r) + one-hot(g + c). Cosine similarity: 1
    with itself, 1/2 with its row and column, 0 elsewhere."""
    embeddings = torch.zeros(1, 1 + grid * grid, width)
    embeddings[0, 0, -1] = 1.0  # the class token: must not matter
    for p in range(grid * grid):
        row, col = divmod(p, grid)
        embeddings[0, 1 + p, row] = embeddings[0, 1 + p, grid + col] = 1.0
    return embeddings


def force_uniform_attention(model: torch.nn.Module) -> None:
    """Zero every query: all scores 0, every token attends to every token alike."""
    with torch.no_grad():
        for block in model.blocks:
            width = block.attn.qkv.in_features
            block.attn.qkv.weight[:width] = 0
            block.attn.qkv.bias[:width] = 0


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_known_values_on_every_transformer_of_the_zoo(name):
    spec = model_spec(name)
    model = zoo_model(name, grid=3)
    assert model.grid_size == 3

    with torch.no_grad():
        model.pos_embed.copy_(row_column_embeddings(3, model.pos_embed.shape[-1]))
    sim = position_similarity(model)
    assert sim.shape == (9, 3, 3)
    for p in range(9):
        for q in range(9):
            (r1, c1), (r2, c2) = divmod(p, 3), divmod(q, 3)
            expected = 1.0 if p == q else 0.5 if (r1 == r2 or c1 == c2) else 0.0
            assert sim[p, r2, c2].item() == pytest.approx(expected, abs=1e-6), (p, q)

    force_uniform_attention(model)
    images = torch.randn(1, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    dist = mean_attention_distance(model, images)
    assert dist.shape == (2, spec.num_heads)
    # Uniform over a 3x3 grid of tokens `stride` pixels apart (a hybrid's: its CNN's
    # downsampling). The 81 ordered pairs by offset (|dr|, |dc|): (0,0) 9 at 0; (0,1) and
    # (1,0) 12 each at 1; (1,1) 16 at sqrt 2; (0,2) and (2,0) 6 each at 2; (1,2) and (2,1)
    # 8 each at sqrt 5; (2,2) 4 at 2 sqrt 2.
    by_hand = (48 + 24 * math.sqrt(2) + 16 * math.sqrt(5)) / 81 * spec.stride
    assert dist == pytest.approx(torch.full_like(dist, by_hand), rel=1e-5)
    assert uniform_attention_distance(3, spec.stride) == pytest.approx(by_hand)


def test_uniform_distance_on_a_larger_grid_by_explicit_sums():
    model = build_model("ViT-Mu/4", num_classes=3, image_size=32)
    force_uniform_attention(model)
    dist = mean_attention_distance(model, torch.randn(2, 3, 32, 32))
    centres = [(4 * (p // 8) + 2, 4 * (p % 8) + 2) for p in range(64)]
    expected = sum(math.dist(a, b) for a in centres for b in centres) / 64**2
    assert dist == pytest.approx(torch.full((2, 2), expected), rel=1e-5)


def test_recomputed_weights_are_those_scaled_dot_product_attention_uses():
    torch.manual_seed(0)
    attention = build_model("ViT-Mu/4", num_classes=3, image_size=32).blocks[0].attn
    x = torch.randn(2, 65, 64)
    qkv = attention.qkv(x)
    q, k, v = qkv.reshape(2, 65, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
    weights = attention_weights(qkv, num_heads=2)
    assert weights.shape == (2, 2, 65, 65)
    torch.testing.assert_close(weights @ v, F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_mean_distance_matches_an_explicit_forward():
    """A trained-looking model (random weights, larger position embeddings), the distance
    computed by a hand-written forward that forms every block's attention weights itself."""
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=3, image_size=32).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3)
    images = torch.randn(5, 3, 32, 32)
    distances = patch_distances(8, 4.0)
    expected = torch.zeros(2, 2)
    with torch.no_grad():
        x = torch.cat([model.cls_token.expand(5, -1, -1), model.embed_patches(images)], dim=1) + model.pos_embed
        for layer, block in enumerate(model.blocks):
            h = block.norm1(x)
            q, k, v = block.attn.qkv(h).reshape(5, 65, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
            weights = (q @ k.transpose(-1, -2) / math.sqrt(32)).softmax(-1)
            patch_weights = weights[:, :, 1:, 1:] / weights[:, :, 1:, 1:].sum(-1, keepdim=True)
            expected[layer] = (patch_weights * distances).sum(-1).mean(dim=(0, 2))
            x = block(x)
    dist = mean_attention_distance(model, images, batch_size=2)  # batches do not change the mean
    torch.testing.assert_close(dist, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dist, torch.full_like(dist, uniform_attention_distance(8, 4.0)), rtol=1e-2)


def test_mode_and_hooks_are_restored():
    model = build_model("ViT-Mu/4", num_classes=3, image_size=32).train()
    mean_attention_distance(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(not block.attn.qkv._forward_hooks for block in model.blocks)


def test_neighbour_contrast_of_hand_made_embeddings():
    model = build_model("ViT-Mu/4", num_classes=3, image_size=16)  # 4x4 grid
    with torch.no_grad():
        model.pos_embed.copy_(row_column_embeddings(4, 64))
    # 4-neighbours share a row or column: 1/2. Pairs >= 2 apart: 78 of the 120, of which 24
    # share a row or column (per line of 4: (0,2), (0,3), (1,3)): 1/2 * 24/78.
    assert neighbour_contrast(position_similarity(model)) == pytest.approx(0.5 - 0.5 * 24 / 78)
    with torch.no_grad():
        model.pos_embed.copy_(torch.ones(1, 17, 64))  # all alike: no contrast
    assert neighbour_contrast(position_similarity(model)) == pytest.approx(0.0, abs=1e-6)


def test_neighbour_contrast_of_smooth_and_random_embeddings():
    grid = 8
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    # Gaussian bumps over the grid: nearby positions share bumps.
    smooth = torch.exp(-torch.cdist(centres, centres) ** 2 / 4)
    unit = F.normalize(smooth, dim=-1)
    assert neighbour_contrast((unit @ unit.T).reshape(64, 8, 8)) > 0.5
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=3, image_size=32)  # at initialisation: noise
    assert abs(neighbour_contrast(position_similarity(model))) < 0.05


def test_what_has_no_figure_is_refused():
    resnet = build_model("R50x1", num_classes=3, image_size=32)
    with pytest.raises(ValueError, match="no position embeddings"):
        position_similarity(resnet)
    with pytest.raises(ValueError, match="no position embeddings"):
        mean_attention_distance(resnet, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="needs g >= 3"):
        neighbour_contrast(torch.ones(4, 2, 2))
    with pytest.raises(ValueError, match=r"not \[g\*g, g, g\]"):
        neighbour_contrast(torch.ones(8, 3, 3))
    mu = build_model("ViT-Mu/4", num_classes=3, image_size=32)
    with pytest.raises(ValueError, match=r"takes \[N, 3, 32, 32\]"):
        mean_attention_distance(mu, torch.randn(1, 3, 64, 64))
