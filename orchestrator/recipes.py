"""The seed's two hyperparameter tables and the paper's shared settings, as data.

Source: ../shared/seed/ (the talk's "Hyperparameters" slide, reproduced from the paper's
Tables 3 and 4) and ../shared/PAPER.md. The rows below are written the way the seed writes
them; `expand_models` turns "ViT-B/{16,32}" and "ViT-*" into model names, and "7/14" means
7 epochs by default with 14 also listed.

    python -c "from orchestrator.recipes import PRETRAIN_RECIPES; print(len(PRETRAIN_RECIPES))"
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

# The paper's pure ViTs: what "ViT-*" in the seed's ImageNet row stands for.
PAPER_VITS = ("ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "ViT-H/14")

# Small models that run in seconds, not in the paper. Each borrows the recipe row of its
# paper twin, so `--model ViT-S/16 --dataset ImageNet` trains with ViT-*'s ImageNet settings.
DEBUG_TWINS = {"ViT-Ti/16": "ViT-B/16", "ViT-S/16": "ViT-B/16", "ViT-S/32": "ViT-B/32", "ViT-Mu/4": "ViT-B/16"}

# Seed table 1, verbatim: models, dataset, epochs, base LR, LR decay, weight decay, dropout.
_PRETRAIN_TABLE = (
    ("ViT-B/{16,32}", "JFT-300M", "7", 8e-4, "linear", 0.1, 0.0),
    ("ViT-L/32", "JFT-300M", "7", 6e-4, "linear", 0.1, 0.0),
    ("ViT-L/16", "JFT-300M", "7/14", 4e-4, "linear", 0.1, 0.0),
    ("ViT-H/14", "JFT-300M", "14", 3e-4, "linear", 0.1, 0.0),
    ("R50x{1,2}", "JFT-300M", "7", 1e-3, "linear", 0.1, 0.0),
    ("R101x1", "JFT-300M", "7", 8e-4, "linear", 0.1, 0.0),
    ("R152x{1,2}", "JFT-300M", "7", 6e-4, "linear", 0.1, 0.0),
    ("R50+ViT-B/{16,32}", "JFT-300M", "7", 8e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/32", "JFT-300M", "7", 2e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/16", "JFT-300M", "7/14", 4e-4, "linear", 0.1, 0.0),
    ("ViT-B/{16,32}", "ImageNet-21k", "90", 1e-3, "linear", 0.03, 0.1),
    ("ViT-L/{16,32}", "ImageNet-21k", "30/90", 1e-3, "linear", 0.03, 0.1),
    ("ViT-*", "ImageNet", "300", 3e-3, "cosine", 0.3, 0.1),
)

# Seed table 2, verbatim: dataset, steps, base-LR grid.
_FINETUNE_TABLE = (
    ("ImageNet", 20_000, (0.003, 0.01, 0.03, 0.06)),
    ("CIFAR100", 10_000, (0.001, 0.003, 0.01, 0.03)),
    ("CIFAR10", 10_000, (0.001, 0.003, 0.01, 0.03)),
    ("Oxford-IIIT Pets", 500, (0.001, 0.003, 0.01, 0.03)),
    ("Oxford Flowers-102", 500, (0.001, 0.003, 0.01, 0.03)),
    ("VTAB (19 tasks)", 2_500, (0.01,)),
)

# Classes per fine-tuning dataset (the datasets' own definitions; VTAB's as in its paper).
FINETUNE_CLASSES = {
    "ImageNet": 1000, "CIFAR100": 100, "CIFAR10": 10, "Oxford-IIIT Pets": 37, "Oxford Flowers-102": 102,
    "Caltech101": 102, "CIFAR-100": 100, "DTD": 47, "Flowers102": 102, "Pets": 37, "Sun397": 397,
    "SVHN": 10, "Patch Camelyon": 2, "EuroSAT": 10, "Resisc45": 45, "Retinopathy": 5,
    "Clevr/count": 8, "Clevr/distance": 6, "DMLab": 6, "KITTI/distance": 4, "dSprites/location": 16,
    "dSprites/orientation": 16, "SmallNORB/azimuth": 18, "SmallNORB/elevation": 9,
}


@dataclass(frozen=True)
class PretrainDataset:
    """A pretraining corpus: its label shape and size (users bring their own in this shape)."""

    name: str
    num_classes: int
    multi_label: bool  # sigmoid cross-entropy when True, softmax otherwise
    train_examples: int


PRETRAIN_DATASETS = {
    d.name: d
    for d in (
        # JFT-300M: ~303M images, ~18k classes, several labels per image (paper section 4.1).
        PretrainDataset("JFT-300M", 18_291, True, 303_000_000),
        # ImageNet-21k: 14.2M images, 21k classes; commonly trained with sigmoid (PAPER.md).
        PretrainDataset("ImageNet-21k", 21_843, True, 14_197_122),
        PretrainDataset("ImageNet", 1_000, False, 1_281_167),
    )
}


@dataclass(frozen=True)
class PretrainShared:
    """Settings the paper uses for every pretraining row (section 4.1, appendix B.1)."""

    optimizer: str = "adam"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    global_batch_size: int = 4096
    warmup_steps: int = 10_000
    grad_clip_norm: float = 1.0
    image_size: int = 224


PRETRAIN_SHARED = PretrainShared()


@dataclass(frozen=True)
class PretrainRecipe:
    """One row of seed table 1 for one model."""

    model: str
    dataset: str
    epochs: int  # the table's default
    epochs_listed: tuple[int, ...]  # every value the table lists ("7/14" -> (7, 14))
    base_lr: float
    lr_decay: str  # "linear" or "cosine"
    weight_decay: float
    dropout: float


@dataclass(frozen=True)
class FinetuneShared:
    """Settings the paper uses for every fine-tuning run (appendix B.1.1)."""

    optimizer: str = "sgd"
    momentum: float = 0.9
    batch_size: int = 512
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    lr_decay: str = "cosine"
    image_size: int = 384


FINETUNE_SHARED = FinetuneShared()


@dataclass(frozen=True)
class FinetuneRecipe:
    """One dataset of seed table 2; VTAB's row becomes one recipe per task."""

    dataset: str
    steps: int
    lr_grid: tuple[float, ...]
    num_classes: int
    # Part of the training set held out to pick the LR (PAPER.md). VTAB-1k tasks instead
    # split their 1000 training examples into 800 train + 200 validation.
    holdout_fraction: float
    warmup_steps: int
    vtab_group: str | None = None  # "natural", "specialized" or "structured" for VTAB tasks
    flip: bool = True  # horizontal flips in the train augmentation
    random_crop: bool = True  # inception crop in the train augmentation (else the whole image, resized)


HOLDOUT_FRACTIONS = {
    "ImageNet": 0.01,
    "CIFAR100": 0.02,
    "CIFAR10": 0.02,
    "Oxford-IIIT Pets": 0.10,
    "Oxford Flowers-102": 0.10,
}

VTAB_TASKS = {
    "natural": ("Caltech101", "CIFAR-100", "DTD", "Flowers102", "Pets", "Sun397", "SVHN"),
    "specialized": ("Patch Camelyon", "EuroSAT", "Resisc45", "Retinopathy"),
    "structured": (
        "Clevr/count", "Clevr/distance", "DMLab", "KITTI/distance", "dSprites/location",
        "dSprites/orientation", "SmallNORB/azimuth", "SmallNORB/elevation",
    ),
}
VTAB_TRAIN_EXAMPLES, VTAB_VAL_EXAMPLES = 800, 200
VTAB_PREFIX = "VTAB/"  # a VTAB task's dataset name is "VTAB/<task>"

# Warm-up steps as big_vision's configs/transfer.py and scenic's VTAB configs set them: 500
# for the long runs, 100 for the 500-step runs (Pets, Flowers), 200 for VTAB's 2500 steps.
FINETUNE_WARMUP = {
    "ImageNet": 500, "CIFAR100": 500, "CIFAR10": 500, "Oxford-IIIT Pets": 100, "Oxford Flowers-102": 100,
    "VTAB": 200,
}

# VTAB tasks whose label a train augmentation would change (PAPER.md, from big_vision's VTAB
# configs): (flip, random crop). A mirror image flips an orientation or a horizontal position;
# a crop moves positions and drops objects that a count or a distance depends on.
VTAB_AUGMENTATION = {
    "dSprites/location": (False, False),
    "dSprites/orientation": (False, False),
    "SmallNORB/azimuth": (False, True),
    "Clevr/count": (True, False),
    "Clevr/distance": (True, False),
    "DMLab": (True, False),
    "KITTI/distance": (True, False),
}


def expand_models(pattern: str) -> tuple[str, ...]:
    """The model names a seed row stands for: "ViT-B/{16,32}" -> ViT-B/16, ViT-B/32."""
    if pattern == "ViT-*":
        return PAPER_VITS
    parts = re.split(r"\{([^}]*)\}", pattern)  # literal, alternatives, literal, ...
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return tuple("".join(combo) for combo in itertools.product(*choices))


def _parse_epochs(text: str) -> tuple[int, ...]:
    return tuple(int(e) for e in text.split("/"))


def _build_pretrain_recipes() -> dict[tuple[str, str], PretrainRecipe]:
    recipes = {}
    for pattern, dataset, epochs, lr, decay, wd, dropout in _PRETRAIN_TABLE:
        listed = _parse_epochs(epochs)
        for model in expand_models(pattern):
            if (model, dataset) in recipes:
                raise AssertionError(f"seed table 1 lists {model} on {dataset} twice")
            recipes[model, dataset] = PretrainRecipe(model, dataset, listed[0], listed, lr, decay, wd, dropout)
    return recipes


def _build_finetune_recipes() -> dict[str, FinetuneRecipe]:
    recipes = {}
    for dataset, steps, grid in _FINETUNE_TABLE:
        if dataset.startswith("VTAB"):
            for group, tasks in VTAB_TASKS.items():
                for task in tasks:
                    holdout = VTAB_VAL_EXAMPLES / (VTAB_TRAIN_EXAMPLES + VTAB_VAL_EXAMPLES)
                    flip, crop = VTAB_AUGMENTATION.get(task, (True, True))
                    recipes[VTAB_PREFIX + task] = FinetuneRecipe(
                        VTAB_PREFIX + task, steps, grid, FINETUNE_CLASSES[task], holdout, FINETUNE_WARMUP["VTAB"],
                        group, flip, crop)
        else:
            recipes[dataset] = FinetuneRecipe(
                dataset, steps, grid, FINETUNE_CLASSES[dataset], HOLDOUT_FRACTIONS[dataset], FINETUNE_WARMUP[dataset]
            )
    return recipes


PRETRAIN_RECIPES = _build_pretrain_recipes()
FINETUNE_RECIPES = _build_finetune_recipes()


def pretrain_models() -> tuple[str, ...]:
    """Every model the recipe table (or a debug twin) can pretrain."""
    seen = dict.fromkeys(m for m, _ in PRETRAIN_RECIPES)
    return tuple(seen) + tuple(DEBUG_TWINS)


def models_for(dataset: str) -> tuple[str, ...]:
    return tuple(m for m, d in PRETRAIN_RECIPES if d == dataset)


def datasets_for(model: str) -> tuple[str, ...]:
    model = DEBUG_TWINS.get(model, model)
    return tuple(d for m, d in PRETRAIN_RECIPES if m == model)


def pretrain_recipe(model: str, dataset: str) -> PretrainRecipe:
    """The table row for (model, dataset); debug twins take their paper twin's row.

    Raises:
        KeyError: the table defines no such row (callers turn this into a usage error).
    """
    return dataclasses.replace(PRETRAIN_RECIPES[DEBUG_TWINS.get(model, model), dataset], model=model)
