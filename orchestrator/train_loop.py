"""What every Ray Train worker runs: model, DeepSpeed, data stream, checkpoints, steps.

    build_trainer(train_loop, train_loop_config=worker_config(config, staging_dir=...), ...).fit()

(build_trainer: orchestrator/trainer.py, a Ray Train TorchTrainer.) `train_loop(config)` reads
only its argument (a plain dict: the resolved run config plus a few runtime settings), so
tests import it and run it under a small local Ray.

One optimizer step is `gradient_accumulation_steps` micro-batches. Before each backward the
ranks agree (one all-reduce) that every rank has a batch and that every loss is finite:
- a rank whose share of the epoch ran out ends the epoch for everyone (the batches other
  ranks were handed at that moment are counted as seen but not trained on); `EMPTY_EPOCHS`
  epochs in a row without one batch (every shard gone or unreadable) stop the run with
  NoDataError, which the driver does not retry (`_fatal_line`);
- a non-finite loss on any rank skips that micro-batch everywhere and is counted; after
  `NONFINITE_ROLLBACK` in a row the run rolls back to the last committed checkpoint while the
  data stream goes on, so the window that produced them is skipped;
- after each update the worker reads the global gradient norm DeepSpeed computed for
  clipping: a non-finite one is counted; when DeepSpeed applied that update anyway (bf16,
  whose serial overflow check is off for speed: orchestrator/engine.py) and the parameters
  are no longer finite, the run rolls back at once;
- a checkpoint is committed only when every rank's parameters are finite.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from typing import Any

import torch

from data_pipelines.s3 import join_location
from orchestrator.checkpoint import CheckpointManager
from orchestrator.config import PretrainConfig, TrialConfig
from orchestrator.objectives import classification_loss
from orchestrator.schedule import learning_rate

NONFINITE_ROLLBACK = 3
EMPTY_EPOCHS = 2  # epochs in a row without a single batch on any rank: the data is gone


class DivergedError(RuntimeError):
    """Non-finite before any checkpoint: nothing to roll back to, and a restart would repeat it."""


class NoDataError(RuntimeError):
    """Every shard of the training data became unreadable: passes over it yield nothing."""
# Worker metrics ports a node offers (metrics_port + 1 .. + 8: the PodMonitor's metrics-0..7).
METRICS_PORTS_PER_NODE = 8


# A fine-tuning trial's routine lines (_Worker.log): its start, its wait for a turn, progress
# rows, epochs, commits, export, score and end.
ROUTINE_TRIAL_LINE = re.compile(
    r"training |no checkpoint to resume|epoch \d+ begins|step \d+ nonfinite_total |checkpoint step \d+ committed|"
    r"exported weights to |finished at step |metrics at |\S.*: (held-out|test|train|val).* accuracy |"
    r"\S.*: ready, waited [\d.]+ s for a turn$")


def worker_config(config: PretrainConfig, *, staging_dir: str, record_dir: str | None = None,
                  nan_loss_at: dict[int, int] | None = None, nan_grad_at: dict[int, int] | None = None,
                  metrics_linger: float = 0.0, starts_prefix: str | None = None,
                  fail_at_step: dict | None = None, trial_gate: str | None = None,
                  progress: str | None = None, fatal: str | None = None) -> dict[str, Any]:
    """The plain-data argument of `train_loop`.

    Args:
        staging_dir: fast node-local disk for checkpoint staging.
        record_dir: if set, each rank appends the sample keys it trains on (and its pid) there,
            so a test can check what a run saw.
        nan_loss_at: fault injection for tests: {step: n} makes the next n micro-batch losses
            NaN once the run has completed `step` optimizer steps.
        nan_grad_at: likewise, but the next n micro-batches keep a finite loss and give a NaN
            gradient.
        metrics_linger: seconds a worker keeps serving its final metrics before it exits, so a
            scraper sees the end of a short run.
        starts_prefix: where rank 0 records each start of the worker group
            (metrics.WorkerGroupStarts; the driver's restart counter).
        fail_at_step: fault injection for tests: {"step": n, "how": "raise" | "kill" | "revoke"}
            (_Worker._inject_failure) or "corrupt" (_Worker._corrupt_fault).
        trial_gate: a fine-tuning trial's: the name of the fan-out's TrialGate actor, whose
            turn the ranks wait for, ready to train (orchestrator/trial_gate.py).
        progress: a pretraining run's: the key under which rank 0 puts each progress row for
            its driver's bar (orchestrator/progress.py).
        fatal: where a rank reports an error that a restart cannot cure (progress.report_fatal;
            default: under `progress`): a fine-tuning trial's, which its trainer's
            trainer.NoRetryOnFatal reads before Ray Train would restart the group.
    """
    return {"run": config.model_dump(mode="json"), "staging_dir": staging_dir, "record_dir": record_dir,
            "nan_loss_at": {str(k): v for k, v in (nan_loss_at or {}).items()},
            "nan_grad_at": {str(k): v for k, v in (nan_grad_at or {}).items()}, "metrics_linger": metrics_linger,
            "starts_prefix": starts_prefix, "fail_at_step": fail_at_step, "trial_gate": trial_gate,
            "progress": progress, "fatal": fatal}


def staging_dir_for(run: PretrainConfig) -> str:
    """The run's own folder of the staging disk (VITSCALE_STAGING_DIR, else $TMPDIR/vitscale-staging):
    runs that share a node (fine-tuning trials side by side, two runs on one machine) never
    write each other's checkpoint or export files. Each rank takes a sub-folder of it."""
    base = os.environ.get("VITSCALE_STAGING_DIR") or os.path.join(tempfile.gettempdir(), "vitscale-staging")
    return os.path.join(base, re.sub(r"[^A-Za-z0-9._-]+", "-", run.run_name))


def train_augmentation(run: PretrainConfig):
    """Pretraining's inception crop and flip at 224; a trial's at its resolution, without the
    flip or the random crop where its labels would change (recipes.VTAB_AUGMENTATION): then
    the whole image is resized."""
    from data_pipelines.augment import Augmentation

    if not isinstance(run, TrialConfig):
        return "pretrain"
    if run.random_crop:
        return Augmentation("finetune", run.image_size, flip=run.flip)
    # An area of 1 with any aspect allowed: the box is the whole image, whatever its shape.
    return Augmentation("finetune", run.image_size, crop_area=(1.0, 1.0), crop_aspect=(1e-3, 1e3), flip=run.flip)


def data_part(run: PretrainConfig, which: str):
    """The KeySplit of a trial's train or eval data (None: everything, as pretraining reads)."""
    from data_pipelines.stream import KeySplit

    if not isinstance(run, TrialConfig):
        return None
    part = run.train_part if which == "train" else run.eval_part
    return None if part == "all" else KeySplit(run.holdout_fraction, part)


def model_input(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A loader batch's images on `device` in `dtype`: a uint8 batch is copied as uint8 and
    normalised there (data_pipelines.augment.normalise_on_device: the float loader's values)."""
    if images.dtype == torch.uint8:
        from data_pipelines.augment import normalise_on_device

        return normalise_on_device(images.to(device, non_blocking=True), dtype)
    return images.to(device, dtype=dtype, non_blocking=True)


def gradient_norm_finite(engine) -> bool:
    """Whether the global gradient norm of the engine's last update was finite (True before
    the first update, or when DeepSpeed computes none)."""
    norm = engine.get_global_grad_norm()
    return norm is None or math.isfinite(float(norm))


def run_url(config: PretrainConfig) -> str:
    """Where a run keeps what it writes: <checkpoints>/<run_name>, or a fine-tuning trial's folder."""
    return config.trial_url if isinstance(config, TrialConfig) else join_location(config.checkpoints, config.run_name)


def checkpoint_url(config: PretrainConfig) -> str:
    return join_location(run_url(config), "checkpoints")


def result_url(config: TrialConfig) -> str:
    """A trial's result.json: written by rank 0 when its evaluation ends (the trial's record)."""
    return join_location(config.trial_url, "result.json")


def _weights_file(config: PretrainConfig, name: str) -> str:
    return join_location(join_location(run_url(config), "weights"), name)


def weights_url(config: PretrainConfig) -> str:
    return _weights_file(config, "model.safetensors")


def history_url(config: PretrainConfig) -> str:
    """Where rank 0 keeps the run's own history of what it logged (orchestrator/report.py reads it)."""
    return join_location(run_url(config), "history")


def weights_record_url(config: PretrainConfig) -> str:
    """Beside the weights, written after them: {"step", "sha256", "weights"}. The driver reads it
    to see that a run is finished without scheduling anything (pretraining.finished_run)."""
    return _weights_file(config, "model.json")


def run_config_of(config: dict[str, Any]) -> PretrainConfig:
    """The run config inside `train_loop`'s argument: a pretraining run's, or a trial's."""
    kind = TrialConfig if "trial_url" in config["run"] else PretrainConfig
    return kind.model_validate(config["run"])


def train_loop(config: dict[str, Any]) -> None:
    import logging

    import ray.train

    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # credential-chain chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)

    context = ray.train.get_context()
    try:
        _Worker(config, context.get_world_rank(), context.get_world_size(), context.get_local_rank(), under_ray=True).run()
    except Exception as error:
        if (line := _fatal_line(error)) is not None:  # the driver stops the run rather than restart it
            from orchestrator.progress import report_fatal

            report_fatal(config.get("fatal") or config.get("progress"), f"rank {context.get_world_rank()}: {line}")
        raise


def _fatal_line(error: BaseException) -> str | None:
    """The one line of an error that restarting the workers cannot cure, else None."""
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.stream import StaleDataPosition
    from orchestrator.checkpoint import RefusedError

    if isinstance(error, (RefusedError, NoDataError, DivergedError, StaleDataPosition)) or (
            isinstance(error, DataSourceError) and error.permanent):
        return str(error)
    return None


class _Worker:
    """One rank's training. Under Ray Train (`train_loop`) it also records for the driver that
    the worker group started and reports to Ray at checkpoints; outside Ray (`under_ray=False`,
    e.g. benchmarks/worker_step.py) the caller initialises torch.distributed, and Ray is not
    needed unless `metrics_address` is "node" (the Ray node's IP)."""

    def __init__(self, config: dict[str, Any], rank: int, world_size: int, local_rank: int = 0, *,
                 under_ray: bool = False):
        self.under_ray = under_ray
        self.rank = rank
        self.trial_log: list[str] | None = [] if "trial_url" in config["run"] else None
        from data_pipelines.stream import ShardLoader
        from orchestrator.engine import build_engine

        self.run_config = run_config_of(config)
        self.fail_at_step = config.get("fail_at_step")  # fault injection for tests (worker_config)
        self._corrupted = False
        self.rank, self.world_size = rank, world_size
        self.record_dir = config.get("record_dir")
        self.starts_prefix = config.get("starts_prefix")
        self.trial_gate = config.get("trial_gate")
        self.progress = config.get("progress") if rank == 0 and under_ray else None
        self.nan_loss_at = {int(k): v for k, v in (config.get("nan_loss_at") or {}).items()}
        self.nan_grad_at = {int(k): v for k, v in (config.get("nan_grad_at") or {}).items()}
        run = self.run_config
        self.use_gpu = torch.cuda.is_available() and run.gpus_per_worker > 0
        if isinstance(run, TrialConfig) and not self.use_gpu:
            # Trials run side by side on a node's CPUs, each reserving cpus_per_worker per worker;
            # Ray 2.60 leaves OMP_NUM_THREADS unset, and torch would take every core in each.
            torch.set_num_threads(max(1, int(run.cpus_per_worker)))
        with self._deepspeed_notices_in_trial_log():
            self.engine = build_engine(run, use_gpu=self.use_gpu)
        self.device = self.engine.device
        from orchestrator.engine import uses_bf16

        self.dtype = torch.bfloat16 if uses_bf16(run, use_gpu=self.use_gpu) else torch.float32
        # GPU workers load uint8 pixels and normalise them on the GPU: a quarter of the bytes
        # to copy (ViT-B/16, 256 images: 38 MB instead of 154 per step) and no float pass on
        # the CPU. CPU workers normalise into the loader's reused float buffers. GPU batches
        # come pinned, so their copy does not hold up the training thread.
        self.loader = ShardLoader(
            run.data, batch_size=run.micro_batch_size, augmentation=train_augmentation(run), image_size=run.image_size,
            seed=run.seed, rank=rank, world_size=world_size, num_workers=run.data_workers,
            labels=run.objective == "supervised", dtype="uint8" if self.use_gpu else "float32",
            pin_memory=self.use_gpu, keep=data_part(run, "train"),
        )
        self.checkpoints = CheckpointManager(
            checkpoint_url(run), staging_dir=os.path.join(config["staging_dir"], run.run_name), rank=rank,
            world_size=world_size, keep_last=run.keep_checkpoints, keep_every=run.keep_checkpoint_every, log=self.log,
        )
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.epoch_batches = 0  # micro-batches trained on in this epoch (agreed by every rank)
        self.empty_epochs = 0  # epochs in a row that gave none
        self.rollbacks = 0
        self._batches = None
        self.metrics = self._start_metrics(local_rank, float(config.get("metrics_linger") or 0.0))
        # Rank 0's history of a pretraining run: its progress rows and its checkpoints' commits,
        # written at each checkpoint as one small part holding what is new since the last.
        self.history = [] if rank == 0 and not isinstance(self.run_config, TrialConfig) else None
        self._commits_in_history = 0

    def _deepspeed_notices_in_trial_log(self):
        """A trial worker under Ray: DeepSpeed's notices as its engine is built (the accelerator
        it chose, the untested SGD, anything it prints) go to the trial's log.txt, not to the
        fan-out's output (2 lines a trial, and Ray's log dedup prints them late, after the
        fan-out's own lines). Its errors are printed still."""
        import contextlib

        if self.trial_log is None or not self.under_ray:
            return contextlib.nullcontext()
        import io
        import logging

        lines = self.trial_log

        class IntoTrialLog(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                lines.append(f"deepspeed: {record.getMessage()}")
                return record.levelno >= logging.ERROR

        # Before deepspeed is imported: it logs on import, and its logger keeps the filter.
        logging.getLogger("DeepSpeed").addFilter(IntoTrialLog())
        import deepspeed  # noqa: F401  (its logger's handler takes the real stdout, not the buffer below)

        printed = io.StringIO()

        class Printed(logging.Filter):
            # Ray Train's worker turns `print` into a record of the root logger as well as
            # writing it to a redirected stdout (ray.train.v2 patch_print): DeepSpeed's "comm op
            # built successfully" came through that way.
            def filter(self, record: logging.LogRecord) -> bool:
                return record.levelno >= logging.WARNING

        @contextlib.contextmanager
        def quiet():
            root, kept = logging.getLogger(), Printed()
            root.addFilter(kept)
            try:
                with contextlib.redirect_stdout(printed):
                    yield
            finally:
                root.removeFilter(kept)
            lines.extend(f"deepspeed: {line}" for line in printed.getvalue().splitlines())

        return quiet()

    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        if self.trial_log is not None:
            # A fine-tuning trial keeps its routine lines in log.txt beside its result.json:
            # the fan-out's driver says when each trial starts and ends, and a dry run's 28
            # trials would bury that under some 500 lines. Warnings and the unusual (a
            # resume, a non-finite loss, a rollback, a failed commit) are printed as well.
            self.trial_log.append(message)
            if ROUTINE_TRIAL_LINE.match(message):
                return
        # Ray Train routes `print` through its logger and also echoes it, which doubles
        # every line in the driver's output; the process's own stdout shows it once.
        sys.__stdout__.write(message + "\n")
        sys.__stdout__.flush()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        run = self.run_config
        self._restore()
        self._wait_for_turn()
        self._announce_start()
        self._step_metrics()  # the step it starts from is known now (alerts count the ranks by it)
        self._record(f"start {self.step} pid {os.getpid()}")
        self.log(f"training {run.model} on {run.data}: steps {self.step} -> {run.steps} of {run.total_steps}, "
                 f"{self.world_size} workers x {run.micro_batch_size} x {run.gradient_accumulation_steps} accumulation, "
                 f"{self.device}, {torch.get_num_threads()} CPU threads")
        if self.step >= run.steps:  # the same command again, after the run finished
            self.log(f"nothing to train: the run's last checkpoint is step {self.step} and it stops at step "
                     f"{run.steps}; exporting that checkpoint's weights (raise --max-steps or --epochs to go on)")
        window_start, window_images, last_loss = time.perf_counter(), 0, None
        while self.step < run.steps:
            lr = learning_rate(self.step, base_lr=run.base_lr, total_steps=run.total_steps,
                               warmup_steps=run.warmup_steps, decay=run.lr_decay)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            step_began, self.data_wait = time.perf_counter(), 0.0
            self._inject_failure()
            losses = self._one_step()
            if losses is None:  # rolled back
                self._step_metrics()
                continue
            self.step += 1
            self._corrupt_fault()
            self.images_seen += run.micro_batch_size * run.gradient_accumulation_steps
            last_loss = sum(losses) / len(losses)
            self._step_metrics(loss=last_loss, lr=lr, seconds=time.perf_counter() - step_began)
            window_images += run.global_batch_size
            if self.step % run.log_every == 0 or self.step == run.steps:
                seconds = time.perf_counter() - window_start
                self._log_progress(loss=last_loss, lr=lr, images_per_second=window_images / seconds)
                window_start, window_images = time.perf_counter(), 0
            if self.step % run.checkpoint_every == 0 or self.step == run.steps:
                self._save()
                self._write_history()
                self._report_to_ray()
        self.checkpoints.close()
        self._write_history()
        self._step_metrics()
        if self.checkpoints.last_committed_step != run.steps and self.rank == 0:
            self.log(f"warning: the final checkpoint (step {run.steps}) did not commit: {self.checkpoints.last_error}")
        if isinstance(run, TrialConfig):
            self._finish_trial()
        else:
            self._export()
        self.log(f"finished at step {self.step}" + ("" if last_loss is None else f", loss {last_loss:.4f}"))
        if self.metrics_linger:
            time.sleep(self.metrics_linger)
        self.metrics.close()

    def _one_step(self) -> list[float] | None:
        """One optimizer step; None when it ended in a rollback."""
        losses = []
        while len(losses) < self.run_config.gradient_accumulation_steps:
            batch = self._next_batch()
            loss = self._loss(batch) if batch is not None else None
            if loss is not None and self.nan_loss_at.get(self.step, 0) > 0:
                self.nan_loss_at[self.step] -= 1
                loss = loss * float("nan")
            if loss is not None and self.nan_grad_at.get(self.step, 0) > 0:
                self.nan_grad_at[self.step] -= 1
                # sqrt(0 * loss) is 0 and its gradient inf * 0 = NaN: a finite loss, NaN gradients.
                loss = loss + torch.sqrt(loss * 0)
            has_batch, finite = self._agree(batch is not None, loss is not None and bool(torch.isfinite(loss)))
            if not has_batch:
                # A rank's share ran out. When no rank had a batch in this whole epoch (agreed: the
                # ranks take the same micro-batches), the data is gone, or the epoch was consumed
                # already when it resumed; EMPTY_EPOCHS of them in a row and the run stops.
                self.empty_epochs = 0 if self.epoch_batches else self.empty_epochs + 1
                if self.empty_epochs >= EMPTY_EPOCHS:
                    stats = self.loader.stats
                    raise NoDataError(
                        f"{self.run_config.data}: {EMPTY_EPOCHS} passes in a row yielded no sample ({stats['missing_samples']} "
                        f"samples of {stats['short_shards']} shards missing, {stats['skipped_samples']} undecodable): "
                        f"its shards are gone or unreadable")
                self.epoch_batches = 0
                self._next_epoch()
                continue
            self.epoch_batches += 1  # a batch, finite or not: the data is there
            if not finite:
                self.nonfinite_total += 1
                self.nonfinite_in_a_row += 1
                self.log(f"step {self.step + 1}: non-finite loss, micro-batch skipped "
                         f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)")
                if self.nonfinite_in_a_row >= NONFINITE_ROLLBACK:
                    self._roll_back()
                    return None
                continue
            self.nonfinite_in_a_row = 0
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            self._record(f"step {self.step + 1} " + " ".join(batch["key"]))
        # The update ran with the last micro-batch; loss.item() waited for it, so this costs
        # no extra synchronization. The norm is global: every rank takes the same branch.
        if not gradient_norm_finite(self.engine):
            self.nonfinite_total += 1
            if not self._parameters_finite():
                self.log(f"step {self.step + 1}: non-finite gradient norm made the parameters non-finite "
                         f"({self.nonfinite_total} non-finite in all): rolling back")
                self._roll_back()
                return None
            self.log(f"step {self.step + 1}: non-finite gradient norm, update skipped by DeepSpeed "
                     f"({self.nonfinite_total} non-finite in all)")
        return losses

    def _loss(self, batch: dict) -> torch.Tensor:
        if self.run_config.objective == "masked-patch":
            from model import masked_patch_loss, patch_color_targets, random_patch_mask

            model = self.engine.module
            pixels = model_input(batch["image"], self.device, torch.float32)  # targets from fp32 pixels
            mask = random_patch_mask(pixels.shape[0], model.num_patches, device=pixels.device)
            targets = patch_color_targets(pixels, model.patch_size)
            return masked_patch_loss(model.forward_masked(pixels.to(self.dtype), mask).float(), targets, mask)
        logits = self.engine(model_input(batch["image"], self.device, self.dtype)).float()
        labels = batch["label"].to(self.device, non_blocking=True)
        return classification_loss(logits, labels, multi_label=self.run_config.multi_label)

    # --- data -----------------------------------------------------------------------------

    def _next_batch(self) -> dict | None:
        began = time.perf_counter()
        if self._batches is None:
            if self.loader.num_workers:
                # The DataLoader forks its workers on the first batch. Python 3.11's fork can
                # leave a child hung for good when another thread of this process starts or
                # ends at that instant (the interpreter's list of threads is copied with its
                # lock held): seen at an epoch boundary that met the end of a checkpoint
                # upload, whose s3transfer threads were exiting. The checkpoint manager's
                # threads (an upload, a restore's release) finish first; once an epoch, or
                # after a restore.
                self.checkpoints.wait()
            self._batches = iter(self.loader)
        batch = next(self._batches, None)
        self.data_wait += time.perf_counter() - began
        return batch

    def _next_epoch(self) -> None:
        self._batches = None  # stops this epoch's DataLoader workers
        self.loader.set_epoch(self.loader.epoch + 1)
        self.log(f"epoch {self.loader.epoch} begins at step {self.step}")

    def _agree(self, has_batch: bool, finite: bool) -> tuple[bool, bool]:
        # On the engine's device: Ray Train's process group on GPUs is NCCL's alone, which
        # takes no CPU tensors ("No backend type associated with device type cpu").
        flags = torch.tensor([float(has_batch), float(finite)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return bool(flags[0]), bool(flags[1])

    # --- checkpoints ------------------------------------------------------------------------

    def _restore(self):
        restored = self.checkpoints.restore(self.engine)
        if restored is not None:
            self.step = restored.step
            self.loader.load_state_dict([r.loader_state for r in restored.manifest.ranks])
            self._batches = None
        else:
            self.log("no checkpoint to resume from: starting at step 0")

    def _wait_for_turn(self) -> None:
        """A trial started while others train waits here, ready (engine built, checkpoint
        restored), until the fan-out gives it a turn; its wall time counts from then."""
        if not (self.trial_gate and self.under_ray and isinstance(self.run_config, TrialConfig)):
            return
        from orchestrator.trial_gate import wait_for_turn

        waited = wait_for_turn(self.trial_gate, self.run_config.trial)
        self.started_at = time.time()
        self.log(f"{self.run_config.trial}: ready, waited {waited:.1f} s for a turn")

    def _parameters_finite(self) -> bool:
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())
        return self._agree(True, finite)[1]

    def _save(self) -> None:
        if not self._parameters_finite():
            self.log(f"step {self.step}: parameters are not finite; not checkpointing, rolling back")
            self._roll_back()
            return
        # The data position is the state after the batches trained so far; batches of a
        # DataLoader prefetch that were not handed out are not in it.
        self.checkpoints.save(self.engine, self.step, loader_state=self.loader.state_dict(),
                              config=self.run_config.model_dump(mode="json"))
        self.metrics.log({"vitscale_checkpoint_save_seconds": self.checkpoints.last_stall_seconds})

    def _roll_back(self) -> None:
        """Back to the last committed checkpoint; the data stream keeps its position."""
        positions = [self.loader.state_dict()]
        if torch.distributed.is_initialized():
            positions = [None] * self.world_size
            torch.distributed.all_gather_object(positions, self.loader.state_dict())
        restored = self.checkpoints.restore(self.engine)
        if restored is None:
            # Before the first commit: the same seed and data would diverge the same way after a
            # restart, so the driver is told not to restart (_fatal_line).
            raise DivergedError(f"after step {self.step}: the run went non-finite before its first checkpoint, with "
                                f"nothing to roll back to (a lower base_lr or a longer warmup_steps may hold it)")
        self.rollbacks += 1
        self.nonfinite_in_a_row = 0
        self.log(f"rolled back from step {self.step} to step {restored.step}; the data window in between is skipped")
        self.step = restored.step
        self.loader.load_state_dict(positions)  # every rank's position: forward through the data
        self._batches = None

    def _inject_failure(self) -> None:
        """Tests' faults (worker_config's fail_at_step): {"step": n, "how": "raise"|"kill"}
        fails rank 0 (or the fault's "rank") once it reaches step n: "raise" every time (a trial
        that keeps failing), "kill" SIGKILLs its own process on the first attempt only (a worker
        lost once: the attempt after it starts from a checkpoint at or past n, or, without one,
        finds the marker the first left beside the trial). {"step": n, "how": "revoke",
        "environment": {...}}: from step n this process's S3 clients take their credentials from
        that environment instead (credentials revoked mid-run: the server itself then refuses)."""
        fault = self.fail_at_step
        if not fault or self.step != fault["step"] or self.rank != fault.get("rank", 0) or fault["how"] == "corrupt":
            return
        if fault["how"] == "revoke":
            self.checkpoints.wait()  # an earlier step's commit in flight goes through first: the next save is the refused one
            os.environ.update(fault["environment"])  # S3ClientFactory makes new clients under it
            return
        if fault["how"] == "raise":
            raise RuntimeError(f"injected failure at step {self.step}")
        marker = os.path.join(self.record_dir or self.checkpoints.staging_dir, f"killed-at-{self.step}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            self.checkpoints.wait()  # the step's checkpoint committed first: the fault is the kill alone
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def _corrupt_fault(self) -> None:
        """Tests' fault {"step": n, "how": "corrupt"}: once step n's update is done, rank 0's copy
        of one parameter turns NaN, once (not again after a rollback): memory corrupted behind
        the optimizer's back (silent data corruption, as large fleets see), with finite losses
        and gradients up to there, so that only the commit's own check (_save) keeps the step
        from being committed."""
        fault = self.fail_at_step
        if not fault or fault["how"] != "corrupt" or self.step != fault["step"] or self.rank != 0 or self._corrupted:
            return
        self._corrupted = True
        with torch.no_grad():
            next(self.engine.module.parameters()).view(-1)[0] = float("nan")

    def _finish_trial(self) -> None:
        """A fine-tuning trial's end: its evaluation, the final stage's weights, and
        result.json (rank 0), after which the trial's checkpoints are deleted: the record is
        what a re-run looks for, and hundreds of trials' checkpoints would only take room."""
        from data_pipelines.storage import write_bytes
        from data_pipelines.transfer import delete_prefix

        run = self.run_config
        began = time.perf_counter()
        score = self._evaluate()
        digest = self._export() if run.stage == "final" else None
        if self.rank != 0:
            return
        ended = time.time()
        record = {"dataset": run.dataset, "stage": run.stage, "lr": run.base_lr, "steps": run.steps, "status": "done",
                  "accuracy": score["accuracy"], "correct": score["correct"], "total": score["total"],
                  "train_split": run.train_split, "eval_split": run.eval_split,
                  "wall_seconds": round(ended - self.started_at, 3), "began_at": round(self.started_at, 3),
                  "ended_at": round(ended, 3),
                  "eval_seconds": round(time.perf_counter() - began, 3), "weights_sha256": run.weights_sha256,
                  "model": run.model, "image_size": run.image_size, "batch_size": run.global_batch_size,
                  "warmup_steps": run.warmup_steps, **({"weights": weights_url(run), "fine_tuned_sha256": digest}
                                                       if digest else {})}
        self.log(f"{run.trial}: {run.eval_split} accuracy {score['accuracy']:.4f} ({score['correct']}/{score['total']})")
        write_bytes(join_location(run.trial_url, "log.txt"), ("\n".join(self.trial_log) + "\n").encode(),
                    self.checkpoints.factory)
        write_bytes(result_url(run), json.dumps(record, indent=1).encode(), self.checkpoints.factory)
        if self.trial_gate and self.under_ray:  # the next trial, ready, trains while this one ends
            from orchestrator.trial_gate import leave

            leave(self.trial_gate, run.trial)
        try:
            delete_prefix(checkpoint_url(run), self.checkpoints.factory)
        except Exception as error:  # the result stands; the checkpoints only take room
            self.log(f"warning: {run.trial}: its checkpoints were not deleted: {type(error).__name__}: {error}")

    def _evaluate(self) -> dict:
        """Top-1 accuracy over the trial's evaluation part, every rank scoring its share of it
        (each sample once); the counts are summed over the ranks. A rank whose share ran out
        still runs the forward pass on a placeholder while others go on: under ZeRO-3 every
        forward gathers parameters from every rank."""
        from data_pipelines.augment import augmentation_for
        from data_pipelines.stream import ShardLoader

        run = self.run_config
        loader = ShardLoader(run.eval_data, batch_size=run.micro_batch_size, augmentation=augmentation_for("eval", run.image_size),
                             seed=run.seed, rank=self.rank, world_size=self.world_size, num_workers=run.data_workers,
                             dtype="uint8" if self.use_gpu else "float32", pin_memory=self.use_gpu,
                             factory=self.checkpoints.factory, keep=data_part(run, "eval"))
        counts = torch.zeros(2, device=self.device)  # correct, total
        module = self.engine.module
        module.eval()
        batches = iter(loader)
        placeholder = torch.zeros(1, 3, run.image_size, run.image_size, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                if not self._anyone(batch is not None):
                    break
                if batch is None:
                    self.engine(placeholder)
                    continue
                logits = self.engine(model_input(batch["image"], self.device, self.dtype))
                labels = batch["label"].to(self.device)
                counts[0] += (logits.argmax(dim=-1) == labels).sum()
                counts[1] += labels.numel()
        module.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])
        return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}

    def _anyone(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value[0])

    def _export(self) -> str | None:
        from orchestrator.checkpoint import export_weights

        run = self.run_config
        digest = export_weights(
            self.engine, weights_url(run), staging_dir=os.path.join(self.checkpoints.staging_dir, "export"),
            metadata={"model": run.model, "num_classes": str(run.num_classes), "image_size": str(run.image_size),
                      "step": str(self.step)},
            factory=self.checkpoints.factory,
        )
        if digest is not None:
            self.log(f"exported weights to {weights_url(run)} (sha256 {digest[:12]})")
            from data_pipelines.s3 import DataSourceError
            from data_pipelines.storage import write_bytes

            # The record names the model, so that launch/finetune.py needs nothing else typed.
            record = {"step": self.step, "sha256": digest, "weights": weights_url(run), "model": run.model,
                      "num_classes": run.num_classes, "image_size": run.image_size, "run": run.run_name}
            try:
                write_bytes(weights_record_url(run), json.dumps(record).encode(), self.checkpoints.factory)
            except DataSourceError as error:  # the weights are there; the same command just runs once more
                self.log(f"warning: {error}: the weights' record was not written")
        return digest

    # --- metrics ----------------------------------------------------------------------------

    def _start_metrics(self, local_rank: int, linger: float):
        from model import forward_flops
        from orchestrator.metrics import MetricsError, WorkerMetrics, bind_address, device_peak_flops, metrics_port

        run = self.run_config
        self.metrics_linger = linger
        self.images_seen, self.data_wait = 0, 0.0
        self._uploads_seen, self._committed_seen, self._commit_time = 0.0, None, time.time()
        self.started_at = time.time()
        address, port = bind_address(run.metrics_address), metrics_port(run.metrics_port, local_rank)
        # Trials that share a node run side by side, each with its local rank 0: a trial's
        # worker takes the first free port from its own upwards, within the node's slots.
        tries = METRICS_PORTS_PER_NODE if isinstance(run, TrialConfig) else 1
        for attempt in range(tries):
            try:
                metrics = WorkerMetrics(run.run_name, self.rank, socket.gethostname(), address=address, port=port + attempt)
                break
            except MetricsError as error:
                if attempt + 1 < tries:
                    continue
                self.log(f"warning: {error}; training goes on without serving metrics")
                metrics = WorkerMetrics(run.run_name, self.rank, socket.gethostname(), address=None, port=port)
        # MFU: forward + backward ~ 3 x forward FLOPs per image, from the size table.
        self.flops_per_image = 3 * forward_flops(run.model, run.image_size)
        if run.peak_flops:
            self.peak_flops, source = run.peak_flops, "peak_flops setting"
        else:
            self.peak_flops, source = device_peak_flops(self.device, self.dtype)
        if metrics.url:
            self.log(f"metrics at {metrics.url} (rank {self.rank}); MFU against {self.peak_flops:.3g} FLOP/s ({source})")
        metrics.log({"vitscale_worker_start_time_seconds": time.time(),
                     "vitscale_checkpoint_last_commit_timestamp_seconds": self._commit_time})
        return metrics

    def _announce_start(self) -> None:
        """Rank 0 records that the worker group (re)started, for the driver's restart counter."""
        if self.rank != 0 or not self.under_ray or not self.starts_prefix:  # not run by run_pretraining
            return
        from orchestrator.metrics import WorkerGroupStarts

        WorkerGroupStarts(self.starts_prefix).record()

    def _step_metrics(self, *, loss: float | None = None, lr: float | None = None, seconds: float | None = None) -> None:
        from orchestrator.metrics import accelerator_memory

        checkpoints = self.checkpoints
        values = {
            "vitscale_step": self.step, "vitscale_images_total": self.images_seen,
            "vitscale_nonfinite_steps_total": self.nonfinite_total, "vitscale_rollbacks_total": self.rollbacks,
            "vitscale_samples_skipped_total": self.loader.stats["skipped_samples"] + self.loader.stats["missing_samples"],
            "vitscale_checkpoint_uploaded_bytes_total": checkpoints.uploaded_bytes,
            "vitscale_checkpoint_failures_total": checkpoints.failures_total,
            "vitscale_checkpoint_retention_failures_total": checkpoints.retention_failures_total,
        }
        values["vitscale_accelerator_memory_bytes"], values["vitscale_accelerator_memory_peak_bytes"] = accelerator_memory(self.device)
        if checkpoints.upload_seconds > self._uploads_seen:
            values["vitscale_checkpoint_upload_seconds"] = checkpoints.upload_seconds - self._uploads_seen
            self._uploads_seen = checkpoints.upload_seconds
        if checkpoints.last_committed_step != self._committed_seen:
            self._committed_seen, self._commit_time = checkpoints.last_committed_step, time.time()
        values["vitscale_checkpoint_last_committed_step"] = self._committed_seen or 0
        values["vitscale_checkpoint_last_commit_timestamp_seconds"] = self._commit_time
        if seconds is not None:
            run = self.run_config
            values.update({
                "vitscale_loss": loss, "vitscale_learning_rate": lr, "vitscale_step_seconds": seconds,
                "vitscale_data_wait_seconds": self.data_wait,
                "vitscale_images_per_second": run.global_batch_size / seconds,
                "vitscale_mfu_ratio": self.flops_per_image * run.micro_batch_size * run.gradient_accumulation_steps
                / seconds / self.peak_flops,
            })
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                values["vitscale_grad_norm"] = float(norm)
        self.metrics.log(values, self.step)

    # --- reporting --------------------------------------------------------------------------

    def _log_progress(self, **metrics: float) -> None:
        """A progress line from rank 0 every `log_every` steps (every rank has its Prometheus
        metrics every step)."""
        row = {"step": self.step, "nonfinite_total": self.nonfinite_total, "rollbacks": self.rollbacks,
               "checkpoint_failures_total": self.checkpoints.failures_total,
               "checkpoint_stall_seconds": self.checkpoints.stall_seconds, **metrics}
        self._last_row = row
        if self.history is not None:
            self.history.append({**row, "time": round(time.time(), 3)})
        if self.progress:
            from orchestrator.progress import report

            report(self.progress, row)
        self.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def _write_history(self) -> None:
        """Rank 0: the rows logged and the commits seen since the last part, as one JSON-lines
        part under history/, named by wall time so that a resumed run's parts sort after the
        first attempt's (orchestrator/report.py merges them: a later row of a step wins). A part
        is a few KB: constant work per checkpoint, however long the run."""
        if self.history is None:
            return
        commits = self.checkpoints.commits[self._commits_in_history:]
        if not self.history and not commits:
            return
        from data_pipelines.s3 import DataSourceError
        from data_pipelines.storage import write_bytes

        lines = [json.dumps(row) for row in self.history]
        lines += [json.dumps({"commit": step, "time": round(at, 3)}) for step, at in commits]
        name = f"{time.time_ns() // 1_000_000:015d}-step-{self.step:08d}.jsonl"
        try:
            write_bytes(join_location(history_url(self.run_config), name), ("\n".join(lines) + "\n").encode(),
                        self.checkpoints.factory)
        except DataSourceError as error:  # the run goes on; its report lacks these rows
            self.log(f"warning: {error}: the run's history part was not written")
            return
        self.history.clear()
        self._commits_in_history += len(commits)

    def _report_to_ray(self) -> None:
        """The last progress row to Ray Train (the driver's `result.metrics`), at checkpoints
        and at the end only: `ray.train.report` is a barrier across all ranks, which every few
        steps would cost a large run real time."""
        if not self.under_ray:
            return
        import ray.train

        ray.train.report(getattr(self, "_last_row", None) or {"step": self.step})

    def _record(self, line: str) -> None:
        if self.record_dir:
            with open(os.path.join(self.record_dir, f"rank-{self.rank}.log"), "a") as f:
                f.write(line + "\n")
