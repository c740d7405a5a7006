"""The fine-tuning fan-out: every dataset of the seed's second table, its LR grid, the pick.

    python launch/finetune.py --weights s3://b/runs/vit-b-16-jft-300m/weights/model.safetensors \
        --data-root s3://b/downstream [--datasets CIFAR10,VTAB] [--print-plan]

The protocol (paper appendix B.1.1; big_vision configs/transfer.py):
- a sweep: one trial per LR of the dataset's grid, trained on its train split less a held-out
  part (ImageNet 1%, CIFAR 2%, Pets and Flowers 10%; chosen by a hash of each sample's key,
  data_pipelines.stream.KeySplit, so rewriting the shards does not move it) and scored on
  that part;
- the final trial: the LR of the best held-out accuracy (ties: the smaller), trained on all of
  train and scored on test: the reported figure. VTAB-1k tasks have one LR: their final
  trains on train800val200 and reports test, with no sweep.

Every trial is a Ray Train run of the pretraining worker (orchestrator/train_loop.py with a
TrialConfig: the exported weights, a zero head, 384 px, SGD), scheduled by Ray Tune as Ray
documents for Train v2: a Tuner over a function that builds and fits the trial's trainer
(`_trial_driver`), at most `max_concurrent_trials` training at once and one more getting ready
(its processes start while the others train; it waits for a turn: orchestrator/trial_gate.py),
no early-stopping scheduler (ray #54305 leaks placement groups). One Tuner runs them all, in
the order of a queue (`_TrialQueue`, served to Tune as its Searcher): the longest first, and a
dataset's final as soon as the last of its sweep trials ends, while other datasets' sweeps go
on. A trial's record is its result.json, written by its rank 0 when its evaluation ends; the
same command again schedules nothing for a trial that has one and resumes the others from
their checkpoints.

Data layout under the data root (launch/make_shards.py writes it): `<root>/<dir>/train/`
and `<root>/<dir>/test/` with <dir> one of imagenet, cifar100, cifar10, oxford-iiit-pets,
oxford-flowers-102 (ImageNet's test split is its validation set), and
`<root>/vtab/<task>/{train800,val200,train800val200,test}/` with <task> e.g. caltech101,
clevr-count, smallnorb-azimuth (`dataset_dir`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import uuid
from typing import Any, Callable, ClassVar, Literal, Mapping

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from orchestrator import recipes
from orchestrator.config import ConfigError, TrialConfig, _one_line
from orchestrator.pretraining import TrainingError

OUTPUT = "runs"  # local folder for the results (gitignored), as the dry run's
_DATASET_DIRS = {
    "ImageNet": "imagenet", "CIFAR100": "cifar100", "CIFAR10": "cifar10", "Oxford-IIIT Pets": "oxford-iiit-pets",
    "Oxford Flowers-102": "oxford-flowers-102",
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dataset_dir(dataset: str) -> str:
    """A dataset's folder under the data root: "cifar10", "vtab/clevr-count"."""
    if dataset.startswith(recipes.VTAB_PREFIX):
        return "vtab/" + slug(dataset[len(recipes.VTAB_PREFIX):])
    return _DATASET_DIRS[dataset]


class Trial(BaseModel):
    """One trial of the plan. The first nine fields are what --print-plan shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    stage: Literal["sweep", "final"]
    lr: float | None  # None: a final trial whose LR the sweep picks
    steps: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    image_size: int = Field(gt=0)
    train_split: str
    eval_split: str
    # How: folders under the data root, which part of each, the augmentation.
    train_data: str
    eval_data: str
    holdout_fraction: float
    train_part: Literal["all", "train", "holdout"]
    eval_part: Literal["all", "train", "holdout"]
    num_classes: int
    flip: bool
    random_crop: bool

    PUBLIC: ClassVar[tuple[str, ...]] = ("dataset", "stage", "lr", "steps", "warmup_steps", "batch_size", "image_size", "train_split", "eval_split")

    def public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PUBLIC}

    @property
    def name(self) -> str:
        """"CIFAR10/sweep-lr0.003": for people."""
        return f"{self.dataset}/{self.stage}-lr{self.lr:g}"

    @property
    def folder(self) -> str:
        """Its folder under the results: "cifar10/sweep-lr0.003"."""
        return f"{dataset_dir(self.dataset)}/{self.stage}-lr{self.lr:g}"


def select_datasets(names: str | None) -> list[str]:
    """The table's datasets that `names` ("CIFAR10,VTAB/DTD", "VTAB" for its 19 tasks) picks, in
    the table's order; all of them for None. Raises ConfigError naming a bad value."""
    every = list(recipes.FINETUNE_RECIPES)
    if not names:
        return every
    wanted: set[str] = set()
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name in ("VTAB", "VTAB-1k", "VTAB (19 tasks)"):
            wanted.update(d for d in every if d.startswith(recipes.VTAB_PREFIX))
        elif name in recipes.FINETUNE_RECIPES:
            wanted.add(name)
        else:
            raise ConfigError(f"unknown fine-tuning dataset {name!r}; valid: {', '.join(every[:5])}, VTAB (all 19 "
                              f"tasks) or one task as VTAB/<task>: {', '.join(every[5:])}")
    if not wanted:
        raise ConfigError(f"--datasets {names!r} names no dataset of the table; valid: {', '.join(every)}")
    return [d for d in every if d in wanted]


def plan_trials(datasets: list[str], *, steps_scale: float = 1.0, image_size: int | None = None,
                batch_size: int | None = None, steps: Mapping[str, int] | None = None) -> list[Trial]:
    """Every trial of the fan-out over `datasets`: the sweep trials, then each dataset's final.

    Args:
        steps_scale: multiplies every step count and warm-up (tests, dry runs); 1: the table.
        image_size, batch_size: in place of the paper's 384 px and 512 (dry runs on a CPU).
        steps: a dataset's step count in place of its row's x steps_scale, its warm-up in
            proportion (the dry run's digits, which need more steps than its other stand-ins).
    """
    if not steps_scale > 0:
        raise ConfigError(f"invalid steps_scale={steps_scale!r}: must be > 0")
    if steps is not None and not isinstance(steps, Mapping):
        raise ConfigError(f"invalid steps={steps!r}: must map dataset names to step counts, e.g. {{\"CIFAR10\": 3000}}")
    steps = dict(steps or {})
    for name, count in steps.items():
        if name not in recipes.FINETUNE_RECIPES:
            raise ConfigError(f"finetune steps name {name!r}, not a dataset of the table; valid: "
                              f"{', '.join(recipes.FINETUNE_RECIPES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"invalid steps {count!r} for {name!r}: must be a whole number >= 1")
    try:
        return _plan(datasets, steps_scale, image_size, batch_size, steps)
    except pydantic.ValidationError as error:  # a size out of bounds: one line
        raise ConfigError(_one_line(error)) from None


def _plan(datasets: list[str], steps_scale: float, image_size: int | None, batch_size: int | None,
          fixed_steps: dict[str, int]) -> list[Trial]:
    shared = recipes.FINETUNE_SHARED
    trials = []
    for dataset in datasets:
        row = recipes.FINETUNE_RECIPES[dataset]
        scale = fixed_steps[dataset] / row.steps if dataset in fixed_steps else steps_scale
        steps = max(1, round(row.steps * scale))
        common = dict(dataset=dataset, steps=steps, warmup_steps=min(round(row.warmup_steps * scale), steps - 1),
                      batch_size=batch_size or shared.batch_size, image_size=image_size or shared.image_size,
                      holdout_fraction=row.holdout_fraction, num_classes=row.num_classes, flip=row.flip,
                      random_crop=row.random_crop)
        folder = dataset_dir(dataset)
        if row.vtab_group is not None:  # VTAB-1k: one LR, its own splits
            trials.append(Trial(stage="final", lr=row.lr_grid[0], train_split="train800val200", eval_split="test",
                                train_data=f"{folder}/train800val200", eval_data=f"{folder}/test", train_part="all",
                                eval_part="all", **common))
            continue
        held = f"{row.holdout_fraction:.0%}"
        for lr in row.lr_grid:
            trials.append(Trial(stage="sweep", lr=lr, train_split=f"train less held-out {held}",
                                eval_split=f"held-out {held} of train", train_data=f"{folder}/train",
                                eval_data=f"{folder}/train", train_part="train", eval_part="holdout", **common))
        trials.append(Trial(stage="final", lr=row.lr_grid[0] if len(row.lr_grid) == 1 else None, train_split="train",
                            eval_split="test", train_data=f"{folder}/train", eval_data=f"{folder}/test",
                            train_part="all", eval_part="all", **common))
    return trials


class FanoutSettings(BaseModel):
    """What every trial of one fan-out shares: the weights, where things are, the trial's size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")  # the pretraining run's name
    model: str
    weights: str
    weights_sha256: str
    data_root: str
    results: str  # <run>/finetune: trials' folders, results.json/md, plots
    workers_per_trial: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    data_workers: int = Field(default=2, ge=0)
    checkpoint_every: int | None = Field(default=None, gt=0)  # None: a quarter of the trial, at most 1000
    max_failures: int = Field(default=2, ge=-1)  # worker-group restarts per trial (Ray Train)
    max_concurrent_trials: int | None = Field(default=None, gt=0)  # None: what the cluster holds
    log_every: int = Field(default=50, gt=0)
    metrics_address: str = "node"
    metrics_port: int = Field(default=9400, ge=1, le=65000)
    seed: int = 0
    torch_compile: bool = False


def trial_config(trial: Trial, settings: FanoutSettings, num_classes: int | None = None) -> TrialConfig:
    """The TrialConfig the workers of `trial` run (its LR known)."""
    from data_pipelines.s3 import join_location

    if trial.lr is None:
        raise ValueError(f"{trial.dataset}: the final trial's LR is not picked yet")
    workers = settings.workers_per_trial
    per_worker, rest = divmod(trial.batch_size, workers)
    if rest or per_worker == 0:
        raise ConfigError(f"batch_size={trial.batch_size} is not divisible by workers_per_trial={workers}")
    micro = settings.micro_batch_size or max(d for d in range(1, min(32, per_worker) + 1) if per_worker % d == 0)
    if per_worker % micro:
        raise ConfigError(f"micro_batch_size={micro} does not divide the {per_worker} images per worker of a "
                          f"{trial.batch_size} batch over {workers} workers")
    every = settings.checkpoint_every or min(1000, math.ceil(trial.steps / 4))
    trial_url = join_location(settings.results, trial.folder)
    return TrialConfig(
        model=settings.model, dataset=trial.dataset, num_classes=num_classes or trial.num_classes, multi_label=False,
        loss="softmax_cross_entropy", image_size=trial.image_size, representation_size=None, dropout=0.0,
        base_lr=trial.lr, lr_decay=recipes.FINETUNE_SHARED.lr_decay, warmup_steps=trial.warmup_steps,
        weight_decay=recipes.FINETUNE_SHARED.weight_decay, momentum=recipes.FINETUNE_SHARED.momentum,
        adam_beta1=0.9, adam_beta2=0.999, grad_clip_norm=recipes.FINETUNE_SHARED.grad_clip_norm,
        epochs=1, epochs_in_table=(1,), train_examples=trial.steps * trial.batch_size, total_steps=trial.steps,
        global_batch_size=trial.batch_size, workers=workers, micro_batch_size=micro,
        gradient_accumulation_steps=per_worker // micro, gpus_per_worker=settings.gpus_per_worker,
        cpus_per_worker=settings.cpus_per_worker, zero_stage=settings.zero_stage, torch_compile=settings.torch_compile,
        seed=settings.seed, run_name=f"{settings.run}-ft-{slug(trial.folder)}", data=join_location(settings.data_root, trial.train_data),
        data_workers=settings.data_workers, checkpoints=settings.results, checkpoint_every=every, keep_checkpoints=1,
        max_failures=settings.max_failures, log_every=settings.log_every, metrics_address=settings.metrics_address,
        metrics_port=settings.metrics_port, finetune=False, recipe_model=settings.model, trial=trial.name,
        stage=trial.stage, trial_url=trial_url, weights=settings.weights, weights_sha256=settings.weights_sha256,
        holdout_fraction=trial.holdout_fraction, train_part=trial.train_part,
        eval_data=join_location(settings.data_root, trial.eval_data), eval_part=trial.eval_part,
        train_split=trial.train_split, eval_split=trial.eval_split, flip=trial.flip, random_crop=trial.random_crop,
    )


# ---- preflight ----------------------------------------------------------------------------

def read_weights_record(weights: str) -> dict[str, Any]:
    """The export's record (model.json beside model.safetensors): model, sha256, step. Raises
    ConfigError when `weights` is not a vitscale export."""
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.storage import read_bytes

    if not weights.endswith(".safetensors"):
        raise ConfigError(f"--weights {weights!r} is not a vitscale export: expected <checkpoints>/<run>/weights/"
                          f"model.safetensors (with its model.json beside it), or a ViT checkpoint to import "
                          f"(.npz, .pth/.pt/.bin, timm .safetensors)")
    record_url = weights[: -len(".safetensors")] + ".json"
    try:
        record = json.loads(read_bytes(record_url))
    except DataSourceError as error:
        raise ConfigError(f"--weights {weights}: its record {record_url} cannot be read ({error}); a vitscale export "
                          f"has one") from None
    except ValueError:
        raise ConfigError(f"--weights {weights}: its record {record_url} is not JSON") from None
    from model import MODEL_NAMES

    if not isinstance(record, dict) or record.get("model") not in MODEL_NAMES or not record.get("sha256"):
        raise ConfigError(f"--weights {weights}: its record {record_url} names no model of the zoo and sha256 "
                          f"(model: {record.get('model') if isinstance(record, dict) else None!r}); valid models: "
                          f"{', '.join(MODEL_NAMES)}")
    return record


def check_data(trials: list[Trial], data_root: str) -> dict[str, int]:
    """Every folder the trials read has a readable manifest and its shards: dataset -> the class
    count its train manifest names. Raises ConfigError naming the first dataset that does not."""
    from data_pipelines.preflight import check_readable
    from data_pipelines.s3 import DataSourceError, join_location

    classes: dict[str, int] = {}
    seen: set[str] = set()
    for trial in trials:
        for folder in (trial.train_data, trial.eval_data):
            if folder in seen:
                continue
            seen.add(folder)
            url = join_location(data_root, folder)
            try:
                manifest = check_readable(url)
            except DataSourceError as error:
                raise ConfigError(f"{trial.dataset}: no readable shards at {url} ({error}); the fan-out reads "
                                  f"<data root>/{dataset_dir(trial.dataset)}/... (README: Fine-tuning), or leave the "
                                  f"dataset out with --datasets") from None
            if manifest.label_kind != "class":
                raise ConfigError(f"{trial.dataset}: {url} holds {manifest.label_kind} labels; fine-tuning needs one "
                                  f"class per image")
            if folder == trial.train_data:
                classes[trial.dataset] = len(manifest.class_names) or trial.num_classes
    return classes


# ---- running -------------------------------------------------------------------------------

def read_result(config: TrialConfig) -> dict | None:
    """A trial's result.json, or None when it has none (not run, or not finished)."""
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.storage import read_bytes
    from orchestrator.train_loop import result_url

    try:
        record = json.loads(read_bytes(result_url(config)))
    except (DataSourceError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "done" else None


def _trial_driver(params: dict) -> None:
    """One Ray Tune trial: build the trial's TorchTrainer, fit it, report its figure."""
    from ray import tune
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from orchestrator.pretraining import failure_line
    from orchestrator.progress import fatal_reported, forget_fatal
    from orchestrator.ray_workers import train_controller_env
    from orchestrator.train_loop import staging_dir_for, train_loop, worker_config
    from orchestrator.trainer import NotRetried, TrialFailed, build_trainer

    config = TrialConfig.model_validate(params["trial"])
    os.environ.update(train_controller_env())  # Ray Train hands it on to the trial's controller
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})}
    staging = staging_dir_for(config)
    # A rank's error that a restart cannot cure (a refusal from S3, a trial that diverged before
    # its first checkpoint: a sweep's too-high LR) ends the trial at once, not after max_failures.
    fatal = f"trial-fatal/{config.trial}/{uuid.uuid4().hex}"
    trainer = build_trainer(
        train_loop,
        train_loop_config=worker_config(config, staging_dir=staging, fail_at_step=params["faults"].get(config.trial),
                                        record_dir=params.get("record_dir"), trial_gate=params.get("gate"),
                                        fatal=fatal),
        fatal_key=fatal,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        # Ray Train's own notices at WARNING: its five lines a trial at INFO (the worker group
        # asked for, started, its ranks, the process group) would bury the fan-out's own.
        run_config=RunConfig(name=config.run_name, failure_config=FailureConfig(max_failures=config.max_failures),
                             storage_path=os.path.join(tempfile.gettempdir(), "vitscale-ray-results"),
                             logging_config=LoggingConfig(log_level="WARNING")),
        local=params["local"],
    )
    try:
        trainer.fit()  # raises when the trial keeps failing past max_failures, or at once (fatal)
    except Exception as error:
        if (line := fatal_reported(fatal)) is not None:
            raise NotRetried(f"{config.trial}: failed, not retried: {line}") from None
        raise TrialFailed(f"{config.trial}: failed after {config.max_failures} restarts: {failure_line(error)}") from None
    finally:
        forget_fatal(fatal)
        if params.get("gate"):  # rank 0 gave the turn back with its result.json; not if it failed
            from orchestrator.trial_gate import leave

            leave(params["gate"], config.trial)
    record = read_result(config)
    if record is None:
        raise RuntimeError(f"{config.trial}: training ended without a result.json")
    tune.report({"accuracy": record["accuracy"]})


class _Progress:
    """Ray Tune callback, in the driver: one line per trial as it starts and ends, a tqdm bar
    over all trials, and the driver's fan-out metrics."""

    def __init__(self, total: int, done: int, log: Callable[[str], None], metrics):
        from tqdm import tqdm

        self.log, self.metrics = log, metrics
        self.bar = tqdm(total=total, initial=done, desc="fine-tuning trials", unit="trial", dynamic_ncols=True,
                        disable=None)
        self.pending, self.running, self.done, self.failed = total - done, 0, done, 0
        self._update()

    def _update(self) -> None:
        if self.metrics is not None:
            self.metrics.set_trials(pending=self.pending, running=self.running, done=self.done, failed=self.failed)

    def queued(self, count: int) -> None:
        self.pending += count
        self.bar.total += count
        self.bar.refresh()
        self._update()

    def callback(self, figure_of: Callable[[dict], str], gate: str | None = None):
        from ray import tune

        from orchestrator.trial_gate import leave

        progress = self

        class Callback(tune.Callback):
            def __reduce__(self):
                # Tune keeps its run config, callbacks included, in its experiment state: the
                # copy it pickles need not print anything.
                return _inert_callback, ()

            def on_trial_start(self, iteration, trials, trial, **info):
                progress.pending -= 1
                progress.running += 1
                progress._update()
                progress.log(f"trial {trial.config['trial']['trial']} started")

            def on_trial_complete(self, iteration, trials, trial, **info):
                progress._end(trial, ok=True, figure=figure_of(trial.config["trial"]))

            def on_trial_error(self, iteration, trials, trial, **info):
                if gate:  # its driver may have died holding the turn
                    leave(gate, trial.config["trial"]["trial"])
                progress._end(trial, ok=False, figure="failed")

        return Callback()

    def _end(self, trial, *, ok: bool, figure: str) -> None:
        self.running -= 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self._update()
        self.bar.update(1)
        self.log(f"trial {trial.config['trial']['trial']} {'finished' if ok else 'failed'}: {figure}")

    def close(self) -> None:
        self.bar.close()


def _inert_callback():
    from ray import tune

    return tune.Callback()


def concurrency(ray, settings: FanoutSettings) -> int:
    """Trials that train at once: the cluster's free accelerators over one trial's. On CPUs
    alone, one trial's CPUs are kept for the trial getting ready beside them (its workers start
    and build their engine while the others train, then wait for a turn: trial_gate.py); with
    accelerators, the next trial's workers wait for a running trial's accelerators."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    available = ray.available_resources()  # free now: pretraining has ended
    workers = settings.workers_per_trial
    if settings.gpus_per_worker:
        fits = available.get("GPU", 0.0) / (workers * settings.gpus_per_worker)
    else:
        fits = (available.get("CPU", 0.0) - 0.5) / (workers * settings.cpus_per_worker) - 1
    return max(1, int(fits))


class _TrialQueue:
    """The fan-out's trials in the order they start, longest first (ImageNet's 20000 steps before
    Pets' 500: the last trials to end are short ones, and the tail where slots stand idle is
    short). A dataset's final joins the queue as soon as the last of its sweep trials ends, with
    the LR the sweep picked on held-out data: it trains while other datasets' sweeps go on.
    Lives in the driver; `searcher()` is the Ray Tune Searcher that serves it."""

    def __init__(self, configs: dict[str, TrialConfig], records: dict[str, dict], finals: list[Trial], *,
                 settings: FanoutSettings, classes: dict[str, int], log: Callable[[str], None], metrics=None):
        import heapq
        import itertools

        self._push, self._pop, self._order = heapq.heappush, heapq.heappop, itertools.count()
        self.configs, self.records, self.settings, self.classes, self.log = configs, records, settings, classes, log
        self.metrics = metrics
        self.heap: list[tuple[int, int, str]] = []
        self.waiting: dict[str, set[str]] = {}  # dataset -> its sweep trials not ended yet
        self.finals = {t.dataset: t for t in finals}
        self.ended: list[str] = []  # datasets whose sweep ended, final not queued yet
        self.queued = 0  # finals added after the start (the progress bar's total grows by them)
        for name, config in configs.items():
            if name not in records:
                self._add(config)
        for dataset in self.finals:
            self.waiting[dataset] = {n for n, c in configs.items()
                                     if c.dataset == dataset and c.stage == "sweep" and n not in records}
            if not self.waiting[dataset]:
                del self.waiting[dataset]
                self.ended.append(dataset)
        self.queue_finals()
        self.queued = 0
        self.size = len(self.heap) + len(self.waiting)  # at most this many trials will run

    def _add(self, config: TrialConfig) -> None:
        self._push(self.heap, (-config.steps, next(self._order), config.trial))

    def queue_finals(self) -> None:
        """Each dataset whose sweep ended: the LR its held-out accuracies pick, its final queued
        (or its record read, when a run before this one trained it)."""
        from orchestrator import finetune_results

        while self.ended:
            dataset = self.ended.pop(0)
            sweep = [r for r in self.records.values() if r["dataset"] == dataset and r["stage"] == "sweep"]
            lr = finetune_results.pick_lr(sweep)
            if lr is None:  # every sweep trial failed
                continue
            if self.metrics is not None:
                self.metrics.set_best_heldout(dataset, max(r["accuracy"] for r in sweep))
            final = self.finals[dataset].model_copy(update={"lr": lr})
            config = trial_config(final, self.settings, self.classes.get(dataset))
            self.configs[final.name] = config
            if (record := read_result(config)) is not None:
                self.records[final.name] = record
                continue
            self.log(f"{dataset}: LR {lr:g} picked on held-out data ({_sweep_line(sweep)})")
            self._add(config)
            self.queued += 1

    def next(self) -> TrialConfig | None | str:
        """The next trial to start; None while sweeps still running may add a final; "finished"."""
        self.queue_finals()
        if self.heap:
            return self.configs[self._pop(self.heap)[2]]
        return None if self.waiting else "finished"

    def ended_trial(self, name: str) -> None:
        """A trial ended, finished or failed: its record, and its dataset's sweep when it was the last."""
        config = self.configs[name]
        if name not in self.records and (record := read_result(config)) is not None:
            self.records[name] = record
        pending = self.waiting.get(config.dataset)
        if config.stage == "sweep" and pending is not None:
            pending.discard(name)
            if not pending:
                del self.waiting[config.dataset]
                self.ended.append(config.dataset)

    def searcher(self, common: dict, on_queued: Callable[[int], None]):
        """A Ray Tune Searcher over this queue; `common` joins each trial's config."""
        from ray.tune.search import Searcher

        queue = self

        class QueueSearcher(Searcher):
            def __init__(self):
                super().__init__()
                self.names: dict[str, str] = {}

            def __reduce__(self):
                # Tune pickles its tune config into the experiment's folder: that copy need not run.
                return Searcher, ()

            def suggest(self, trial_id):
                before = queue.queued
                config = queue.next()
                if queue.queued > before:
                    on_queued(queue.queued - before)
                if config == "finished":
                    return Searcher.FINISHED
                if config is None:
                    return None
                self.names[trial_id] = config.trial
                return {"trial": config.model_dump(mode="json"), **common}

            def on_trial_complete(self, trial_id, result=None, error=False):
                if trial_id in self.names:
                    queue.ended_trial(self.names.pop(trial_id))

            def save(self, checkpoint_path):  # Tune's experiment state; a re-run reads result.json instead
                with open(checkpoint_path, "w") as f:
                    json.dump({"running": sorted(self.names.values()), "waiting": sorted(queue.waiting)}, f)

        return QueueSearcher()


def _run_trials(queue: _TrialQueue, *, settings: FanoutSettings, ray_local: bool, progress: _Progress, faults: dict,
                record_dir: str | None) -> dict[str, str]:
    """Runs the queue's trials through one Ray Tune Tuner; returns trial name -> error of those that
    failed. `settings.max_concurrent_trials` train at once; with more trials than that, Tune runs
    one more, which gets ready while they train and waits for a turn (orchestrator/trial_gate.py)."""
    import ray
    from ray import tune

    from orchestrator.trainer import NotRetried, TrialFailed
    from orchestrator.trial_gate import TrialGate

    turns = settings.max_concurrent_trials
    gate, gate_name = TrialGate.start(ray, turns) if queue.size > turns else (None, None)
    common = {"local": ray_local, "faults": faults, "record_dir": record_dir, "gate": gate_name}
    trainable = tune.with_resources(_trial_driver, {"CPU": 0.01})  # 0 is refused (DESIGN.md)
    tuner = tune.Tuner(
        trainable,
        # reuse_actors: a trial's driver process (it only builds and fits the trainer) serves the
        # next trial too, one Ray worker process fewer to start per trial.
        tune_config=tune.TuneConfig(search_alg=queue.searcher(common, progress.queued), num_samples=queue.size,
                                    max_concurrent_trials=turns + (gate is not None), reuse_actors=True,
                                    trial_name_creator=lambda t: slug(t.config["trial"]["trial"]),
                                    trial_dirname_creator=lambda t: slug(t.config["trial"]["trial"])),
        run_config=tune.RunConfig(name=f"{settings.run}-finetune-{int(time.time())}", verbose=0,
                                  storage_path=os.path.join(tempfile.gettempdir(), "vitscale-tune"),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress.callback(lambda t: _figure(queue.configs[t["trial"]]), gate_name)]),
    )
    # Tune's console output (a table at each Tuner's start, the experiment's paths) would come
    # between the fan-out's own lines; with its older reporter, verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        grid = tuner.fit()
    finally:
        if gate is not None:
            ray.kill(gate)
    errors = {}
    for result in grid:
        name = result.config["trial"]["trial"]
        if result.error is not None:
            line = (str(result.error).strip().splitlines() or ["failed"])[-1]
            for kind in (NotRetried, TrialFailed):
                line = line.removeprefix(f"{kind.__module__}.{kind.__name__}: ")
            errors[name] = line[:300]
    return errors


def _figure(config: TrialConfig) -> str:
    record = read_result(config)
    if record is None:
        return "no result"
    return f"{config.eval_split} accuracy {record['accuracy']:.4f}"


def run_fanout(settings: FanoutSettings, trials: list[Trial], *, log: Callable[[str], None] = print,
               faults: dict | None = None, record_dir: str | None = None) -> tuple[dict, str]:
    """Preflight, the sweeps, the pick, the finals, the results; returns (summary, local folder
    of results.json/results.md/plots). Raises ConfigError (preflight, or another driver holds
    the results' lease) before scheduling anything."""
    classes = check_data(trials, settings.data_root)
    configs = {t.name: trial_config(t, settings, classes.get(t.dataset)) for t in trials if t.lr is not None}
    records: dict[str, dict] = {}
    for name, config in configs.items():
        if (record := read_result(config)) is not None:
            records[name] = record
    lease = _take_the_results(settings, log)  # before any cluster resource: one fan-out per results
    try:
        return _fan_out(settings, trials, configs, records, classes, lease, log=log, faults=faults,
                        record_dir=record_dir)
    finally:
        lease.release()


class FanoutStopped(TrainingError):
    """The fan-out's lease was taken over by another driver: it stopped (exit status 1)."""


def _take_the_results(settings: FanoutSettings, log: Callable[[str], None]):
    """The fan-out's lease, `<results>/lease.json` (orchestrator/lease.py, as a pretraining run
    takes its own): two fan-outs writing the same results would run every trial twice and
    overwrite each other's records. ConfigError naming the driver that holds it."""
    from data_pipelines.s3 import join_location
    from orchestrator.lease import LeaseUnavailable, hold

    try:
        return hold(join_location(settings.results, "lease.json"), what=f"fine-tuning {settings.run}", log=log,
                    elsewhere="another --results")
    except LeaseUnavailable as error:
        raise ConfigError(str(error)) from None


def _fan_out(settings: FanoutSettings, trials: list[Trial], configs: dict, records: dict, classes: dict, lease, *,
             log: Callable[[str], None], faults: dict | None, record_dir: str | None) -> tuple[dict, str]:
    from data_pipelines.s3 import join_location
    from data_pipelines.transfer import upload_file
    from orchestrator import finetune_results
    from orchestrator.pretraining import connect_ray, ray_started_here, signals_stop_the_run

    ray = connect_ray(next(iter(configs.values())) if configs else None)
    local = ray_started_here(ray)
    settings = settings.model_copy(update={"max_concurrent_trials": concurrency(ray, settings)})
    log(f"fine-tuning fan-out of {settings.run} ({settings.model}, weights sha256 {settings.weights_sha256[:12]}): "
        f"{len(trials)} trials over {len({t.dataset for t in trials})} datasets, {len(records)} finished already, "
        f"{settings.max_concurrent_trials} at once; results in {settings.results}")
    metrics = _start_fanout_metrics(settings, log)
    finals_later = [t for t in trials if t.lr is None]
    queue = _TrialQueue(configs, records, finals_later, settings=settings, classes=classes, log=log, metrics=metrics)
    progress = _Progress(len(configs), len(records), log, metrics)
    failed: dict[str, str] = {}
    with signals_stop_the_run():
        try:
            if queue.size:
                failed.update(_run_trials(queue, settings=settings, ray_local=local, progress=progress,
                                          faults=faults or {}, record_dir=record_dir))
            _collect(configs.values(), records, failed)
        except KeyboardInterrupt:
            if lease.lost:  # not a signal: the lease was taken over
                raise FanoutStopped(f"fine-tuning stopped: {lease.lost}") from None
            raise
        finally:
            progress.close()
            if metrics is not None:
                _test_accuracies(records, metrics)
                metrics.close()
    listed = list(records.values())
    for name, config in configs.items():
        if name not in records:
            listed.append({"dataset": config.dataset, "stage": config.stage, "lr": config.base_lr, "steps": config.steps,
                           "status": "failed", "error": failed.get(name, "no result")})
    for trial in finals_later:
        if not any(r["dataset"] == trial.dataset and r["stage"] == "final" for r in listed):
            listed.append({"dataset": trial.dataset, "stage": "final", "lr": None, "steps": trial.steps,
                           "status": "not run", "error": "every sweep trial failed"})
    summary = finetune_results.summarize(listed, run=settings.run, model=settings.model, weights=settings.weights,
                                         weights_sha256=settings.weights_sha256)
    out = os.path.join(OUTPUT, settings.run, "finetune")
    paths = finetune_results.write_results(summary, out)
    for path in paths:
        upload_file(path, join_location(settings.results, os.path.basename(path)))
    return summary, out


def _collect(configs, records: dict, failed: dict) -> None:
    for config in configs:
        if config.trial not in records and (record := read_result(config)) is not None:
            records[config.trial] = record
            failed.pop(config.trial, None)


def _sweep_line(sweep: list[dict]) -> str:
    return ", ".join(f"lr {r['lr']:g}: {r['accuracy']:.4f}" for r in sorted(sweep, key=lambda r: r["lr"]))


def _start_fanout_metrics(settings: FanoutSettings, log: Callable[[str], None]):
    from orchestrator.metrics import FanoutMetrics, MetricsError, bind_address, metrics_port

    try:
        metrics = FanoutMetrics(settings.run, address=bind_address(settings.metrics_address),
                                port=metrics_port(settings.metrics_port, None))
    except MetricsError as error:
        log(f"warning: {error}; the fan-out goes on without the driver's metrics")
        return None
    if metrics.url:
        log(f"fan-out metrics at {metrics.url}")
    return metrics


def _best_heldout(records: dict, metrics) -> None:
    if metrics is None:
        return
    best: dict[str, float] = {}
    for record in records.values():
        if record["stage"] == "sweep":
            best[record["dataset"]] = max(best.get(record["dataset"], 0.0), record["accuracy"])
    for dataset, accuracy in best.items():
        metrics.set_best_heldout(dataset, accuracy)


def _test_accuracies(records: dict, metrics) -> None:
    _best_heldout(records, metrics)
    for record in records.values():
        if record["stage"] == "final":
            metrics.set_test_accuracy(record["dataset"], record["accuracy"])


def settings_for(weights: str, record: dict, data_root: str, *, results: str | None = None,
                 **overrides: Any) -> FanoutSettings:
    """The fan-out's settings for an export: the run is the folder above weights/."""
    parent = weights.rsplit("/", 2)[0]  # <checkpoints>/<run>
    run = parent.rsplit("/", 1)[-1]
    values = {"run": slug(run) or "run", "model": record["model"], "weights": weights,
              "weights_sha256": record["sha256"], "data_root": data_root, "results": results or f"{parent}/finetune"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return FanoutSettings(**values)
    except pydantic.ValidationError as error:
        raise ConfigError(_one_line(error)) from None


# ---- the hand-over from pretraining --------------------------------------------------------

def plan_for(config) -> list[Trial]:
    """The fan-out a pretraining config (PretrainConfig) asks for when it ends."""
    return plan_trials(select_datasets(config.finetune_datasets), steps_scale=config.finetune_steps_scale,
                       image_size=config.finetune_image_size, batch_size=config.finetune_batch_size,
                       steps=config.finetune_steps)


def check_for_pretraining(config) -> None:
    """Pretraining's preflight: every dataset the fan-out will read is there, before the first
    pretraining step (a missing CIFAR-10 is found before 7 epochs of JFT, not after them)."""
    check_data(plan_for(config), config.finetune_data)


def later_command(config) -> str:
    """The launch/finetune.py command that runs this run's fan-out by hand."""
    from orchestrator.train_loop import weights_url

    return f"python launch/finetune.py --weights {weights_url(config)} --data-root URL"


def run_after_pretraining(config, log: Callable[[str], None] = print) -> tuple[dict, str] | None:
    """launch/pretrain.py's hand-over (also in a dry run): the fan-out from the weights the
    pretraining run just exported, on the same cluster, with trials the size of the run's
    machines (at most 8 of its workers each). None when the config asks for none."""
    from orchestrator.train_loop import weights_url

    if not (config.finetune and config.finetune_data):
        return None
    weights = weights_url(config)
    record = read_weights_record(weights)
    settings = settings_for(
        weights, record, config.finetune_data,
        workers_per_trial=config.finetune_workers_per_trial or min(config.workers, 8),
        gpus_per_worker=config.gpus_per_worker, cpus_per_worker=config.cpus_per_worker,
        zero_stage=config.zero_stage,
        data_workers=config.data_workers if config.finetune_data_workers is None else config.finetune_data_workers,
        metrics_address=config.metrics_address,
        metrics_port=config.metrics_port, max_failures=config.max_failures, seed=config.seed,
        torch_compile=config.torch_compile)
    log(f"pretraining ended: the fine-tuning fan-out starts from {weights}")
    return run_fanout(settings, plan_for(config), log=log)
