"""Prometheus metrics: the exporter on its own, then a real Prometheus scraping a real 2-worker run."""

import json
import math
import os
import re
import signal
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from data_pipelines.transfer import list_prefix
from orchestrator.local_prometheus import LocalPrometheus, free_ports
from orchestrator.metric_plots import DASHBOARD, dashboard_panels, plot_dashboard
from orchestrator.metrics import FAMILIES, FANOUT_FAMILIES, DriverMetrics, FanoutMetrics, MetricsError, WorkerMetrics
from orchestrator.pretraining import run_pretraining
from orchestrator.train_loop import checkpoint_url
from tests.orchestrator.conftest import config_for


def scrape(url: str) -> dict[str, float]:
    """{'name{label="v",...}': value} of one /metrics page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def fanout_panel_titles() -> set[str]:
    """The panels of the dashboard's last row, "Fine-tuning fan-out" (its panels follow it)."""
    with open(DASHBOARD) as f:
        top = json.load(f)["panels"]
    (at,) = [i for i, p in enumerate(top) if p.get("type") == "row" and p["title"] == "Fine-tuning fan-out"]
    assert not [p for p in top[at + 1:] if p.get("type") == "row"], "the fan-out row is the last"
    return {p["title"] for p in top[at + 1:] + top[at].get("panels", [])}


def test_free_ports_come_from_below_the_range_the_kernel_hands_out():
    """The ports a dry run picks for its exporters are bound only later, by the workers: from
    the ephemeral range, Ray or any client could take one meanwhile."""
    import socket

    from orchestrator.local_prometheus import FIRST_QUIET_PORT, first_ephemeral_port

    low = first_ephemeral_port()
    bases = {free_ports(3) for _ in range(20)}
    assert len(bases) > 1  # picked at random: concurrent runs seldom try the same
    for base in bases:
        assert FIRST_QUIET_PORT <= base and base + 3 <= low
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 2))  # free when returned


def test_worker_exporter_sets_gauges_advances_counters_and_observes_histograms():
    metrics = WorkerMetrics("r", 3, "node-a", address="127.0.0.1", port=free_ports(1))
    try:
        metrics.log({"vitscale_loss": 2.5, "vitscale_images_total": 64, "vitscale_step_seconds": [0.2, 0.7]}, 1)
        metrics.log({"vitscale_loss": 2.0, "vitscale_images_total": 128, "vitscale_step_seconds": 0.3}, 2)
        page = scrape(metrics.url)
    finally:
        metrics.close()
    labels = "node=node-a,rank=3,run=r"
    assert page[f"vitscale_loss{{{labels}}}"] == 2.0
    assert page[f"vitscale_images_total{{{labels}}}"] == 128  # running totals, not increments
    assert page[f"vitscale_step_seconds_count{{{labels}}}"] == 3
    assert page[f"vitscale_step_seconds_sum{{{labels}}}"] == pytest.approx(1.2)
    assert not any("_created" in k for k in page)
    exposed = {re.sub(r"(_bucket|_sum|_count)?\{.*", "", k) for k in page if k.startswith("vitscale_")}
    worker = {f.name for f in FAMILIES if f.source == "worker"}
    # Counters and histograms from the start; a gauge only once it has a value.
    assert {f.name for f in FAMILIES if f.source == "worker" and f.kind != "gauge"} | {"vitscale_loss"} == exposed
    assert exposed <= worker


def test_driver_counts_restarts_at_scrape_time_and_a_taken_port_is_a_clear_error():
    starts = [1]
    port = free_ports(1)
    driver = DriverMetrics("r", model="ViT-Mu/4", dataset="JFT-300M", workers=4, starts=lambda: starts[0],
                           address="127.0.0.1", port=port)
    try:
        assert scrape(driver.url)["vitscale_restarts_total{run=r}"] == 0
        starts[0] = 3
        page = scrape(driver.url)
        assert page["vitscale_restarts_total{run=r}"] == 2
        assert page["vitscale_workers{run=r}"] == 4
        assert page["vitscale_run_info{dataset=JFT-300M,model=ViT-Mu/4,run=r}"] == 1
        assert "vitscale_finetune_" not in urllib.request.urlopen(driver.url, timeout=5).read().decode()
        with pytest.raises(MetricsError, match=rf"127.0.0.1:{port}.*metrics_port"):
            WorkerMetrics("r", 0, "n", address="127.0.0.1", port=port)
    finally:
        driver.close()


def test_fanout_exporter_counts_trials_by_state_and_accuracies_by_dataset():
    port = free_ports(1)
    fanout = FanoutMetrics("vit-b-16-jft-300m", address="127.0.0.1", port=port)
    try:
        assert not any(k.startswith("vitscale_") for k in scrape(fanout.url))  # nothing set yet
        fanout.set_trials(pending=44, running=0, done=0, failed=0)
        fanout.set_trials(pending=30, running=4, done=8, failed=2)
        fanout.set_best_heldout("CIFAR10", 0.91)
        fanout.set_best_heldout("CIFAR10", 0.95)
        fanout.set_best_heldout("Oxford-IIIT Pets", 0.88)
        fanout.set_best_heldout("VTAB/Caltech101", 0.9)
        fanout.set_test_accuracy("CIFAR10", 0.948)
        page = scrape(fanout.url)
        with pytest.raises(MetricsError, match=rf"127.0.0.1:{port}.*metrics_port"):
            FanoutMetrics("other", address="127.0.0.1", port=port)
    finally:
        fanout.close()
    run = "run=vit-b-16-jft-300m"
    assert {k: v for k, v in page.items() if k.startswith("vitscale_")} == {
        f"vitscale_finetune_trials{{{run},state=pending}}": 30,
        f"vitscale_finetune_trials{{{run},state=running}}": 4,
        f"vitscale_finetune_trials{{{run},state=done}}": 8,
        f"vitscale_finetune_trials{{{run},state=failed}}": 2,
        f"vitscale_finetune_best_heldout_accuracy{{dataset=CIFAR10,{run}}}": 0.95,
        f"vitscale_finetune_best_heldout_accuracy{{dataset=Oxford-IIIT Pets,{run}}}": 0.88,
        f"vitscale_finetune_best_heldout_accuracy{{dataset=VTAB/Caltech101,{run}}}": 0.9,
        f"vitscale_finetune_test_accuracy{{dataset=CIFAR10,{run}}}": 0.948,  # the others' are not known yet
    }
    assert {f.name for f in FAMILIES if f.name.startswith("vitscale_finetune_")} == set(FANOUT_FAMILIES)
    assert all(f.source == "driver" for f in FAMILIES if f.name in FANOUT_FAMILIES)
    assert fanout.url is None  # closed


def test_prometheus_draws_the_fanout_row_from_the_fanout_driver_and_its_trials(tmp_path):
    """A real Prometheus scrapes a fan-out's driver and two trials' workers, beside a trial of
    another run whose name matches only if the run's '.' were taken as a regex: the fan-out row
    shows this run's figures and trials only, and its panels, alone with data, are drawn."""
    run = "vit-mu-4.v2"
    base = free_ports(4)
    fanout = FanoutMetrics(run, address="127.0.0.1", port=base)
    trials = [WorkerMetrics(name, 0, "n0", address="127.0.0.1", port=base + 1 + i)
              for i, name in enumerate((f"{run}-ft-cifar10-sweep-lr0.003", f"{run}-ft-cifar10-sweep-lr0.01",
                                        "vit-mu-4xv2-ft-cifar10-sweep-lr0.003"))]
    try:
        with LocalPrometheus([f"127.0.0.1:{base + i}" for i in range(4)], data_dir=str(tmp_path / "prometheus")) as prometheus:
            began = time.time()
            fanout.set_trials(pending=1, running=2, done=0, failed=1)
            fanout.set_best_heldout("CIFAR10", 0.97)
            fanout.set_best_heldout("VTAB/Caltech101", 0.9)
            fanout.set_test_accuracy("CIFAR10", 0.965)
            for i, trial in enumerate(trials):
                trial.log({"vitscale_loss": 1.5 + i}, 1)
            deadline = time.monotonic() + 60
            while len(prometheus.query("vitscale_loss")) < 3 or not prometheus.query("vitscale_finetune_test_accuracy"):
                assert time.monotonic() < deadline, prometheus.targets_up()
                time.sleep(0.5)

            def last(expr):
                return {tuple(sorted((k, v) for k, v in r["metric"].items() if k in ("run", "state", "dataset"))):
                        float(r["values"][-1][1]) for r in prometheus.query_range(expr, began, ended)}

            row = {title: exprs for title, exprs, _ in dashboard_panels(DASHBOARD, run=run) if title in fanout_panel_titles()}
            assert len(row) == 4
            expected = [{(("run", run), ("state", s)): n for s, n in {"pending": 1, "running": 2, "done": 0, "failed": 1}.items()},
                        {(("dataset", "CIFAR10"), ("run", run)): 0.97, (("dataset", "VTAB/Caltech101"), ("run", run)): 0.9},
                        {(("dataset", "CIFAR10"), ("run", run)): 0.965},
                        {(("run", f"{run}-ft-cifar10-sweep-lr0.003"),): 1.5, (("run", f"{run}-ft-cifar10-sweep-lr0.01"),): 2.5}]
            while True:  # until the range's last evaluation comes after the scrape that has them all
                ended = time.time()
                panels = [last(exprs[0]) for exprs in row.values()]
                if panels == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            by_state, best, test, loss = panels
            assert by_state == expected[0]
            assert best == expected[1]
            assert test == expected[2]
            assert loss == expected[3]
            # Every other panel (the pretraining run's) is empty here and is left out, not drawn blank.
            pictures = plot_dashboard(prometheus, run=run, start=began, end=ended, out_dir=str(tmp_path / "plots"))
    finally:
        fanout.close()
        for trial in trials:
            trial.close()
    assert sorted(re.sub(r"^\d+-", "", os.path.basename(p)) for p in pictures) == [
        "best-held-out-accuracy-per-dataset.png", "fine-tuning-trials-by-state.png",
        "fine-tuning-trials-training-loss.png", "test-accuracy-per-dataset.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_prometheus_scrapes_a_two_worker_run_through_a_restart(cluster, tmp_path, capfd):
    """A real Prometheus scrapes the driver and both workers; a worker is killed after the first
    commit and the group restarts. Every dashboard query returns data, and the values agree
    with what the run did."""
    base = free_ports(3)
    config = config_for(cluster, "observed", max_steps=12, checkpoint_every=4, log_every=2, metrics_port=base)
    record = tmp_path / "record"
    record.mkdir()
    with LocalPrometheus([f"127.0.0.1:{base + i}" for i in range(3)], data_dir=str(tmp_path / "prometheus")) as prometheus:
        began = time.time()
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(metrics=run_pretraining(
            config, record_dir=str(record), nan_loss_at={1: 1}, metrics_linger=3.0)))
        runner.start()
        deadline = time.monotonic() + 300
        while "step-00000004/manifest.json" not in list_prefix(checkpoint_url(config)):
            assert time.monotonic() < deadline, "step 4 never committed"
            time.sleep(0.3)
        while not [r for r in prometheus.query(f'vitscale_checkpoint_last_committed_step{{run="{config.run_name}"}}')
                   if float(r["value"][1]) >= 4]:  # scraped at least once past the commit
            assert time.monotonic() < deadline, prometheus.targets_up()
            time.sleep(0.3)
        pid = re.findall(r"start 0 pid (\d+)", open(record / "rank-1.log").read())[0]
        os.kill(int(pid), signal.SIGKILL)
        runner.join(timeout=600)
        ended = time.time()
        out = capfd.readouterr().out
        assert re.search(r"metrics at http://127\.0\.0\.1:\d+/metrics \(rank 0\)", out), out[-3000:]
        assert "metrics" in outcome, "the run did not finish after the worker was killed"

        def peak(expr):
            return max(float(v) for r in prometheus.query_range(expr, began, ended) for _, v in r["values"])

        run = f'run="{config.run_name}"'
        assert peak(f"max(vitscale_step{{{run}}})") == 12
        assert peak(f"max(vitscale_checkpoint_last_committed_step{{{run}}})") == 12
        assert peak(f"vitscale_restarts_total{{{run}}}") == 1
        assert peak(f"sum(changes(vitscale_worker_start_time_seconds{{{run}}}[5m]))") >= 1
        assert peak(f"max(vitscale_nonfinite_steps_total{{{run}}})") == 1
        assert peak(f'vitscale_workers{{{run}}}') == 2
        ranks = {r["metric"]["rank"] for r in prometheus.query_range(f"vitscale_loss{{{run}}}", began, ended)}
        assert ranks == {"0", "1"}
        # The restarted group's rank 0 counts from its resume step: 16 images a step per rank.
        resumed = int(re.findall(r"resumed from step (\d+)", out)[0])
        [series] = prometheus.query_range(f'max(vitscale_images_total{{{run},rank="0"}})', ended - 20, ended)
        assert float(series["values"][-1][1]) == (12 - resumed) * 16
        # MFU is model FLOPs per second over the peak a worker logged at its start: over images
        # per second, a constant of the model and that peak (the step's time cancels, so a
        # loaded machine cannot move it). On a CPU the peak is a measured matmul rate, one per start.
        from model import forward_flops

        assert peak(f"min(vitscale_mfu_ratio{{{run}}})") > 0
        peaks = re.findall(r"\(rank 0\); MFU against ([\d.e+]+) FLOP/s \(measured ", out)
        assert len(peaks) == 2, out[-3000:]  # rank 0's two starts
        expected = [3 * forward_flops(config.model, config.image_size) / config.workers / float(p) for p in peaks]
        [series] = prometheus.query_range(f'max(vitscale_mfu_ratio{{{run},rank="0"}}) / '
                                          f'max(vitscale_images_per_second{{{run},rank="0"}})', began, ended)
        for _, value in series["values"]:
            assert any(float(value) == pytest.approx(e, rel=0.01) for e in expected), (value, expected)

        panels = dashboard_panels(DASHBOARD, run=config.run_name)
        assert len(panels) >= len(FAMILIES) - 3
        fanout = fanout_panel_titles()  # no fan-out here: see the test above
        panels = [p for p in panels if p[0] not in fanout]
        empty = [(title, expr) for title, exprs, _ in panels for expr in exprs
                 if not any(not math.isnan(float(v)) for r in prometheus.query_range(expr, began, ended)
                            for _, v in r["values"])]
        assert not empty, f"dashboard queries without data: {empty}"
        pictures = plot_dashboard(prometheus, run=config.run_name, start=began, end=ended, out_dir=str(tmp_path / "plots"))
        assert len(pictures) == len(panels)
        assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_the_exporter_answers_scrapes_without_starting_threads(monkeypatch):
    # One long-lived thread serves every scrape: a thread starting or ending while the
    # DataLoader forks can hang the child (Python 3.11), and scrapes come all run long.
    metrics = WorkerMetrics("run", 0, "host", address="127.0.0.1", port=0)
    started = []
    original = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), original(self))[1])
    try:
        for _ in range(3):
            assert any(name.startswith("vitscale_images_total") for name in scrape(metrics.url))
    finally:
        metrics.close()
    assert started == []
