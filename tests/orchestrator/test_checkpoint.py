"""CheckpointManager against a real S3 server (SeaweedFS) and real DeepSpeed on gloo, 2 ranks."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from data_pipelines.s3 import parse_s3_url
from data_pipelines.storage import read_bytes
from data_pipelines.transfer import list_prefix
from tests.conftest import free_port
from tests.faultproxy import FaultProxy

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_worker.py")


def start_ranks(s3_server, world, *args, environment=None):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, **(s3_server.environment() | (environment or {})), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def finish(procs, timeout=240):
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:  # a hung rank: none of them outlives the test
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return [p.returncode for p in procs], outputs


def run_ranks(s3_server, world, *args, environment=None):
    codes, outputs = finish(start_ranks(s3_server, world, *args, environment=environment))
    assert codes == [0] * world, "\n".join(o[-3000:] for o in outputs)
    return outputs


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b):
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=0, atol=0)
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for name in a["optimizer"]:
        torch.testing.assert_close(a["optimizer"][name], b["optimizer"][name], rtol=0, atol=0)
    assert a["global_steps"] == b["global_steps"]
    assert a["loader_state"] == b["loader_state"]
    torch.testing.assert_close(a["rng_draw"], b["rng_draw"], rtol=0, atol=0)


def client(s3_server):
    return s3_server.client_factory().client()


# Stages 1 and 3: stage 2 saves and loads through the same code as stage 1 (DeepSpeed's
# stage_1_and_2.py, and ours: only stage 3 is told apart), and trains to a commit in
# test_pretraining.py's test_loss_falls_with_two_workers[2].
@pytest.mark.parametrize("stage", [1, 3])
def test_save_then_resume_gives_identical_state(s3_server, run_url, tmp_path, stage):
    dumps = tmp_path / "dumps"
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", dumps,
              "--zero-stage", stage, "--steps", 4, "--save-at", "2,4")
    # Both steps committed: each manifest's files are there with the stated size and sha256.
    found = list_prefix(run_url, s3_server.client_factory())
    for step in (2, 4):
        location = parse_s3_url(f"{run_url}/step-{step:08d}/manifest.json")
        manifest = json.loads(client(s3_server).get_object(Bucket=location.bucket, Key=location.prefix)["Body"].read())
        assert (manifest["step"], manifest["world_size"], manifest["config"]) == (step, 2, {"zero_stage": stage})
        assert {r["rank"] for r in manifest["ranks"]} == {0, 1}
        assert [r["loader_state"]["consumed"] for r in manifest["ranks"]] == [step * 8, step * 8]
        for entry in manifest["files"]:
            key = f"step-{step:08d}/{entry['name']}"
            assert found[key] == entry["size"]
            body = client(s3_server).get_object(Bucket=location.bucket, Key=location.prefix.rsplit("/", 1)[0] + "/" + entry["name"])
            import hashlib

            assert hashlib.sha256(body["Body"].read()).hexdigest() == entry["sha256"]
        assert not any(name.endswith("latest") for name in found)

    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "b", "--dumps", dumps,
                        "--zero-stage", stage, "--steps", 4, "--restore-again")
    assert "resumed from step 4" in outputs[0]
    # Restored from memory: the Adam moments DeepSpeed kept as they were loaded stay there, and
    # the rest of the download was given back (checkpoint_worker.py checks how much is left).
    assert int(re.search(r"restore kept (\d+) bytes", outputs[0]).group(1)) > 0, outputs[0][-3000:]
    for rank in (0, 1):
        assert_same_state(load(dumps / f"restored-rank-{rank}.pt"), load(dumps / f"step-4-rank-{rank}.pt"))


def test_resume_through_staging_files_when_memory_is_short(s3_server, run_url, tmp_path):
    dumps = tmp_path / "dumps"
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", dumps, "--steps", 2, "--save-at", "2")
    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "b", "--dumps", dumps, "--steps", 2,
                        "--memory-room", 1000)
    assert "restoring step 2 through staging files" in outputs[0] and "would take more than half the memory left" in outputs[0]
    assert "resumed from step 2" in outputs[0]
    assert "restore kept 0 bytes of tensors in 0 bytes of memory" in outputs[0]  # the moments were copied out
    for rank in (0, 1):
        assert_same_state(load(dumps / f"restored-rank-{rank}.pt"), load(dumps / f"step-2-rank-{rank}.pt"))


def test_sigkill_mid_multipart_upload_leaves_a_step_that_is_never_loaded(s3_server, run_url, tmp_path):
    """ViT-Ti/16's checkpoint files are past the 16 MiB multipart threshold. Both ranks are
    SIGKILLed while step 4's parts are really in flight (a proxy holds every part of step 4),
    which leaves open multipart uploads and a step without its manifest behind; the next start
    resumes from step 2, never from the partial step, and its first commit aborts those uploads
    and deletes what step 4 left."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    location = parse_s3_url(run_url)
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add("PUT", r"/step-00000004/.*[?&]partNumber=", "stall", seconds=600)
        procs = start_ranks(s3_server, 2, "--model", "ViT-Ti/16", "--url", run_url, "--staging", tmp_path / "a",
                            "--dumps", dumps, "--steps", 6, "--save-at", "2,4",
                            environment={"AWS_ENDPOINT_URL": proxy.endpoint_url})
        deadline = time.monotonic() + 180
        while proxy.count("stall") < 2:  # parts of step 4 on their way, held
            assert all(p.poll() is None for p in procs), finish(procs)[1]
            assert time.monotonic() < deadline, ("no part of step 4 was sent", proxy.served)
            time.sleep(0.05)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        finish(procs)
    found = list_prefix(run_url, s3_server.client_factory())
    assert "step-00000002/manifest.json" in found and "step-00000004/manifest.json" not in found
    left_open = client(s3_server).list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix).get("Uploads", [])
    assert [u for u in left_open if "/step-00000004/" in u["Key"]], left_open  # the killed writers' own

    outputs = run_ranks(s3_server, 2, "--model", "ViT-Ti/16", "--url", run_url, "--staging", tmp_path / "b",
                        "--dumps", dumps, "--steps", 6, "--save-at", "6")
    assert "resumed from step 2" in outputs[0]
    for rank in (0, 1):
        assert_same_state(load(dumps / f"restored-rank-{rank}.pt"), load(dumps / f"step-2-rank-{rank}.pt"))
    # Step 6 committed; the partial step 4 and its open multipart uploads are gone after it.
    found = list_prefix(run_url, s3_server.client_factory())
    assert "step-00000006/manifest.json" in found
    assert not any(k.startswith("step-00000004/") for k in found)
    assert not client(s3_server).list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix).get("Uploads")


def test_rank_0_killed_mid_commit_and_a_rank_killed_mid_restore_resume_from_the_last_verified_step(
        s3_server, run_url, tmp_path):
    """Rank 0 SIGKILLed in step 4's commit (every report written, the manifest not yet), then a
    rank SIGKILLed while it restores: each time the next start resumes from step 2, the last
    step verified, with exactly its state, and commits step 4 again (that attempt's reports,
    not the killed one's)."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()

    def killed_at(marker, *args):
        procs = start_ranks(s3_server, 2, "--url", run_url, "--dumps", dumps, *args)
        deadline = time.monotonic() + 180
        while not (dumps / marker).exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs)[1]
            time.sleep(0.1)
        for proc in procs:  # the rank first, then the group, as Ray Train stops a group that lost one
            proc.send_signal(signal.SIGKILL)
        finish(procs)

    killed_at("hanging-in-commit", "--staging", tmp_path / "a", "--steps", 4, "--save-at", "2,4", "--hang-in-commit", 4)
    found = list_prefix(run_url, s3_server.client_factory())
    assert "step-00000002/manifest.json" in found and "step-00000004/manifest.json" not in found
    assert len([k for k in found if re.fullmatch(r"step-00000004/ranks/\w+/rank-0000[01]\.json", k)]) == 2
    killed_at("hanging-in-restore-rank-1", "--staging", tmp_path / "b", "--steps", 4, "--hang-in-restore", 1)
    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "c", "--dumps", dumps,
                        "--steps", 4, "--save-at", "4")
    assert "resumed from step 2" in outputs[0] and "checkpoint step 4 committed" in outputs[0], outputs[0][-3000:]
    for rank in (0, 1):
        assert_same_state(load(dumps / f"restored-rank-{rank}.pt"), load(dumps / f"step-2-rank-{rank}.pt"))


def test_corrupted_object_falls_back_to_the_previous_checkpoint(s3_server, run_url, tmp_path):
    dumps = tmp_path / "dumps"
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", dumps,
              "--steps", 4, "--save-at", "2,4")
    location = parse_s3_url(f"{run_url}/step-00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    original = client(s3_server).get_object(Bucket=location.bucket, Key=location.prefix)["Body"].read()
    corrupted = bytes([original[0] ^ 0xFF]) + original[1:]  # same size, one byte flipped
    client(s3_server).put_object(Bucket=location.bucket, Key=location.prefix, Body=corrupted)

    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "b", "--dumps", dumps, "--steps", 4)
    assert "checkpoint step 4 is unusable" in outputs[0] and "sha256" in outputs[0]
    assert "resumed from step 2" in outputs[0]
    for rank in (0, 1):
        assert_same_state(load(dumps / f"restored-rank-{rank}.pt"), load(dumps / f"step-2-rank-{rank}.pt"))


def test_listing_the_steps_takes_one_request_per_step_however_many_objects_each_holds(s3_server, run_url):
    """list_steps (every commit's retention, every restore): the step folders listed with a
    delimiter, each manifest looked up; the requests count the steps, not the objects in them
    (512 ranks' files in each of hundreds of kept steps)."""
    import concurrent.futures

    from orchestrator.checkpoint import list_steps

    factory = s3_server.client_factory()
    location = parse_s3_url(run_url)
    s3 = factory.client()
    requests = []
    s3.meta.events.register("before-send.s3", lambda request, **_: requests.append(request.method))

    def put(key: str) -> None:
        s3.put_object(Bucket=location.bucket, Key=f"{location.prefix}/{key}", Body=b"")

    def fill(step: int, objects: int, manifest: bool) -> None:
        names = [f"step-{step:08d}/ranks/a/rank-{r:05d}.json" for r in range(objects)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, names + ([f"step-{step:08d}/manifest.json"] if manifest else [])))

    fill(2, 3, True)
    fill(4, 3, False)  # partial: files, no manifest
    fill(6, 3, True)
    put("lease.json")  # not a step
    requests.clear()
    assert list_steps(run_url, factory) == ([2, 6], [4])
    few = list(requests)
    fill(6, 2500, True)  # the same steps, one of them 2,500 objects more
    requests.clear()
    assert list_steps(run_url, factory) == ([2, 6], [4])
    assert requests == few and sorted(few) == ["GET"] + ["HEAD"] * 3, few  # one listing, one HEAD per step


def test_retention_keeps_the_last_k_and_every_mth(s3_server, run_url, tmp_path):
    run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
              "--steps", 7, "--save-at", "1,2,3,4,5,6,7", "--keep-last", 2, "--keep-every", 3)
    found = list_prefix(run_url, s3_server.client_factory())
    steps = sorted({int(k[5:13]) for k in found})
    assert steps == [3, 6, 7]
    assert all(f"step-{s:08d}/manifest.json" in found for s in steps)


def test_a_different_world_size_verifies_every_ranks_files_then_converts(s3_server, run_url, tmp_path):
    # One rank resuming a two-rank checkpoint reads rank 1's shard too (test_universal.py has the rest).
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
              "--steps", 4, "--save-at", "2,4")
    location = parse_s3_url(f"{run_url}/step-00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    original = client(s3_server).get_object(Bucket=location.bucket, Key=location.prefix)["Body"].read()
    client(s3_server).put_object(Bucket=location.bucket, Key=location.prefix, Body=bytes([original[0] ^ 0xFF]) + original[1:])

    outputs = run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "b", "--dumps", tmp_path / "d",
                        "--steps", 4)
    assert "checkpoint step 4 is unusable" in outputs[0] and "sha256" in outputs[0]
    assert "resumed from step 2 (converted from 2 workers to 1)" in outputs[0]


def test_reports_an_earlier_attempt_left_at_a_step_are_never_counted(s3_server, run_url, tmp_path):
    """A step that an earlier worker group started and did not commit keeps that attempt's rank
    reports: here two ranks', rank 1's a failure. One rank, resuming from step 2 (converted from
    two workers), saves that step again: its commit counts only its own attempt's report (it
    counted both: the old failure failed it, and a manifest of two ranks would have failed every
    later restore): the manifest is one rank's, of this attempt."""
    factory = s3_server.client_factory()
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
              "--steps", 4, "--save-at", "2,4", "--break-upload", "4:1")
    found = list_prefix(run_url, factory)
    assert "step-00000004/manifest.json" not in found
    assert len([k for k in found if re.fullmatch(r"step-00000004/ranks/(\w+/)?rank-0000[01]\.json", k)]) == 2, found

    outputs = run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "b", "--dumps", tmp_path / "d",
                        "--steps", 4, "--save-at", "4")
    assert "resumed from step 2 (converted from 2 workers to 1)" in outputs[0]
    assert "checkpoint step 4 committed" in outputs[0] and "failed" not in outputs[0], outputs[0][-3000:]
    manifest = json.loads(read_bytes(f"{run_url}/step-00000004/manifest.json", factory))
    assert manifest["world_size"] == 1 and [r["rank"] for r in manifest["ranks"]] == [0]
    attempt = manifest["ranks"][0]["attempt"]
    assert f"step-00000004/ranks/{attempt}/rank-00000.json" in list_prefix(run_url, factory)


def test_a_refused_upload_is_not_retried_and_the_next_save_stops_the_run(s3_server, run_url, tmp_path):
    """Credentials revoked mid-run, over real HTTP: from step 2 on, a proxy in front of the S3
    server answers 403 AccessDenied to everything under the run's steps. Each request of step
    2 is made once (not retried as if the server were busy), and the next save stops the run
    at once, not after the failure budget (here 3) of saves that cannot succeed."""
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add(None, r"/step-0000000[2-9]/", "403")
        codes, outputs = finish(start_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "a", "--dumps",
                                            tmp_path / "d", "--steps", 6, "--save-at", "1,2,3,4,5,6", "--failure-budget", 3,
                                            "--fresh", environment={"AWS_ENDPOINT_URL": proxy.endpoint_url}))
    out = outputs[0]
    assert codes == [3], out[-3000:]
    assert "checkpoint step 1 committed" in out
    assert re.search(r"checkpoint step 2 failed on rank 0: .*AccessDenied: access denied", out), out[-3000:]
    assert "CheckpointError: the checkpoint location refuses this run" in out and "checkpoint step 3 failed" not in out
    refused = [path for _, path, fault in proxy.served if fault == "403"]
    assert refused and len(refused) == len(set(refused)), refused  # each asked once
    assert s3_server.secret_access_key not in out


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs): a staging folder on a disk too small for a restore of
    ViT-Mu/4's ~1.8 MB steps and the 4 MiB margin."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_restore_that_would_fill_the_staging_disk_stops_with_one_line_and_loses_nothing(s3_server, run_url, tmp_path,
                                                                                          small_disk):
    """Restores through staging files (memory short) and a resize's conversion, on a real disk
    too small for them: each stops before writing, on every rank, naming the folder and the room;
    it neither fills the disk nor falls back to an older step (or to step 0)."""
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
              "--steps", 2, "--save-at", "2")
    codes, outputs = finish(start_ranks(s3_server, 2, "--url", run_url, "--staging", small_disk, "--dumps",
                                        tmp_path / "d", "--steps", 4, "--memory-room", 0))
    assert codes[0] != 0 and codes[1] != 0
    for out in outputs:
        assert re.search(rf"RefusedError: restoring step 2 through staging files \(2 ranks here\) needs "
                         rf"[\d.]+ MiB free in {small_disk}/rank-0000\d/step-00000002 .*, the disk has [\d.]+ MiB: "
                         rf"point VITSCALE_STAGING_DIR at a larger disk", out), out[-3000:]
        assert "trying the previous one" not in out and "resumed" not in out
    codes, outputs = finish(start_ranks(s3_server, 1, "--url", run_url, "--staging", small_disk, "--dumps",
                                        tmp_path / "d", "--steps", 4))
    assert codes == [1] and "RefusedError: converting step 2 from 2 workers needs" in outputs[0], outputs[0][-3000:]
    assert "the disk has 1.0 MiB" in outputs[0]
    assert sum(f.stat().st_size for f in small_disk.rglob("*") if f.is_file()) == 0  # nothing written


def test_a_refused_delete_leaves_every_commit_standing(s3_server, run_url, tmp_path):
    """Retention's deletes refused for real (the proxy answers 403 AccessDenied to DELETE and to
    multi-object deletes: a policy without s3:DeleteObject): every step still commits and counts
    as committed, no save counts as failed, the warning is said once; the first commit after the
    refusal is gone deletes what is no longer kept."""
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add("DELETE", r".", "403")
        proxy.add("POST", r"[?&]delete", "403")
        outputs = run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
                            "--steps", 4, "--save-at", "1,2,3,4", "--keep-last", 1, "--fresh",
                            environment={"AWS_ENDPOINT_URL": proxy.endpoint_url})
        refused = proxy.count("403")
    out = outputs[0]
    assert refused >= 1 and all(f"checkpoint step {s} committed" in out for s in (1, 2, 3, 4)), out[-3000:]
    assert "rank 0: failures_total=0 last_committed=4" in out
    assert out.count("warning: deleting old checkpoints after step") == 1 and "AccessDenied" in out
    assert {int(k[5:13]) for k in list_prefix(run_url, s3_server.client_factory())} == {1, 2, 3, 4}
    run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "b", "--dumps", tmp_path / "d",
              "--steps", 5, "--save-at", "5", "--keep-last", 1)
    assert {int(k[5:13]) for k in list_prefix(run_url, s3_server.client_factory())} == {5}


def test_failed_uploads_are_counted_until_the_budget_is_spent(s3_server, run_url, tmp_path):
    """A server that answers every write under the steps with 503 SlowDown (a busy S3, for real
    over HTTP; botocore asked once per request here): the failures are counted, the run goes on
    until the budget is spent, then stops with one line."""
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add(None, r"/step-\d{8}/", "503")
        codes, outputs = finish(start_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "a",
                                            "--dumps", tmp_path / "d", "--steps", 5, "--save-at", "1,2,3,4,5",
                                            "--failure-budget", 2, "--fresh", "--upload-attempts", 2,
                                            environment={"AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_MAX_ATTEMPTS": "1"}))
    assert codes == [3], outputs[0][-3000:]
    assert "checkpoint step 1 failed on rank 0" in outputs[0] and "checkpoint step 3 failed on rank 0" in outputs[0]
    assert "3 checkpoint saves failed in a row (budget 2)" in outputs[0]
    assert "SlowDown" in outputs[0] and proxy.count("503") >= 3 * 2  # each save's upload tried twice
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "unset") not in outputs[0]
    assert s3_server.secret_access_key not in outputs[0]


def test_an_upload_asked_again_commits_and_a_rank_late_past_the_commit_timeout_fails_only_its_step(
        s3_server, run_url, tmp_path):
    """Over real HTTP (a proxy; botocore asks once per request here): step 1's model file is
    answered 503 once, and the manager's own second attempt commits the step; rank 1's upload of
    step 2 is held 8 s, past rank 0's 3 s commit timeout: step 2 fails with one line and is
    counted, and step 3, which both ranks report, commits."""
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add("PUT", r"/step-00000001/\S*mp_rank_00_model_states", "503", times=1)
        proxy.add("PUT", r"/step-00000002/\S*zero_pp_rank_1_", "stall", times=1, seconds=8)
        codes, outputs = finish(start_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a",
                                            "--dumps", tmp_path / "d", "--steps", 3, "--save-at", "1,2,3", "--fresh",
                                            "--upload-attempts", 2, "--commit-timeout", 3,
                                            environment={"AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_MAX_ATTEMPTS": "1"}))
    both = "\n".join(outputs)
    assert codes == [0, 0], both[-4000:]
    assert [proxy.count(f) for f in ("503", "stall")] == [1, 1], proxy.served
    assert "checkpoint step 1 committed" in both
    assert "checkpoint step 2 failed on rank 0: only 1 of 2 ranks reported step 2 in time" in both, both[-4000:]
    assert "checkpoint step 3 committed" in both and "rank 0: failures_total=1 last_committed=3" in both
    manifests = sorted(k for k in list_prefix(run_url, s3_server.client_factory()) if k.endswith("manifest.json"))
    assert manifests == ["step-00000001/manifest.json", "step-00000003/manifest.json"]


def test_trim_frees_only_the_memory_no_tensor_uses_even_for_a_file_loaded_twice(tmp_path):
    """restore maps downloads shared and gives back what DeepSpeed did not keep: a range one
    load dropped but another load of the same file kept must survive."""
    import mmap

    from data_pipelines.transfer import download_to_memory
    from orchestrator.checkpoint import _CheckpointFiles

    state = {"a": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(500_000), "c": torch.full((3,), 7.0)}
    torch.save(state, tmp_path / "x.pt")
    held, _ = download_to_memory(str(tmp_path / "x.pt"), os.path.getsize(tmp_path / "x.pt"))
    os.symlink(held.path, tmp_path / "link.pt")
    files = _CheckpointFiles(inner=None)
    files.mapping, files.in_memory = True, {str(tmp_path / "link.pt"): held}
    first, second = files.load(str(tmp_path / "link.pt")), files.load(str(tmp_path / "link.pt"))
    assert len(files.shared) == 2 and not files.mapped  # both mapped shared, nothing to copy out
    kept_a, kept_c = first["a"], second["c"]  # each load keeps one tensor
    del first, second
    assert files.trim() == kept_a.nbytes + kept_c.untyped_storage().nbytes()
    assert held.allocated_bytes() <= kept_a.nbytes + 4 * mmap.PAGESIZE  # "b", the pickle, the zip index: gone
    held.close()
    torch.testing.assert_close(kept_a, state["a"], rtol=0, atol=0)
    torch.testing.assert_close(kept_c, state["c"], rtol=0, atol=0)
    kept_a += 1  # written in place: the memory is this process's own now
    assert kept_a[0].item() == 1.0


def test_a_restore_goes_into_memory_only_when_it_takes_at_most_half_of_what_is_left():
    from data_pipelines.transfer import memory_room
    from orchestrator.checkpoint import fits_in_memory

    assert fits_in_memory(10, 20) and not fits_in_memory(11, 20)
    assert fits_in_memory(10**12, None)  # unknown: memory
    room = memory_room()  # Linux always says (MemAvailable): known, and no more than the machine has
    assert room is not None and 0 < room <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_checkpoint_files_are_serialized_without_zip_crc32s_and_load_all_the_same(tmp_path):
    """The sha256 covers every byte: torch.save skips its per-record CRC32 while a checkpoint
    file is serialized (on the upload thread), and nothing else's saves change."""
    import threading
    import zipfile

    from orchestrator.checkpoint import _CheckpointFiles

    files = _CheckpointFiles(inner=type("Engine", (), {"zipfile_serialization": True})())
    state = {"w": torch.randn(1000), "step": 3}
    seen = []

    def upload_thread():
        with open(tmp_path / "x.pt", "wb") as f:
            files.serialize(state, f)
        seen.append(torch.serialization.get_crc32_options())

    thread = threading.Thread(target=upload_thread)
    thread.start()
    thread.join(30)
    assert seen == [True] and torch.serialization.get_crc32_options()
    with zipfile.ZipFile(tmp_path / "x.pt") as z:
        assert z.testzip() is not None  # no CRC32s written
    loaded = torch.load(tmp_path / "x.pt", weights_only=True, mmap=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


def test_a_manifest_name_outside_the_staging_folder_is_refused_by_both_downloads(tmp_path):
    """Names come from the store: neither the memory nor the staging-file download writes or
    links anything outside the step's folder."""
    from orchestrator.checkpoint import CheckpointManager, FileEntry

    manager = CheckpointManager(str(tmp_path / "store"), staging_dir=str(tmp_path / "staging"), log=lambda m: None)
    entries = [FileEntry(name="../../escaped.pt", size=1, sha256="0" * 64, rank=0)]
    local = str(tmp_path / "staging" / "step")
    for download in (manager._download_to_memory, manager._download_to_staging):
        assert download(str(tmp_path / "store"), local, entries) == "../../escaped.pt is not a file name inside the checkpoint"
    assert not os.path.exists(tmp_path / "escaped.pt") and not manager._held_at


def test_snapshots_are_uploaded_from_their_own_tensors_not_a_copy(tmp_path, monkeypatch):
    """torch.save hands each storage of a snapshot to its MemoryImage as it is: the images hold
    every tensor byte by reference (the parts go from the snapshot to the socket), all files
    go up in one upload_images call, and what lands is what torch.save writes, with its sha256."""
    import hashlib

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from orchestrator import checkpoint

    files = checkpoint._CheckpointFiles(TorchCheckpointEngine(config_params=None))
    assert files.streams
    states = {
        "model.pt": {"module": {"w": torch.randn(512, 1024), "b": torch.randn(3 << 18)}, "step": 7},
        "optim.pt": {"optimizer": [torch.ones(2 << 20, dtype=torch.bfloat16)], "step": 7},
    }
    local = tmp_path / "staging" / "step"
    snapshots = [(str(local / name), checkpoint._snapshot(state, iter([]))) for name, state in states.items()]
    calls = []

    def recorded(uploads, factory=None):
        calls.append([image for image, _ in uploads])
        return real(uploads, factory)

    real = checkpoint.upload_images
    monkeypatch.setattr(checkpoint, "upload_images", recorded)
    manager = checkpoint.CheckpointManager(str(tmp_path / "store"), staging_dir=str(tmp_path / "staging"), log=lambda m: None)
    entries = manager._upload_snapshots(files, snapshots, str(local), str(tmp_path / "store" / "step"))
    [images] = calls
    assert [e.name for e in entries] == ["model.pt", "optim.pt"]
    for (path, state), image, entry in zip(snapshots, images, entries):
        url = str(tmp_path / "store" / "step" / entry.name)
        assert image.kept_bytes == sum(t.untyped_storage().nbytes() for t in checkpoint._tensors(state))
        assert entry.size == image.size == os.path.getsize(url)
        with open(url, "rb") as f:
            assert entry.sha256 == hashlib.sha256(f.read()).hexdigest()
        loaded = torch.load(url, weights_only=True)
        assert loaded["step"] == 7
    assert torch.equal(torch.load(tmp_path / "store" / "step" / "model.pt", weights_only=True)["module"]["w"],
                       states["model.pt"]["module"]["w"])
    assert set(files.spare) == {"model.pt", "optim.pt"}  # the buffers are given back for the next save


def test_an_unexpected_upload_error_is_reported_to_every_rank_and_counted(s3_server, run_url, tmp_path):
    # Not a storage error (a bug, a missing module...): the background upload must not die
    # silently, leaving rank 0 to wait out its commit timeout and the failure uncounted. Rank
    # 0 names rank 1's error: it read rank 1's report rather than timing out.
    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", tmp_path / "d",
                        "--steps", 3, "--save-at", "1,2,3", "--break-upload", "2:1", "--fresh")
    both = "\n".join(outputs)
    assert "checkpoint step 2 failed on rank 1: RuntimeError: injected: not a storage error" in both
    assert "checkpoint step 2 failed on rank 0: rank 1 could not upload step 2: RuntimeError: injected" in both
    assert "rank 0: failures_total=1 last_committed=3" in both and "rank 1: failures_total=1" in both


def test_the_weights_export_checks_its_room_first(tmp_path, small_disk):
    from types import SimpleNamespace

    from model import build_model
    from orchestrator.checkpoint import CheckpointError, export_weights

    engine = SimpleNamespace(module=build_model("ViT-Mu/4", 10, image_size=32), global_rank=0)
    digest = export_weights(engine, str(tmp_path / "out" / "model.safetensors"), staging_dir=str(tmp_path / "staging"))
    assert len(digest) == 64 and os.path.getsize(tmp_path / "out" / "model.safetensors") > 100_000
    with pytest.raises(CheckpointError, match=rf"exporting the weights needs [\d.]+ MiB free in {small_disk}/staging "
                                              rf"\([\d.]+ MiB and a margin\), the disk has 1.0 MiB"):
        export_weights(engine, str(tmp_path / "again" / "model.safetensors"), staging_dir=str(small_disk / "staging"))
    assert not os.path.exists(tmp_path / "again")
