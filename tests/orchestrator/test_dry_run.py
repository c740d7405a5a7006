"""orchestrator/dry_run.py's storage: what a stopped dry run can say about resuming."""

import signal

import botocore.exceptions
import pytest

from data_pipelines.s3 import S3ClientFactory
from orchestrator.config import resolve_pretrain_config
from orchestrator.dry_run import storage_for
from orchestrator.pretraining import Interrupted

S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS")


def _unset(monkeypatch, names):
    for name in names:
        monkeypatch.setenv(name, "x")  # so that monkeypatch puts back what was there, or nothing
        monkeypatch.delenv(name)


def test_a_dry_run_stopped_on_the_embedded_s3_says_its_checkpoints_went_with_it(monkeypatch):
    _unset(monkeypatch, S3_SETTINGS)
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", {}, dry_run=True)
    with pytest.raises(Interrupted) as stopped:
        with storage_for(config, log=lambda line: None) as config:
            factory = S3ClientFactory()
            factory.client().head_bucket(Bucket="vitscale-dry-run")  # the embedded server, up
            raise Interrupted(signal.SIGTERM, "the last committed checkpoint is step 10 in ...")
    assert str(stopped.value) == (
        "interrupted by SIGTERM: the workers were stopped; the last committed checkpoint is step 10 in ...; the "
        "embedded S3 goes with this run, its checkpoints too: to resume a dry run, give it an S3 that stays "
        "(AWS_ENDPOINT_URL and credentials)")
    assert stopped.value.exit_status == 143
    with pytest.raises(botocore.exceptions.EndpointConnectionError):  # and it is gone
        factory.client().head_bucket(Bucket="vitscale-dry-run")


def test_a_dry_run_stopped_on_an_s3_that_stays_says_the_same_command_resumes_it(s3_server, monkeypatch):
    _unset(monkeypatch, S3_SETTINGS)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", {}, dry_run=True)
    with pytest.raises(Interrupted) as stopped:
        with storage_for(config, log=lambda line: None):
            raise Interrupted(signal.SIGINT, "no checkpoint was committed yet in ...")
    assert str(stopped.value).endswith("; the same command resumes the run from its last committed checkpoint")
    assert stopped.value.exit_status == 130
