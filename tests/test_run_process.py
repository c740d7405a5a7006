"""The tests' subprocess helper: a child that outlives its timeout takes its own children with it."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import run_process

# A child that starts a grandchild (as a CLI starts its local Ray and S3 server), prints its pid
# and then hangs.
HANGS = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
         "print(child.pid, flush=True); time.sleep(600)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waits for its parent only: gone all the same
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_timeout_kills_the_whole_process_group_and_says_what_it_printed():
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_process([sys.executable, "-c", HANGS], timeout=3, capture_output=True, text=True)
    grandchild = int(caught.value.output.split()[0])
    deadline = time.monotonic() + 10
    while alive(grandchild):
        assert time.monotonic() < deadline, f"grandchild {grandchild} outlived its group's kill"
        time.sleep(0.05)


def test_a_process_that_ends_in_time_is_returned_as_subprocess_run_returns_it():
    done = run_process([sys.executable, "-c", "import sys; print(sys.stdin.read().upper()); sys.exit(3)"],
                       timeout=60, capture_output=True, text=True, input="hello")
    assert (done.returncode, done.stdout, done.stderr) == (3, "HELLO\n", "")
