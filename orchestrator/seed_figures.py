"""The seed's Figure 7 for a trained ViT beside its initialisation: PNGs, numbers, one honest line.

    python launch/figures.py --weights s3://b/runs/<run>/weights/model.safetensors --images s3://b/val

    result = draw_seed_figures(trained, initial, images, out_dir="figures/")
    result["statement"]   # what the numbers show, and only that
    result = figures_of_export(weights_url, images=shards_url, out_dir="figures/")   # launch/figures.py

The numbers come from model/seed_figures.py; this module draws them (matplotlib, Agg) and
words them. A claim is made only where the trained model's number clears its initialisation's
by a margin: a small or briefly trained model gets a line saying that the structure is absent.
"""

from __future__ import annotations

import json
import os

import torch

# Position embeddings "show neighbour structure" when the trained neighbour contrast exceeds
# both 0 and the initialisation's by this much. At initialisation (std 0.02 noise) the
# contrast is within a few hundredths of 0 for the zoo's widths.
CONTRAST_MARGIN = 0.1
# Attention distance "grows with depth" when the last layer's mean exceeds the first's by this
# fraction of the distance uniform attention would give.
DISTANCE_MARGIN = 0.05


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_position_similarity(sim: torch.Tensor, path: str, title: str) -> str:
    """The [g*g, g, g] similarities as the paper draws them: a g x g grid of small g x g
    images, the one at (row, column) holding that patch's similarity with every patch."""
    plt = _pyplot()
    positions, grid, _ = sim.shape
    cell = grid + 1  # one blank pixel between the small images
    mosaic = torch.full((grid * cell - 1, grid * cell - 1), float("nan"))
    for p in range(positions):
        row, col = divmod(p, grid)
        mosaic[row * cell:row * cell + grid, col * cell:col * cell + grid] = sim[p].float()
    figure, axes = plt.subplots(figsize=(5.6, 5))
    image = axes.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ticks = [i * cell + (grid - 1) / 2 for i in range(grid)]
    labels = [str(i + 1) if grid <= 16 or i % 2 == 0 else "" for i in range(grid)]
    axes.set_xticks(ticks, labels, fontsize=7)
    axes.set_yticks(ticks, labels, fontsize=7)
    axes.set_xlabel("input patch column")
    axes.set_ylabel("input patch row")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="cosine similarity")
    figure.tight_layout()
    figure.savefig(path, dpi=100 if grid <= 8 else 200)  # enough pixels for every small image's
    plt.close(figure)
    return path


def draw_attention_distance(dist: torch.Tensor, path: str, title: str, image_size: int,
                            reference: float | None = None) -> str:
    """[layers, heads] mean attention distances: one dot per head over the layer index, the
    y axis in pixels up to the image's side (`reference`: uniform attention's distance,
    drawn dashed)."""
    plt = _pyplot()
    layers, heads = dist.shape
    figure, axes = plt.subplots(figsize=(5.6, 4))
    x = torch.arange(1, layers + 1).float()
    for head in range(heads):
        axes.scatter(x.numpy(), dist[:, head].numpy(), s=14, label=f"head {head + 1}" if heads <= 4 else None)
    axes.plot(x.numpy(), dist.mean(dim=1).numpy(), color="black", linewidth=1, alpha=0.5, label="mean of heads")
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    axes.set_xlim(0.5, layers + 0.5)
    axes.set_xticks(range(1, layers + 1, 1 if layers <= 16 else 2))
    axes.set_ylim(0, max(float(image_size), float(dist.max()) * 1.05))
    axes.set_xlabel("network depth (layer)")
    axes.set_ylabel("mean attention distance (pixels)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="upper left")  # heads are named when there are at most 4
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def describe(contrast: dict[str, float], distance: dict[str, list[float]], reference: float) -> tuple[str, bool, bool]:
    """(one line, position structure shown?, distance grows with depth?) from the numbers
    draw_seed_figures computes; claims nothing the numbers do not clear by the margins."""
    trained, initial = contrast["trained"], contrast["initialisation"]
    structure = trained > CONTRAST_MARGIN and trained > initial + CONTRAST_MARGIN
    if structure:
        position = (f"neighbouring patches' position embeddings are more similar than distant ones' "
                    f"(contrast {trained:.2f}, {initial:.2f} at initialisation)")
    else:
        position = (f"the position embeddings show no neighbour structure beyond initialisation "
                    f"(contrast {trained:.2f} vs {initial:.2f}): the model is too small or too briefly trained for it")
    per_layer, per_layer_initial = distance["trained"], distance["initialisation"]
    first, last = per_layer[0], per_layer[-1]
    grows = len(per_layer) > 1 and last > first + DISTANCE_MARGIN * reference
    where = (f"{first:.1f} px in layer 1, {last:.1f} px in layer {len(per_layer)}; at initialisation "
             f"{per_layer_initial[0]:.1f} and {per_layer_initial[-1]:.1f}; uniform attention {reference:.1f} px")
    attention = f"mean attention distance {'grows' if grows else 'does not grow'} with depth ({where})"
    return f"{position}; {attention}", structure, grows


def draw_seed_figures(trained_model: torch.nn.Module, initial_model: torch.nn.Module, images: torch.Tensor,
                      out_dir: str) -> dict:
    """Both figures for both models: four PNGs in `out_dir` and seed_figures.json with the
    numbers. Returns {"paths", "neighbour_contrast", "mean_attention_distance_px" (per layer,
    mean of heads), "per_head_attention_distance_px", "uniform_attention_distance_px",
    "position_structure", "distance_grows", "statement"}; the two dicts of numbers are keyed
    "trained" and "initialisation"."""
    from model.seed_figures import (mean_attention_distance, neighbour_contrast, position_similarity,
                                    uniform_attention_distance)

    os.makedirs(out_dir, exist_ok=True)
    image_size, grid = trained_model.image_size, trained_model.grid_size
    reference = uniform_attention_distance(grid, image_size / grid)
    paths, contrast, distance, per_head = [], {}, {}, {}
    for key, model, label in [("initialisation", initial_model, "at initialisation"),
                              ("trained", trained_model, "trained")]:
        sim = position_similarity(model)
        contrast[key] = neighbour_contrast(sim)
        heads = mean_attention_distance(model, images)
        distance[key], per_head[key] = heads.mean(dim=1).tolist(), heads.tolist()
        slug = "initial" if key == "initialisation" else "trained"
        paths.append(draw_position_similarity(
            sim, os.path.join(out_dir, f"position_similarity_{slug}.png"),
            f"Position embedding similarity, {label} (contrast {contrast[key]:.2f})"))
        paths.append(draw_attention_distance(
            heads, os.path.join(out_dir, f"attention_distance_{slug}.png"),
            f"Mean attention distance, {label} ({images.shape[0]} images)", image_size, reference))
    statement, structure, grows = describe(contrast, distance, reference)
    result = {"paths": paths, "neighbour_contrast": contrast, "mean_attention_distance_px": distance,
              "per_head_attention_distance_px": per_head, "uniform_attention_distance_px": reference,
              "position_structure": structure, "distance_grows": grows, "statement": statement}
    numbers = os.path.join(out_dir, "seed_figures.json")
    with open(numbers, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "paths"}, f, indent=1)
    return result


def load_export(weights: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(trained, at initialisation, record) for a vitscale export: the record (model.json
    beside the weights) names the model; the weights are checked against its sha256 and
    loaded from safetensors (nothing unpickled). The initial model is the recipe's model
    built after `torch.manual_seed(0)`, as the trainer builds it (a run that added a
    pre-logits or masked-patch head drew its initial weights in another order). Raises
    ConfigError."""
    from model import build_model
    from orchestrator.checkpoint import WeightsError, load_exported_weights
    from orchestrator.config import ConfigError
    from orchestrator.finetuning import read_weights_record

    record = read_weights_record(weights)
    try:
        num_classes, image_size = int(record["num_classes"]), int(record["image_size"])
        torch.manual_seed(0)
        initial = build_model(record["model"], num_classes, image_size=image_size)
        trained = build_model(record["model"], num_classes, image_size=image_size)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--weights {weights}: its record does not build a model ({error})") from None
    if not hasattr(trained, "pos_embed"):
        raise ConfigError(f"--weights {weights}: {record['model']} has no position embeddings or attention, so no "
                          f"seed figures (they are defined for the zoo's ViTs and hybrids)")
    try:
        load_exported_weights(trained, weights, sha256=record["sha256"])
    except (WeightsError, RuntimeError) as error:  # RuntimeError: load_state_dict's mismatch
        raise ConfigError(f"--weights {weights}: {str(error).splitlines()[0]}") from None
    return trained.eval(), initial.eval(), record


def synthetic_images(samples: int, image_size: int) -> torch.Tensor:
    """[samples, 3, S, S] in [-1, 1]: data_pipelines.synthetic's striped classification images."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipelines.augment import normalise
    from data_pipelines.synthetic import classification_samples

    pixels = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
              for s in classification_samples(samples, image_size=image_size)]
    return normalise(torch.from_numpy(np.stack(pixels))).contiguous()


def shard_images(source: str, samples: int, image_size: int) -> torch.Tensor:
    """Up to `samples` images of a shard folder or s3:// prefix, eval-augmented to `image_size`
    (centre crop). Raises ConfigError when the shards cannot be read or hold no image."""
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.stream import ShardLoader
    from orchestrator.config import ConfigError

    batches, count = [], 0
    try:
        loader = ShardLoader(source, batch_size=min(samples, 64), augmentation="eval", image_size=image_size,
                             num_workers=0, labels=False)
        for batch in loader:
            batches.append(batch["image"].contiguous().clone())
            count += batches[-1].shape[0]
            if count >= samples:
                break
    except DataSourceError as error:
        raise ConfigError(f"--images {source}: {error}") from None
    if not count:
        raise ConfigError(f"--images {source}: no images there")
    return torch.cat(batches)[:samples]


def figures_of_export(weights: str, *, images: str | None = None, out_dir: str | None = None,
                      samples: int = 64) -> dict:
    """draw_seed_figures for an export against its initialisation, on `samples` images of the
    shards at `images` (default: synthetic ones); `out_dir` defaults to runs/<run>/figures.
    Adds "out_dir" to the result. Raises ConfigError for anything the user can fix."""
    from orchestrator.config import ConfigError
    from orchestrator.finetuning import OUTPUT

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    trained, initial, record = load_export(weights)
    size = trained.image_size
    pixels = shard_images(images, samples, size) if images else synthetic_images(samples, size)
    if torch.cuda.is_available():
        trained, initial = trained.cuda(), initial.cuda()
    out_dir = out_dir or os.path.join(OUTPUT, str(record.get("run") or "export"), "figures")
    try:
        result = draw_seed_figures(trained, initial, pixels, out_dir)
    except ValueError as error:  # a grid too small for the contrast
        raise ConfigError(f"--weights {weights}: {error}") from None
    result["out_dir"] = out_dir
    return result
