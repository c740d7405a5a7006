"""The Grafana dashboard's panels, queried back from a Prometheus and drawn as PNG files.

    paths = plot_dashboard(prometheus, run="my-run", start=t0, end=t1, out_dir="plots/")

The dashboard (k8s/monitoring/dashboards/vitscale.json) is the one list of what to look at:
Kubernetes users get it in Grafana, a dry run gets the same panels as pictures.
"""

from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "k8s", "monitoring", "dashboards", "vitscale.json")
RATE_INTERVAL = "30s"  # what $__rate_interval stands for at a 1 s scrape interval


def panels(dashboard: dict) -> list[dict]:
    """Every panel of a dashboard, those nested in rows included (rows themselves left out)."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panels(panel))
        else:
            found.append(panel)
    return found


def panel_targets(panel: dict) -> list[dict]:
    return [t for t in panel.get("targets", []) if t.get("expr")]


def dashboard_panels(path: str = DASHBOARD, *, run: str = ".*") -> list[tuple[str, list[str], list[str]]]:
    """[(panel title, [PromQL of each target], [legend format of each])], Grafana's variables filled in: `run=~"$run"`
    becomes `run="<run>"` (or matches every run for ".*"), `$run` within a longer regex (the fan-out's trials,
    `run=~"$run-ft-.*"`) the run's name escaped, `$__rate_interval` RATE_INTERVAL."""
    with open(path) as f:
        dashboard = json.load(f)
    exact = run != ".*"
    # A run name is not a regex ('.' in it): match it exactly. In a longer regex its
    # punctuation is escaped, the backslash doubled for the PromQL string.
    literal = re.sub(r"([^A-Za-z0-9_-])", r"\\\\\1", run) if exact else run
    found = []
    for panel in panels(dashboard):
        targets = panel_targets(panel)
        if not targets:
            continue
        exprs = [t["expr"] for t in targets]
        if exact:
            exprs = [re.sub(r'run\s*=~\s*"\$\{?run\}?"', f'run="{run}"', e) for e in exprs]
        exprs = [e.replace("${run}", literal).replace("$run", literal)
                 .replace("${__rate_interval}", RATE_INTERVAL).replace("$__rate_interval", RATE_INTERVAL) for e in exprs]
        found.append((panel.get("title", "untitled"), exprs, [t.get("legendFormat", "") for t in targets]))
    return found


def plot_dashboard(prometheus, *, run: str, start: float, end: float, out_dir: str,
                   path: str = DASHBOARD) -> list[str]:
    """One PNG per panel with data; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for number, (title, exprs, legends) in enumerate(dashboard_panels(path, run=run), start=1):
        series = []
        for expr, legend in zip(exprs, legends):
            for result in prometheus.query_range(expr, start, end):
                metric = result["metric"]
                label = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), legend) if legend else ""
                if not label.strip():
                    label = " ".join(f"{k}={v}" for k, v in sorted(metric.items()) if k not in ("job", "instance")) or expr
                series.append((label, [(float(t) - start, float(v)) for t, v in result["values"]]))
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(7, 3.2))
        for label, points in series:
            axes.plot([t for t, _ in points], [v for _, v in points], label=label[:60])
        axes.set_title(title)
        axes.set_xlabel("seconds since the run started")
        axes.grid(alpha=0.3)
        if len(series) <= 8:
            axes.legend(fontsize=7)
        figure.tight_layout()
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "panel"
        target = os.path.join(out_dir, f"{number:02d}-{slug}.png")
        figure.savefig(target, dpi=90)
        plt.close(figure)
        written.append(target)
    return written
