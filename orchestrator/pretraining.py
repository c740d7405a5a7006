"""The driver side of a pretraining run: preflight, then Ray Train runs `train_loop` everywhere.

    python launch/pretrain.py --model ViT-B/16 --dataset JFT-300M --data s3://b/train \
        --checkpoints s3://b/runs --workers 64 --gpus-per-worker 1

Inside `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; run directly it starts
a local Ray. Everything a run needs is checked before any worker is scheduled; a problem is a
`PreflightError`, one line, which the entry point turns into exit status 2.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import time
from typing import Callable

from orchestrator.config import ConfigError, PretrainConfig
from orchestrator.ray_workers import train_controller_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PreflightError(ConfigError):
    """The run cannot start: data, checkpoint location or cluster resources (exit status 2)."""


class TrainingError(RuntimeError):
    """Training started but did not finish (exit status 1)."""

    exit_status = 1


class Interrupted(TrainingError):
    """A signal stopped the run: Ctrl-C (SIGINT), `ray job stop` or a pod's deletion (SIGTERM), a
    closed terminal (SIGHUP). Exit status 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int, stood: str, hint: str = "the same command resumes the run from its last "
                                                            "committed checkpoint"):
        self.signum, self.stood, self.hint = signum, stood, hint
        self.exit_status = 128 + signum
        super().__init__()

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}: the workers were stopped; {self.stood}; {self.hint}"


# What stops a run, besides SIGKILL (signals_stop_the_run).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# The GCS address of the local Ray that `connect_ray` started in this process, if it did.
_started_here: str | None = None


def check_locations(config: PretrainConfig) -> PretrainConfig:
    """Data readable and consistent with the config, checkpoints writable; returns the config
    with the class count taken from the data's manifest unless it was set explicitly."""
    from data_pipelines.preflight import check_readable, check_writable
    from data_pipelines.s3 import DataSourceError

    if not config.data:
        raise PreflightError("no training data: pass --data (a folder or s3://bucket/prefix with shards)")
    if not config.checkpoints:
        raise PreflightError("no checkpoint location: pass --checkpoints (a folder or s3://bucket/prefix)")
    try:
        manifest = check_readable(config.data)
        check_writable(config.checkpoints)
    except DataSourceError as error:
        raise PreflightError(str(error)) from None
    classes = len(manifest.class_names)
    if config.objective == "supervised" and manifest.label_kind == "none":
        raise PreflightError(f"{config.data} holds unlabeled data; supervised training needs labels "
                             f"(or use --objective masked-patch)")
    if config.objective == "supervised" and classes:
        multi_label = manifest.label_kind == "multi_label"
        if multi_label != config.multi_label:
            kind = "multi-label" if multi_label else "single-label"
            raise PreflightError(f"{config.data} holds {kind} data but {config.dataset} is trained as "
                                 f"{'multi' if config.multi_label else 'single'}-label; set --set multi_label={str(multi_label).lower()}")
        if "num_classes" in config.overrides and config.num_classes != classes:
            raise PreflightError(f"num_classes={config.num_classes} but {config.data} has {classes} classes")
        if config.num_classes != classes:
            config = config.model_copy(update={"num_classes": classes})
    return config


def connect_ray(config: PretrainConfig):
    """Join the cluster this runs in (a Ray job, or RAY_ADDRESS), else start a local Ray."""
    global _started_here
    import ray

    if ray.is_initialized():
        return ray
    _started_here = None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", logging_level="WARNING", log_to_driver=True)
    else:
        # A local Ray for direct runs, with the repository on the workers' import path. A dry
        # run may oversubscribe this machine's cores (2 workers on a 2-core laptop); a real run
        # gets what the machine has, so the resource check below means something.
        cpus = os.cpu_count() or 1
        if config.dry_run:
            # Room for the workers and the driver, and for two fine-tuning trials at once and a
            # third getting ready (finetuning.concurrency): a trial spends seconds starting its
            # processes, time the others train in (a whole dry run, 28 trials: 12.4 -> 9.8 min
            # on a 2-core machine with 2 at once and no third).
            cpus = max(cpus, math.ceil(config.workers * config.cpus_per_worker) + 1, 4)
        # No dashboard: with it the orchestrated step was 5% slower on a 2-core machine
        # (train_step_vs_bare_deepspeed 0.95 -> 0.90). Ray Train's PlacementGroupCleaner,
        # which would ask the dashboard's state API, is not started on this Ray (it goes with
        # this process; orchestrator/trainer.py), nor are the other helpers a run has no use for.
        # Ray Train's PreemptionWatcher is off: a one-machine Ray goes with its machine, so a
        # preemption notice is nothing to act on, and each idle Ray process costs ~1% of a core
        # here (its main thread wakes 100 times a second). For the same reason no worker is
        # prestarted for the driver's tasks: a run creates only actors, each in a process of
        # its own, so that worker sat idle all run long (and took ~80 MB).
        # address="local": a new Ray of its own, also where `ray start` left a cluster running on
        # this machine (ray.init() would join that one through /tmp/ray/ray_current_cluster, and
        # refuse num_cpus there); joining a cluster is what RAY_ADDRESS says.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
                 _system_config={"prestart_worker_first_driver": False},
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                          **train_controller_env()},
                              "worker_process_setup_hook": "orchestrator.ray_workers.quiet_local_workers"})
        _started_here = ray.get_runtime_context().gcs_address
    return ray


def ray_started_here(ray) -> bool:
    """Whether the Ray this process is connected to is the local one `connect_ray` started
    (and which goes with this process), not a cluster it joined."""
    return ray.is_initialized() and _started_here is not None and ray.get_runtime_context().gcs_address == _started_here


def check_resources(config: PretrainConfig, ray) -> None:
    available = ray.cluster_resources()
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    want_cpus, want_gpus = config.workers * config.cpus_per_worker, config.workers * config.gpus_per_worker
    if want_gpus > gpus or want_cpus > cpus:
        raise PreflightError(
            f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs; this run asks for {config.workers} workers x "
            f"({config.cpus_per_worker:g} CPU, {config.gpus_per_worker:g} GPU) = {want_cpus:g} CPUs and {want_gpus:g} GPUs"
        )


def start_driver_metrics(config: PretrainConfig, starts, log: Callable[[str], None]):
    """The driver's exporter; its restart counter reads `starts` (WorkerGroupStarts)."""
    from orchestrator.metrics import DriverMetrics, MetricsError, bind_address, metrics_port

    kwargs = dict(model=config.model, dataset=config.dataset, workers=config.workers, starts=starts.count,
                  port=metrics_port(config.metrics_port, None))
    try:
        metrics = DriverMetrics(config.run_name, address=bind_address(config.metrics_address), **kwargs)
    except MetricsError as error:
        log(f"warning: {error}; the run goes on without the driver's metrics")
        metrics = DriverMetrics(config.run_name, address=None, **kwargs)
    if metrics.url:
        log(f"driver metrics at {metrics.url}")
    return metrics


def run_pretraining(config: PretrainConfig, *, log: Callable[[str], None] = print,
                    record_dir: str | None = None, nan_loss_at: dict[int, int] | None = None,
                    nan_grad_at: dict[int, int] | None = None, metrics_linger: float = 0.0,
                    fault: dict | None = None) -> dict:
    """Preflight, then train; returns the last metrics reported by rank 0 (or, for a run that is
    finished already, {"step", "nothing_to_train": True}, and nothing is scheduled).

    While it trains, the driver serves its own metrics (run info, workers, restarts) on
    `metrics_port`; each worker serves its own (orchestrator/metrics.py).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from orchestrator.metrics import WorkerGroupStarts
    from orchestrator.progress import progress_bar
    from orchestrator.train_loop import checkpoint_url, staging_dir_for, train_loop, worker_config
    from orchestrator.trainer import build_trainer

    config = check_locations(config)
    if config.finetune and config.finetune_data:
        from orchestrator.finetuning import check_for_pretraining

        check_for_pretraining(config)
    finished = finished_run(config)
    if finished is not None:  # the same command again: nothing is scheduled
        log(f"nothing to train: the run finished at step {finished['step']} (its last checkpoint; it stops at step "
            f"{config.steps}: raise --max-steps or --epochs to go on); its weights: {finished['weights']} "
            f"(sha256 {finished['sha256'][:12]})")
        return {"step": finished["step"], "nothing_to_train": True}
    check_resume(config)
    lease = _take_the_run(config, log)  # before any cluster resource: one driver per run
    try:
        ray = connect_ray(config)  # a local Ray puts its own SIGTERM handler in place: ours go in after
        with signals_stop_the_run() as received:
            check_resources(config, ray)
            log(f"run {config.run_name}: {config.workers} workers, checkpoints in {checkpoint_url(config)}")
            starts = WorkerGroupStarts.for_run(config.run_name)
            driver_metrics = start_driver_metrics(config, starts, log)
            resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})}
            staging = staging_dir_for(config)
            with progress_bar(ray, config.run_name, total=config.steps, initial=last_committed_step(config)) as progress:
                trainer = build_trainer(
                    train_loop,
                    train_loop_config=worker_config(config, staging_dir=staging, record_dir=record_dir, nan_loss_at=nan_loss_at,
                                                    nan_grad_at=nan_grad_at, metrics_linger=metrics_linger, fail_at_step=fault,
                                                    starts_prefix=starts.prefix, progress=progress),
                    scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpus_per_worker > 0,
                                                 resources_per_worker=resources),
                    run_config=RunConfig(name=config.run_name, failure_config=FailureConfig(max_failures=config.max_failures),
                                         storage_path=os.path.join(tempfile.gettempdir(), "vitscale-ray-results")),
                    local=ray_started_here(ray),
                )
                try:
                    result = trainer.fit()
                except (KeyboardInterrupt, SystemExit):
                    if progress.fatal or lease.lost:  # not a signal: progress.py or the lease aborted the run
                        raise TrainingError(f"training failed, not retried: {progress.fatal or lease.lost}") from None
                    # A stop signal (signals_stop_the_run), or Ctrl-C through Ray Train's own handler,
                    # which aborts the controller and then makes ray.get raise SystemExit.
                    signum = received[0] if received else signal.SIGINT
                    if ray_started_here(ray):
                        # Now, not at exit: when the signal reached the whole process group (systemd,
                        # Slurm), Ray's GCS and raylet died of it too, and the controller, still alive,
                        # started the workers again; shut down at exit, the driver then waited 60 s for
                        # the GCS and left those workers running. Here: 1.4 s (8 s without a GCS).
                        ray.shutdown()
                    raise Interrupted(signum, where_it_stands(config)) from None
                except Exception as error:  # ray.train.TrainingFailedError and its kin
                    raise TrainingError(f"training failed: {failure_line(error)}") from error
                finally:
                    if metrics_linger and not received:  # for a last scrape; not when told to stop
                        time.sleep(metrics_linger)
                    driver_metrics.close()
                    starts.clear()
    finally:
        lease.release()
    if result.error is not None:
        raise TrainingError(f"training failed: {failure_line(result.error)}")
    # Rank 0's last progress row, as the bar took it at the end (Ray Train v2's result.metrics
    # is None when the workers reported without a checkpoint).
    return dict(progress.last or result.metrics or {})


def failure_line(error: BaseException) -> str:
    """One line for a failed Ray Train run: the first failing rank's own error (Ray Train's
    WorkerGroupError says only "Training failed due to worker errors:" on its first line)."""
    for rank, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        cause = getattr(failure, "_base_exc", None) or failure  # Ray Train's UserExceptionWithTraceback
        first = (str(cause).strip().splitlines() or [""])[0]
        return f"rank {rank}: {type(cause).__name__}: {first}" if first else f"rank {rank}: {type(cause).__name__}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _take_the_run(config: PretrainConfig, log: Callable[[str], None]):
    """The run's lease (orchestrator/lease.py), renewed while this driver lives; PreflightError
    naming the driver that holds it. A lease taken over later (this driver stopped renewing
    for its whole ttl) stops this run as Ctrl-C does, with that line."""
    from data_pipelines.s3 import join_location
    from orchestrator.lease import LeaseUnavailable, hold
    from orchestrator.train_loop import run_url

    try:
        return hold(join_location(run_url(config), "lease.json"), what=f"run {config.run_name}", log=log)
    except LeaseUnavailable as error:
        raise PreflightError(str(error)) from None


@contextlib.contextmanager
def signals_stop_the_run():
    """From joining Ray to the end of training: SIGTERM and SIGHUP stop the run as Ctrl-C does.

    Each raises KeyboardInterrupt in the driver, which leaves `fit` (run_pretraining then shuts
    a local Ray down; a joined cluster ends the job's actors, the workers among them, when its
    driver goes). What was committed stays committed. Ctrl-C inside `fit` is Ray Train's: its
    handler asks the controller to abort first. Without this, SIGTERM met Ray's own handlers: a
    local Ray's node killed its processes and the driver then aborted (exit 134, Ray's dashboard
    and runtime-env agents left running for good, ~200 MB); a driver that joined a cluster
    exited at once, silently. Handing SIGTERM to Ray Train's abort as well was tried: when the
    signal reached the whole process group, Ray's GCS was gone and the abort waited 60 s for
    it. The signals received are listed in the yielded list; the previous handlers come back
    after. Outside the main thread (no signals there) it does nothing.
    """
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def finished_run(config: PretrainConfig) -> dict | None:
    """The record of the run's exported weights ({"step", "sha256", "weights"}) when the run is
    finished: those weights are of its newest committed checkpoint, and that step is where the
    config stops, or past it. None otherwise (also when no record can be read)."""
    import json

    from data_pipelines.s3 import DataSourceError
    from data_pipelines.storage import read_bytes
    from orchestrator.checkpoint import committed_steps
    from orchestrator.train_loop import checkpoint_url, weights_record_url

    try:
        record = json.loads(read_bytes(weights_record_url(config)))
        record = {"step": int(record["step"]), "sha256": str(record["sha256"]), "weights": str(record["weights"])}
        steps = committed_steps(checkpoint_url(config))
    except (DataSourceError, ValueError, KeyError, TypeError):  # none yet, or unreadable: the workers decide
        return None
    return record if steps and steps[-1] == record["step"] >= config.steps else None


def check_resume(config: PretrainConfig) -> None:
    """PreflightError when the run's newest checkpoint was trained with other training settings
    (config.TRAINING_FIELDS: a changed LR, schedule, batch, model, data or seed), unless
    `resume_with_changes` is set; nothing for a fresh run or one whose manifest cannot be read
    now (the workers will say why)."""
    from data_pipelines.s3 import DataSourceError
    from orchestrator.checkpoint import CheckpointManager
    from orchestrator.config import TRAINING_FIELDS
    from orchestrator.train_loop import checkpoint_url

    if config.resume_with_changes:
        return
    try:
        manager = CheckpointManager(checkpoint_url(config), staging_dir=tempfile.gettempdir())
        steps = manager.committed_steps()
        if not steps:
            return
        saved = manager.read_manifest(steps[-1]).config
    except (DataSourceError, ValueError):
        return
    now = config.model_dump(mode="json")
    changed = [f for f in TRAINING_FIELDS if f in saved and saved[f] != now[f]]
    if changed:
        listed = ", ".join(f"{f}={saved[f]!r} (now {now[f]!r})" for f in changed)
        raise PreflightError(f"run {config.run_name} resumes from step {steps[-1]}, trained with {listed}: resume with "
                             f"those settings, give this config another --set run_name=..., or --set "
                             f"resume_with_changes=true to go on with the new ones")


def last_committed_step(config: PretrainConfig) -> int:
    """The step of the run's newest committed checkpoint, where a resumed run starts; 0 when it
    has none, or its checkpoints cannot be listed now (the workers will say why)."""
    from orchestrator.checkpoint import committed_steps
    from orchestrator.train_loop import checkpoint_url

    try:
        steps = committed_steps(checkpoint_url(config))
    except Exception:
        return 0
    return steps[-1] if steps else 0


def where_it_stands(config: PretrainConfig) -> str:
    """The run's last committed checkpoint, said for someone who just stopped it."""
    from orchestrator.checkpoint import committed_steps
    from orchestrator.train_loop import checkpoint_url

    url = checkpoint_url(config)
    try:
        steps = committed_steps(url)
    except Exception as error:  # the store is unreachable now: say so, do not hide the interruption
        return f"its checkpoints in {url} could not be listed ({type(error).__name__})"
    return f"the last committed checkpoint is step {steps[-1]} in {url}" if steps else f"no checkpoint was committed yet in {url}"
