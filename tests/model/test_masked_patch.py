"""Masked patch prediction: masks, colour targets, corruption, and a few training steps."""

import pytest
import torch

from model import build_model, masked_patch_loss, patch_color_targets, random_patch_mask
from model.masked_patch import corrupt_patch_embeddings


@pytest.mark.parametrize(("num_patches", "ratio"), [(64, 0.5), (196, 0.5), (49, 0.5), (10, 0.3), (7, 0.0)])
def test_mask_has_exactly_the_ratio_per_row(num_patches, ratio):
    mask = random_patch_mask(16, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (16, num_patches)
    assert (mask.sum(dim=1) == round(ratio * num_patches)).all()


def test_mask_is_random_across_rows_and_reproducible():
    mask = random_patch_mask(8, 64, generator=torch.Generator().manual_seed(1))
    assert len({tuple(row.tolist()) for row in mask}) == 8
    assert torch.equal(mask, random_patch_mask(8, 64, generator=torch.Generator().manual_seed(1)))


def test_targets_of_constant_colour_images():
    # value range (-1, 1): -1 -> bin 0, 1 -> bin 7, 0 -> bin 4, -0.5 -> bin 2
    image = torch.empty(1, 3, 8, 8)
    image[:, 0], image[:, 1], image[:, 2] = -1.0, 1.0, 0.0
    assert patch_color_targets(image, 4).tolist() == [[0 * 64 + 7 * 8 + 4] * 4]
    image = torch.full((2, 3, 8, 8), -0.5)
    assert (patch_color_targets(image, 4) == 2 * 64 + 2 * 8 + 2).all()


def test_targets_follow_patch_order_and_value_range():
    image = torch.zeros(1, 3, 8, 8)  # in [0, 1]: 0 -> class 0
    image[:, :, :4, 4:] = 1.0  # top-right patch white -> class 511
    targets = patch_color_targets(image, 4, value_range=(0.0, 1.0))
    assert targets.dtype == torch.long
    assert targets.tolist() == [[0, 511, 0, 0]]


def test_targets_use_the_patch_mean():
    image = torch.full((1, 3, 4, 4), -1.0)
    image[:, 0, :, :2] = 1.0  # red channel: half -1, half +1 -> mean 0 -> bin 4
    assert patch_color_targets(image, 4).tolist() == [[4 * 64]]


def test_corruption_split_is_80_10_10_on_masked_positions_only():
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(64, 64, 8)
    mask = random_patch_mask(64, 64, generator=generator)
    mask_token = torch.full((1, 1, 8), 100.0)
    corrupted = corrupt_patch_embeddings(patches, mask, mask_token, generator)
    is_mask_token = (corrupted == 100.0).all(-1)
    unchanged = (corrupted == patches).all(-1)
    replaced = ~is_mask_token & ~unchanged
    assert unchanged[~mask].all()
    masked = mask.sum().item()
    assert is_mask_token[mask].sum().item() / masked == pytest.approx(0.8, abs=0.03)
    assert replaced[mask].sum().item() / masked == pytest.approx(0.1, abs=0.02)
    assert unchanged[mask].sum().item() / masked == pytest.approx(0.1, abs=0.02)
    # replacements are other patch embeddings of the batch
    pool = patches.reshape(-1, 8)
    assert all((pool == row).all(-1).any() for row in corrupted[replaced])
    assert patches.abs().max() < 100  # input not overwritten


def test_masked_forward_shape_and_loss():
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=10, image_size=32, masked_patch_prediction=True)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = random_patch_mask(2, 64)
    logits = model.forward_masked(images, mask)
    assert logits.shape == (2, 64, 512)
    loss = masked_patch_loss(logits, patch_color_targets(images, 4), mask)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=1e-4)  # zero head


def test_masked_forward_needs_the_masked_head():
    model = build_model("ViT-Mu/4", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="masked_patch_prediction"):
        model.forward_masked(torch.zeros(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.bool))


def test_loss_counts_masked_positions_only():
    logits = torch.zeros(1, 4, 512)
    logits[0, 0, 3] = 50.0  # position 0 confidently right, position 1 confidently wrong
    logits[0, 1, 7] = 50.0
    targets = torch.tensor([[3, 8, 0, 0]])
    assert masked_patch_loss(logits, targets, torch.tensor([[True, False, False, False]])).item() < 1e-6
    assert masked_patch_loss(logits, targets, torch.tensor([[False, True, False, False]])).item() > 40


def test_loss_decreases_over_a_few_adam_steps():
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=10, image_size=32, masked_patch_prediction=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # smooth images: a few colour blobs, so patch colours are predictable from neighbours
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    targets = patch_color_targets(images, 4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        mask = random_patch_mask(8, 64, generator=generator)
        loss = masked_patch_loss(model.forward_masked(images, mask, generator), targets, mask)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
