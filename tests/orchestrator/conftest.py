"""Shared by the orchestrator tests: checkpoint prefixes, the local Ray cluster, run configs."""

import itertools
import os

import pytest

from data_pipelines.synthetic import write_synthetic
from orchestrator.config import resolve_pretrain_config
from orchestrator.pretraining import connect_ray

SAMPLES = 512
_numbers = itertools.count()


@pytest.fixture
def run_url(s3_server):
    """A fresh, empty checkpoint prefix per test."""
    bucket = s3_server.create_bucket("vitscale-checkpoints")
    return f"{bucket}/run-{next(_numbers)}/checkpoints"


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A local Ray whose workers see the embedded S3 through the standard AWS variables."""
    saved = dict(os.environ)
    os.environ.update(s3_server.environment())
    bucket = s3_server.create_bucket("vitscale-pretraining")
    data = f"{bucket}/synth"
    write_synthetic("multi_label", data, num_samples=SAMPLES, num_classes=10, image_size=48, samples_per_shard=64)
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 2, "data": data}, dry_run=True)
    ray = connect_ray(config)
    yield bucket, data
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def config_for(cluster, name, **overrides):
    bucket, data = cluster
    values = {"workers": 2, "data": data, "checkpoints": f"{bucket}/runs", "run_name": name, "max_steps": 24,
              "checkpoint_every": 8, "log_every": 4, "train_examples": SAMPLES, "global_batch_size": 32,
              "micro_batch_size": 8, "warmup_steps": 3, "base_lr": 3e-3, "data_workers": 1, "max_failures": 2,
              "epochs": 2}
    return resolve_pretrain_config("ViT-B/16", "JFT-300M", values | overrides, dry_run=True)
