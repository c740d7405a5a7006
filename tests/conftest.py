"""Fixtures shared by every test folder: one real S3 server (SeaweedFS on 127.0.0.1) per session."""

import pytest

from data_pipelines.embedded_s3 import EmbeddedS3
from orchestrator.local_prometheus import free_ports

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range and not handed out by this
    function before. With a port the kernel picked (bind to 0), Ray's own connections, made from
    that range meanwhile, once took the port a test's `ray start --head` was given for its
    dashboard before the dashboard bound it ("address already in use": the Ray job tests' cluster
    did not start)."""
    while (port := free_ports(1)) in _handed_out:
        pass
    _handed_out.add(port)
    return port


@pytest.fixture(scope="session")
def s3_server():
    # The data folder is thrown away, so a short SIGTERM grace (then SIGKILL) keeps teardown quick.
    with EmbeddedS3(grace_seconds=2) as server:
        yield server
