"""Which of Ray Train's helpers a run's trainer starts (orchestrator/trainer.py); the actors a
real run makes are checked in test_pretraining.py."""

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from orchestrator.trainer import LocalScalingPolicy, build_trainer


def loop(config):
    pass


def callbacks(local: bool, **kwargs) -> set:
    trainer = build_trainer(loop, train_loop_config={}, scaling_config=ScalingConfig(num_workers=2),
                            run_config=RunConfig(name="t"), local=local)
    assert isinstance(trainer, TorchTrainer)
    trainer.datasets = kwargs.get("datasets", trainer.datasets)
    return {type(c) for c in trainer._create_default_callbacks()}


def test_a_local_ray_gets_no_dataset_manager_nor_placement_group_cleaner():
    kinds = callbacks(local=True)
    assert DatasetsCallback not in kinds and PlacementGroupCleanerCallback not in kinds, kinds


def test_a_joined_cluster_keeps_the_placement_group_cleaner():
    kinds = callbacks(local=False)
    assert PlacementGroupCleanerCallback in kinds and DatasetsCallback not in kinds, kinds


def test_datasets_keep_their_manager():
    assert DatasetsCallback in callbacks(local=True, datasets={"train": object()})


def test_the_local_scaling_policy_requests_nothing_from_an_autoscaler():
    policy = LocalScalingPolicy(ScalingConfig(num_workers=3))
    assert isinstance(policy, FixedScalingPolicy)
    policy.after_controller_start(None)  # the base class would start the coordinator actor here
    assert policy._coordinator_client is None
    decision = policy.make_decision_for_non_running_worker_group()  # the base class asserts a client
    assert decision.num_workers == 3
    assert policy._cancel_resource_request() is None  # the base class would call the coordinator here
    assert policy._coordinator_client is None
