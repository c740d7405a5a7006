"""The Ray Train trainer a pretraining run fits: Ray Train's TorchTrainer, less the helper
actors this run has no use for.

Ray Train (v2) starts, besides the training workers, a controller and a few helper actors,
each in a Ray worker process of its own (~80 MB, a second or two of CPU to start, and ~1% of a
core all run long: every Ray worker's main thread wakes 100 times a second). Three of them do
nothing for a vitscale run:

- `DatasetManager` (Ray Train's DatasetsCallback): serves shards of Ray Data datasets. A run
  streams webdataset shards itself and passes no `datasets`, so it is left out whenever there
  are none, on any cluster.
- `PlacementGroupCleaner`: frees the run's placement group when the controller dies while the
  cluster lives on. A local Ray that this process started goes with it, so there it is left
  out; a run that joined a cluster keeps it.
- `_AutoscalingCoordinatorActor` (the fixed scaling policy's resource requests): tells a
  cluster autoscaler what the run needs. A local Ray has no autoscaler; a joined cluster keeps
  the requests.

On a 2-core machine, a 2-worker run whose workers only report once, from `fit()` to its
result in a fresh local Ray: 16.7-17.4 s and 7 actors with them, 9.4-11.3 s and 4 actors
without (benchmarks/run_startup.py).

A trainer given a `fatal_key` also carries `NoRetryOnFatal`, a controller callback: Ray Train's
failure policy restarts the worker group on any worker error, up to `max_failures`; when a rank
has reported an error that a restart cannot cure (progress.report_fatal: a refusal from S3, a
staging disk too small, a run that diverged before its first checkpoint), the callback turns
that retry into a controller error, which the policy never retries: `fit` raises at once. (A
pretraining driver stops its run on the same report itself: orchestrator/progress.py.)

These are Ray Train's internal classes (`ray==2.60`, the version constraints.txt pins). Where
a Ray release moves them, `build_trainer` falls back to the plain TorchTrainer with every
helper, and tests/orchestrator/test_pretraining.py fails on the helpers it then finds.
"""

from typing import Any, Callable

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
except ImportError:  # another Ray: the plain TorchTrainer
    FixedScalingPolicy = None


class NotRetried(RuntimeError):
    """A rank's error that restarting the workers cannot cure: its one line."""


class TrialFailed(RuntimeError):
    """A fine-tuning trial that kept failing past its restarts: its first failing rank's line."""


if FixedScalingPolicy is not None:

    class LocalScalingPolicy(FixedScalingPolicy):
        """The fixed scaling policy without its requests to a cluster autoscaler (a local Ray
        has none), hence without the coordinator actor that would take them."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class NoRetryOnFatal(ControllerCallback):
        """In the run's controller: a retry of the worker group becomes a controller error
        (raised here: Ray Train's policy does not retry those) once a rank has reported a
        fatal line under `key`."""

        def __init__(self, key: str):
            self.key = key

        def before_controller_execute_failure_decision(self, failure_decision) -> None:
            from orchestrator.progress import fatal_reported

            if failure_decision == FailureDecision.RETRY and (line := fatal_reported(self.key)):
                raise NotRetried(line)

    class LeanTorchTrainer(TorchTrainer):
        """TorchTrainer without the helpers above: no DatasetManager when there are no
        datasets; on a local Ray (`local=True`) no PlacementGroupCleaner and no autoscaler
        coordinator either; with `fatal_key`, NoRetryOnFatal."""

        def __init__(self, *args, local: bool, fatal_key: str | None = None, **kwargs):
            self._local, self._fatal_key = local, fatal_key
            super().__init__(*args, **kwargs)

        def _create_default_callbacks(self):
            def wanted(callback) -> bool:
                if isinstance(callback, DatasetsCallback):
                    return bool(self.datasets)
                return not (self._local and isinstance(callback, PlacementGroupCleanerCallback))

            kept = [c for c in super()._create_default_callbacks() if wanted(c)]
            return kept + ([NoRetryOnFatal(self._fatal_key)] if self._fatal_key else [])

        def _initialize_and_run_controller(self, **kwargs):
            if self._local and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)


def _knows_this_ray() -> bool:
    return FixedScalingPolicy is not None and all(
        hasattr(TorchTrainer, name) for name in ("_create_default_callbacks", "_initialize_and_run_controller"))


def build_trainer(train_loop: Callable[[dict], Any], *, train_loop_config: dict, scaling_config, run_config,
                  local: bool, fatal_key: str | None = None) -> TorchTrainer:
    """A TorchTrainer for `train_loop`; `local` says that the Ray it runs on is one this
    process started (and that goes with it); `fatal_key`: where ranks report fatal errors
    (NoRetryOnFatal; the same key as train_loop_config's "fatal")."""
    kwargs = dict(train_loop_config=train_loop_config, scaling_config=scaling_config, run_config=run_config)
    if not _knows_this_ray():
        return TorchTrainer(train_loop, **kwargs)
    return LeanTorchTrainer(train_loop, local=local, fatal_key=fatal_key, **kwargs)
