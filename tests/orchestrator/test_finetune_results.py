"""The fan-out's LR pick, results.json, results.md and the sweep plots, from hand-made trial records."""

import json
import os

import pytest

from orchestrator import finetune_results as fr
from orchestrator.recipes import VTAB_TASKS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHA = "ab12cd34ef56" + "0" * 52


def done(dataset, stage, lr, correct, total=1000, steps=10_000):
    return {"dataset": dataset, "stage": stage, "lr": lr, "steps": steps, "status": "done",
            "accuracy": correct / total, "correct": correct, "total": total,
            "train_split": "train[:98%]" if stage == "sweep" else "train",
            "eval_split": "train[98%:]" if stage == "sweep" else "test",
            "wall_seconds": 12.3, "weights_sha256": "cd" * 32}


def failed(dataset, stage, lr, steps=10_000):
    return {"dataset": dataset, "stage": stage, "lr": lr, "steps": steps, "status": "failed",
            "error": "RuntimeError: CUDA out of memory"}


def not_run(dataset):
    return {"dataset": dataset, "stage": "final", "lr": None, "status": "not run", "error": "every sweep trial failed"}


def test_pick_lr_best_held_out_accuracy():
    sweep = [done("CIFAR10", "sweep", 0.001, 970), done("CIFAR10", "sweep", 0.003, 981),
             done("CIFAR10", "sweep", 0.01, 975)]
    assert fr.pick_lr(sweep) == 0.003


def test_pick_lr_tie_goes_to_the_smaller_lr():
    sweep = [done("CIFAR10", "sweep", 0.03, 981), done("CIFAR10", "sweep", 0.003, 981),
             done("CIFAR10", "sweep", 0.01, 981), done("CIFAR10", "sweep", 0.001, 900)]
    assert fr.pick_lr(sweep) == 0.003


def test_pick_lr_ignores_failures_and_is_none_when_nothing_finished():
    assert fr.pick_lr([failed("CIFAR10", "sweep", 0.003), done("CIFAR10", "sweep", 0.01, 500)]) == 0.01
    assert fr.pick_lr([failed("CIFAR10", "sweep", 0.003), failed("CIFAR10", "sweep", 0.01)]) is None
    assert fr.pick_lr([]) is None


# VTAB: one task per group, each with only a final trial.
VTAB_SCORES = {"VTAB/DTD": 0.70, "VTAB/EuroSAT": 0.96, "VTAB/Clevr/count": 0.59}


def mixed_records():
    records = [
        # CIFAR10: sweep done (one LR failed), final done.
        done("CIFAR10", "sweep", 0.001, 970), failed("CIFAR10", "sweep", 0.003),
        done("CIFAR10", "sweep", 0.01, 985), done("CIFAR10", "sweep", 0.03, 960),
        done("CIFAR10", "final", 0.01, 9_871, total=10_000),
        # Oxford-IIIT Pets: sweep done, final failed.
        done("Oxford-IIIT Pets", "sweep", 0.001, 90, total=100, steps=500),
        done("Oxford-IIIT Pets", "sweep", 0.003, 93, total=100, steps=500),
        failed("Oxford-IIIT Pets", "final", 0.003, steps=500),
        # ImageNet: every sweep trial failed, so the final never ran.
        failed("ImageNet", "sweep", 0.003, steps=20_000), failed("ImageNet", "sweep", 0.01, steps=20_000),
        not_run("ImageNet"),
    ]
    for name, accuracy in VTAB_SCORES.items():
        records.append(done(name, "final", 0.01, round(accuracy * 1000), steps=2_500))
    return records


@pytest.fixture
def summary():
    return fr.summarize(mixed_records(), run="vit-b16-jft", model="ViT-B/16",
                        weights="s3://bucket/runs/vit-b16-jft/weights.safetensors", weights_sha256=SHA)


def test_summarize_datasets_in_the_papers_order(summary):
    assert list(summary["datasets"]) == ["ImageNet", "CIFAR10", "Oxford-IIIT Pets",
                                         "VTAB/DTD", "VTAB/EuroSAT", "VTAB/Clevr/count"]
    assert {k: summary[k] for k in ("run", "model", "weights_sha256")} == {
        "run": "vit-b16-jft", "model": "ViT-B/16", "weights_sha256": SHA}
    assert summary["complete"] is False


def test_summarize_each_outcome(summary):
    cifar = summary["datasets"]["CIFAR10"]
    assert cifar["sweep"] == {"0.001": 0.97, "0.003": "failed", "0.01": 0.985, "0.03": 0.96}
    assert cifar["sweep_errors"] == {"0.003": "RuntimeError: CUDA out of memory"}
    assert (cifar["lr"], cifar["test_accuracy"], cifar["status"], cifar["steps"]) == (0.01, 0.9871, "done", 10_000)

    pets = summary["datasets"]["Oxford-IIIT Pets"]
    assert pets["sweep"] == {"0.001": 0.9, "0.003": 0.93}
    assert (pets["lr"], pets["test_accuracy"], pets["status"], pets["steps"]) == (0.003, None, "failed", 500)
    assert "out of memory" in pets["error"]

    imagenet = summary["datasets"]["ImageNet"]
    assert imagenet["sweep"] == {"0.003": "failed", "0.01": "failed"}
    assert (imagenet["lr"], imagenet["test_accuracy"], imagenet["status"]) == (None, None, "not run")
    assert imagenet["steps"] == 20_000  # from the sweep: the not-run record has none

    dtd = summary["datasets"]["VTAB/DTD"]
    assert (dtd["sweep"], dtd["lr"], dtd["test_accuracy"], dtd["vtab_group"]) == ({}, 0.01, 0.7, "natural")


def test_summarize_vtab_means_and_counts(summary):
    vtab = summary["vtab"]
    assert (vtab["tasks"], vtab["of"]) == (3, 19)
    assert vtab["mean"] == pytest.approx(sum(VTAB_SCORES.values()) / 3)
    groups = vtab["groups"]
    assert [(groups[g]["tasks"], groups[g]["of"]) for g in ("natural", "specialized", "structured")] == [
        (1, 7), (1, 4), (1, 8)]
    assert groups["natural"]["mean"] == pytest.approx(0.70)
    assert groups["specialized"]["mean"] == pytest.approx(0.96)
    assert groups["structured"]["mean"] == pytest.approx(0.59)
    assert len(vtab["missing"]) == 16 and "VTAB/DTD" not in vtab["missing"] and "VTAB/SVHN" in vtab["missing"]
    assert fr.VTAB_TASK_COUNT == sum(len(t) for t in VTAB_TASKS.values()) == 19


def test_summarize_complete_and_a_final_without_record():
    records = [done("CIFAR100", "sweep", 0.003, 900), done("CIFAR100", "final", 0.003, 9_100, total=10_000)]
    summary = fr.summarize(records, run="r", model="m", weights="w", weights_sha256=SHA)
    assert summary["complete"] is True and summary["vtab"]["mean"] is None and summary["vtab"]["tasks"] == 0
    # A sweep whose final left no record: not run, and not complete.
    summary = fr.summarize(records[:1], run="r", model="m", weights="w", weights_sha256=SHA)
    entry = summary["datasets"]["CIFAR100"]
    assert (entry["status"], entry["lr"], summary["complete"]) == ("not run", 0.003, False)
    assert fr.summarize([], run="r", model="m", weights="w", weights_sha256=SHA)["complete"] is False


def test_summarize_a_retried_trial_keeps_the_finished_record():
    records = [done("CIFAR10", "sweep", 0.01, 985), failed("CIFAR10", "sweep", 0.01),
               failed("CIFAR10", "final", 0.01), done("CIFAR10", "final", 0.01, 980)]
    entry = fr.summarize(records, run="r", model="m", weights="w", weights_sha256=SHA)["datasets"]["CIFAR10"]
    assert (entry["sweep"], entry["test_accuracy"]) == ({"0.01": 0.985}, 0.98)


def test_summarize_rejects_a_record_of_unknown_shape():
    with pytest.raises(ValueError, match="not a trial record"):
        fr.summarize([{"dataset": "CIFAR10", "stage": "eval", "status": "done"}],
                     run="r", model="m", weights="w", weights_sha256=SHA)


def test_results_markdown(summary):
    md = fr.results_markdown(summary)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "vit-b16-jft" in md and "ViT-B/16" in md and "`ab12cd34ef56`" in md and SHA not in md
    assert rows["CIFAR-10"] == (
        "| CIFAR-10 | 98.71 | 0.01 | 0.001: 97.00, 0.003: failed, **0.01: 98.50**, 0.03: 96.00 | 10000 |")
    assert rows["Oxford-IIIT Pets"].startswith("| Oxford-IIIT Pets | failed | 0.003 | 0.001: 90.00, **0.003: 93.00** |")
    assert rows["ImageNet"].startswith("| ImageNet | not run | — | 0.003: failed, 0.01: failed | 20000 |")
    mean = 100 * sum(VTAB_SCORES.values()) / 3
    assert rows["VTAB mean (3 of 19 tasks)"] == f"| VTAB mean (3 of 19 tasks) | {mean:.2f} | 0.01 | — | 2500 |"
    assert rows["VTAB Natural (1 of 7 tasks)"].startswith("| VTAB Natural (1 of 7 tasks) | 70.00 |")
    assert rows["VTAB Specialized (1 of 4 tasks)"].startswith("| VTAB Specialized (1 of 4 tasks) | 96.00 |")
    assert rows["VTAB Structured (1 of 8 tasks)"].startswith("| VTAB Structured (1 of 8 tasks) | 59.00 |")
    assert "| structured | Clevr/count | 59.00 | 0.01 | 2500 |" in md
    assert "- Oxford-IIIT Pets, final: failed: RuntimeError: CUDA out of memory" in md
    assert "- CIFAR-10, sweep at LR 0.003: failed: RuntimeError: CUDA out of memory" in md
    assert "- ImageNet, final: not run: every sweep trial failed" in md
    assert "CIFAR-100" not in rows  # absent from the records, absent from the table
    # Table 2's order: the five datasets, then the VTAB rows.
    order = [k for k in rows if not k.startswith(("Dataset", "Group", "natural", "specialized", "structured"))]
    assert order == ["ImageNet", "CIFAR-10", "Oxford-IIIT Pets", "VTAB mean (3 of 19 tasks)",
                     "VTAB Natural (1 of 7 tasks)", "VTAB Specialized (1 of 4 tasks)", "VTAB Structured (1 of 8 tasks)"]


def test_results_markdown_every_vtab_task():
    records = [done(f"VTAB/{task}", "final", 0.01, 500 + i, steps=2_500)
               for i, task in enumerate(t for tasks in VTAB_TASKS.values() for t in tasks)]
    md = fr.results_markdown(fr.summarize(records, run="r", model="m", weights="w", weights_sha256=SHA))
    assert "| VTAB (19 tasks) mean | 50.90 | 0.01 | — | 2500 |" in md
    assert "| VTAB Natural | 50.30 |" in md and "of 19 tasks" not in md and "without a test figure" not in md


def test_plot_sweeps_writes_valid_pngs(summary, tmp_path):
    paths = fr.plot_sweeps(summary, str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in paths] == [
        "sweep-imagenet.png", "sweep-cifar10.png", "sweep-oxford-iiit-pets.png"]  # VTAB tasks have no sweep
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, path
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        assert width >= 300 and height >= 200
    assert fr.sweep_plot_name("Oxford Flowers-102") == "sweep-oxford-flowers-102.png"


def test_write_results_round_trips(summary, tmp_path):
    out = tmp_path / "results"
    paths = fr.write_results(summary, str(out))
    assert [os.path.basename(p) for p in paths] == [
        "results.json", "sweep-imagenet.png", "sweep-cifar10.png", "sweep-oxford-iiit-pets.png", "results.md"]
    assert all(os.path.isfile(p) for p in paths)
    with open(out / "results.json") as f:
        assert json.load(f) == summary
    md = (out / "results.md").read_text()
    assert md.startswith(fr.results_markdown(summary)) and "![sweep-cifar10.png](sweep-cifar10.png)" in md


def test_vtab_tasks_outside_the_fan_out_are_said_to_be_so_not_failed_or_not_run():
    records = [done("VTAB/DTD", "final", 0.01, 600, steps=2500), failed("VTAB/SVHN", "final", 0.01, steps=2500)]
    md = fr.results_markdown(fr.summarize(records, run="r", model="ViT-B/16", weights="w", weights_sha256="ab" * 32))
    assert "| VTAB Structured (0 of 8 tasks) | not in this fan-out |" in md
    assert "VTAB tasks without a test figure: SVHN." in md
    assert "VTAB tasks not in this fan-out: Caltech101, CIFAR-100, Flowers102, Pets, Sun397, Patch Camelyon" in md
