"""launch/pretrain.py as users run it: a subprocess from the repository root."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import processes_in_session, run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "pretrain.py")


def pretrain(*args, timeout=120):
    return run_process([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_print_config_resolves_the_recipe_and_touches_nothing_else():
    # Run it in a fresh interpreter and look at what it imported: no Ray, DeepSpeed, S3 or CUDA.
    probe = (
        "import runpy, sys; sys.argv = [sys.argv[0], '--model', 'ViT-L/16', '--dataset', 'JFT-300M', "
        "'--epochs', '14', '--print-config']\n"
        "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "loaded = sorted(m for m in ('ray', 'deepspeed', 'boto3', 'botocore') if m in sys.modules)\n"
        "import torch\nprint('LOADED', loaded, torch.cuda.is_initialized())\n" % SCRIPT
    )
    out = run_process([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text, last = out.stdout.rsplit("LOADED", 1)
    assert last.strip() == "[] False"
    config = json.loads(text)
    assert config["model"] == "ViT-L/16" and config["dataset"] == "JFT-300M"
    assert (config["epochs"], config["base_lr"], config["lr_decay"]) == (14, 4e-4, "linear")
    assert (config["weight_decay"], config["dropout"], config["global_batch_size"], config["warmup_steps"]) == (
        0.1, 0.0, 4096, 10_000,
    )
    assert config["overrides"] == ["epochs"]


def test_flags_override_and_show_up_in_the_config():
    out = pretrain("--model", "ViT-B/16", "--dataset", "ImageNet", "--workers", "64", "--micro-batch", "16",
                   "--zero-stage", "3", "--base-lr", "0.001", "--set", "seed=7", "--no-finetune", "--print-config")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert (config["workers"], config["micro_batch_size"], config["gradient_accumulation_steps"]) == (64, 16, 4)
    assert (config["zero_stage"], config["base_lr"], config["seed"], config["finetune"]) == (3, 0.001, 7, False)
    assert set(config["overrides"]) == {"workers", "micro_batch_size", "zero_stage", "base_lr", "seed", "finetune"}


@pytest.mark.parametrize(
    "args,named",
    [
        (["--model", "ViT-Z/16", "--dataset", "ImageNet"], ["ViT-Z/16", "ViT-B/16"]),
        (["--model", "ViT-B/16", "--dataset", "Places365"], ["Places365", "JFT-300M"]),
        (["--model", "R152x2", "--dataset", "ImageNet-21k"], ["R152x2", "JFT-300M"]),
        (["--model", "ViT-B/16", "--dataset", "ImageNet", "--base-lr", "-0.003"], ["base_lr=-0.003"]),
        (["--model", "ViT-B/16", "--dataset", "ImageNet", "--workers", "3"], ["4096", "3 x 32"]),
        (["--model", "ViT-B/16", "--dataset", "ImageNet", "--workers", "two"], ["--workers", "'two'"]),
        (["--model", "ViT-B/16", "--dataset", "ImageNet", "--set", "colour=blue"], ["'colour'", "base_lr"]),
        (["--model", "ViT-B/16", "--dataset", "ImageNet", "--frobnicate"], ["--frobnicate"]),
        (["--dataset", "ImageNet"], ["--model"]),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, named):
    out = pretrain(*args, "--print-config")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for text in named:
        assert text in lines[0]


def test_cli_surface_is_frozen():
    """New knobs belong in the config (reachable with --set), not in new flags."""
    out = pretrain("--help")
    flags = set(re.findall(r"(--[a-z][a-z-]+)", out.stdout))
    assert flags == {
        "--help", "--model", "--dataset", "--epochs", "--base-lr", "--data", "--checkpoints", "--workers",
        "--gpus-per-worker", "--micro-batch", "--zero-stage", "--max-steps", "--checkpoint-every",
        "--objective", "--no-finetune", "--finetune-data", "--set", "--dry-run", "--print-config",
    }


def test_dry_run_pretrains_fans_out_over_its_stand_ins_and_writes_its_report():
    """`make dry-run`'s command, scaled to the test budget (10 pretraining steps; the fan-out over
    two of its stand-ins: the real digits as CIFAR-10, its sweep and final at a tenth of the dry
    run's 3000 steps, and one VTAB task): embedded S3, synthetic shards, Ray + DeepSpeed,
    checkpoints, then launch/pretrain.py's own hand-over to the fan-out, then the report, whose
    path is the last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = run_process([sys.executable, SCRIPT, "--dry-run", "--max-steps", "10", "--checkpoint-every", "5",
                          "--set", "log_every=2", "--set", "finetune_datasets=CIFAR10,VTAB/EuroSAT",
                          "--set", 'finetune_steps={"CIFAR10": 300}'],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "dry run: embedded S3 (SeaweedFS)" in text
    assert "wrote multi_label shards" in text
    assert "checkpoint step 10 committed" in text and "finished at step 10" in text
    assert ("dry run: wrote downstream stand-ins to s3://vitscale-dry-run/downstream: the real digits as CIFAR10, "
            "VTAB/EuroSAT") in text
    # The hand-over: from the export, CIFAR-10's sweep (4 LRs) and final, VTAB/EuroSAT's final.
    assert "pretraining ended: the fine-tuning fan-out starts from s3://vitscale-dry-run/runs/" in text
    assert len(re.findall(r"trial CIFAR10/sweep-lr\S+ finished: held-out 2% of train accuracy", text)) == 4
    assert "trial VTAB/EuroSAT/final-lr0.01 finished: test accuracy" in text
    digits = float(re.search(r"trial CIFAR10/final-lr\S+ finished: test accuracy (\S+)", text).group(1))
    # The real digits, 300 steps at 8 px under the table's inception crop and flip: chance is
    # 0.1. `make dry-run`'s own 3000 steps reach 0.931 (README; issue 21 asks for 0.9); at 3000
    # this test took 268 s of a 19-minute suite here, at 1000 (>= 0.5) 154 s.
    assert digits >= 0.25, digits
    # A log short enough to read: Ray Train's notices (a worker group asked for, started, its
    # ranks, its process group) are pretraining's alone, not repeated by each of the 6 trials,
    # which say when they start and end; DeepSpeed builds no comm op on CPUs (gloo), so says none.
    assert text.count("Attempting to start training worker group") == 1, text[-3000:]
    assert text.count("Setting up process group") == 1 and "shm_comm_op" not in text  # gloo on CPUs: no op built
    assert len(text.splitlines()) <= 60, len(text.splitlines())
    report = out.stdout.strip().splitlines()[-1]
    assert report == "runs/vit-mu-4-jft-300m-dry-run/report.md", report
    folder = os.path.join(ROOT, os.path.dirname(report))
    markdown = open(os.path.join(ROOT, report)).read()
    results = json.load(open(os.path.join(folder, "results.json")))
    assert results["config"]["model"] == "ViT-Mu/4" and results["config"]["finetune_data"].endswith("/downstream")
    assert [(p["dataset"], p["stage"]) for p in results["plan"]] == [("CIFAR10", "sweep")] * 4 + [
        ("CIFAR10", "final"), ("VTAB/EuroSAT", "final")]
    # The run's own history: every logged step, the two commits, marked in the curves.
    assert [r["step"] for r in results["pretraining"]["history"]] == [2, 4, 6, 8, 10]
    assert [c["commit"] for c in results["pretraining"]["commits"]] == [5, 10]
    assert "Checkpoints committed (step: time): 5: " in markdown and "![loss, learning rate and throughput](report/pretraining.png)" in markdown
    assert round(results["finetune"]["datasets"]["CIFAR10"]["test_accuracy"], 4) == digits
    assert "These are the dry run's stand-ins, not the paper's datasets: scikit-learn's real digits" in markdown
    assert "| CIFAR-10 | " in markdown and "(finetune/sweep-cifar10.png)" in markdown
    assert os.path.exists(os.path.join(folder, "finetune", "sweep-cifar10.png"))
    # The seed's figures, trained beside initialisation, with the line that says what they show.
    seed = results["seed_figures"]
    assert seed["statement"] in markdown and set(seed["neighbour_contrast"]) == {"trained", "initialisation"}
    for link in re.findall(r"\]\((report/[^)]+\.png)\)", markdown):
        assert open(os.path.join(folder, link), "rb").read(4) == b"\x89PNG", link
    assert len(re.findall(r"\]\((report/seed/[^)]+\.png)\)", markdown)) == 4
    assert re.search(r"report: runs/\S+/report\.md and s3://vitscale-dry-run/runs/vit-mu-4-jft-300m-dry-run/report\.md",
                     text)
    # Metrics: served on loopback, scraped by a real Prometheus, the dashboard drawn from it.
    assert re.search(r"driver metrics at http://127\.0\.0\.1:\d+/metrics", text)
    plots = re.search(r"dry run: (\d+) metric plots from Prometheus in (\S+) and s3://", text)
    assert plots and int(plots.group(1)) >= 20, text[-3000:]
    folder = os.path.join(ROOT, plots.group(2))
    assert sorted(os.listdir(folder))[0].endswith(".png")
    assert all(open(os.path.join(folder, p), "rb").read(4) == b"\x89PNG" for p in os.listdir(folder))
    losses = [float(x) for x in re.findall(r"step \d+ nonfinite_total .*? loss (\S+)", text)]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    for name in ("AWS_SECRET_ACCESS_KEY", "secret"):
        assert name not in text
    # The local Ray's noise stays out: Ray Train's PlacementGroupCleaner (no state API without
    # a dashboard), its echo of each report, its PreemptionWatcher (off on one machine).
    for noise in ("Failed to query Ray Train Controller", "Reporting training result", "PreemptionWatcher"):
        assert noise not in text


def test_training_without_data_is_a_preflight_error():
    out = pretrain("--model", "ViT-B/16", "--dataset", "ImageNet", "--checkpoints", "/tmp/vitscale-x")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "pretrain.py: error: no training data: pass --data (a folder or s3://bucket/prefix with shards)"
    # A run without fine-tuning data says at its start that it pretrains only, and how to fan out later.
    assert ("no fine-tuning data (--finetune-data): pretraining only; the fan-out can run later with: python "
            "launch/finetune.py --weights /tmp/vitscale-x/vit-b-16-imagenet/weights/model.safetensors --data-root URL"
            ) in out.stdout


def test_a_missing_fine_tuning_dataset_stops_the_run_before_pretraining(tmp_path, s3_server):
    """The preflight checks every dataset the fan-out will read: a missing CIFAR-10 is found
    before pretraining, not after it."""
    from data_pipelines.synthetic import write_synthetic

    env = dict(os.environ, **s3_server.environment())
    bucket = s3_server.create_bucket("preflight-finetune")
    write_synthetic("multi_label", f"{bucket}/synth", num_samples=64, num_classes=4, image_size=32, samples_per_shard=32,
                    factory=s3_server.client_factory())
    out = run_process([sys.executable, SCRIPT, "--model", "ViT-Mu/4", "--dataset", "JFT-300M", "--data",
                          f"{bucket}/synth", "--checkpoints", f"{bucket}/runs", "--finetune-data", str(tmp_path),
                          "--set", "finetune_datasets=CIFAR10", "--set", "gpus_per_worker=0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"pretrain.py: error: CIFAR10: no readable shards at {tmp_path}/cifar10/train (")
    assert "Traceback" not in out.stderr and "run " not in out.stdout  # no Ray joined, nothing scheduled


def test_a_real_run_writes_its_report_beside_it_and_prints_its_path_last(tmp_path, s3_server):
    """Not a dry run: a recipe row with its sizes set small, pretraining only (--no-finetune).
    The report is the dry run's (orchestrator/report.py): its history, its commits and the
    seed's figures on the run's own shards, in runs/<run>/ of the working directory and on S3."""
    from data_pipelines.synthetic import write_synthetic
    from data_pipelines.transfer import list_prefix

    env = dict(os.environ, **s3_server.environment(), VITSCALE_STAGING_DIR=str(tmp_path / "staging"))
    bucket = s3_server.create_bucket("real-run-report")
    write_synthetic("multi_label", f"{bucket}/synth", num_samples=64, num_classes=4, image_size=32, samples_per_shard=32,
                    factory=s3_server.client_factory())
    sizes = {"image_size": 32, "global_batch_size": 8, "micro_batch_size": 8, "train_examples": 64, "epochs": 1,
             "warmup_steps": 1, "checkpoint_every": 4, "log_every": 2, "data_workers": 1, "gpus_per_worker": 0,
             "metrics_address": "off"}
    out = run_process([sys.executable, SCRIPT, "--model", "ViT-Mu/4", "--dataset", "JFT-300M", "--data",
                          f"{bucket}/synth", "--checkpoints", f"{bucket}/runs", "--no-finetune", "--max-steps", "8",
                          *[a for k, v in sizes.items() for a in ("--set", f"{k}={v}")]],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = "vit-mu-4-jft-300m"
    assert out.stdout.strip().splitlines()[-1] == f"runs/{run}/report.md"
    text = (tmp_path / "runs" / run / "report.md").read_text()
    assert "dry run" not in text and "Fine-tuning: none (no fine-tuning data, or --no-finetune)." in text
    assert "step 8, loss" in text and "Checkpoints committed (step: time): 4: " in text, text
    results = json.loads((tmp_path / "runs" / run / "results.json").read_text())
    assert [r["step"] for r in results["pretraining"]["history"]] == [2, 4, 6, 8]
    assert set(results["seed_figures"]) >= {"statement"}
    remote = list_prefix(f"{bucket}/runs/{run}", s3_server.client_factory())
    assert {"report.md", "results.json", "report/pretraining.png",
            "report/seed/position_similarity_trained.png"} <= set(remote), sorted(remote)


def test_a_dry_run_on_a_cluster_without_s3_stops_at_its_preflight(tmp_path):
    """A `ray job submit` driver (RAY_ADDRESS set) starts no embedded S3, which its workers,
    started by the cluster's nodes, could never see: with no S3 the cluster knows of, the dry
    run stops before Ray is even joined (the address here leads nowhere), with one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(RAY_ADDRESS="127.0.0.1:9", HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")
    out = run_process([sys.executable, SCRIPT, "--dry-run", "--no-finetune"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "dry run: embedded S3" not in out.stdout and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "pretrain.py: error: s3://vitscale-dry-run: NoCredentialsError: no credentials found (environment, profile or "
        "IAM role) (a dry run on a Ray cluster uses the S3 its nodes are configured for: AWS_ENDPOINT_URL and "
        "credentials in their environment; the embedded S3 serves a local run only)")


def started_until_committed(args, env, log_path, s3_server, bucket, manifest) -> subprocess.Popen:
    """`args` started in a session of its own (output to `log_path`), once `manifest` is on S3.
    The commit is watched on S3 itself: the worker's "committed" line reaches the driver's log
    through Ray's log streaming, which can lag behind the rest of a short run."""
    log = open(log_path, "w+")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    client = s3_server.client_factory().client()
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and process.poll() is None, open(log_path).read()[-3000:]
        try:
            client.head_object(Bucket=bucket, Key=manifest)
            return process
        except client.exceptions.ClientError:
            time.sleep(0.25)  # a HEAD a quarter second: the wait is for a commit, tens of seconds


def test_a_run_killed_stopped_and_resized_resumes_each_time_and_finishes(s3_server, tmp_path):
    """One run's life through the same command (one test: each start is a local Ray, Ray Train
    and DeepSpeed, ~30 s here). SIGKILL of the driver and its local Ray after a commit; resumed,
    then Ctrl-C (SIGINT to the terminal's whole process group); resumed on 1 worker instead of 2
    (the 2-worker checkpoint converted: DeepSpeed's universal checkpoint), then SIGHUP to the
    whole group (a closed terminal; SIGTERM to the driver alone, as `ray job stop` sends it, is
    tests/launch/test_ray_job.py's). Each stop: one line naming the signal and
    the last committed step (the newest manifest), exit 128 + signal, nothing of the local Ray
    left running. Then it finishes, keeps the newest two checkpoints whole, and once more it
    schedules nothing and names the weights it exported."""
    import json

    from data_pipelines.transfer import list_prefix

    bucket = s3_server.create_bucket("lifecycle")
    env = dict(os.environ, **s3_server.environment(), VITSCALE_STAGING_DIR=str(tmp_path / "staging"))
    # 64 px makes a step slow enough (~0.1 s here) for each stop to land between commits.
    args = [sys.executable, SCRIPT, "--dry-run", "--no-finetune", "--max-steps", "50", "--checkpoint-every", "5",
            "--data", f"{bucket}/synth", "--checkpoints", f"{bucket}/run", "--set", "image_size=64",
            "--set", "metrics_address=off"]
    checkpoints = "run/vit-mu-4-jft-300m-dry-run/checkpoints"

    def committed() -> list[int]:
        return sorted(int(k[5:13]) for k in list_prefix(f"{bucket}/{checkpoints}", s3_server.client_factory())
                      if k.endswith("/manifest.json"))

    def started(attempt: str, workers: int, after: int) -> tuple[subprocess.Popen, str]:
        log_path = tmp_path / f"{attempt}.log"
        run = started_until_committed([*args, "--workers", str(workers)], env, log_path, s3_server,
                                      bucket.removeprefix("s3://"), f"{checkpoints}/step-{after:08d}/manifest.json")
        return run, log_path

    def stopped(attempt: str, workers: int, signum: int) -> tuple[int, str]:
        wait_for_step = committed()[-1] + 10  # two commits after resuming
        run, log_path = started(attempt, workers, wait_for_step)
        os.killpg(run.pid, signum)  # the terminal's whole foreground group: the driver and its local Ray
        assert run.wait(timeout=120) == 128 + signum
        text = open(log_path).read()
        assert "Traceback" not in text, text[-3000:]
        said = [line for line in text.splitlines() if line.startswith("pretrain.py:")]
        assert len(said) == 1 and (match := re.fullmatch(
            rf"pretrain\.py: interrupted by {signal.Signals(signum).name}: the workers were stopped; the last committed "
            rf"checkpoint is step (\d+) in {re.escape(f'{bucket}/{checkpoints}')}; the same command resumes the run "
            rf"from its last committed checkpoint", said[0])), said
        stood = int(match.group(1))
        assert wait_for_step <= stood == committed()[-1] < 50, (stood, committed())
        deadline = time.monotonic() + 30
        while processes_in_session(run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_in_session(run.pid) == []
        return stood, text

    killed, _ = started("killed", 2, 5)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and the local Ray it started
    killed.wait()
    deadline = time.monotonic() + 60  # Ray's workers outlive the group's SIGKILL by a moment: they may still commit
    while processes_in_session(killed.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in_session(killed.pid) == []
    after_kill = committed()[-1]
    first, text = stopped("first", 2, signal.SIGINT)
    assert f"resumed from step {after_kill}" in text and "converted" not in text
    second, text = stopped("second", 1, signal.SIGHUP)
    assert f"resumed from step {first} (converted from 2 workers to 1)" in text, text[-3000:]
    third = run_process([*args, "--workers", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    text = third.stdout + third.stderr
    assert third.returncode == 0, text[-3000:]
    assert f"resumed from step {second}" in text and "finished at step 50, loss" in text
    # The newest two checkpoints are kept, every file of their manifests whole.
    found = list_prefix(f"{bucket}/run", s3_server.client_factory())
    assert committed() == [45, 50]  # the older ones deleted
    for step in (45, 50):
        manifest = json.loads(s3_server.client_factory().client().get_object(
            Bucket=bucket.removeprefix("s3://"), Key=f"{checkpoints}/step-{step:08d}/manifest.json")["Body"].read())
        for entry in manifest["files"]:
            assert found[f"{checkpoints.removeprefix('run/')}/step-{step:08d}/{entry['name']}"] == entry["size"]
    # Once more: finished, so nothing is scheduled (no Ray, no worker); it names its weights.
    fourth = run_process([*args, "--workers", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    again = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, again[-3000:]
    (exported,) = re.findall(r"exported weights to (\S+) \(sha256 (\w+)\)", text)
    assert (f"nothing to train: the run finished at step 50 (its last checkpoint; it stops at step 50: raise "
            f"--max-steps or --epochs to go on); its weights: {exported[0]} (sha256 {exported[1]})") in again
    assert "workers, checkpoints in" not in again and "RayTrainWorker" not in again


def test_a_cluster_too_small_is_refused_before_anything_is_scheduled(s3_server):
    from data_pipelines.synthetic import write_synthetic

    bucket = s3_server.create_bucket("too-small")
    write_synthetic("multi_label", f"{bucket}/synth", num_samples=64, image_size=32, factory=s3_server.client_factory(),
                    progress=False)
    env = dict(os.environ, **s3_server.environment())
    out = run_process([sys.executable, SCRIPT, "--model", "ViT-B/16", "--dataset", "JFT-300M", "--data",
                          f"{bucket}/synth", "--checkpoints", f"{bucket}/runs", "--workers", "64", "--gpus-per-worker", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"pretrain\.py: error: the cluster has \d+ CPUs and 0 GPUs; this run asks for 64 workers x "
                        r"\(1 CPU, 1 GPU\) = 64 CPUs and 64 GPUs", last), last
    assert "Traceback" not in out.stderr


def test_unreachable_checkpoint_location_is_refused(s3_server):
    env = dict(os.environ, **s3_server.environment())
    bucket = s3_server.create_bucket("reachable-data")
    from data_pipelines.synthetic import write_synthetic

    write_synthetic("multi_label", f"{bucket}/synth", num_samples=32, image_size=32, factory=s3_server.client_factory(),
                    progress=False)
    out = run_process([sys.executable, SCRIPT, "--model", "ViT-B/16", "--dataset", "JFT-300M", "--data",
                          f"{bucket}/synth", "--checkpoints", "s3://no-such-bucket-here/runs"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("pretrain.py: error: s3://no-such-bucket-here/runs: NoSuchBucket: the "
                                                   "bucket does not exist (a test write was refused)")
