"""Seed table 1 and 2, row by row, against the recipe data and the resolved configs.

The expected rows are written out expanded here, by hand from ../shared/seed/, so that a slip
in the table literal or in the "{16,32}" / "ViT-*" / "7/14" expansion shows up.
"""

import pytest

from orchestrator import recipes
from orchestrator.config import ConfigError, resolve_finetune_config, resolve_pretrain_config

# (model, dataset): (default epochs, epochs listed, base LR, LR decay, weight decay, dropout)
SEED_TABLE_1 = {
    ("ViT-B/16", "JFT-300M"): (7, (7,), 8e-4, "linear", 0.1, 0.0),
    ("ViT-B/32", "JFT-300M"): (7, (7,), 8e-4, "linear", 0.1, 0.0),
    ("ViT-L/32", "JFT-300M"): (7, (7,), 6e-4, "linear", 0.1, 0.0),
    ("ViT-L/16", "JFT-300M"): (7, (7, 14), 4e-4, "linear", 0.1, 0.0),
    ("ViT-H/14", "JFT-300M"): (14, (14,), 3e-4, "linear", 0.1, 0.0),
    ("R50x1", "JFT-300M"): (7, (7,), 1e-3, "linear", 0.1, 0.0),
    ("R50x2", "JFT-300M"): (7, (7,), 1e-3, "linear", 0.1, 0.0),
    ("R101x1", "JFT-300M"): (7, (7,), 8e-4, "linear", 0.1, 0.0),
    ("R152x1", "JFT-300M"): (7, (7,), 6e-4, "linear", 0.1, 0.0),
    ("R152x2", "JFT-300M"): (7, (7,), 6e-4, "linear", 0.1, 0.0),
    ("R50+ViT-B/16", "JFT-300M"): (7, (7,), 8e-4, "linear", 0.1, 0.0),
    ("R50+ViT-B/32", "JFT-300M"): (7, (7,), 8e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/32", "JFT-300M"): (7, (7,), 2e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/16", "JFT-300M"): (7, (7, 14), 4e-4, "linear", 0.1, 0.0),
    ("ViT-B/16", "ImageNet-21k"): (90, (90,), 1e-3, "linear", 0.03, 0.1),
    ("ViT-B/32", "ImageNet-21k"): (90, (90,), 1e-3, "linear", 0.03, 0.1),
    ("ViT-L/16", "ImageNet-21k"): (30, (30, 90), 1e-3, "linear", 0.03, 0.1),
    ("ViT-L/32", "ImageNet-21k"): (30, (30, 90), 1e-3, "linear", 0.03, 0.1),
    ("ViT-B/16", "ImageNet"): (300, (300,), 3e-3, "cosine", 0.3, 0.1),
    ("ViT-B/32", "ImageNet"): (300, (300,), 3e-3, "cosine", 0.3, 0.1),
    ("ViT-L/16", "ImageNet"): (300, (300,), 3e-3, "cosine", 0.3, 0.1),
    ("ViT-L/32", "ImageNet"): (300, (300,), 3e-3, "cosine", 0.3, 0.1),
    ("ViT-H/14", "ImageNet"): (300, (300,), 3e-3, "cosine", 0.3, 0.1),
}

# dataset: (steps, LR grid)
SEED_TABLE_2 = {
    "ImageNet": (20_000, (0.003, 0.01, 0.03, 0.06)),
    "CIFAR100": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "CIFAR10": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "Oxford-IIIT Pets": (500, (0.001, 0.003, 0.01, 0.03)),
    "Oxford Flowers-102": (500, (0.001, 0.003, 0.01, 0.03)),
}
VTAB_19 = {
    "Caltech101": "natural", "CIFAR-100": "natural", "DTD": "natural", "Flowers102": "natural",
    "Pets": "natural", "Sun397": "natural", "SVHN": "natural",
    "Patch Camelyon": "specialized", "EuroSAT": "specialized", "Resisc45": "specialized",
    "Retinopathy": "specialized",
    "Clevr/count": "structured", "Clevr/distance": "structured", "DMLab": "structured",
    "KITTI/distance": "structured", "dSprites/location": "structured",
    "dSprites/orientation": "structured", "SmallNORB/azimuth": "structured",
    "SmallNORB/elevation": "structured",
}


def test_table_1_has_exactly_the_seed_rows():
    assert set(recipes.PRETRAIN_RECIPES) == set(SEED_TABLE_1)


@pytest.mark.parametrize("model,dataset", sorted(SEED_TABLE_1))
def test_every_table_1_row_resolves_exactly(model, dataset):
    epochs, listed, lr, decay, wd, dropout = SEED_TABLE_1[model, dataset]
    config = resolve_pretrain_config(model, dataset, {"workers": 64})
    assert (config.epochs, config.epochs_in_table) == (epochs, listed)
    assert config.base_lr == pytest.approx(lr, rel=0, abs=1e-12)
    assert (config.lr_decay, config.weight_decay, config.dropout) == (decay, wd, dropout)
    # The paper's shared settings (section 4.1).
    assert (config.optimizer, config.adam_beta1, config.adam_beta2) == ("adam", 0.9, 0.999)
    assert (config.global_batch_size, config.warmup_steps, config.grad_clip_norm) == (4096, 10_000, 1.0)
    assert config.image_size == 224
    assert config.workers * config.micro_batch_size * config.gradient_accumulation_steps == 4096
    assert config.overrides == ("workers",)


@pytest.mark.parametrize("model,dataset,epochs", [("ViT-L/16", "JFT-300M", 14), ("ViT-L/32", "ImageNet-21k", 90)])
def test_second_listed_epoch_count_is_accepted(model, dataset, epochs):
    config = resolve_pretrain_config(model, dataset, {"epochs": epochs})
    assert config.epochs == epochs and "epochs" in config.overrides


@pytest.mark.parametrize(
    "dataset,loss",
    [("JFT-300M", "sigmoid_cross_entropy"), ("ImageNet-21k", "sigmoid_cross_entropy"), ("ImageNet", "softmax_cross_entropy")],
)
def test_loss_follows_the_label_shape(dataset, loss):
    assert resolve_pretrain_config("ViT-B/16", dataset).loss == loss
    assert resolve_pretrain_config("ViT-B/16", dataset, {"objective": "masked-patch"}).loss == "masked_patch_cross_entropy"


def test_total_steps_follow_epochs_and_corpus_size():
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M")
    assert config.total_steps == -(-7 * 303_000_000 // 4096)
    assert resolve_pretrain_config("ViT-B/16", "JFT-300M", {"max_steps": 12}).steps == 12


def test_pretraining_head_has_pre_logits_for_vits_only():
    assert resolve_pretrain_config("ViT-L/16", "JFT-300M").representation_size == 1024
    assert resolve_pretrain_config("R50+ViT-B/16", "JFT-300M").representation_size == 768
    assert resolve_pretrain_config("R50x1", "JFT-300M").representation_size is None


def test_an_override_wins_and_is_visible():
    config = resolve_pretrain_config("ViT-B/16", "ImageNet", {"base_lr": 1e-4, "weight_decay": 0.05, "dropout": None})
    assert (config.base_lr, config.weight_decay, config.dropout) == (1e-4, 0.05, 0.1)
    assert config.overrides == ("base_lr", "weight_decay")


def test_debug_twins_borrow_their_paper_twins_row():
    config = resolve_pretrain_config("ViT-S/16", "ImageNet")
    assert (config.model, config.recipe_model, config.base_lr, config.lr_decay) == ("ViT-S/16", "ViT-B/16", 3e-3, "cosine")


def test_dry_run_resolves_the_tiny_twin_and_overrides_still_win():
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"max_steps": 7}, dry_run=True)
    assert (config.model, config.image_size, config.dry_run, config.max_steps) == ("ViT-Mu/4", 32, True, 7)
    assert (config.base_lr, config.lr_decay, config.weight_decay) == (8e-4, "linear", 0.1)
    assert config.overrides == ("max_steps",)


@pytest.mark.parametrize(
    "model,dataset,overrides,named",
    [
        ("ViT-X/16", "ImageNet", {}, ["'ViT-X/16'", "ViT-B/16"]),
        ("ViT-B/16", "JFT-3B", {}, ["'JFT-3B'", "ImageNet-21k"]),
        ("R50x1", "ImageNet", {}, ["'R50x1'", "'ImageNet'", "JFT-300M"]),
        ("ViT-H/14", "ImageNet-21k", {}, ["'ViT-H/14'", "ViT-L/16"]),
        ("ViT-B/16", "ImageNet", {"base_lr": -0.001}, ["base_lr=-0.001", "greater than 0"]),
        ("ViT-B/16", "ImageNet", {"workers": 3}, ["4096", "3 x 32"]),
        ("ViT-B/16", "ImageNet", {"workers": 8, "micro_batch_size": 24}, ["4096", "8 x 24"]),
        ("ViT-B/16", "ImageNet", {"zero_stage": 4}, ["zero_stage=4"]),
        ("ViT-B/16", "ImageNet", {"objective": "mae"}, ["objective='mae'", "masked-patch"]),
        ("ViT-B/16", "ImageNet", {"learning_rate": 1}, ["'learning_rate'", "base_lr"]),
        ("ViT-B/16", "ImageNet", {"total_steps": 5}, ["'total_steps'"]),
        ("R50x1", "JFT-300M", {"objective": "masked-patch"}, ["'R50x1'", "ViT-B/16"]),
        ("R50+ViT-B/16", "JFT-300M", {"objective": "masked-patch"}, ["'R50+ViT-B/16'", "ViT-L/16"]),
        ("R50x1", "JFT-300M", {"dropout": 0.1}, ["dropout=0.1", "0.0"]),
    ],
)
def test_bad_input_is_one_line_naming_the_value_and_the_choices(model, dataset, overrides, named):
    with pytest.raises(ConfigError) as err:
        resolve_pretrain_config(model, dataset, overrides)
    message = str(err.value)
    assert "\n" not in message
    for text in named:
        assert text in message


def test_table_2_rows_resolve_exactly():
    for dataset, (steps, grid) in SEED_TABLE_2.items():
        config = resolve_finetune_config("ViT-B/16", dataset)
        assert (config.steps, config.lr_grid) == (steps, grid)
    for task, group in VTAB_19.items():
        config = resolve_finetune_config("ViT-L/16", "VTAB/" + task)
        assert (config.steps, config.lr_grid, config.vtab_group) == (2_500, (0.01,), group)
    assert set(recipes.FINETUNE_RECIPES) == set(SEED_TABLE_2) | {"VTAB/" + task for task in VTAB_19}


def test_fine_tuning_shared_settings_and_holdouts():
    holdout = {"ImageNet": 0.01, "CIFAR100": 0.02, "CIFAR10": 0.02, "Oxford-IIIT Pets": 0.1, "Oxford Flowers-102": 0.1}
    for dataset, fraction in holdout.items():
        config = resolve_finetune_config("ViT-B/16", dataset)
        assert config.holdout_fraction == fraction
        assert (config.optimizer, config.momentum, config.batch_size, config.image_size) == ("sgd", 0.9, 512, 384)
        assert (config.weight_decay, config.grad_clip_norm, config.lr_decay) == (0.0, 1.0, "cosine")
    # Warm-up as big_vision and scenic: 500 steps for ImageNet and CIFAR, 100 for Pets and
    # Flowers (500 would warm them for their whole run), 200 for VTAB.
    warmups = {"ImageNet": 500, "CIFAR100": 500, "CIFAR10": 500, "Oxford-IIIT Pets": 100, "Oxford Flowers-102": 100}
    for dataset, warmup in warmups.items():
        assert resolve_finetune_config("ViT-B/16", dataset).warmup_steps == warmup
    for task in VTAB_19:
        assert resolve_finetune_config("ViT-B/16", "VTAB/" + task).warmup_steps == 200
    assert resolve_finetune_config("ViT-B/16", "VTAB/DTD").holdout_fraction == pytest.approx(200 / 1000)
    assert resolve_finetune_config("ViT-B/16", "Oxford-IIIT Pets").num_classes == 37


def test_fine_tuning_bad_input():
    with pytest.raises(ConfigError, match="'Food101'.*CIFAR10"):
        resolve_finetune_config("ViT-B/16", "Food101")
    with pytest.raises(ConfigError, match=r"lr_grid\.1=-0\.1"):
        resolve_finetune_config("ViT-B/16", "CIFAR10", {"lr_grid": [0.1, -0.1]})


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("ViT-B/{16,32}", ("ViT-B/16", "ViT-B/32")),
        ("R50x{1,2}", ("R50x1", "R50x2")),
        ("R50+ViT-B/{16,32}", ("R50+ViT-B/16", "R50+ViT-B/32")),
        ("ViT-L/32", ("ViT-L/32",)),
        ("ViT-*", ("ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "ViT-H/14")),
    ],
)
def test_model_patterns_expand_as_the_seed_means(pattern, expected):
    assert recipes.expand_models(pattern) == expected


def test_every_recipe_model_is_in_the_model_registry():
    from model import MODEL_NAMES

    assert set(recipes.pretrain_models()) <= set(MODEL_NAMES)
