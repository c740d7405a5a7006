"""Pretraining through Ray Train + DeepSpeed on gloo (CPU), streaming shards from a real S3."""

import collections
import hashlib
import io
import json
import os
import re
import sys
import threading
import time

import pytest

from data_pipelines.storage import read_bytes, write_bytes
from data_pipelines.synthetic import write_synthetic
from data_pipelines.transfer import list_prefix
from orchestrator.pretraining import PreflightError, check_locations, check_resources, finished_run, run_pretraining
from orchestrator.train_loop import checkpoint_url, run_url, weights_record_url, weights_url
from tests.orchestrator.conftest import SAMPLES, config_for


def attempts_in(record_dir):
    """[(start step, {step: keys})] per attempt, all ranks merged, from the workers' records."""
    attempts = collections.defaultdict(lambda: collections.defaultdict(list))
    starts = {}
    for rank_file in sorted(os.listdir(record_dir)):
        attempt = -1
        for line in open(os.path.join(record_dir, rank_file)):
            kind, step, *rest = line.split()
            if kind == "start":
                attempt += 1
                starts[attempt] = int(step)
            else:
                attempts[attempt][int(step)].extend(rest)
    return [(starts[a], attempts[a]) for a in sorted(starts)]


def idle_ray_workers() -> list[int]:
    """Pids of the worker processes holding no task or actor that the raylet of the local Ray
    this process started (its child) runs; another Ray on the machine is not looked at."""

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[1])

    pids = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::IDLE") and parent(parent(pid)) == os.getpid():
                    pids.append(pid)
        except OSError:  # gone meanwhile
            pass
    return pids


def actor_classes() -> collections.Counter:
    """Class names of every actor the connected Ray has created, alive or dead (the GCS's
    actor table)."""
    import ray

    return collections.Counter(a["ActorClassName"] for a in ray._private.state.actors().values())


class Terminal(io.StringIO):
    """Standard error as a terminal, where tqdm draws its bars."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_with_two_workers(cluster, stage, capfd, monkeypatch):
    import ray

    from orchestrator.pretraining import ray_started_here

    config = config_for(cluster, f"zero-{stage}", zero_stage=stage)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    metrics = run_pretraining(config)
    monkeypatch.undo()
    # What it returns: rank 0's last progress row, at the run's last step.
    assert metrics["step"] == 24 and metrics["loss"] > 0 and metrics["nonfinite_total"] == 0, metrics
    # On a terminal, the driver's bar follows rank 0's progress lines (every 4 steps) to the end.
    drawn = terminal.getvalue()
    assert re.search(rf"pretraining zero-{stage}: +0%.* 0/24 ", drawn), drawn[-2000:]
    assert re.search(r"100%.* 24/24 .*loss=[\d.]+, lr=[\d.e-]+, img/s=\d+", drawn), drawn[-2000:]
    # A run makes actors only, each in its own process: the local Ray prestarts no worker
    # that would sit idle beside them (each wakes 100 times a second).
    assert not idle_ray_workers()
    # Nor does it start Ray Train's helpers that a run on a Ray of its own has no use for
    # (orchestrator/trainer.py), nor an actor of ours; the controller and the workers it does.
    assert ray_started_here(ray)
    made = actor_classes()
    assert made["TrainController"] >= 1 and made["RayTrainWorker"] >= 2 and made["SynchronizationActor"] >= 1, made
    assert not set(made) - {"TrainController", "RayTrainWorker", "SynchronizationActor"}, made
    out = capfd.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d+ .*?loss ([\d.]+)", out)]
    assert len(losses) >= 4, out[-3000:]
    assert losses[-1] < 0.75 * losses[0], losses
    found = list_prefix(checkpoint_url(config))
    assert "step-00000024/manifest.json" in found and "step-00000016/manifest.json" in found
    assert any(k.endswith("model.safetensors") for k in list_prefix(f"{cluster[0]}/runs/zero-{stage}"))
    # The weights' record: the same command again would find the run finished, these weights its own.
    record = finished_run(config)
    assert record is not None and record["step"] == 24 and record["weights"] == weights_url(config)
    assert record["sha256"] == hashlib.sha256(read_bytes(weights_url(config))).hexdigest()


def test_killed_worker_resumes_from_the_last_commit_in_its_second_epoch(cluster, tmp_path, capfd):
    """Rank 1 SIGKILLs its own process at step 22 of the second epoch (16 steps of 32 make an
    epoch of the 512 samples), past step 20's commit: the group restarts from that commit, in
    that epoch, at that position. (The kill came from this test once, when it saw step 22 in
    rank 1's log: on a loaded machine the run reached step 24's commit first.)"""
    config = config_for(cluster, "killed", max_steps=24, checkpoint_every=4, log_every=2)
    record = tmp_path / "record"
    record.mkdir()
    metrics = run_pretraining(config, record_dir=str(record), fault={"step": 22, "how": "kill", "rank": 1})
    assert metrics["step"] == 24
    assert (record / "killed-at-22").exists()
    out = capfd.readouterr().out
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", out)]
    assert resumed == [20], out[-3000:]
    (first_start, first), (second_start, second) = attempts_in(record)
    assert (first_start, second_start) == (0, resumed[0])
    # The first epoch: every sample once. The second (8 steps of it): its committed steps of the
    # first attempt plus everything of the second, each sample at most once, 256 in all: nothing
    # trained before the commit comes back, nothing after it is skipped.
    epoch_1 = [k for step, keys in first.items() if step <= 16 for k in keys]
    assert len(epoch_1) == len(set(epoch_1)) == SAMPLES
    committed = [k for step, keys in first.items() if 16 < step <= resumed[0] for k in keys]
    after = [k for keys in second.values() for k in keys]
    assert sorted(second) == list(range(resumed[0] + 1, 25))
    assert len(committed) == len(set(committed)) and len(after) == len(set(after))
    assert not set(committed) & set(after)
    assert len(committed) + len(after) == 8 * 32


def test_a_run_is_finished_when_its_weights_are_of_its_newest_commit_at_its_last_step(cluster):
    config = config_for(cluster, "finished-or-not", max_steps=30)
    assert finished_run(config) is None  # nothing yet
    for step in (25, 30):
        write_bytes(f"{checkpoint_url(config)}/step-{step:08d}/manifest.json", b"{}")
    record = {"step": 30, "sha256": "ab" * 32, "weights": weights_url(config)}
    write_bytes(weights_record_url(config), json.dumps(record).encode())
    assert finished_run(config) == record
    assert finished_run(config.model_copy(update={"max_steps": 20})) == record  # stops before: nothing to train
    assert finished_run(config.model_copy(update={"max_steps": 32})) is None  # more steps asked for: they train
    write_bytes(f"{checkpoint_url(config)}/step-00000035/manifest.json", b"{}")  # a commit after those weights
    assert finished_run(config) is None and finished_run(config.model_copy(update={"max_steps": 20})) is None
    write_bytes(weights_record_url(config), b"not json")
    assert finished_run(config) is None


def test_credentials_revoked_mid_run_stop_it_with_one_line_instead_of_restarts(cluster, s3_server, capfd):
    """From step 6 rank 0's S3 credentials are ones the server lets read but not write (a real
    SeaweedFS identity: credentials revoked mid-run). Its step-8 upload is refused (AccessDenied,
    not retried), its next save raises, and the driver stops the run with that line: no restart
    of the group into the same refusal (max_failures 3), the last good commit kept."""
    from orchestrator.checkpoint import committed_steps
    from orchestrator.pretraining import TrainingError

    config = config_for(cluster, "revoked", max_steps=16, checkpoint_every=4, log_every=2, max_failures=3)
    reader = {"AWS_ACCESS_KEY_ID": s3_server.reader_access_key_id,
              "AWS_SECRET_ACCESS_KEY": s3_server.reader_secret_access_key}
    with pytest.raises(TrainingError, match=r"^training failed, not retried: rank 0: the checkpoint location refuses "
                                            r"this run: s3://.*step-00000008.*AccessDenied"):
        run_pretraining(config, fault={"step": 6, "how": "revoke", "environment": reader})
    printed = capfd.readouterr()
    assert "checkpoint step 8 failed on rank 0" in printed.out + printed.err
    assert "resumed from step" not in printed.out + printed.err  # the group was not started again
    assert committed_steps(checkpoint_url(config)) == [4]
    assert s3_server.reader_secret_access_key not in printed.out + printed.err


def test_a_final_checkpoint_that_does_not_commit_and_a_record_not_written_are_said_not_hidden(cluster, s3_server,
                                                                                                capfd):
    """From step 7 rank 0's S3 goes through a proxy that answers 503 SlowDown to every write of
    step 8 (the last) and of the weights' record (botocore asks once; the manager three times):
    the run still finishes, exports its weights, and says that the final checkpoint did not
    commit (step 6 is the last) and that the record was not written (so the same command runs
    once more rather than taking the run for finished)."""
    from orchestrator.checkpoint import committed_steps
    from tests.conftest import free_port
    from tests.faultproxy import FaultProxy

    config = config_for(cluster, "final-refused", max_steps=8, checkpoint_every=2, log_every=2)
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add("PUT", r"/step-00000008/", "503")
        proxy.add("PUT", r"/weights/model\.json", "503")
        run_pretraining(config, fault={"step": 7, "how": "revoke",
                                       "environment": {"AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_MAX_ATTEMPTS": "1"}})
    out = capfd.readouterr().out
    assert proxy.count("503") >= 4, proxy.served
    assert re.search(r"warning: the final checkpoint \(step 8\) did not commit: .*SlowDown", out), out[-3000:]
    assert re.search(r"warning: .*weights/model\.json: SlowDown.*: the weights' record was not written", out), out[-3000:]
    assert committed_steps(checkpoint_url(config)) == [4, 6]
    assert read_bytes(weights_url(config))[:8] and finished_run(config) is None


def test_a_failure_that_keeps_coming_back_spends_max_failures_and_stops_with_one_line(cluster, capfd):
    """A worker that raises at step 2 on every attempt: restarted max_failures (1) times, then
    the run stops with the error's one line (exit status 1 from launch/pretrain.py)."""
    from orchestrator.pretraining import TrainingError

    config = config_for(cluster, "keeps-failing", max_steps=8, checkpoint_every=4, max_failures=1)
    with pytest.raises(TrainingError) as caught:
        run_pretraining(config, fault={"step": 2, "how": "raise"})
    assert caught.value.exit_status == 1
    assert str(caught.value) == "training failed: rank 0: RuntimeError: injected failure at step 2"
    printed = capfd.readouterr()
    assert (printed.out + printed.err).count("no checkpoint to resume from: starting at step 0") == 2  # two attempts


def test_shards_gone_mid_run_stop_it_after_two_empty_passes(cluster, capfd):
    """The data's shards are deleted after the first commit (for real, on the S3 server): the
    passes after it yield nothing. Two such passes in a row stop the run with one line, not
    retried, instead of empty epochs for ever."""
    from data_pipelines.transfer import delete_file
    from orchestrator.checkpoint import committed_steps
    from orchestrator.pretraining import TrainingError

    bucket, _ = cluster
    data = f"{bucket}/gone"
    write_synthetic("multi_label", data, num_samples=128, num_classes=10, image_size=48, samples_per_shard=32)
    config = config_for(cluster, "gone", data=data, max_steps=400, checkpoint_every=2, log_every=2, max_failures=3,
                        data_workers=0)

    def delete_the_shards():
        deadline = time.monotonic() + 300
        while not committed_steps(checkpoint_url(config)):
            if time.monotonic() > deadline:
                return  # nothing deleted: the run then trains on, and the test fails on its missing error
            time.sleep(0.1)
        for name in list_prefix(data):
            if name.endswith(".tar"):
                delete_file(f"{data}/{name}")

    deleter = threading.Thread(target=delete_the_shards)
    deleter.start()
    with pytest.raises(TrainingError, match=rf"^training failed, not retried: rank \d: {data}: 2 passes in a row "
                                            rf"yielded no sample \(\d+ samples of \d+ shards missing"):
        run_pretraining(config)
    deleter.join()
    printed = capfd.readouterr()
    assert "resumed from step" not in printed.out + printed.err


def test_a_resume_with_other_training_settings_is_refused_unless_told(cluster):
    """A run resumed with another learning rate and seed (a changed recipe, a typo) would train
    on from its checkpoint as something else: refused before anything starts, naming each
    setting; with resume_with_changes it goes on. How it runs (workers, checkpointing) may change."""
    from orchestrator.pretraining import check_resume

    config = config_for(cluster, "changed", max_steps=2, checkpoint_every=2)
    run_pretraining(config)
    assert "lease.json" not in list_prefix(run_url(config))  # the run's lease, given back at its end
    changed = config_for(cluster, "changed", max_steps=4, checkpoint_every=2, base_lr=1e-3, seed=5)
    with pytest.raises(PreflightError, match=r"^run changed resumes from step 2, trained with base_lr=0.003 \(now 0.001\), "
                                            r"seed=0 \(now 5\): .* --set resume_with_changes=true"):
        run_pretraining(changed)
    check_resume(config_for(cluster, "changed", max_steps=4, base_lr=1e-3, seed=5, resume_with_changes=True))
    check_resume(config_for(cluster, "changed", max_steps=4, workers=1, checkpoint_every=1, data_workers=0))


def test_pretraining_refuses_a_run_another_driver_holds_before_taking_anything(cluster, s3_server):
    from orchestrator.lease import RunLease

    config = config_for(cluster, "leased", max_steps=2, checkpoint_every=2)
    holder = RunLease(f"{run_url(config)}/lease.json", factory=s3_server.client_factory())
    holder.acquire()
    try:
        with pytest.raises(PreflightError, match=r"^run leased: another driver is running this run"):
            run_pretraining(config)
    finally:
        holder.release()
    assert not list_prefix(checkpoint_url(config))  # nothing trained, nothing written
    # A run that ends gives its lease back: the resume test above looks.


def test_preflight_names_what_is_missing(cluster):
    bucket, data = cluster
    with pytest.raises(PreflightError, match="no-such-bucket-x"):
        check_locations(config_for(cluster, "pf", data="s3://no-such-bucket-x/synth"))
    with pytest.raises(PreflightError, match="empty-prefix"):
        check_locations(config_for(cluster, "pf", data=f"{bucket}/empty-prefix"))
    import ray

    with pytest.raises(PreflightError, match=r"asks for 2 workers x \(1 CPU, 4 GPU\) = 2 CPUs and 8 GPUs"):
        check_resources(config_for(cluster, "pf", gpus_per_worker=4), ray)


def test_non_finite_losses_are_skipped_and_roll_back(cluster, tmp_path, capfd):
    # 12 steps + the redone step 9 + the 4 skipped micro-batches stay inside one epoch (512).
    config = config_for(cluster, "nan", max_steps=12, checkpoint_every=4, log_every=2)
    record = tmp_path / "record"
    record.mkdir()
    # One NaN after step 2 (skipped), three in a row after step 9 (roll back to step 8); a
    # finite loss with NaN gradients after step 5 (DeepSpeed's fp32 engine skips the update;
    # the bf16 one applies it, and then the worker rolls back: tests/orchestrator/test_engine.py).
    run_pretraining(config, record_dir=str(record), nan_loss_at={2: 1, 9: 3}, nan_grad_at={5: 1})
    out = capfd.readouterr().out
    assert "step 3: non-finite loss, micro-batch skipped (1 in a row, 1 in all)" in out
    assert "step 6: non-finite gradient norm, update skipped by DeepSpeed (2 non-finite in all)" in out
    assert "rolled back from step 9 to step 8" in out
    assert re.search(r"step 12 nonfinite_total 5 rollbacks 1", out), out[-2000:]
    # The data stream went forward through the rollback: no sample trained twice.
    [(start, steps)] = attempts_in(record)
    keys = [k for ks in steps.values() for k in ks]
    assert len(keys) == len(set(keys))
    manifests = [k for k in list_prefix(checkpoint_url(config)) if k.endswith("manifest.json")]
    assert "step-00000008/manifest.json" in manifests and "step-00000012/manifest.json" in manifests


def test_bf16_rolls_back_an_update_that_made_the_parameters_non_finite_and_stops_one_before_any_commit(
        cluster, capfd):
    """bf16 on CPUs (precision=bf16: DeepSpeed's CPU accelerator), where as on GPUs DeepSpeed
    applies an update whatever its gradient norm: NaN gradients after step 5 make the parameters
    non-finite, the worker rolls back to step 4 and the run finishes finite. The same before the
    first checkpoint has nothing to roll back to: the run stops with one line, not retried (the
    same seed and data would diverge the same way).

    Then a parameter corrupted after step 8's update (rank 0's copy turns NaN: memory corrupted
    behind the optimizer's back, losses and gradients finite up to there): the commit's own check
    refuses to checkpoint step 8 and every rank rolls back to step 4 again."""
    from orchestrator.pretraining import TrainingError

    config = config_for(cluster, "bf16", precision="bf16", max_steps=8, checkpoint_every=4, log_every=2)
    run_pretraining(config, nan_grad_at={5: 1}, fault={"step": 8, "how": "corrupt"})
    out = capfd.readouterr().out
    assert "step 6: non-finite gradient norm made the parameters non-finite (1 non-finite in all): rolling back" in out
    assert "rolled back from step 5 to step 4" in out
    assert "step 8: parameters are not finite; not checkpointing, rolling back" in out, out
    assert "rolled back from step 8 to step 4" in out and re.search(r"step 8 nonfinite_total 1 rollbacks 2 .*loss \d", out)
    assert out.count("checkpoint step 8 committed") == 1, out[-3000:]
    assert "step-00000008/manifest.json" in list_prefix(checkpoint_url(config))
    early = config_for(cluster, "bf16-early", precision="bf16", max_steps=8, checkpoint_every=4, max_failures=3)
    with pytest.raises(TrainingError, match=r"^training failed, not retried: rank \d: after step 1: the run went non-finite "
                                            r"before its first checkpoint, with nothing to roll back to"):
        run_pretraining(early, nan_grad_at={1: 1})
    assert "resumed" not in capfd.readouterr().out and not list_prefix(checkpoint_url(early))


def test_masked_patch_prediction_trains_on_unlabeled_shards(cluster, capfd):
    bucket, _ = cluster
    write_synthetic("unlabeled", f"{bucket}/unlabeled", num_samples=SAMPLES, image_size=48, samples_per_shard=64)
    config = config_for(cluster, "masked", data=f"{bucket}/unlabeled", objective="masked-patch", max_steps=16)
    with pytest.raises(PreflightError, match="unlabeled data"):
        check_locations(config_for(cluster, "supervised-on-unlabeled", data=f"{bucket}/unlabeled"))
    run_pretraining(config)
    out = capfd.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d+ nonfinite_total .*? loss ([\d.]+)", out)]
    assert len(losses) >= 4 and losses[-1] < 0.9 * losses[0], losses
    assert "finished at step 16" in out


@pytest.mark.parametrize("data_workers", [0, 1])
def test_loader_workers_fork_only_once_the_checkpoint_threads_are_done(data_workers):
    # Python 3.11's fork can hang the child when another thread starts or ends meanwhile: a
    # worker waits for its checkpoint upload (or a restore's release) before the DataLoader
    # forks its processes; with no processes to fork it does not wait.
    from orchestrator.train_loop import _Worker

    events = []

    class Checkpoints:
        def wait(self):
            events.append("wait")

    class Loader:
        num_workers = data_workers

        def __iter__(self):
            events.append("fork" if self.num_workers else "read")
            yield {"key": ["a"]}

    worker = object.__new__(_Worker)
    worker.loader, worker.checkpoints, worker._batches, worker.data_wait = Loader(), Checkpoints(), None, 0.0
    assert worker._next_batch() == {"key": ["a"]} and worker._next_batch() is None
    assert events == (["wait", "fork"] if data_workers else ["read"])


def test_the_local_rays_train_controllers_poll_their_workers_every_half_second(cluster, monkeypatch):
    """A run's end is seen at the controller's next poll (orchestrator/ray_workers.py): every
    process of the local Ray has the interval, which Ray Train reads in its controller; a value
    the user set wins."""
    import ray

    from orchestrator.ray_workers import train_controller_env

    @ray.remote(num_cpus=0)
    class Process:  # an actor, as a controller is: its process ends with it, none is left idle
        def interval(self):
            return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    process = Process.remote()
    assert ray.get(process.interval.remote()) == "0.5"
    ray.kill(process)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert train_controller_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
