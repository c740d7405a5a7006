"""Fixtures shared by every test folder: one real S3 server (SeaweedFS on 127.0.0.1) per session."""

import pytest

from data_pipelines.embedded_s3 import EmbeddedS3


@pytest.fixture(scope="session")
def s3_server():
    # The data folder is thrown away, so a short SIGTERM grace (then SIGKILL) keeps teardown quick.
    with EmbeddedS3(grace_seconds=2) as server:
        yield server
