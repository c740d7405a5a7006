"""What every Ray worker process of a local Ray runs first, and the Ray Train controller's poll
interval: kept apart from the rest of `orchestrator` so that a Ray worker that trains nothing
(a Tune trial's driver, Ray Train's controller) does not import torch and the run configs for
them (~2.5 s of a process's start on a 2-core machine).
"""

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), so a run's end is seen up to 2 s late: per fine-tuning trial, and per run of a dry
# run or a test. Half a second here; a poll is one small call per worker, and Ray propagates the
# variable from the process that fits the trainer to its controller.
TRAIN_CONTROLLER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def train_controller_env() -> dict[str, str]:
    """TRAIN_CONTROLLER_ENV, less what this process's environment sets already (the user's word wins)."""
    import os

    return {name: os.environ.get(name, value) for name, value in TRAIN_CONTROLLER_ENV.items()}


def quiet_local_workers() -> None:
    """Run in every worker process of the local Ray: Ray Train stops echoing each
    `ray.train.report` (rank 0's progress line says it), and, where a Ray release brings back
    the PlacementGroupCleaner that orchestrator/trainer.py leaves out here, that cleaner (which
    can never reach the state API of a Ray without a dashboard) does not warn every second."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module logs under its file name
