"""Typed, validated run configs, resolved from a recipe row plus explicit overrides.

    python launch/pretrain.py --model ViT-L/16 --dataset JFT-300M --epochs 14 --print-config

`resolve_pretrain_config(model, dataset, overrides)` looks up the seed's row for
(model, dataset), fills in the paper's shared settings, applies the overrides (an override
always wins and is listed in `overrides`) and validates the result. Every problem becomes a
`ConfigError` whose message is one line naming the bad value and what would be valid.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model import model_spec
from orchestrator import recipes


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ConfigError(ValueError):
    """A usage or configuration error: one line, shown to the user as is (exit status 2)."""


# The debug twin that `--dry-run` trains: the same recipe row, a model and data small enough
# for a laptop CPU. Any override given with --dry-run still wins over these.
DRY_RUN = {
    "model": "ViT-Mu/4",
    "image_size": 32,
    "num_classes": 10,
    "global_batch_size": 32,
    "micro_batch_size": 16,
    "workers": 1,
    "warmup_steps": 5,
    "epochs": 1,
    "train_examples": 2048,
    "max_steps": 40,
    "checkpoint_every": 20,
    "data_workers": 1,
    "log_every": 5,
    "metrics_address": "127.0.0.1",
    # The fan-out over the dry run's stand-in downstream sets (orchestrator/dry_run.py): the
    # table's trials and LR grids at 2% of their steps (ImageNet's 20000 -> 400), at 8 px (the
    # digits' own size), batch 32. The real digits (CIFAR-10's stand-in) get 3000 steps: at
    # 2000 the LR the sweep picks (0.01) scored 0.889 on test, at 3000 0.931 (README). Pets
    # and Flowers get 100, where 2% of 500 would be 10 steps, too few to learn anything.
    "finetune_steps_scale": 0.02,
    "finetune_steps": {"CIFAR10": 3000, "Oxford-IIIT Pets": 100, "Oxford Flowers-102": 100},
    "finetune_image_size": 8,
    "finetune_batch_size": 32,
    # The trials decode in their own process: a stand-in's epoch is 8-45 steps, and a
    # DataLoader forks its workers anew each epoch (data_pipelines/stream.py), which took ~40%
    # of a digits trial's worker time with one data worker (py-spy, this 2-core VM).
    "finetune_data_workers": 0,
}


class PretrainConfig(BaseModel):
    """Everything one pretraining run needs; travels to the workers as plain data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What is trained on what.
    model: str
    dataset: str
    objective: Literal["supervised", "masked-patch"] = "supervised"
    num_classes: int = Field(gt=0)
    multi_label: bool
    loss: Literal["sigmoid_cross_entropy", "softmax_cross_entropy", "masked_patch_cross_entropy"]
    image_size: int = Field(gt=0)
    representation_size: int | None = Field(default=None, gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)

    # Optimisation (seed table 1 + paper section 4.1).
    optimizer: Literal["adam"] = "adam"
    base_lr: float = Field(gt=0.0)
    lr_decay: Literal["linear", "cosine"]
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0.0)  # decoupled (AdamW-style), as in the paper
    adam_beta1: float = Field(ge=0.0, lt=1.0)
    adam_beta2: float = Field(ge=0.0, lt=1.0)
    grad_clip_norm: float = Field(gt=0.0)

    # How long.
    epochs: int = Field(gt=0)
    epochs_in_table: tuple[int, ...]
    train_examples: int = Field(gt=0)
    total_steps: int = Field(gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # stop early; the schedule keeps total_steps

    # How it is split across the cluster.
    global_batch_size: int = Field(gt=0)
    workers: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    gpus_per_worker: float = Field(ge=0.0)
    # Ray reserves these per worker and sets OMP_NUM_THREADS to match (torch's CPU threads).
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    # ZeRO-1 by default: it shards what dominates a ViT's memory, the fp32 master weights and
    # Adam's two moments (12 of 14 bytes per parameter with bf16 weights), for the same
    # communication volume as plain data parallelism (a reduce-scatter and an all-gather per
    # step). Every table model (ViT-H/14 is 632M parameters) fits a GPU with it, so ZeRO-2/3's
    # extra gradient/parameter collectives buy nothing here; measured on CPU (benchmarks/
    # train_step.py) ZeRO-1 and -2 cost about the same, 0.87-0.88 of a bare torch loop.
    zero_stage: Literal[0, 1, 2, 3] = 1
    # The engine's arithmetic: "auto" is bf16 (fp32 masters) on GPUs and fp32 on CPUs; "bf16" on
    # CPUs too (DeepSpeed's CPU accelerator: tests of what only bf16 does, e.g. an update that
    # makes the parameters non-finite, which the fp32 engine skips).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile the model (inductor) in every worker: ViT-B/16 bf16 on an H200 (benchmarks/
    # mfu.py, batch 256) steps in 75 ms instead of 88 (MFU 0.309 -> 0.363), for ~22 s of
    # compiling at each worker start. Off by default until a whole run has been tried with it
    # on a GPU; on CPUs it gains nothing (measured: ViT-Ti/16).
    torch_compile: bool = False
    seed: int = 0

    # Where things live, and what to do after.
    run_name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")  # a folder under `checkpoints`
    data: str | None = None
    data_workers: int = Field(default=8, ge=0)  # DataLoader processes per training worker
    checkpoints: str | None = None  # checkpoints go to <checkpoints>/<run_name>/checkpoints/
    checkpoint_every: int = Field(default=1000, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)  # the newest K committed ones
    keep_checkpoint_every: int = Field(default=0, ge=0)  # plus every step divisible by this
    max_failures: int = Field(default=3, ge=-1)  # Ray Train worker-group restarts (-1: no limit)
    log_every: int = Field(default=10, gt=0)
    # Prometheus /metrics of the driver (metrics_port) and of the worker with local rank i
    # (metrics_port + 1 + i), served on metrics_address: "node" is the Ray node's IP (the pod
    # IP on Kubernetes), "off" serves nothing, anything else is an IP address to bind.
    metrics_address: str = "node"
    metrics_port: int = Field(default=9400, ge=1, le=65000)
    peak_flops: float | None = Field(default=None, gt=0.0)  # per device, for MFU; None: datasheet or measured
    finetune: bool = True  # the fine-tuning fan-out when pretraining ends (orchestrator/finetuning.py)
    finetune_data: str | None = None  # its data root: <root>/cifar10/{train,test}/, ... (README)
    finetune_datasets: str | None = None  # comma-separated names of seed table 2 (None: every one)
    finetune_steps_scale: float = Field(default=1.0, gt=0.0)  # multiplies every trial's steps (dry runs)
    # A dataset's steps in place of the table's x finetune_steps_scale, warm-up in proportion.
    finetune_steps: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    finetune_image_size: int | None = Field(default=None, gt=0)  # None: the paper's 384
    finetune_batch_size: int | None = Field(default=None, gt=0)  # None: the paper's 512
    finetune_workers_per_trial: int | None = Field(default=None, gt=0)  # None: the run's workers, at most 8
    finetune_data_workers: int | None = Field(default=None, ge=0)  # a trial's DataLoader workers; None: data_workers
    dry_run: bool = False
    # Resume a run whose last checkpoint was trained with other training settings (TRAINING_FIELDS):
    # refused unless set.
    resume_with_changes: bool = False
    recipe_model: str  # the table row the settings come from (a debug twin's paper twin)
    overrides: tuple[str, ...] = ()  # fields set explicitly, winning over the recipe

    @field_validator("data", "checkpoints", "finetune_data")
    @classmethod
    def _bucket_name_is_valid(cls, url: str | None) -> str | None:
        if url and url.startswith("s3://"):
            bucket = url[len("s3://"):].partition("/")[0]
            if not _BUCKET_NAME.match(bucket) or ".." in bucket:
                raise ValueError(f"bucket name {bucket!r} is not a valid S3 bucket name "
                                 f"(3-63 lowercase letters, digits, '.' and '-')")
        return url

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address_is_valid(cls, address: str) -> str:
        if address not in ("node", "off"):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"metrics_address {address!r} is not 'node', 'off' or an IP address") from None
        return address

    @field_validator("finetune_steps")
    @classmethod
    def _finetune_steps_name_datasets(cls, steps: dict[str, int]) -> dict[str, int]:
        for name in steps:
            if name not in recipes.FINETUNE_RECIPES:
                raise ValueError(f"{name!r} is not a dataset of the fine-tuning table; valid: "
                                 f"{', '.join(recipes.FINETUNE_RECIPES)}")
        return steps

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> "PretrainConfig":
        per_step = self.workers * self.micro_batch_size
        if self.global_batch_size != per_step * self.gradient_accumulation_steps:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not workers x micro_batch_size x "
                f"gradient_accumulation_steps = {self.workers} x {self.micro_batch_size} x "
                f"{self.gradient_accumulation_steps}"
            )
        return self

    @property
    def steps(self) -> int:
        """Optimizer steps this run takes: the schedule's length, or fewer with max_steps."""
        return min(self.total_steps, self.max_steps or self.total_steps)


# Fields the recipe derives; setting them directly would contradict the fields they come from.
# What changes the computation a resumed run continues (the model, the objective, the
# optimizer and its schedule's shape, the batch, the data, the seed); not how it is run
# (workers, micro-batches, ZeRO stage, checkpointing, metrics), nor its length: a larger
# --max-steps or --epochs trains on from the last checkpoint, as the README says (--epochs
# stretches the decay over the longer run).
TRAINING_FIELDS = (
    "model", "dataset", "objective", "num_classes", "multi_label", "loss", "image_size", "representation_size",
    "dropout", "optimizer", "base_lr", "lr_decay", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "grad_clip_norm", "global_batch_size", "seed", "data", "precision",
)
_DERIVED = {"loss", "gradient_accumulation_steps", "total_steps", "recipe_model", "overrides", "epochs_in_table"}
OVERRIDABLE = tuple(f for f in PretrainConfig.model_fields if f not in _DERIVED)


def resolve_pretrain_config(
    model: str, dataset: str, overrides: dict[str, Any] | None = None, *, dry_run: bool = False
) -> PretrainConfig:
    """The fully resolved config for pretraining `model` on `dataset`.

    Args:
        overrides: field -> value, each winning over the recipe (None values are ignored, so
            unset command-line flags can be passed straight through).
        dry_run: resolve the debug twin of this recipe (DRY_RUN); overrides still win.

    Raises:
        ConfigError: an unknown model, dataset or field, a pair the table does not define, or
            a value that fails validation.
    """
    overrides = {k: _coerce(k, v) for k, v in (overrides or {}).items() if v is not None}
    row = _recipe_row(model, dataset)
    data = recipes.PRETRAIN_DATASETS[dataset]
    shared = recipes.PRETRAIN_SHARED

    values: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "num_classes": data.num_classes,
        "multi_label": data.multi_label,
        "image_size": shared.image_size,
        # The pretraining head has a tanh pre-logits layer of width D for ViTs (PAPER.md).
        "representation_size": None,
        "dropout": row.dropout,
        "optimizer": shared.optimizer,
        "base_lr": row.base_lr,
        "lr_decay": row.lr_decay,
        "warmup_steps": shared.warmup_steps,
        "weight_decay": row.weight_decay,
        "adam_beta1": shared.adam_beta1,
        "adam_beta2": shared.adam_beta2,
        "grad_clip_norm": shared.grad_clip_norm,
        "epochs": row.epochs,
        "epochs_in_table": row.epochs_listed,
        "train_examples": data.train_examples,
        "global_batch_size": shared.global_batch_size,
        "workers": 1,
        "micro_batch_size": None,
        "gpus_per_worker": 1.0,
        "recipe_model": recipes.DEBUG_TWINS.get(model, model),
        "run_name": None,
    }
    if dry_run:
        values.update(DRY_RUN, gpus_per_worker=0.0, dry_run=True)
        _recipe_row(values["model"], dataset)  # the twin must be able to take this row
    values.update(overrides)
    values["representation_size"] = overrides.get("representation_size", _pre_logits_width(values["model"]))
    _check_model_options(values)
    values["run_name"] = values["run_name"] or _default_run_name(values)
    values["loss"] = _loss(values)
    values["overrides"] = tuple(sorted(overrides))
    values["micro_batch_size"] = values["micro_batch_size"] or _default_micro_batch(values)
    values["gradient_accumulation_steps"] = _accumulation_steps(values)
    values["total_steps"] = _total_steps(values)
    try:
        return PretrainConfig(**values)
    except pydantic.ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _coerce(field: str, value: Any) -> Any:
    """Check one override against its field's type and bounds before anything derives from it."""
    info = PretrainConfig.model_fields.get(field)
    if info is None or field in _DERIVED:
        raise ConfigError(f"unknown config field {field!r}; valid fields: {', '.join(OVERRIDABLE)}")
    try:
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        return pydantic.TypeAdapter(kind).validate_python(value)
    except pydantic.ValidationError as err:
        raise ConfigError(f"invalid {field}={value!r}: {err.errors()[0]['msg']}") from None


def _recipe_row(model: str, dataset: str) -> recipes.PretrainRecipe:
    models = recipes.pretrain_models()
    if model not in models:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(models)}")
    if dataset not in recipes.PRETRAIN_DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(recipes.PRETRAIN_DATASETS)}")
    try:
        return recipes.pretrain_recipe(model, dataset)
    except KeyError:
        raise ConfigError(
            f"the recipe table has no row for model {model!r} on dataset {dataset!r}; "
            f"{model} is defined for: {', '.join(recipes.datasets_for(model)) or 'nothing'}; "
            f"{dataset} is defined for: {', '.join(recipes.models_for(dataset))}"
        ) from None


def _pre_logits_width(model: str) -> int | None:
    """ViTs and hybrids pretrain with a tanh pre-logits layer of width D (PAPER.md); ResNets have none."""
    spec = model_spec(model)
    return None if spec.family == "resnet" else spec.width


def _default_run_name(values: dict[str, Any]) -> str:
    """Deterministic, so that the same command resumes the same run: "vit-b-16-jft-300m"."""
    name = f"{values['model']}-{values['dataset']}" + ("-dry-run" if values.get("dry_run") else "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _check_model_options(values: dict[str, Any]) -> None:
    """Options a model family cannot take, caught here rather than inside a worker."""
    family = model_spec(values["model"]).family
    if values.get("objective") == "masked-patch" and family != "vit":
        vits = ", ".join(m for m in recipes.pretrain_models() if model_spec(m).family == "vit")
        raise ConfigError(f"objective='masked-patch' needs a plain ViT, not {values['model']!r}; valid models: {vits}")
    if family == "resnet" and values["dropout"]:
        raise ConfigError(f"invalid dropout={values['dropout']!r}: the ResNet {values['model']} has no dropout; valid: 0.0")


def _loss(values: dict[str, Any]) -> str:
    if values.get("objective") == "masked-patch":
        return "masked_patch_cross_entropy"
    return "sigmoid_cross_entropy" if values["multi_label"] else "softmax_cross_entropy"


def _default_micro_batch(values: dict[str, Any]) -> int:
    """The largest per-worker batch of at most 32 that splits the global batch evenly."""
    per_worker, rest = divmod(values["global_batch_size"], values["workers"])
    if rest or per_worker <= 0:
        return 32  # validation below reports the uneven split with these numbers
    return max(d for d in range(1, min(32, per_worker) + 1) if per_worker % d == 0)


def _accumulation_steps(values: dict[str, Any]) -> int:
    per_step = values["workers"] * values["micro_batch_size"]
    if per_step <= 0:
        return 1  # validation below names the field that is not positive
    steps, rest = divmod(values["global_batch_size"], per_step)
    if rest or steps == 0:
        raise ConfigError(
            f"global_batch_size={values['global_batch_size']} is not divisible by workers x micro_batch_size "
            f"= {values['workers']} x {values['micro_batch_size']} = {per_step}; choose workers and "
            f"micro_batch_size whose product divides {values['global_batch_size']}"
        )
    return steps


def _total_steps(values: dict[str, Any]) -> int:
    if values["epochs"] <= 0 or values["train_examples"] <= 0:
        return 1  # validation below names the bad field
    return math.ceil(values["epochs"] * values["train_examples"] / values["global_batch_size"])


def _one_line(err: pydantic.ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    shown = f"{field}={value!r}" if first["loc"] else str(first["msg"])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid {shown}: {first['msg'].removeprefix('Value error, ')}{more}"


class FinetuneConfig(BaseModel):
    """One downstream fine-tuning job of the fan-out (seed table 2 + appendix B.1.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    dataset: str
    vtab_group: str | None = None
    num_classes: int = Field(gt=0)
    image_size: int = Field(gt=0)
    steps: int = Field(gt=0)
    lr_grid: tuple[Annotated[float, Field(gt=0.0)], ...] = Field(min_length=1)
    base_lr: float | None = Field(default=None, gt=0.0)  # None until the grid search picks one
    holdout_fraction: float = Field(gt=0.0, lt=1.0)
    optimizer: Literal["sgd"] = "sgd"
    momentum: float = Field(ge=0.0, lt=1.0)
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(ge=0.0)
    grad_clip_norm: float = Field(gt=0.0)
    lr_decay: Literal["linear", "cosine"]
    warmup_steps: int = Field(ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0
    overrides: tuple[str, ...] = ()


def resolve_finetune_config(model: str, dataset: str, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """The config for fine-tuning `model` on `dataset` (a seed table 2 dataset or a VTAB task).

    Raises:
        ConfigError: an unknown model, dataset or field, or a value that fails validation.
    """
    models = recipes.pretrain_models()
    if model not in models:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(models)}")
    if dataset not in recipes.FINETUNE_RECIPES:
        raise ConfigError(
            f"unknown fine-tuning dataset {dataset!r}; valid datasets: {', '.join(recipes.FINETUNE_RECIPES)}"
        )
    row, shared = recipes.FINETUNE_RECIPES[dataset], recipes.FINETUNE_SHARED
    values: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "vtab_group": row.vtab_group,
        "num_classes": row.num_classes,
        "image_size": shared.image_size,
        "steps": row.steps,
        "lr_grid": row.lr_grid,
        "holdout_fraction": row.holdout_fraction,
        "optimizer": shared.optimizer,
        "momentum": shared.momentum,
        "batch_size": shared.batch_size,
        "weight_decay": shared.weight_decay,
        "grad_clip_norm": shared.grad_clip_norm,
        "lr_decay": shared.lr_decay,
        "warmup_steps": row.warmup_steps,
    }
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    fixed = {"model", "dataset", "overrides"}
    unknown = sorted(k for k in overrides if k not in FinetuneConfig.model_fields or k in fixed)
    if unknown:
        valid = ", ".join(f for f in FinetuneConfig.model_fields if f not in fixed)
        raise ConfigError(f"unknown config field {unknown[0]!r}; valid fields: {valid}")
    values.update(overrides, overrides=tuple(sorted(overrides)))
    try:
        return FinetuneConfig(**values)
    except pydantic.ValidationError as err:
        raise ConfigError(_one_line(err)) from None


class TrialConfig(PretrainConfig):
    """One fine-tuning trial as its workers run it, through the pretraining worker
    (orchestrator/train_loop.py): a training run of its own (run_name, data, checkpoints, the
    batch split, the schedule) plus what fine-tuning changes: SGD with momentum, the exported
    weights it starts from (pre-logits dropped, a zero head, position embeddings resized),
    the part of the data it trains on, and the evaluation that ends it with result.json."""

    optimizer: Literal["adam", "sgd"] = "sgd"  # type: ignore[assignment]
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    trial: str  # "<dataset>/<stage>-lr<lr>", for people
    stage: Literal["sweep", "final"]
    trial_url: str  # the trial's folder: checkpoints/, result.json, weights/ (final trials)
    weights: str  # the pretraining export it starts from
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Which samples of `data` it trains on and of `eval_data` it is scored on: "all", or the
    # two sides of the held-out part, chosen by a hash of each sample's key
    # (data_pipelines.stream.KeySplit): "train" is the rest, "holdout" the part itself.
    holdout_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    train_part: Literal["all", "train", "holdout"] = "all"
    eval_data: str
    eval_part: Literal["all", "train", "holdout"] = "all"
    train_split: str  # the two splits as the plan names them
    eval_split: str
    flip: bool = True
    random_crop: bool = True
