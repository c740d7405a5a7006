"""A run's report: report.md, results.json and its figures, in runs/<run>/ and beside the run.

    path = write_report(config, fanout=(summary, finetune_folder), metric_plots="runs/<run>/metrics")

What it holds, each part from where the run left it (nothing is re-typed or assumed):
- the resolved config and the plan that ran (pretraining's steps and batch, every fine-tuning
  trial of the fan-out as --print-plan shows it);
- loss, learning rate and throughput over the steps, with each checkpoint's commit marked,
  from the run's own history (rank 0's parts under `<checkpoints>/<run>/history/`,
  orchestrator/train_loop.py), so they are there with or without a Prometheus; the dashboard's
  panels too when a local Prometheus drew them (orchestrator/dry_run.py);
- the fan-out's results table (its results.md) and its LR-sweep plots;
- the seed's Figure 7 for the exported weights beside the initialisation
  (orchestrator/seed_figures.py), with its one line saying what the numbers show, and only that.

Local layout: runs/<run>/report.md, results.json, report/*.png, finetune/ (the fan-out's),
metrics/ (the dashboard's panels); the same names under `<checkpoints>/<run>/`, so that the
report's relative links hold in both places.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from orchestrator.config import PretrainConfig

OUTPUT = "runs"
# Images the seed's attention-distance figure averages over (its title says how many): 16 take
# a quarter of 64's time (0.4 s against 1.6 s for ViT-Mu/4 at 96 px on a 2-core machine).
FIGURE_SAMPLES = 16


def read_history(url: str, factory=None) -> tuple[list[dict], list[dict]]:
    """(rows by step, commits by step) from the history parts at `url`. Parts are read in the
    order of their names (wall time), and a later row or commit of a step replaces an earlier
    one: a resumed run re-logs the steps after its checkpoint."""
    from data_pipelines.s3 import join_location
    from data_pipelines.storage import read_bytes
    from data_pipelines.transfer import list_prefix

    rows: dict[int, dict] = {}
    commits: dict[int, dict] = {}
    for name in sorted(k for k in list_prefix(url, factory) if k.endswith(".jsonl")):
        for line in read_bytes(join_location(url, name), factory).decode().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if "commit" in entry:
                commits[int(entry["commit"])] = entry
            elif "step" in entry:
                # A resumed attempt starts again after its checkpoint: its rows replace the
                # first attempt's from there on.
                for later in [s for s in rows if s >= entry["step"] and rows[s]["time"] < entry["time"]]:
                    del rows[later]
                rows[int(entry["step"])] = entry
    return [rows[s] for s in sorted(rows)], [commits[s] for s in sorted(commits)]


def draw_history(rows: list[dict], commits: list[dict], path: str, title: str) -> str:
    """Loss, learning rate and images per second against the step, one panel each, with a
    dashed line at each committed checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    steps = [r["step"] for r in rows]
    for ax, key, label in zip(axes, ("loss", "lr", "images_per_second"),
                              ("training loss", "learning rate", "images / s (all workers)")):
        ax.plot(steps, [r.get(key) for r in rows], marker="o", markersize=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for i, commit in enumerate(commits):
            ax.axvline(commit["commit"], color="tab:green", linestyle="--", linewidth=1,
                       label="checkpoint committed" if i == 0 else None)
    if commits:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plan_rows(config: PretrainConfig) -> list[dict]:
    from orchestrator.finetuning import plan_for

    return [t.public() for t in plan_for(config)] if config.finetune and config.finetune_data else []


def _markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value: Any) -> str:
        return "picked on held-out data" if value is None else str(value)

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows])


def write_report(config: PretrainConfig, *, fanout: tuple[dict, str] | None = None, metric_plots: str | None = None,
                 figure_images: str | None = None, note: str | None = None,
                 log: Callable[[str], None] = print) -> str:
    """Writes runs/<run>/report.md, results.json and report/*.png, uploads them beside the run,
    and returns the local report.md's path.

    Args:
        fanout: the fan-out's (summary, local folder of its results), if it ran.
        metric_plots: the local folder of the dashboard's panels, if a Prometheus drew them.
        figure_images: shards to average the attention distances over (default: synthetic).
        note: said of the fine-tuning data under the plan (the dry run's stand-ins).
    """
    from data_pipelines.s3 import join_location
    from data_pipelines.transfer import upload_file
    from orchestrator.seed_figures import figures_of_export
    from orchestrator.train_loop import history_url, run_url, weights_url

    out = os.path.join(OUTPUT, config.run_name)
    figures = os.path.join(out, "report")
    os.makedirs(figures, exist_ok=True)
    lines = [f"# vitscale run `{config.run_name}`", "",
             f"{config.model} on {config.dataset}{' (dry run: the recipe’s debug twin)' if config.dry_run else ''}, "
             f"{config.workers} worker(s); checkpoints and weights in `{run_url(config)}`.", ""]
    results: dict[str, Any] = {"run": config.run_name, "config": config.model_dump(mode="json")}

    # The plan.
    plan = _plan_rows(config)
    lines += ["## Plan", "",
              f"Pretraining: {config.steps} steps of {config.global_batch_size} images "
              f"({config.workers} worker(s) x {config.micro_batch_size} x {config.gradient_accumulation_steps} "
              f"accumulation), {config.image_size} px, a checkpoint every {config.checkpoint_every} steps.", ""]
    if plan:
        lines += [f"Fine-tuning: {len(plan)} trials over {len({p['dataset'] for p in plan})} datasets from "
                  f"`{config.finetune_data}`:", ""]
        lines += _markdown_table(plan, ["dataset", "stage", "lr", "steps", "warmup_steps", "batch_size", "image_size",
                                        "train_split", "eval_split"]) + [""]
        if note:
            lines += [note, ""]
    else:
        lines += ["Fine-tuning: none (no fine-tuning data, or --no-finetune).", ""]
    results["plan"] = plan

    # Pretraining, from the run's own history.
    rows, commits = read_history(history_url(config))
    lines += ["## Pretraining", ""]
    if rows:
        chart = draw_history(rows, commits, os.path.join(figures, "pretraining.png"),
                             f"{config.run_name}: {len(rows)} logged steps, {len(commits)} checkpoints committed")
        last = rows[-1]
        lines += [f"From the run's own history (`{history_url(config)}`, rank 0 every {config.log_every} steps): "
                  f"step {last['step']}, loss {last['loss']:.4f} (first logged: {rows[0]['loss']:.4f} at step "
                  f"{rows[0]['step']}).", "", f"![loss, learning rate and throughput](report/{os.path.basename(chart)})",
                  ""]
    else:
        lines += [f"No history at `{history_url(config)}`: the run logged no step.", ""]
    if commits:
        lines += ["Checkpoints committed (step: time): " + ", ".join(
            f"{c['commit']}: {_clock(c['time'])}" for c in commits) + ".", ""]
    results["pretraining"] = {"history": rows, "commits": commits}
    if metric_plots and os.path.isdir(metric_plots):
        panels = sorted(p for p in os.listdir(metric_plots) if p.endswith(".png"))
        rel = os.path.relpath(metric_plots, out)
        lines += [f"The Grafana dashboard's {len(panels)} panels, drawn from the local Prometheus that scraped the "
                  f"run: `{rel}/` ({', '.join(panels[:4])}{', ...' if len(panels) > 4 else ''}).", ""]

    # The fan-out.
    lines += ["## Fine-tuning", ""]
    if fanout is not None:
        summary, folder = fanout
        rel = os.path.relpath(folder, out)
        with open(os.path.join(folder, "results.md")) as f:
            table = f.read().strip()
        # Its plots' links are relative to its folder: make them relative to the report's; its
        # headings go two levels down, under this one.
        table = table.replace("](", f"]({rel}/")
        table = "\n".join("##" + line if line.startswith("#") else line for line in table.splitlines())
        lines += [f"The fan-out's results (`{rel}/results.md`, and beside the run):", "", table, ""]
        results["finetune"] = summary
    else:
        lines += ["The fan-out did not run.", ""]

    # The seed's figures.
    lines += ["## The seed's figures (PAPER.md, Figure 7)", ""]
    seed = figures_of_export(weights_url(config), images=figure_images, out_dir=os.path.join(figures, "seed"),
                             samples=FIGURE_SAMPLES)
    names = {os.path.basename(p): f"report/seed/{os.path.basename(p)}" for p in seed["paths"]}
    lines += [f"What the numbers show: {seed['statement']}.", "",
              "| | at initialisation | trained |", "|---|---|---|",
              f"| position-embedding similarity | ![]({names['position_similarity_initial.png']}) | "
              f"![]({names['position_similarity_trained.png']}) |",
              f"| mean attention distance per head | ![]({names['attention_distance_initial.png']}) | "
              f"![]({names['attention_distance_trained.png']}) |", ""]
    results["seed_figures"] = {k: v for k, v in seed.items() if k not in ("paths", "out_dir")}

    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    remote = run_url(config)
    uploaded = [report, os.path.join(out, "results.json")]
    for folder, _, files in os.walk(figures):
        uploaded += [os.path.join(folder, name) for name in files]
    for path in uploaded:
        upload_file(path, join_location(remote, os.path.relpath(path, out)))
    log(f"report: {report} and {join_location(remote, 'report.md')}")
    return report


def _clock(epoch: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%H:%M:%S UTC")
