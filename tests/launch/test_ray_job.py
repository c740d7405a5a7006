"""`ray job submit` against a `ray start --head` cluster with token authentication."""

import os
import secrets
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(s3_server, tmp_path_factory):
    """A Ray head with token auth; its processes (and so the jobs' workers) see the S3 server."""
    home = tmp_path_factory.mktemp("ray-home")
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(s3_server.environment(), PATH=f"{BIN}:{env.get('PATH', '')}", HOME=str(home),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    start = subprocess.run([f"{BIN}/ray", "start", "--head", "--num-cpus", "3", f"--port={free_port()}",
                            f"--dashboard-port={dashboard}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    yield env, f"http://127.0.0.1:{dashboard}"
    subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(env, address, *entrypoint, timeout=600):
    return subprocess.run([f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                           *entrypoint], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_job_with_the_token_trains(head):
    env, address = head
    out = submit(env, address, "python", "launch/pretrain.py", "--dry-run", "--no-finetune", "--workers", "2",
                 "--max-steps", "4", "--checkpoint-every", "2", "--data", "s3://jobs-bucket/synth",
                 "--checkpoints", "s3://jobs-bucket/runs")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "finished at step 4" in text and "checkpoint step 4 committed" in text
    assert "succeeded" in text


def test_job_without_the_token_is_refused(head, tmp_path):
    env, address = head
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    out = submit(anonymous, address, "python", "-c", "print('should not run')", timeout=120)
    assert out.returncode != 0
    assert "Authentication required" in out.stdout + out.stderr
    assert "should not run" not in out.stdout
    wrong = dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "wrong"))
    (tmp_path / "wrong").write_text(secrets.token_hex(32))
    out = submit(wrong, address, "python", "-c", "print('should not run')", timeout=120)
    assert out.returncode != 0 and "Invalid authentication token" in out.stdout + out.stderr
