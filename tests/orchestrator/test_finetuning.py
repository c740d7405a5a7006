"""The fine-tuning fan-out end to end: a real pretraining export fine-tuned by Ray Tune trials of
Ray Train + DeepSpeed workers on gloo, over real digits and two synthetic sets on a real S3."""

import json
import os
import re

import pytest

from data_pipelines.storage import read_bytes
from data_pipelines.synthetic import write_synthetic
from data_pipelines.transfer import list_prefix
from orchestrator import finetuning
from orchestrator.config import ConfigError
from orchestrator.pretraining import run_pretraining
from orchestrator.train_loop import weights_url
from tests.orchestrator.conftest import config_for

# Digits stand in for CIFAR-10 (real data, its fixed split); two synthetic VTAB tasks.
DATASETS = ["CIFAR10", "VTAB/DTD", "VTAB/Caltech101"]
# CIFAR10: 10000 x 0.02 = 200 steps (warm-up 10); VTAB: 50 (4). At 16 px (the export's 8x8
# position grid resized to 4x4) a step of ViT-Mu/4 takes a few ms here: a trial's cost is its
# start (a Ray Train controller and worker, DeepSpeed) more than its steps.
SCALE = 0.02


@pytest.fixture(scope="module")
def export(cluster):
    """A pretraining run's export, and the downstream sets under one data root."""
    bucket, _ = cluster
    config = config_for(cluster, "ft-source", workers=1, max_steps=4, checkpoint_every=4)
    run_pretraining(config)
    root = f"{bucket}/downstream"
    for split in ("train", "test"):
        write_synthetic("digits", f"{root}/cifar10/{split}", image_size=32, samples_per_shard=256, split=split)
    for task in ("dtd", "caltech101"):
        for split, seed in (("train800val200", 3), ("test", 4)):
            write_synthetic("classification", f"{root}/vtab/{task}/{split}", num_samples=128, num_classes=3,
                            image_size=40, samples_per_shard=64, seed=seed)
    return weights_url(config), root


def settings(export, results, **overrides):
    weights, root = export
    record = finetuning.read_weights_record(weights)
    values = dict(micro_batch_size=32, data_workers=0, max_concurrent_trials=2, metrics_address="127.0.0.1",
                  log_every=50, max_failures=1)
    return finetuning.settings_for(weights, record, root, results=results, **(values | overrides))


def plan(datasets=DATASETS):
    return finetuning.plan_trials(datasets, steps_scale=SCALE, image_size=16, batch_size=32)


def records_in(results):
    found = {}
    for name in list_prefix(results):
        if name.endswith("result.json"):
            record = json.loads(read_bytes(f"{results}/{name}"))
            found[(record["dataset"], record["stage"], record["lr"])] = record
    return found


def test_the_fan_out_sweeps_picks_on_held_out_data_retrains_and_writes_the_table(cluster, export, tmp_path, capfd):
    """One fan-out: the digits' sweep, the pick, the final; a VTAB trial whose worker is SIGKILLed
    once (it resumes from its checkpoint and finishes) and one that goes non-finite before its
    first checkpoint (a parameter turns NaN after step 13: a restart would diverge the same way,
    so it fails at once, not after max_failures, and is marked failed while the others finish).
    Run again, only the failed trial is scheduled."""
    bucket, _ = cluster
    results = f"{bucket}/fanout"
    faults = {"VTAB/DTD/final-lr0.01": {"step": 26, "how": "kill"},
              "VTAB/Caltech101/final-lr0.01": {"step": 13, "how": "corrupt"}}
    summary, out = finetuning.run_fanout(settings(export, results), plan(), faults=faults, record_dir=str(tmp_path))
    printed = capfd.readouterr().out
    records = records_in(results)
    sweep = {lr: r for (d, stage, lr), r in records.items() if d == "CIFAR10" and stage == "sweep"}
    assert sorted(sweep) == [0.001, 0.003, 0.01, 0.03]
    # Every sweep trial trained the table's steps (scaled) on train less its held-out 2% and was
    # scored on that held-out part only: ~2% of 1437 digits.
    for record in sweep.values():
        assert record["steps"] == 200 and record["eval_split"] == "held-out 2% of train"
        assert 15 <= record["total"] <= 45
    best = max(sweep.values(), key=lambda r: (r["accuracy"], -r["lr"]))["lr"]
    final = records[("CIFAR10", "final", best)]
    # The final trial: the picked LR, all of train, scored on digits' 360 test images. Far above
    # chance (0.1): a ViT-Mu pretrained 4 steps on synthetic stripes, 200 steps of 32 digits at
    # 16 px under inception crops.
    assert (final["eval_split"], final["train_split"], final["total"]) == ("test", "train", 360)
    assert final["accuracy"] >= 0.3, final
    cifar = summary["datasets"]["CIFAR10"]
    assert cifar["lr"] == best and cifar["test_accuracy"] == final["accuracy"] and cifar["status"] == "done"
    assert f"CIFAR10: LR {best:g} picked on held-out data" in printed
    assert f"trial CIFAR10/final-lr{best:g} finished: test accuracy" in printed
    # The killed trial: its worker died once (by SIGKILL, after its step-26 checkpoint: trials
    # checkpoint every quarter of their steps), the group restarted from that checkpoint and finished.
    assert os.path.exists(tmp_path / "killed-at-26")
    assert "resumed from step 26" in printed and summary["datasets"]["VTAB/DTD"]["status"] == "done"
    assert ("VTAB/DTD", "final", 0.01) in records and not any(d.startswith("VTAB") and s == "sweep" for d, s, _ in records)
    # The failing trial is marked failed, the fan-out is incomplete.
    assert summary["datasets"]["VTAB/Caltech101"]["status"] == "failed" and not summary["complete"]
    assert "trial VTAB/Caltech101/final-lr0.01 failed" in printed
    # Not retried (max_failures=1 would have run it twice): one attempt, one line saying why.
    assert printed.count("step 13: parameters are not finite; not checkpointing") == 1, printed[-4000:]
    error = summary["datasets"]["VTAB/Caltech101"]["error"]
    assert re.fullmatch(r"VTAB/Caltech101/final-lr0.01: failed, not retried: rank 0: after step 13: the run went "
                        r"non-finite before its first checkpoint, .*", error), error
    # The table, JSON and plot, here and on S3; finished trials' checkpoints are gone.
    assert {"results.json", "results.md", "sweep-cifar10.png"} <= set(os.listdir(out))
    on_s3 = list_prefix(results)
    assert {"results.json", "results.md", "sweep-cifar10.png"} <= set(on_s3)
    assert not [n for n in on_s3 if "/checkpoints/" in n and not n.startswith("vtab/caltech101/")]
    # Each finished trial's routine lines are in log.txt beside its result.json, not in the
    # driver's output (28 trials of a dry run would bury the fan-out's own lines); the resume
    # above is printed as well.
    assert all(name.replace("result.json", "log.txt") in on_s3 for name in on_s3 if name.endswith("result.json"))
    trial_log = read_bytes(f"{results}/cifar10/final-lr{best:g}/log.txt").decode()
    assert "training ViT-Mu/4 on " in trial_log and "step 200 nonfinite_total " in trial_log and ": test accuracy " in trial_log
    assert "/cifar10/train: steps 0 -> 200" not in printed  # a trial worker's "training ..." line
    # DeepSpeed's notices as a trial's engine is built, too (Ray's log dedup printed them late).
    assert "deepspeed: " in trial_log and "untested optimizer" in trial_log and "untested optimizer" not in printed
    table = open(os.path.join(out, "results.md")).read()
    assert "| CIFAR-10 |" in table and "failed" in table
    # 2 trials train at once and a third gets ready meanwhile (orchestrator/trial_gate.py): it
    # waits for a turn, then trains from where a running trial's record was written.
    spans = sorted((r["began_at"], r["ended_at"]) for r in records.values())
    assert max(sum(b <= began < e for b, e in spans) for began, _ in spans) == 2, spans
    waited = [float(w) for name in on_s3 if name.endswith("log.txt")
              for w in re.findall(r": ready, waited ([\d.]+) s for a turn", read_bytes(f"{results}/{name}").decode())]
    # Every trial that finished (4 sweeps, DTD, CIFAR10's final: one Tuner, one gate) said so.
    assert len(waited) == len(records) == 6 and max(waited) > 1, waited

    # The same command again, the fault gone: only the failed trial is scheduled, and it finishes.
    again, _ = finetuning.run_fanout(settings(export, results), plan())
    printed = capfd.readouterr().out
    assert "7 trials over 3 datasets, 5 finished already" in printed
    assert printed.count(" started") == 1 and "trial VTAB/Caltech101/final-lr0.01 started" in printed
    assert again["complete"] and again["datasets"]["CIFAR10"]["test_accuracy"] == final["accuracy"]


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
    # A second fan-out writing the same results: refused, naming the first (a live driver holds
    # the lease: this process), before any trial is looked at or scheduled.
    from orchestrator.lease import RunLease

    results = f"{bucket}/fanout-held"
    with RunLease(f"{results}/lease.json"):
        with pytest.raises(ConfigError, match=rf"^fine-tuning ft-source: another driver is running this run \(host \S+, "
                                              rf"pid {os.getpid()}, .*give this one another --results;"):
            finetuning.run_fanout(settings(export, results), plan(["VTAB/DTD"]))
        assert list(list_prefix(results)) == ["lease.json"]
    assert not list_prefix(results)


def test_exported_weights_load_adapted_and_nothing_else_loads(tmp_path):
    """load_exported_weights: safetensors only (a pickle is refused, not run), the sha256 its
    record names, pre-logits dropped, a zero head of the new classes, the position grid resized."""
    import hashlib
    import pickle

    import torch
    from safetensors.torch import save_file

    from model import build_model
    from orchestrator.checkpoint import WeightsError, load_exported_weights

    torch.manual_seed(1)
    pretrained = build_model("ViT-Mu/4", 10, image_size=32, representation_size=64)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    model = build_model("ViT-Mu/4", 7, image_size=16)
    load_exported_weights(model, path, sha256=digest)
    assert not model.head.weight.any() and model.head.weight.shape == (7, 64)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 64)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, pretrained.blocks[1].mlp.fc2.weight)
    with pytest.raises(WeightsError, match="is not the"):
        load_exported_weights(model, path, sha256="0" * 64)

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    bad = str(tmp_path / "bad.safetensors")
    with open(bad, "wb") as f:
        pickle.dump({"head.weight": Payload()}, f)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_exported_weights(model, bad)
    assert not os.path.exists(tmp_path / "ran")


def test_the_queue_starts_longest_first_and_a_final_as_soon_as_its_sweep_ends(monkeypatch):
    """_TrialQueue alone (records in a dict in place of result.json on S3): the longest trials
    first; a dataset's final, with the LR its held-out accuracies pick, ahead of shorter trials
    still queued as soon as its last sweep trial ends, finished or failed; none for a dataset
    whose sweep all failed; "finished" only when nothing running can add a final."""
    written: dict[str, dict] = {}
    monkeypatch.setattr(finetuning, "read_result", lambda config: written.get(config.trial))
    trials = finetuning.plan_trials(["CIFAR10", "Oxford-IIIT Pets", "VTAB/DTD"], steps_scale=0.02,
                                    steps={"CIFAR10": 300, "Oxford-IIIT Pets": 100})
    fanout = finetuning.FanoutSettings(run="r", model="ViT-Mu/4", weights="s3://runs/r/weights/model.safetensors",
                                       weights_sha256="0" * 64, data_root="s3://data/d", results="s3://runs/r/finetune")
    configs = {t.name: finetuning.trial_config(t, fanout) for t in trials if t.lr is not None}
    # A run before this one finished Pets' 0.001 sweep trial.
    records = {"Oxford-IIIT Pets/sweep-lr0.001": {"dataset": "Oxford-IIIT Pets", "stage": "sweep", "lr": 0.001,
                                                  "accuracy": 0.2, "status": "done"}}
    written.update(records)
    lines = []
    queue = finetuning._TrialQueue(configs, records, [t for t in trials if t.lr is None], settings=fanout,
                                   classes={}, log=lines.append)
    assert queue.size == 4 + 3 + 1 + 2  # the sweeps not run, DTD, a final per swept dataset

    def ends(name, accuracy=None):
        if accuracy is not None:
            config = queue.configs[name]
            written[name] = {"dataset": config.dataset, "stage": config.stage, "lr": config.base_lr,
                             "accuracy": accuracy, "status": "done"}
        queue.ended_trial(name)

    started = [queue.next().trial for _ in range(3)]
    assert started == ["CIFAR10/sweep-lr0.001", "CIFAR10/sweep-lr0.003", "CIFAR10/sweep-lr0.01"]
    assert queue.next().trial == "CIFAR10/sweep-lr0.03"
    for name, accuracy in zip(started, (0.5, 0.9, 0.9)):
        ends(name, accuracy)
    assert queue.next().trial == "Oxford-IIIT Pets/sweep-lr0.003"  # CIFAR10's 0.03 still training
    ends("CIFAR10/sweep-lr0.03")  # failed: no result.json
    # CIFAR10's final (300 steps) comes before the 100-step Pets trials and DTD's 50 steps; the
    # tie at 0.9 goes to the smaller LR.
    assert queue.next().trial == "CIFAR10/final-lr0.003"
    assert lines == ["CIFAR10: LR 0.003 picked on held-out data (lr 0.001: 0.5000, lr 0.003: 0.9000, lr 0.01: 0.9000)"]
    assert [queue.next().trial for _ in range(3)] == ["Oxford-IIIT Pets/sweep-lr0.01", "Oxford-IIIT Pets/sweep-lr0.03",
                                                      "VTAB/DTD/final-lr0.01"]
    assert queue.next() is None  # Pets' sweep may still add its final
    for name in ("Oxford-IIIT Pets/sweep-lr0.003", "Oxford-IIIT Pets/sweep-lr0.01"):
        ends(name, 0.1)
    assert queue.next() is None
    ends("Oxford-IIIT Pets/sweep-lr0.03", 0.7)
    assert queue.next().trial == "Oxford-IIIT Pets/final-lr0.03" and queue.queued == 2
    assert queue.next() == "finished"

    # A dataset whose every sweep trial failed gets no final.
    written.clear()
    queue = finetuning._TrialQueue({n: c for n, c in configs.items() if n.startswith("CIFAR10/sweep")}, {},
                                   [t for t in trials if t.lr is None and t.dataset == "CIFAR10"], settings=fanout,
                                   classes={}, log=lines.append)
    for _ in range(4):
        queue.ended_trial(queue.next().trial)
    assert queue.next() == "finished" and not any(n.startswith("CIFAR10/final") for n in queue.configs)
