"""The dry run as far as it is built: the debug twin's config, model and a few local steps.

    make dry-run        # = python launch/pretrain.py --dry-run

The finished dry run (later issues) streams synthetic shards from an embedded S3 through Ray
and DeepSpeed. Until those parts exist this module runs what does exist, on random but
learnable tensors in one process, and prints which stages it could not run.
"""

from __future__ import annotations

import time

import torch

from model import build_model, masked_patch_loss, patch_color_targets, random_patch_mask
from orchestrator.config import PretrainConfig
from orchestrator.objectives import classification_loss
from orchestrator.schedule import learning_rate

NOT_BUILT_YET = (
    "webdataset shards on S3 (issue 3)",
    "checkpoints to S3 (issue 4)",
    "Ray + DeepSpeed workers (issue 5)",
    "Prometheus metrics (issue 6)",
    "fine-tuning fan-out",
)


def learnable_batch(config: PretrainConfig, batch_size: int, generator: torch.Generator):
    """Images whose class sets the mean colour of each quadrant, plus noise: learnable fast."""
    c, s = config.num_classes, config.image_size
    prototypes = torch.randn(c, 3, 2, 2, generator=torch.Generator().manual_seed(config.seed))
    labels = torch.randint(0, c, (batch_size,), generator=generator)
    images = prototypes[labels].repeat_interleave(s // 2, dim=2).repeat_interleave(s // 2, dim=3)
    images = images + 0.5 * torch.randn(images.shape, generator=generator)
    targets = torch.nn.functional.one_hot(labels, c).float() if config.multi_label else labels
    return images, targets


def objective_loss(model, config: PretrainConfig, images, targets, generator) -> torch.Tensor:
    if config.objective == "masked-patch":  # labels unused: predict masked patches' colours
        mask = random_patch_mask(images.shape[0], model.num_patches, generator=generator)
        colours = patch_color_targets(images.clamp(-1, 1), model.patch_size)
        return masked_patch_loss(model.forward_masked(images, mask, generator), colours, mask)
    return classification_loss(model(images), targets, multi_label=config.multi_label)


def run(config: PretrainConfig, log=print) -> list[float]:
    """Train the debug twin locally for `config.steps` steps; returns the losses."""
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        config.num_classes,
        image_size=config.image_size,
        representation_size=config.representation_size,
        dropout=config.dropout,
        masked_patch_prediction=config.objective == "masked-patch",
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.base_lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    params = sum(p.numel() for p in model.parameters())
    log(f"dry run: {config.model} ({params:,} parameters) at {config.image_size} px, {config.steps} steps "
        f"of {config.global_batch_size} images, {config.loss}, in this process")
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step,
                base_lr=config.base_lr,
                total_steps=config.total_steps,
                warmup_steps=config.warmup_steps,
                decay=config.lr_decay,
            )
        images, targets = learnable_batch(config, config.global_batch_size, generator)
        loss = objective_loss(model, config, images, targets, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}")
    log(f"dry run: {config.steps} steps in {time.perf_counter() - start:.1f} s, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    log("dry run: not built yet, so not run: " + "; ".join(NOT_BUILT_YET))
    return losses
