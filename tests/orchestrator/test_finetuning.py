"""The fine-tuning fan-out end to end: a real pretraining export fine-tuned by Ray Tune trials of
Ray Train + DeepSpeed workers on gloo, over real digits and two synthetic sets on a real S3."""

import json
import os

import pytest

from data_pipelines.storage import read_bytes
from data_pipelines.synthetic import write_synthetic
from data_pipelines.transfer import list_prefix
from orchestrator import finetuning
from orchestrator.config import ConfigError
from orchestrator.pretraining import run_pretraining
from orchestrator.train_loop import weights_url
from tests.orchestrator.conftest import config_for

DATASETS = ["CIFAR10", "Oxford-IIIT Pets", "VTAB/DTD"]
# CIFAR10: 10000 x 0.02 = 200 steps (warm-up 10); Pets: 10 (2); VTAB: 50 (4). At 16 px (the
# export's 8x8 position grid resized to 4x4) a step of ViT-Mu/4 takes ~30 ms here.
SCALE = 0.02


@pytest.fixture(scope="module")
def export(cluster):
    """A pretraining run's export, and the downstream sets: digits standing in for CIFAR-10 (real
    data, its fixed split), synthetic sets for Pets and one VTAB task."""
    bucket, _ = cluster
    config = config_for(cluster, "ft-source", max_steps=8, checkpoint_every=8)
    run_pretraining(config)
    root = f"{bucket}/downstream"
    for split in ("train", "test"):
        write_synthetic("digits", f"{root}/cifar10/{split}", image_size=32, samples_per_shard=256, split=split)
        write_synthetic("classification", f"{root}/oxford-iiit-pets/{split}", num_samples=192, num_classes=4,
                        image_size=40, samples_per_shard=64, seed=1 if split == "train" else 2)
    for split, seed in (("train800val200", 3), ("test", 4)):
        write_synthetic("classification", f"{root}/vtab/dtd/{split}", num_samples=128, num_classes=3, image_size=40,
                        samples_per_shard=64, seed=seed)
    return weights_url(config), root


def settings(export, results, **overrides):
    weights, root = export
    record = finetuning.read_weights_record(weights)
    values = dict(micro_batch_size=16, data_workers=0, max_concurrent_trials=2, metrics_address="127.0.0.1",
                  log_every=50, max_failures=1, checkpoint_every=1000)
    return finetuning.settings_for(weights, record, root, results=results, **(values | overrides))


def plan(datasets=DATASETS):
    return finetuning.plan_trials(datasets, steps_scale=SCALE, image_size=16, batch_size=32)


def test_the_fan_out_sweeps_picks_on_held_out_data_retrains_and_writes_the_table(cluster, export, tmp_path, capfd):
    bucket, _ = cluster
    results = f"{bucket}/fanout-full"
    summary, out = finetuning.run_fanout(settings(export, results), plan())
    printed = capfd.readouterr().out
    assert summary["complete"], summary
    cifar = summary["datasets"]["CIFAR10"]
    records = {}
    for name in list_prefix(results):
        if name.endswith("result.json"):
            record = json.loads(read_bytes(f"{results}/{name}"))
            records[(record["dataset"], record["stage"], record["lr"])] = record
    sweep = {lr: r for (d, stage, lr), r in records.items() if d == "CIFAR10" and stage == "sweep"}
    assert sorted(sweep) == [0.001, 0.003, 0.01, 0.03]
    # Every sweep trial trained the table's steps (scaled) on train less its held-out 2% and was
    # scored on that held-out part only: ~2% of 1437 digits.
    for record in sweep.values():
        assert record["steps"] == 200 and record["eval_split"] == "held-out 2% of train"
        assert 15 <= record["total"] <= 45
    best = max(sweep.values(), key=lambda r: (r["accuracy"], -r["lr"]))["lr"]
    final = records[("CIFAR10", "final", best)]
    # The final trial: the picked LR, all of train, scored on digits' 360 test images.
    assert (final["eval_split"], final["train_split"], final["total"]) == ("test", "train", 360)
    # Far above chance (0.1): a ViT-Mu briefly pretrained on synthetic stripes, 200 steps of 32
    # digits at 16 px under inception crops (dry runs train longer: issue 21 asks 0.9 there).
    assert final["accuracy"] >= 0.3, final
    assert cifar["lr"] == best and cifar["test_accuracy"] == final["accuracy"]
    assert ("VTAB/DTD", "final", 0.01) in records and not any(d == "VTAB/DTD" and s == "sweep" for d, s, _ in records)
    # The table, JSON and plots, here and on S3; the trials' checkpoints are gone, their records stay.
    local = sorted(os.listdir(out))
    assert {"results.json", "results.md", "sweep-cifar10.png", "sweep-oxford-iiit-pets.png"} <= set(local)
    on_s3 = list_prefix(results)
    assert {"results.json", "results.md", "sweep-cifar10.png"} <= set(on_s3)
    assert not [n for n in on_s3 if "/checkpoints/" in n]
    assert "| CIFAR-10 |" in open(os.path.join(out, "results.md")).read()
    assert "trial CIFAR10/sweep-lr0.003 started" in printed
    assert f"trial CIFAR10/final-lr{best:g} finished: test accuracy" in printed

    # The same command again: every trial has its record, nothing is scheduled.
    again, _ = finetuning.run_fanout(settings(export, results), plan())
    printed = capfd.readouterr().out
    assert again["complete"] and "started" not in printed
    assert "11 trials over 3 datasets, 11 finished already" in printed


def test_a_killed_trial_resumes_and_one_that_keeps_failing_is_marked_failed(cluster, export, tmp_path, capfd):
    bucket, _ = cluster
    results = f"{bucket}/fanout-faults"
    trials = plan(["VTAB/DTD", "VTAB/Caltech101"])  # 50 steps each
    faults = {"VTAB/DTD/final-lr0.01": {"step": 30, "how": "kill"},
              "VTAB/Caltech101/final-lr0.01": {"step": 2, "how": "raise"}}
    summary, out = finetuning.run_fanout(settings(export, results, checkpoint_every=10), trials, faults=faults,
                                         record_dir=str(tmp_path))
    printed = capfd.readouterr()
    assert os.path.exists(tmp_path / "killed-at-30")  # the worker did die once, by SIGKILL
    datasets = summary["datasets"]
    # The killed trial's workers restarted from its step-30 checkpoint and finished.
    assert datasets["VTAB/DTD"]["status"] == "done"
    assert "resumed from step 30" in printed.out
    # The one that failed at every attempt is marked failed; the fan-out says it is incomplete.
    assert datasets["VTAB/Caltech101"]["status"] == "failed" and not summary["complete"]
    assert "trial VTAB/Caltech101/final-lr0.01 failed" in printed.out
    assert "failed" in open(os.path.join(out, "results.md")).read()


def test_bad_input_is_refused_before_anything_is_scheduled(cluster, export):
    bucket, _ = cluster
    weights, root = export
    with pytest.raises(ConfigError, match="no readable shards at .*/downstream/cifar100/train"):
        finetuning.run_fanout(settings(export, f"{bucket}/fanout-bad"), plan(["CIFAR100"]))
    with pytest.raises(ConfigError, match="not a vitscale export"):
        finetuning.read_weights_record(f"{root}/cifar10/train/manifest.json")
    with pytest.raises(ConfigError, match="record .* cannot be read"):
        finetuning.read_weights_record(f"{bucket}/nothing/weights/model.safetensors")
    with pytest.raises(ConfigError, match="'Food101'"):
        finetuning.select_datasets("CIFAR10,Food101")
