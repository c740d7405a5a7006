"""Fixtures shared by every test folder: one real S3 server (SeaweedFS on 127.0.0.1) per session.

The suite runs in two pytest-xdist workers (pyproject: `-n 2 --dist loadfile`, each test file
whole in one of them): most of a test's time here is spent waiting (processes starting, Ray's
polls, S3 round trips), not computing. Each worker gets a temporary folder of its own (the
staging disk, Ray Train's and Tune's result folders, Ray's sessions live under it) and a range
of ports of its own (orchestrator.local_prometheus.free_ports: VITSCALE_PORTS).
"""

import os
import signal
import subprocess
import tempfile

import pytest

_worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist
if _worker and _worker[2:].isdigit():
    _index, _count = int(_worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _folder = os.path.join(tempfile.gettempdir(), f"vitscale-tests-{_worker}")
    os.makedirs(_folder, exist_ok=True)
    os.environ["TMPDIR"] = _folder
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    _span = (30000 - 20000) // max(_count, 1)  # below the kernel's ephemeral range (32768 on Linux)
    os.environ["VITSCALE_PORTS"] = f"{20000 + _index * _span}-{20000 + (_index + 1) * _span - 1}"

from data_pipelines.embedded_s3 import EmbeddedS3  # noqa: E402
from orchestrator.local_prometheus import free_ports  # noqa: E402

_handed_out: set[int] = set()


# The test files that take longest here (minutes each; `--durations`), first: the two xdist
# workers take files in collection order, and a long file started last would run alone at the end.
LONGEST_FIRST = ("orchestrator/test_pretraining.py", "launch/test_pretrain_cli.py", "orchestrator/test_checkpoint.py",
                 "orchestrator/test_finetuning.py", "launch/test_ray_job.py", "orchestrator/test_metrics.py",
                 "orchestrator/test_engine.py", "data_pipelines/test_shard_writer.py", "model/test_timm_logits.py",
                 "orchestrator/test_universal.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order stays


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
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    done.pid = process.pid  # its session's id: what it left running (daemons) is found by it
    return done


def processes_in_session(sid: int) -> list[str]:
    """'pid command line' of every process of the session `sid` (a child started with
    start_new_session: its pid), e.g. the daemons `ray start` left running."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    with open(f"/proc/{pid}/cmdline") as g:
                        left.append(f"{pid} {g.read().replace(chr(0), ' ')[:100]}")
        except (OSError, IndexError, ValueError):
            pass
    return left


def kill_session(sid: int, grace: float = 10.0) -> None:
    """SIGTERM to every process of the session, SIGKILL to those still there after `grace`:
    a Ray that a test started with `ray start` goes, and no other (`ray stop` stops every Ray
    of the machine, a parallel test worker's included)."""
    import time

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for line in processes_in_session(sid):
            try:
                os.kill(int(line.split()[0]), signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while processes_in_session(sid) and time.monotonic() < deadline:
            time.sleep(0.1)


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
