"""The dry run as far as it is built: the debug twin learns, for both objectives."""

import pytest

from orchestrator import dry_run
from orchestrator.config import resolve_pretrain_config


@pytest.mark.parametrize("dataset,objective", [("JFT-300M", "supervised"), ("ImageNet", "supervised"), ("JFT-300M", "masked-patch")])
def test_debug_twin_loss_falls(dataset, objective):
    config = resolve_pretrain_config("ViT-B/16", dataset, {"objective": objective, "max_steps": 30}, dry_run=True)
    lines = []
    losses = dry_run.run(config, log=lines.append)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert any("not built yet" in line for line in lines)


def test_learnable_batch_matches_the_label_shape():
    import torch

    multi = resolve_pretrain_config("ViT-B/16", "JFT-300M", dry_run=True)
    single = resolve_pretrain_config("ViT-B/16", "ImageNet", dry_run=True)
    images, targets = dry_run.learnable_batch(multi, 4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 10) and targets.sum(1).eq(1).all()
    _, labels = dry_run.learnable_batch(single, 4, torch.Generator().manual_seed(0))
    assert labels.shape == (4,) and labels.dtype == torch.long
