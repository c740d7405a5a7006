"""Forward FLOPs against the paper's compute figures and an analytic count."""

import pytest
import torch

from model import build_model, forward_flops

# PAPER.md "Compute per image": forward multiply-accumulates at 224 px, in G.
PAPER_GMACS = {"ViT-B/32": 4.4, "ViT-B/16": 17.6, "ViT-L/32": 15.4, "ViT-L/16": 61.6, "ViT-H/14": 167.4, "R50x1": 4.2}


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_flops_match_the_paper(name):
    assert forward_flops(name) / 2 / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.05)


def test_vit_flops_include_attention_exactly():
    width, mlp_dim, depth, tokens, classes = 768, 3072, 12, 197, 1000
    macs = (tokens - 1) * 16 * 16 * 3 * width  # patch embedding
    macs += depth * tokens * (4 * width * width + 2 * width * mlp_dim)  # qkv, proj, MLP
    macs += depth * 2 * tokens * tokens * width  # q @ k^T and attention @ v
    macs += width * classes
    assert forward_flops("ViT-B/16") == 2 * macs


def test_module_is_counted_without_being_moved():
    model = build_model("ViT-Mu/4", num_classes=10, image_size=32)
    before = model.pos_embed.detach().clone()
    flops = forward_flops(model, image_size=32)
    assert flops == forward_flops(build_model("ViT-Mu/4", num_classes=10, image_size=32, device="meta"), 32)
    assert model.pos_embed.device.type == "cpu"
    assert torch.equal(model.pos_embed, before)


def test_flops_grow_with_image_size():
    assert forward_flops("R50x1", image_size=448) == pytest.approx(4 * forward_flops("R50x1"), rel=0.02)
