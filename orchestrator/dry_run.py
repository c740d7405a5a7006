"""`make dry-run`: the whole pipeline on one machine, with an embedded S3 unless one is set.

    python launch/pretrain.py --dry-run [--workers 2] [--max-steps 12] [--data s3://b/synth] ...

The debug twin of the recipe (orchestrator/config.py DRY_RUN) trains through the real path:
synthetic webdataset shards on S3 (written first when `--data` holds none), Ray Train
workers running DeepSpeed, checkpoints committed to S3, weights exported at the end. With no
S3 endpoint configured (AWS_ENDPOINT_URL), a SeaweedFS server is started on 127.0.0.1 for the
run and stopped after it; not on a Ray cluster (RAY_ADDRESS set, as in a `ray job submit`
driver), whose workers see the nodes' S3 settings only: there the cluster's S3 is used, and
a dry run on a cluster without one stops at its preflight with a one-line error.

When pretraining ends, launch/pretrain.py's own hand-over runs the fine-tuning fan-out, as in a
real run. Without `--finetune-data` the dry run writes its own downstream sets first, beside
the pretraining shards (`<data>/../downstream/`, the layout of the README): scikit-learn's real
digits stand in for CIFAR-10 (its fixed split: every fifth image is test), generated sets of
striped images for the table's other rows, and one VTAB task per group (STAND_INS).

Every worker and the driver serve Prometheus metrics on 127.0.0.1. When the `prometheus`
binary is installed (Debian: `apt-get install prometheus`), a real Prometheus scrapes the run
and afterwards the Grafana dashboard's panels are drawn from it as PNG files into
`runs/<run name>/metrics/` (and copied beside the checkpoints, `<checkpoints>/<run>/metrics/`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

from orchestrator.config import PretrainConfig

BUCKET = "vitscale-dry-run"
OUTPUT = "runs"  # local folder for what outlives the embedded S3 (gitignored)

# The dry run's downstream sets, one per row of seed table 2 (VTAB: one task per group): name
# -> (classes, train images, test images) of a generated set of striped images (a class is an
# angle and a colour), or None for scikit-learn's real digits (1,797 images, 10 classes). The
# held-out part of a sweep is carved from train as for the real sets (ImageNet 1%, ...).
STAND_INS: dict[str, tuple[int, int, int] | None] = {
    "ImageNet": (20, 800, 200),
    "CIFAR100": (16, 600, 160),
    "CIFAR10": None,
    "Oxford-IIIT Pets": (6, 240, 120),
    "Oxford Flowers-102": (8, 240, 120),
    "VTAB/Caltech101": (5, 200, 100),  # natural
    "VTAB/EuroSAT": (4, 200, 100),  # specialized
    "VTAB/dSprites/location": (3, 200, 100),  # structured
}
STAND_IN_PIXELS = 32


@contextlib.contextmanager
def storage_for(config: PretrainConfig, log: Callable[[str], None]):
    """The config with data and checkpoint locations filled in, an S3 server running if needed."""
    updates = {"data": config.data or f"s3://{BUCKET}/synth", "checkpoints": config.checkpoints or f"s3://{BUCKET}/runs"}
    uses_s3 = any(url.startswith("s3://") for url in updates.values())
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    # On a Ray cluster (a `ray job submit` driver, or RAY_ADDRESS set: connect_ray joins it) the
    # workers are started by the cluster's nodes and see their S3 settings, never this process's:
    # an embedded server here would hold the shards where no worker looks (each then failed with
    # "no credentials", after scheduling). There the dry run uses the S3 the cluster has, like any
    # run; only a local Ray, started below with this environment, gets the embedded one.
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    server = None
    if uses_s3 and not endpoint and not on_cluster:
        from data_pipelines.embedded_s3 import EmbeddedS3

        server = EmbeddedS3().start()
        os.environ.update(server.environment())  # inherited by the local Ray and its workers
        log(f"dry run: embedded S3 (SeaweedFS) at {server.endpoint_url}")
    from orchestrator.pretraining import Interrupted

    try:
        for url in updates.values():
            if url.startswith("s3://"):
                _ensure_bucket(url, hint="" if endpoint or not on_cluster else (
                    " (a dry run on a Ray cluster uses the S3 its nodes are configured for: AWS_ENDPOINT_URL and "
                    "credentials in their environment; the embedded S3 serves a local run only)"))
        yield config.model_copy(update=updates)
    except Interrupted as stopped:
        if server is not None:
            stopped.hint = ("the embedded S3 goes with this run, its checkpoints too: to resume a dry run, give it an "
                            "S3 that stays (AWS_ENDPOINT_URL and credentials)")
        raise
    finally:
        if server is not None:
            server.stop()


def _ensure_bucket(url: str, hint: str = "") -> None:
    """The dry run makes its buckets; a real run only checks them (preflight)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from data_pipelines.s3 import S3ClientFactory, describe_client_error, parse_s3_url
    from orchestrator.pretraining import PreflightError

    client, bucket = S3ClientFactory().client(), parse_s3_url(url).bucket
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            client.create_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as error:
        raise PreflightError(describe_client_error(error, f"s3://{bucket}") + hint) from None


def ensure_shards(config: PretrainConfig, log: Callable[[str], None]) -> None:
    """Write the synthetic set to `config.data` unless a manifest is already there."""
    from data_pipelines.manifest import load_shard_list
    from data_pipelines.s3 import DataSourceError
    from data_pipelines.synthetic import write_synthetic

    try:
        load_shard_list(config.data)
        return
    except DataSourceError:
        pass
    kind = "multi_label" if config.multi_label else "classification"
    if config.objective == "masked-patch":
        kind = "unlabeled"
    summary = write_synthetic(kind, config.data, num_samples=config.train_examples, num_classes=config.num_classes,
                              image_size=2 * config.image_size, samples_per_shard=128)
    log(f"dry run: wrote {kind} shards to {config.data}: {summary.line()}")


def with_downstream(config: PretrainConfig, log: Callable[[str], None]) -> PretrainConfig:
    """The config with its fine-tuning data: the given root, or the stand-ins (STAND_INS),
    written beside the pretraining shards unless they are there already."""
    if not config.finetune or config.finetune_data:
        return config
    from data_pipelines.manifest import load_shard_list
    from data_pipelines.s3 import DataSourceError, join_location
    from data_pipelines.synthetic import write_synthetic
    from orchestrator.finetuning import dataset_dir, select_datasets

    root = config.data.rstrip("/").rsplit("/", 1)[0] + "/downstream"
    datasets = [d for d in select_datasets(config.finetune_datasets) if d in STAND_INS]
    if not datasets:
        from orchestrator.config import ConfigError

        raise ConfigError(f"finetune_datasets={config.finetune_datasets!r}: the dry run's own downstream sets are "
                          f"{', '.join(STAND_INS)}; give --finetune-data for others")
    written = []
    for dataset in datasets:
        seed = list(STAND_INS).index(dataset)  # each set the same whichever rows a run picks
        vtab = dataset.startswith("VTAB/")
        for split in ("train800val200" if vtab else "train", "test"):
            url = join_location(root, f"{dataset_dir(dataset)}/{split}")
            try:
                load_shard_list(url)
                continue
            except DataSourceError:
                pass
            size = STAND_INS[dataset]
            if size is None:
                write_synthetic("digits", url, image_size=STAND_IN_PIXELS, samples_per_shard=512,
                                split="test" if split == "test" else "train")
            else:
                classes, train, test = size
                write_synthetic("classification", url, num_samples=test if split == "test" else train,
                                num_classes=classes, image_size=STAND_IN_PIXELS, samples_per_shard=512,
                                seed=2 * seed + (split == "test"))
            written.append(dataset)
    if written:
        written = list(dict.fromkeys(written))
        said = [("the real digits as CIFAR10" if STAND_INS[d] is None else d) for d in written]
        log(f"dry run: wrote downstream stand-ins to {root}: {', '.join(said)}")
    return config.model_copy(update={"finetune_data": root, "finetune_datasets": ",".join(datasets)})


def stand_ins_note(config: PretrainConfig) -> str:
    """What the report says of the downstream sets of a dry run that wrote its own."""
    from orchestrator.finetuning import select_datasets

    chosen = [d for d in select_datasets(config.finetune_datasets) if d in STAND_INS]
    generated = [f"{d} ({STAND_INS[d][0]} classes, {STAND_INS[d][1]} train / {STAND_INS[d][2]} test images)"
                 for d in chosen if STAND_INS[d] is not None]
    digits = ("scikit-learn's real digits stand in for CIFAR10 (8 px images upscaled to "
              f"{STAND_IN_PIXELS} px; every fifth image is test); " if "CIFAR10" in chosen else "")
    striped = (f"generated sets of striped images (a class is an angle and a colour) for {', '.join(generated)}"
               if generated else "")
    return (f"These are the dry run's stand-ins, not the paper's datasets: {(digits + striped).rstrip('; ')}. Their "
            f"figures say whether the path works, not what ViT scores on the real sets.")


def run(config: PretrainConfig, log: Callable[[str], None] = print) -> tuple[tuple[dict, str] | None, str]:
    """Pretraining, then the fan-out (launch/pretrain.py's own hand-over, as in a real run) over
    the given fine-tuning data or the stand-ins, then the report: ((summary, results folder) of
    the fan-out or None, the report's local path)."""
    from orchestrator.finetuning import run_after_pretraining
    from orchestrator.pretraining import run_pretraining
    from orchestrator.report import write_report

    with storage_for(config, log) as config:
        ensure_shards(config, log)
        given = config.finetune_data
        config = with_downstream(config, log)
        panels = None  # the dashboard's panels, when a local Prometheus drew them for this run
        with observed(config, log) as (config, plot):
            metrics = run_pretraining(config, log=log, metrics_linger=2.0)
            if not metrics.get("nothing_to_train"):
                panels = plot()
        fanout = run_after_pretraining(config, log)
        report = write_report(config, fanout=fanout, metric_plots=panels, log=log,
                              note=None if given or not config.finetune else stand_ins_note(config))
        return fanout, report


@contextlib.contextmanager
def observed(config: PretrainConfig, log: Callable[[str], None]):
    """A local Prometheus scraping the run (if installed), and a function that plots the run."""
    from orchestrator.local_prometheus import LocalPrometheus, PrometheusError, free_ports

    if config.metrics_address == "off" or not LocalPrometheus.available():
        if config.metrics_address != "off":
            log("dry run: metrics are served, but no `prometheus` binary is installed: no plots")
        yield config, lambda: None
        return
    if "metrics_port" not in config.overrides:  # the default port may be taken on a laptop
        config = config.model_copy(update={"metrics_port": free_ports(config.workers + 1)})
    host = config.metrics_address
    # The driver, then one worker per local rank (all workers are on this machine).
    targets = [f"{host}:{config.metrics_port + i}" for i in range(config.workers + 1)]
    out = os.path.join(OUTPUT, config.run_name)
    try:
        prometheus = LocalPrometheus(targets, data_dir=os.path.join(out, "prometheus")).start()
    except PrometheusError as error:
        log(f"dry run: {error}: no plots")
        yield config, lambda: None
        return
    log(f"dry run: Prometheus at {prometheus.url} scraping {', '.join(targets)}")
    began = time.time()

    def plot() -> str:
        from data_pipelines.s3 import join_location
        from data_pipelines.transfer import upload_file
        from orchestrator.metric_plots import plot_dashboard

        pictures = plot_dashboard(prometheus, run=config.run_name, start=began, end=time.time(),
                                  out_dir=os.path.join(out, "metrics"))
        remote = join_location(join_location(config.checkpoints, config.run_name), "metrics")
        for path in pictures:
            upload_file(path, join_location(remote, os.path.basename(path)))
        log(f"dry run: {len(pictures)} metric plots from Prometheus in {os.path.join(out, 'metrics')} and {remote}")
        return os.path.join(out, "metrics")

    try:
        yield config, plot
    finally:
        prometheus.stop()
