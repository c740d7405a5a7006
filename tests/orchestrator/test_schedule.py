import math

import pytest
import torch

from orchestrator.objectives import classification_loss
from orchestrator.schedule import learning_rate


def lr(step, decay="linear"):
    return learning_rate(step, base_lr=1.0, total_steps=110, warmup_steps=10, decay=decay)


def test_linear_warmup_then_linear_decay_to_zero():
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.5)
    assert lr(110) == pytest.approx(0.0)
    assert lr(500) == pytest.approx(0.0)  # past the end it stays at zero


def test_cosine_decay():
    assert lr(10, "cosine") == pytest.approx(1.0)
    assert lr(60, "cosine") == pytest.approx(0.5)
    assert lr(35, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(110, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_unknown_decay_is_an_error():
    with pytest.raises(ValueError, match="'step'"):
        lr(50, "step")


def test_sigmoid_loss_sums_classes_and_softmax_is_plain_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p = torch.sigmoid(logits)
    manual = -(multi_hot * p.log() + (1 - multi_hot) * (1 - p).log()).sum(1).mean()
    assert classification_loss(logits, multi_hot, multi_label=True) == pytest.approx(manual.item(), rel=1e-6)
    labels = torch.tensor([0, 1])
    manual = -torch.log_softmax(logits, 1)[torch.arange(2), labels].mean()
    assert classification_loss(logits, labels, multi_label=False) == pytest.approx(manual.item(), rel=1e-6)
