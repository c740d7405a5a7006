"""The fine-tuning fan-out's LR pick and its results: results.json, results.md, sweep plots.

    paths = write_results(summarize(records, run=run, model=model, weights=url, weights_sha256=sha), out_dir)

Per downstream dataset (seed table 2) the fan-out runs one "sweep" trial per LR of the grid
(trained on train minus a held-out part, evaluated on that part), picks the LR with
`pick_lr`, then one "final" trial with it (all of train, evaluated on test: the reported
figure). VTAB-1k tasks have one LR and so only a final trial. Every trial leaves one record
(its result.json), of one of three shapes:

    {"dataset", "stage": "sweep"|"final", "lr", "steps", "status": "done", "accuracy",
     "correct", "total", "train_split", "eval_split", "wall_seconds", "weights_sha256"}
    {"dataset", "stage", "lr", "steps", "status": "failed", "error": "one line"}
    {"dataset", "stage": "final", "lr": None, "status": "not run", "error": "every sweep trial failed"}

Accuracies are fractions in results.json and percentages (2 decimals) in results.md. Pure
code: no Ray, no S3; matplotlib is imported only by `plot_sweeps`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from orchestrator.recipes import VTAB_PREFIX, VTAB_TASKS

VTAB_DATASETS = {group: tuple(VTAB_PREFIX + task for task in tasks) for group, tasks in VTAB_TASKS.items()}
VTAB_TASK_COUNT = sum(len(tasks) for tasks in VTAB_DATASETS.values())
_VTAB_GROUP_OF = {name: group for group, names in VTAB_DATASETS.items() for name in names}

# The paper's order (Table 2), with its spelling of each name.
PAPER_ORDER = ("ImageNet", "CIFAR10", "CIFAR100", "Oxford-IIIT Pets", "Oxford Flowers-102") + tuple(
    name for names in VTAB_DATASETS.values() for name in names
)
DISPLAY_NAMES = {"CIFAR10": "CIFAR-10", "CIFAR100": "CIFAR-100"}

STAGES = ("sweep", "final")
STATUSES = ("done", "failed", "not run")


def pick_lr(sweep: list[dict]) -> float | None:
    """The LR whose sweep trial scored best on the held-out part; ties go to the smaller LR.

    Trials that did not finish ("failed") are ignored; None when none finished.
    """
    done = [r for r in sweep if r.get("status") == "done"]
    if not done:
        return None
    return min(done, key=lambda r: (-r["accuracy"], r["lr"]))["lr"]


def lr_key(lr: float) -> str:
    """How an LR is written as a key of a summary's "sweep" (JSON keys are strings)."""
    return repr(float(lr))


def _check(record: dict) -> None:
    if record.get("stage") not in STAGES or record.get("status") not in STATUSES or "dataset" not in record:
        raise ValueError(
            f"not a trial record (needs dataset, stage in {STAGES}, status in {STATUSES}): {record!r}"[:300]
        )


def _keep(old: dict | None, new: dict) -> dict:
    """Of two records of the same trial (a retry), a finished one wins; otherwise the later."""
    if old is not None and old["status"] == "done" and new["status"] != "done":
        return old
    return new


def _dataset_summary(name: str, sweep: dict[float, dict], final: dict | None) -> dict[str, Any]:
    sweep_records = [sweep[lr] for lr in sorted(sweep)]
    if final is None:
        # No final record: the fan-out never got to it (or lost it).
        error = "every sweep trial failed" if sweep and pick_lr(sweep_records) is None else "no final trial recorded"
        final = {"status": "not run", "lr": None, "error": error}
    chosen = final.get("lr")
    if chosen is None:
        chosen = pick_lr(sweep_records)
    steps = final.get("steps")
    if steps is None and sweep_records:
        steps = sweep_records[0].get("steps")
    done = final["status"] == "done"
    return {
        "sweep": {lr_key(r["lr"]): r["accuracy"] if r["status"] == "done" else "failed" for r in sweep_records},
        "sweep_errors": {lr_key(r["lr"]): r.get("error") for r in sweep_records if r["status"] != "done"},
        "lr": chosen,
        "test_accuracy": final["accuracy"] if done else None,
        "test_correct": final.get("correct") if done else None,
        "test_total": final.get("total") if done else None,
        "train_split": final.get("train_split"),
        "eval_split": final.get("eval_split"),
        "status": final["status"],
        "error": None if done else final.get("error"),
        "steps": steps,
        "vtab_group": _VTAB_GROUP_OF.get(name),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _vtab_summary(datasets: dict[str, dict]) -> dict[str, Any]:
    """Means of the VTAB tasks' test accuracies, over those that have one (overall and per group)."""
    groups = {}
    all_scores, missing = [], []
    for group, names in VTAB_DATASETS.items():
        figures = {n: datasets[n]["test_accuracy"] for n in names if n in datasets}
        scores = [a for a in figures.values() if a is not None]
        group_missing = [n for n in names if figures.get(n) is None]
        groups[group] = {"mean": _mean(scores), "tasks": len(scores), "of": len(names), "missing": group_missing}
        all_scores += scores
        missing += group_missing
    return {"mean": _mean(all_scores), "tasks": len(all_scores), "of": VTAB_TASK_COUNT, "missing": missing,
            "groups": groups}


def summarize(records: list[dict], *, run: str, model: str, weights: str, weights_sha256: str) -> dict:
    """results.json's content: run info, one entry per dataset in the records, the VTAB means.

    Datasets come in the paper's order (names it does not list follow, in order of first
    appearance). "complete" is true when there is at least one dataset and every one has a
    test figure. VTAB means are over the tasks with a test figure; "tasks" says how many.
    """
    sweeps: dict[str, dict[float, dict]] = {}
    finals: dict[str, dict] = {}
    for record in records:
        _check(record)
        name = record["dataset"]
        sweeps.setdefault(name, {})
        if record["stage"] == "sweep":
            lr = float(record["lr"])
            sweeps[name][lr] = _keep(sweeps[name].get(lr), record)
        else:
            finals[name] = _keep(finals.get(name), record)
    rank = {name: i for i, name in enumerate(PAPER_ORDER)}
    order = sorted(sweeps, key=lambda n: rank.get(n, len(rank)))  # stable: unknown names keep their order
    datasets = {name: _dataset_summary(name, sweeps[name], finals.get(name)) for name in order}
    return {
        "run": run,
        "model": model,
        "weights": weights,
        "weights_sha256": weights_sha256,
        "datasets": datasets,
        "vtab": _vtab_summary(datasets),
        "complete": bool(datasets) and all(d["test_accuracy"] is not None for d in datasets.values()),
    }


def _percent(accuracy: float | None) -> str:
    return "" if accuracy is None else f"{100 * accuracy:.2f}"


def _lr_text(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def _sweep_cell(sweep: dict[str, Any], chosen: float | None) -> str:
    if not sweep:
        return "—"
    cells = []
    for key, accuracy in sweep.items():
        text = f"{float(key):g}: " + ("failed" if accuracy == "failed" else _percent(accuracy))
        cells.append(f"**{text}**" if chosen is not None and float(key) == chosen else text)
    return ", ".join(cells)


def _vtab_row(label: str, entry: dict, tasks: list[dict], *, all_label: str | None = None) -> str:
    """One aggregate row; LR and steps shown when every task present agrees on them."""
    if entry["tasks"] < entry["of"]:
        label += f" ({entry['tasks']} of {entry['of']} tasks)"
    elif all_label:
        label = all_label
    if entry["mean"] is not None:
        figure = _percent(entry["mean"])
    else:
        # No figure: its tasks failed, did not run, or none of them was in this fan-out at all.
        figure = ("failed" if any(t["status"] == "failed" for t in tasks) else "not run" if tasks
                  else "not in this fan-out")
    lrs = {t["lr"] for t in tasks if t["lr"] is not None}
    steps = {t["steps"] for t in tasks if t["steps"] is not None}
    lr = _lr_text(lrs.pop()) if len(lrs) == 1 else "—"
    return f"| {label} | {figure} | {lr} | — | {steps.pop() if len(steps) == 1 else '—'} |"


def results_markdown(summary: dict, *, plots: list[str] = ()) -> str:
    """results.md: the paper's Table 2 layout for one model, then the VTAB tasks one by one.

    Args:
        plots: sweep plots to link (by file name, as they lie beside results.md).
    """
    datasets = summary["datasets"]
    lines = [
        f"# Fine-tuning results: {summary['run']}",
        "",
        f"- Model: {summary['model']}",
        f"- Pretrained weights: `{summary['weights']}` (sha256 `{summary['weights_sha256'][:12]}`)",
        f"- Complete: {'yes' if summary['complete'] else 'no'}"
        f" ({sum(d['test_accuracy'] is not None for d in datasets.values())} of {len(datasets)}"
        " datasets have a test figure)",
        "",
        "Test accuracy: the final trial (all of train, the chosen LR) on the test split. Held-out"
        " accuracy: each sweep trial (train less its held-out part) on that held-out part; the chosen"
        " LR in bold. Accuracies in percent.",
        "",
        "| Dataset | Test accuracy (%) | LR | Held-out accuracy (%) by LR | Steps |",
        "|---|---:|---:|---|---:|",
    ]
    for name, d in datasets.items():
        if d["vtab_group"] is not None:
            continue
        figure = _percent(d["test_accuracy"]) if d["status"] == "done" else d["status"]
        steps = "—" if d["steps"] is None else d["steps"]
        lines.append(f"| {DISPLAY_NAMES.get(name, name)} | {figure} | {_lr_text(d['lr'])} |"
                     f" {_sweep_cell(d['sweep'], d['lr'])} | {steps} |")
    vtab_tasks = {n: d for n, d in datasets.items() if d["vtab_group"] is not None}
    if vtab_tasks:
        vtab = summary["vtab"]
        all_label = f"VTAB ({vtab['of']} tasks) mean"
        lines.append(_vtab_row("VTAB mean", vtab, list(vtab_tasks.values()), all_label=all_label))
        for group, entry in vtab["groups"].items():
            in_group = [d for d in vtab_tasks.values() if d["vtab_group"] == group]
            lines.append(_vtab_row(f"VTAB {group.capitalize()}", entry, in_group))
        lines += ["", "VTAB-1k tasks (means above are over the tasks with a test figure):", "",
                  "| Group | Task | Test accuracy (%) | LR | Steps |", "|---|---|---:|---:|---:|"]
        for name, d in vtab_tasks.items():
            figure = _percent(d["test_accuracy"]) if d["status"] == "done" else d["status"]
            lines.append(f"| {d['vtab_group']} | {name[len(VTAB_PREFIX):]} | {figure} | {_lr_text(d['lr'])} |"
                         f" {'—' if d['steps'] is None else d['steps']} |")
        absent = [n for n in summary["vtab"]["missing"] if n not in vtab_tasks]
        unscored = [n for n in summary["vtab"]["missing"] if n in vtab_tasks]
        if unscored:
            lines += ["", "VTAB tasks without a test figure: " + ", ".join(n[len(VTAB_PREFIX):] for n in unscored) + "."]
        if absent:
            lines += ["", "VTAB tasks not in this fan-out: " + ", ".join(n[len(VTAB_PREFIX):] for n in absent) + "."]
    problems = [(name, d) for name, d in datasets.items() if d["status"] != "done"]
    failed_sweeps = [(name, k, e) for name, d in datasets.items() for k, e in d["sweep_errors"].items()]
    if problems or failed_sweeps:
        lines += ["", "## Trials without a figure", ""]
        lines += [f"- {DISPLAY_NAMES.get(n, n)}, final: {d['status']}: {d['error'] or 'no error given'}"
                  for n, d in problems]
        lines += [f"- {DISPLAY_NAMES.get(n, n)}, sweep at LR {float(k):g}: failed: {e or 'no error given'}"
                  for n, k, e in failed_sweeps]
    if plots:
        lines += ["", "## LR sweeps", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def sweep_plot_name(dataset: str) -> str:
    """"Oxford-IIIT Pets" -> "sweep-oxford-iiit-pets.png"."""
    return "sweep-" + (re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset") + ".png"


def plot_sweeps(summary: dict, out_dir: str) -> list[str]:
    """One PNG per dataset with a sweep: held-out accuracy against LR (log axis), the chosen LR starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, d in summary["datasets"].items():
        if not d["sweep"]:
            continue
        points = sorted((float(k), 100 * v) for k, v in d["sweep"].items() if v != "failed")
        failed = [float(k) for k, v in d["sweep"].items() if v == "failed"]
        figure, axes = plt.subplots(figsize=(5, 3.4))
        title = f"{DISPLAY_NAMES.get(name, name)}: LR sweep"
        if failed:
            title += f"\n(failed, not shown: LR {', '.join(f'{lr:g}' for lr in failed)})"
        if points:
            axes.plot([lr for lr, _ in points], [a for _, a in points], "o-", color="tab:blue")
        else:
            axes.text(0.5, 0.5, "no sweep trial finished", ha="center", va="center", transform=axes.transAxes)
        chosen = d["lr"]
        held_out = dict(points).get(chosen) if chosen is not None else None
        if held_out is not None:
            label = f"chosen LR {chosen:g}"
            if d["test_accuracy"] is not None:
                label += f" (test {100 * d['test_accuracy']:.2f}%)"
            axes.plot([chosen], [held_out], "*", color="tab:red", markersize=16, label=label)
            axes.legend(fontsize=8)
        axes.set_xscale("log")
        ticks = sorted(float(k) for k in d["sweep"])
        axes.set_xticks(ticks, [f"{lr:g}" for lr in ticks])
        axes.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)  # every swept LR in view, failed ones too
        axes.minorticks_off()
        axes.set_xlabel("learning rate")
        axes.set_ylabel("held-out accuracy (%)")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        target = os.path.join(out_dir, sweep_plot_name(name))
        figure.savefig(target, dpi=90)
        plt.close(figure)
        written.append(target)
    return written


def write_results(summary: dict, out_dir: str) -> list[str]:
    """results.json, the sweep PNGs and results.md (which links them) into out_dir; every path written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    plots = plot_sweeps(summary, out_dir)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(results_markdown(summary, plots=plots))
    return [json_path, *plots, md_path]
