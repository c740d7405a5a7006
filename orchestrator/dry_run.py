"""`make dry-run`: the whole pipeline on one machine, with an embedded S3 unless one is set.

    python launch/pretrain.py --dry-run [--workers 2] [--max-steps 12] [--data s3://b/synth] ...

The debug twin of the recipe (orchestrator/config.py DRY_RUN) trains through the real path:
synthetic webdataset shards on S3 (written first when `--data` holds none), Ray Train
workers running DeepSpeed, checkpoints committed to S3, weights exported at the end. With no
S3 endpoint configured (AWS_ENDPOINT_URL), a SeaweedFS server is started on 127.0.0.1 for the
run and stopped after it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

from orchestrator.config import PretrainConfig

BUCKET = "vitscale-dry-run"
NOT_BUILT_YET = ("Prometheus metrics", "the fine-tuning fan-out")


@contextlib.contextmanager
def storage_for(config: PretrainConfig, log: Callable[[str], None]):
    """The config with data and checkpoint locations filled in, an S3 server running if needed."""
    updates = {"data": config.data or f"s3://{BUCKET}/synth", "checkpoints": config.checkpoints or f"s3://{BUCKET}/runs"}
    uses_s3 = any(url.startswith("s3://") for url in updates.values())
    server = None
    if uses_s3 and not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        from data_pipelines.embedded_s3 import EmbeddedS3

        server = EmbeddedS3().start()
        os.environ.update(server.environment())  # inherited by the local Ray and its workers
        log(f"dry run: embedded S3 (SeaweedFS) at {server.endpoint_url}")
    try:
        for url in updates.values():
            if url.startswith("s3://"):
                _ensure_bucket(url)
        yield config.model_copy(update=updates)
    finally:
        if server is not None:
            server.stop()


def _ensure_bucket(url: str) -> None:
    """The dry run makes its buckets; a real run only checks them (preflight)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from data_pipelines.s3 import S3ClientFactory, describe_client_error, parse_s3_url
    from orchestrator.pretraining import PreflightError

    client, bucket = S3ClientFactory().client(), parse_s3_url(url).bucket
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            client.create_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as error:
        raise PreflightError(describe_client_error(error, f"s3://{bucket}")) from None


def ensure_shards(config: PretrainConfig, log: Callable[[str], None]) -> None:
    """Write the synthetic set to `config.data` unless a manifest is already there."""
    from data_pipelines.manifest import load_shard_list
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.synthetic import write_synthetic

    try:
        load_shard_list(config.data)
        return
    except DataSourceError:
        pass
    kind = "multi_label" if config.multi_label else "classification"
    if config.objective == "masked-patch":
        kind = "unlabeled"
    summary = write_synthetic(kind, config.data, num_samples=config.train_examples, num_classes=config.num_classes,
                              image_size=2 * config.image_size, samples_per_shard=128)
    log(f"dry run: wrote {kind} shards to {config.data}: {summary.line()}")


def run(config: PretrainConfig, log: Callable[[str], None] = print) -> dict:
    from orchestrator.pretraining import run_pretraining

    with storage_for(config, log) as config:
        ensure_shards(config, log)
        metrics = run_pretraining(config, log=log)
    log("dry run: not built yet, so not run: " + "; ".join(NOT_BUILT_YET))
    return metrics
