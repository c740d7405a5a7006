"""`ray job submit` against a `ray start` cluster with token authentication, in the shape
k8s/pretrain's RayJob gives KubeRay (a head without CPUs, a worker node, PYTHONPATH on both)."""

import os
import secrets
import shutil
import sys
import tempfile

import pytest
import yaml

from tests.conftest import free_port, kill_session, run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def rayjob_pods() -> tuple[dict, str]:
    """k8s/pretrain's head `rayStartParams` and the PYTHONPATH its Ray containers set."""
    with open(os.path.join(ROOT, "k8s", "pretrain", "rayjob.yaml")) as f:
        cluster = yaml.safe_load(f)["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    (pythonpath,) = {e["value"] for g in groups for e in g["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "PYTHONPATH"}
    return cluster["headGroupSpec"]["rayStartParams"], pythonpath


@pytest.fixture(scope="module")
def head(s3_server, tmp_path_factory):
    """A Ray cluster in the shape k8s/pretrain gives KubeRay, on this machine: a head started with
    the RayJob's head rayStartParams (no CPUs: it holds the driver only) and a worker node with
    the CPUs, both with token auth (what KubeRay's authOptions sets up) and the pods' PYTHONPATH
    (the image's repository there, this checkout here), started outside the repository so that
    nothing is importable from the working directory. Its processes see the S3 server."""
    home = tmp_path_factory.mktemp("ray-home")
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    head_params, pythonpath = rayjob_pods()
    # The fixture starts the head with these (its object store in this machine's /dev/shm).
    assert head_params["num-cpus"] == "0" and set(head_params) <= {"num-cpus", "object-store-memory"}, head_params
    dashboard, gcs = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    # The user's own cache (not the fresh HOME's): DeepSpeed's JIT-built CPU communication op is
    # there already, built by the suite's first engine; in an empty cache each new node's first
    # workers would build it again (~100 s on this 2-core machine).
    env.update(s3_server.environment(), PATH=f"{BIN}:{env.get('PATH', '')}", HOME=str(home),
               XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PYTHONPATH=pythonpath.replace("/home/ray/vitscale", ROOT))
    # Each pod has its own IP and disk; here the second node takes ports and a temp dir of its
    # own (with the head's, the worker node's runtime-env agent would delete the working_dir
    # files the driver runs in when its workers end). Short: Ray's socket paths live under it.
    worker_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Every port either node listens on is picked free (Ray's defaults, e.g. the client server's
    # 10001 and the dashboard agent's 52365, may be taken on a shared machine).
    nodes = [["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
              f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", *(f"--{k}={v}" for k, v in head_params.items())],
             [f"--address=127.0.0.1:{gcs}", "--num-cpus=3", f"--dashboard-agent-listen-port={free_port()}",
              f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
              f"--temp-dir={worker_temp}"]]
    sessions = []
    try:
        for args in nodes:
            start = run_process([f"{BIN}/ray", "start", *args], env=env, cwd=home, capture_output=True, text=True,
                                timeout=180)
            sessions.append(start.pid)  # each node's daemons stay in its `ray start`'s session
            assert start.returncode == 0, start.stdout + start.stderr
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        # Not `ray stop`: it stops every Ray of the machine (a parallel test worker's too).
        for sid in reversed(sessions):
            kill_session(sid)
        shutil.rmtree(worker_temp, ignore_errors=True)


def submit(env, address, *entrypoint, timeout=600, working_dir=True):
    return run_process([f"{BIN}/ray", "job", "submit", "--address", address,
                           *(["--working-dir", "."] if working_dir else []), "--", *entrypoint],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_job_with_the_token_trains(head):
    env, address = head
    out = submit(env, address, "python", "launch/pretrain.py", "--dry-run", "--no-finetune", "--workers", "2",
                 "--max-steps", "4", "--checkpoint-every", "2", "--data", "s3://jobs-bucket/synth",
                 "--checkpoints", "s3://jobs-bucket/runs")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "finished at step 4" in text and "checkpoint step 4 committed" in text
    assert "dry run: embedded S3" not in text   # the cluster's S3 (the nodes' environment), which the workers see
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


PROBE = """
import os, ray
ray.init()

@ray.remote(num_cpus=1)   # a CPU: on the worker node, the head has none
def train_loop_module():
    import orchestrator.train_loop
    return orchestrator.train_loop.__file__, ray.get_runtime_context().get_node_id()

where, node = ray.get(train_loop_module.remote())
print("IMPORTED", where, node != ray.get_runtime_context().get_node_id())
"""


LOCAL = """
from orchestrator.config import resolve_pretrain_config
from orchestrator.pretraining import connect_ray, ray_started_here
ray = connect_ray(resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1}, dry_run=True))
print("OWN RAY", ray_started_here(ray), ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def test_a_direct_run_starts_its_own_ray_beside_a_cluster_that_ray_start_left_on_the_machine(head):
    """Without RAY_ADDRESS a direct run starts a local Ray of its own, also while `ray start`'s
    cluster runs on the machine (ray.init() would join that one, found through
    /tmp/ray/ray_current_cluster, and refuse the run's num_cpus there)."""
    env, _ = head
    alone = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    out = run_process([sys.executable, "-c", LOCAL], env=alone, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OWN RAY True 4.0" in out.stdout, out.stdout + out.stderr[-2000:]  # the dry run's 4, not the cluster's 3


def test_a_job_without_a_working_dir_finds_vitscale_through_the_pods_pythonpath(head):
    """KubeRay's submitter sends the entrypoint alone (no working_dir): the driver and the
    workers on other nodes import vitscale from the image, through the pods' PYTHONPATH."""
    env, address = head
    out = submit(env, address, "python", "-c", PROBE, working_dir=False, timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert f"IMPORTED {os.path.join(ROOT, 'orchestrator', 'train_loop.py')} True" in text


def test_ray_job_stop_stops_the_workers_and_the_job_says_where_the_run_stands(head, s3_server):
    """`ray job stop` sends the driver SIGTERM: it stops the run (its workers on the worker node
    go with it), says which step is committed, and the job ends STOPPED."""
    import json
    import re
    import time

    env, address = head
    job = f"stop-{secrets.token_hex(4)}"
    out = run_process([f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
                          "--submission-id", job, "--", "python", "launch/pretrain.py", "--dry-run", "--no-finetune",
                          "--max-steps", "60", "--checkpoint-every", "5", "--set", "image_size=96",
                          "--set", "metrics_address=off", "--data", "s3://jobs-stop/synth",
                          "--checkpoints", "s3://jobs-stop/runs"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr

    def ray_cli(*args):
        return run_process([f"{BIN}/ray", *args, "--address", address], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    client = s3_server.client_factory().client()
    deadline = time.monotonic() + 300
    while True:  # the second commit, on S3
        assert time.monotonic() < deadline, ray_cli("job", "logs", job).stdout[-3000:]
        try:
            client.head_object(Bucket="jobs-stop", Key="runs/vit-mu-4-jft-300m-dry-run/checkpoints/step-00000010/manifest.json")
            break
        except client.exceptions.ClientError:
            time.sleep(0.1)
    stop = ray_cli("job", "stop", job)
    assert stop.returncode == 0 and "was stopped" in stop.stdout + stop.stderr, stop.stdout + stop.stderr
    logs = ray_cli("job", "logs", job).stdout
    said = re.findall(r"pretrain\.py: interrupted by SIGTERM: the workers were stopped; the last committed checkpoint "
                      r"is step (\d+) in s3://jobs-stop/runs/vit-mu-4-jft-300m-dry-run/checkpoints; the same command "
                      r"resumes the run from its last committed checkpoint", logs)
    assert said and 10 <= int(said[0]) < 60, logs[-3000:]
    deadline = time.monotonic() + 60
    while True:  # the driver's exit ends the run's actors (Ray Train's autoscaling coordinator is the cluster's)
        listed = ray_cli("list", "actors", "--filter", "state=ALIVE", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        alive = [a["class_name"] for a in json.loads(listed.stdout) if a["class_name"] != "_AutoscalingCoordinatorActor"]
        if not alive:
            break
        assert time.monotonic() < deadline, alive
        time.sleep(1)


def test_make_shards_as_a_ray_job_writes_the_shards_with_tasks_on_the_worker_node(head, s3_server, tmp_path):
    """A conversion submitted as users submit it on a cluster: an ImageFolder tree on S3, the
    shards written by Ray tasks, which run on the worker node (the head has no CPUs), and the
    manifest written by the job's driver."""
    import json

    import numpy as np
    from PIL import Image

    bucket = s3_server.create_bucket("shards-job")
    client = s3_server.client_factory().client()
    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(4):
            data = tmp_path / f"{c}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(data)
            client.upload_file(str(data), "shards-job", f"raw/class{c}/img{i}.png")
    env, address = head
    out = submit(env, address, "python", "launch/make_shards.py", "--input", f"{bucket}/raw", "--output",
                 f"{bucket}/shards", "--samples-per-shard", "5", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "wrote 12 samples in 3 shards to s3://shards-job/shards by " in text and " Ray worker" in text, text[-3000:]
    manifest = json.loads(client.get_object(Bucket="shards-job", Key="shards/manifest.json")["Body"].read())
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]
    records = [json.loads(client.get_object(Bucket="shards-job", Key=f"shards/_written/shard-00000{i}.json")["Body"].read())
               for i in range(3)]
    assert [r["sha256"] for r in records] == [s["sha256"] for s in manifest["shards"]]
