"""Fixtures shared by every test folder: one real S3 server (SeaweedFS on 127.0.0.1) per session."""

import os
import signal
import subprocess

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


def run_process(args, *, timeout: float, capture_output: bool = False, text: bool = False, input=None,
                **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, the child in a session of its own: when it outlives `timeout`, its whole
    process group is killed (a CLI's local Ray, its S3 server, its workers), not only the child
    as subprocess.run does, and TimeoutExpired is raised with what it printed."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with subprocess.Popen(args, start_new_session=True, text=text, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(pid: int) -> None:
    """SIGKILL to the process group `pid` leads (a child started with start_new_session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_server():
    # The data folder is thrown away, so a short SIGTERM grace (then SIGKILL) keeps teardown quick.
    with EmbeddedS3(grace_seconds=2) as server:
        yield server
