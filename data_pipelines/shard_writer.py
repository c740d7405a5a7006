"""Images to webdataset shards in a folder or on S3, with a manifest written last.

    python launch/make_shards.py --input INPUT --output s3://bucket/prefix [--samples-per-shard N]
        [--resize-shorter PX] [--workers N] [--ray]

Inputs (data_pipelines/image_inputs.py): an ImageFolder tree in a folder or under an S3
prefix, a folder of images plus `labels.json` (multi-label), or a .tsv/.csv list of image URLs
and labels, local or on S3, whole or in parts (a brace pattern). `make_shards` cuts the
sorted, seeded-shuffled input (each part of a list on its own, its shards numbered after the
previous parts') into shards with fixed names and writes each whole (here, in processes, or
as Ray tasks), each followed by its record (`_written/<shard>.json`), so that a run again
keeps what verifies; `write_shards` writes samples a caller generates (CIFAR, VTAB, synthetic
sets) in one process.

Each sample is `<key>.jpg` or `<key>.png` (the original bytes unless `--resize-shorter`
shrinks it) plus `<key>.cls` (the class index) or `<key>.json` ({"labels": [indices]}). The
input order is shuffled with a fixed seed so every shard mixes classes. Undecodable images
are skipped with a warning and counted. S3 shards go up as parallel multipart uploads
(boto3 `upload_fileobj` with a `TransferConfig`); `manifest.json` is written after every
shard has landed, so a manifest only ever lists complete shards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import random
from typing import Callable, Iterable, Iterator

from data_pipelines.image_inputs import (
    InputError, InputImage, ListSummary, find_inputs, is_list_file, list_images, list_parts, sorted_classes,
    summarise_list,
)
from data_pipelines.manifest import MANIFEST_NAME, Manifest, ShardInfo
from data_pipelines.preflight import check_writable
from data_pipelines.s3 import (
    DataSourceError, S3ClientFactory, client_error, error_code, is_s3_url, join_location, parse_s3_url, s3_errors,
)
from data_pipelines.storage import read_bytes, write_bytes
from data_pipelines.transfer import sha256_file

log = logging.getLogger(__name__)

MULTIPART_BYTES = 16 << 20


class ShardWriteError(Exception):
    """The input cannot be turned into shards: one line that says why."""


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str  # unique, no dots (webdataset splits the key from the extension at the first dot)
    image: bytes
    image_ext: str  # "jpg" or "png"
    label: int | list[int] | None  # a class index, the class indices present (multi-label), or None


@dataclasses.dataclass
class WriteSummary:
    output: str
    manifest: Manifest
    written: int
    skipped: int

    def line(self) -> str:
        return (f"wrote {self.written} samples in {len(self.manifest.shards)} shards to {self.output}"
                f" ({self.skipped} undecodable inputs skipped)")


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _encode_sample(sample: Sample) -> dict:
    record = {"__key__": sample.key, sample.image_ext: sample.image}
    if sample.label is None:
        pass  # unlabeled data (label_kind "none"): the image alone
    elif isinstance(sample.label, int):
        record["cls"] = str(sample.label).encode("ascii")
    else:
        record["json"] = json.dumps({"labels": sorted(sample.label)}).encode("utf-8")
    return record


def _upload_shard(url: str, data: bytes, factory: S3ClientFactory) -> None:
    """A shard onto S3: one PUT, or a parallel multipart upload above MULTIPART_BYTES."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_url(url)
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=4)
    try:
        factory.client().upload_fileobj(io.BytesIO(data), location.bucket, location.prefix, Config=config)
    except (BotoCoreError, ClientError) as error:
        raise client_error(error, url) from None
    except S3UploadFailedError as error:  # wraps the ClientError's own one-line text
        raise DataSourceError(f"{url}: upload failed: {error}") from None


class _ShardSink:
    """Puts finished shards where they go: a folder (write + rename) or S3 (threaded multipart)."""

    def __init__(self, output: str, factory: S3ClientFactory | None, upload_workers: int):
        self.output = output
        self.factory = factory or S3ClientFactory()
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, upload_workers)) if is_s3_url(output) else None
        self.upload_workers = max(1, upload_workers)
        self.pending: list[concurrent.futures.Future] = []
        if not is_s3_url(output):
            os.makedirs(output, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        url = join_location(self.output, name)
        if self.pool is None:
            write_bytes(url, data)
            return
        while len(self.pending) >= 2 * self.upload_workers:  # bound the shards held in memory
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(_upload_shard, url, data, self.factory))

    def finish(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def write_shards(
    samples: Iterable[Sample],
    output: str,
    *,
    class_names: list[str],
    label_kind: str = "class",
    samples_per_shard: int = 1000,
    upload_workers: int = 4,
    factory: S3ClientFactory | None = None,
    skipped: Callable[[], int] | int = 0,
    total: int | None = None,
    progress: bool = True,
) -> WriteSummary:
    """Writes `samples` as webdataset tars plus `manifest.json` to a folder or s3:// prefix.

    `skipped` counts inputs the caller dropped; a callable is read after `samples` is exhausted.
    """
    import webdataset as wds
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ShardWriteError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    check_writable(output, factory)
    sink = _ShardSink(output, factory, upload_workers)
    shards: list[ShardInfo] = []
    written = 0
    seen_keys: set[str] = set()
    buffer, writer, in_shard = None, None, 0

    def close_shard():
        nonlocal buffer, writer, in_shard
        writer.close()
        data = buffer.getvalue()
        name = _shard_name(len(shards))
        shards.append(ShardInfo(name, in_shard, len(data), hashlib.sha256(data).hexdigest()))
        sink.put(name, data)
        buffer, writer, in_shard = None, None, 0

    try:
        for sample in tqdm(samples, total=total, unit="img", desc="shards", disable=not progress):
            if "." in sample.key or sample.key in seen_keys:
                raise ShardWriteError(f"sample key {sample.key!r} is {'duplicated' if sample.key in seen_keys else 'dotted'}")
            seen_keys.add(sample.key)
            if writer is None:
                buffer = io.BytesIO()
                writer = wds.TarWriter(buffer, mtime=0)  # an int: a float mtime makes tarfile add a PAX header per member
            writer.write(_encode_sample(sample))
            in_shard += 1
            written += 1
            if in_shard == samples_per_shard:
                close_shard()
        if writer is not None:
            close_shard()
    finally:
        sink.finish()
    skipped = skipped() if callable(skipped) else skipped
    manifest = Manifest(shards=shards, class_names=list(class_names), label_kind=label_kind, skipped=skipped)
    write_bytes(join_location(output, MANIFEST_NAME), manifest.to_json().encode("utf-8"), factory)
    return WriteSummary(output=output, manifest=manifest, written=written, skipped=skipped)


# ---- images to shards, a shard at a time: in this process, in processes, or as Ray tasks ---

RECORDS_FOLDER = "_written"  # <output>/_written/<shard>.json: what a shard holds, written once it has landed
IMAGE_READS_AT_ONCE = 16  # a task's image GETs in flight (S3 answers in tens of ms: latency, not bandwidth)
PLAN_VERSION = 1  # in every shard's digest: a change of what a shard holds for the same inputs rewrites it
MISSING_CODES = ("NoSuchKey", "404", "NotFound")


def prepare_bytes(original: bytes, resize_shorter: int | None) -> tuple[bytes, str] | str:
    """(bytes, "jpg"|"png") ready for a shard, or the reason the image cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(original)) as image:
            image.load()  # a full decode: truncated or corrupt files fail here, not at training time
            image_format = image.format
            shorter = min(image.size)
            if resize_shorter is None or shorter <= resize_shorter:
                if image_format in ("JPEG", "PNG"):
                    return original, "jpg" if image_format == "JPEG" else "png"
                resized = image
            else:
                scale = resize_shorter / shorter
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            if image_format == "JPEG":
                resized.convert("RGB").save(out, "JPEG", quality=95)
                return out.getvalue(), "jpg"
            resized.save(out, "PNG")
            return out.getvalue(), "png"
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"


def prepare_image(path: str, resize_shorter: int | None) -> tuple[bytes, str] | str:
    """prepare_bytes of a local file, or the reason it cannot be read."""
    try:
        with open(path, "rb") as f:
            original = f.read()
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror}"
    return prepare_bytes(original, resize_shorter)


def _prepare(args: tuple[str, int | None]):
    return prepare_image(*args)


def _bounded_map(pool: concurrent.futures.Executor, jobs: Iterator, window: int) -> Iterator:
    """`pool.map(_prepare, jobs)` in order, with at most `window` jobs submitted at a time
    (Executor.map submits everything at once: a million futures for ImageNet)."""
    while True:
        block = list(itertools.islice(jobs, window))
        if not block:
            return
        yield from pool.map(_prepare, block, chunksize=16)


def _read_input(url: str, factory: S3ClientFactory | None) -> bytes | None:
    """An input image's bytes; None when it is not there (skipped and counted, like an image
    that does not decode). Any other failure (access denied, a server that stays down) raises:
    it would fail every image after it."""
    if not is_s3_url(url):
        try:
            with open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise DataSourceError(f"{url}: {error.strerror}") from None
    try:
        return read_bytes(url, factory)
    except DataSourceError as error:
        if error.code in MISSING_CODES:
            return None
        raise


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard of a conversion: its place in the plan and the images it holds, in order."""
    index: int
    images: tuple[InputImage, ...]
    resize_shorter: int | None

    @property
    def name(self) -> str:
        return _shard_name(self.index)

    def digest(self) -> str:
        """What the shard is made of: a shard written from other inputs (another seed, shard
        size or resize, an edited list) is not taken for this one."""
        described = [PLAN_VERSION, self.resize_shorter,
                     [[image.url, image.key, image.label] for image in self.images]]
        return hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardReport:
    """What a task reports for its shard (and keeps as the shard's record, less `kept` and `process`)."""
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: int
    inputs: str  # ShardJob.digest()
    etag: str | None = None  # S3's ETag of the shard, which changes when the object is replaced
    kept: bool = False  # already written and verified by an earlier run: not written again
    process: str = ""  # host:pid of the process that wrote or verified it

    def record(self) -> bytes:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("kept", "process")}
        return json.dumps(fields, sort_keys=True).encode()


def _record_url(output: str, name: str) -> str:
    return join_location(join_location(output, RECORDS_FOLDER), name.replace(".tar", ".json"))


def _head(url: str, factory: S3ClientFactory) -> dict | None:
    location = parse_s3_url(url)
    try:
        return factory.client().head_object(Bucket=location.bucket, Key=location.prefix)
    except s3_errors() as error:
        if error_code(error) in MISSING_CODES:
            return None
        raise client_error(error, url) from None


def _written_before(job: ShardJob, inputs: str, output: str, factory: S3ClientFactory) -> ShardReport | None:
    """The shard's report when an earlier run wrote this very shard and it is still there,
    whole: its record names the same inputs (`inputs`: the job's digest), and the shard has the recorded size and (S3) ETag
    or (a folder) sha256. A record is written only after its shard landed."""
    try:
        report = ShardReport(**json.loads(read_bytes(_record_url(output, job.name), factory)))
    except (DataSourceError, ValueError, TypeError):  # no record, or not one of ours: the shard is written
        return None
    if report.inputs != inputs:
        return None
    if report.samples == 0:
        return report  # every image skipped: no shard to look at
    shard_url = join_location(output, job.name)
    if is_s3_url(shard_url):
        head = _head(shard_url, factory)
        whole = head is not None and head["ContentLength"] == report.bytes and head["ETag"] == report.etag
    else:
        whole = os.path.isfile(shard_url) and os.path.getsize(shard_url) == report.bytes \
            and sha256_file(shard_url) == report.sha256
    return report if whole else None


def write_shard(job: ShardJob, output: str, factory: S3ClientFactory | None = None) -> ShardReport:
    """Writes one shard of the plan (or finds it written) and its record; returns its report.
    What a Ray task or a worker process runs."""
    import socket

    import webdataset as wds

    factory = factory or S3ClientFactory()
    process = f"{socket.gethostname()}:{os.getpid()}"
    inputs = job.digest()
    earlier = _written_before(job, inputs, output, factory)
    if earlier is not None:
        return dataclasses.replace(earlier, kept=True, process=process)
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, mtime=0)  # an int: a float mtime makes tarfile add a PAX header per member
    samples = skipped = 0
    with concurrent.futures.ThreadPoolExecutor(IMAGE_READS_AT_ONCE) as pool:
        originals = _read_ahead(pool, job.images, factory)
        for image, original in zip(job.images, originals):
            prepared = "not found" if original is None else prepare_bytes(original, job.resize_shorter)
            if isinstance(prepared, str):
                skipped += 1
                log.warning("skipping undecodable image %s: %s", image.url, prepared)
                continue
            data, ext = prepared
            writer.write(_encode_sample(Sample(image.key, data, ext, image.label)))
            samples += 1
    writer.close()
    data = buffer.getvalue()
    etag = None
    if samples:
        shard_url = join_location(output, job.name)
        if is_s3_url(shard_url):
            _upload_shard(shard_url, data, factory)
            etag = _head(shard_url, factory)["ETag"]
        else:
            write_bytes(shard_url, data)
    report = ShardReport(job.name, samples, len(data) if samples else 0, hashlib.sha256(data).hexdigest() if samples else "",
                         skipped, inputs, etag, process=process)
    write_bytes(_record_url(output, job.name), report.record(), factory)
    return report


def _read_ahead(pool: concurrent.futures.Executor, images: tuple[InputImage, ...],
                factory: S3ClientFactory) -> Iterator[bytes | None]:
    """The images' bytes in order, IMAGE_READS_AT_ONCE reads in flight ahead of the decoding."""
    pending: list[concurrent.futures.Future] = []
    upcoming = iter(images)
    for image in itertools.islice(upcoming, IMAGE_READS_AT_ONCE):
        pending.append(pool.submit(_read_input, image.url, factory))
    while pending:
        result = pending.pop(0).result()
        following = next(upcoming, None)
        if following is not None:
            pending.append(pool.submit(_read_input, following.url, factory))
        yield result


def plan_shards(images: list[InputImage], samples_per_shard: int, resize_shorter: int | None,
                seed: int | str = 0, first_index: int = 0) -> list[ShardJob]:
    """The conversion's shards: the images (sorted by key) shuffled with `seed` so that every
    shard mixes classes, then cut in order, `samples_per_shard` a shard, numbered from
    `first_index`. The same input and options give the same shards, named the same, wherever
    and however often they run."""
    order = list(images)
    random.Random(seed).shuffle(order)
    return [ShardJob(first_index + i, tuple(order[start:start + samples_per_shard]), resize_shorter)
            for i, start in enumerate(range(0, len(order), samples_per_shard))]


@dataclasses.dataclass
class ConversionPlan:
    """What make_shards writes: the jobs (a list, or made part by part as they are taken),
    how many, and the classes."""
    jobs: Iterable[ShardJob]
    total: int
    class_names: list[str]
    label_kind: str
    parts: int = 1


def plan_conversion(input_url: str, samples_per_shard: int, resize_shorter: int | None = None, seed: int = 0,
                    factory: S3ClientFactory | None = None, ray: bool = False, workers: int | None = None,
                    progress: bool = False) -> ConversionPlan:
    """The input listed (and a list in parts checked and counted, every part, as Ray tasks
    with `ray`) and cut into shards; nothing is written."""
    parts = list_parts(input_url) if is_list_file(input_url) else [input_url]
    if len(parts) > 1:
        return _plan_parts(parts, samples_per_shard, resize_shorter, seed, factory, ray, workers, progress)
    try:
        images, class_names, label_kind = find_inputs(parts[0], factory)
    except InputError as error:
        raise ShardWriteError(str(error)) from None
    jobs = plan_shards(images, samples_per_shard, resize_shorter, seed)
    return ConversionPlan(jobs, len(jobs), class_names, label_kind)


def _plan_parts(parts: list[str], samples_per_shard: int, resize_shorter: int | None, seed: int,
                factory: S3ClientFactory | None, ray: bool, workers: int | None, progress: bool) -> ConversionPlan:
    """A list in parts: every part read, checked and counted first (Ray tasks with `ray`, else
    here, one after another), its classes merged as it comes; then every part planned on its
    own (its images sorted and shuffled with the seed and the part's place), its shards
    numbered after the previous parts', and read only when the writing reaches it, so the
    driver holds about one part's images, not the list's."""
    images_in = [0] * len(parts)
    names: set[str] = set()
    single = True

    def counted(place: int, summary: ListSummary) -> None:
        nonlocal single
        images_in[place] = summary.images
        names.update(summary.class_names)
        single = single and summary.single
        bar.update()

    from tqdm import tqdm

    with tqdm(total=len(parts), unit="part", desc="list parts counted", disable=not progress) as bar:
        try:
            if ray:
                _map_on_ray(summarise_list, parts, factory, workers=workers, done=counted)
            else:
                for place, url in enumerate(parts):
                    counted(place, summarise_list(url, factory))
        except InputError as error:
            raise ShardWriteError(str(error)) from None
    class_names = sorted_classes(names)
    counts = [-(-n // samples_per_shard) for n in images_in]

    def jobs() -> Iterator[ShardJob]:
        first = 0
        for place, (url, expected, count) in enumerate(zip(parts, images_in, counts)):
            try:
                images = list_images(url, class_names, single, factory)
            except InputError as error:
                raise ShardWriteError(str(error)) from None
            if len(images) != expected:
                raise ShardWriteError(f"{url}: {len(images)} images listed, {expected} when the conversion "
                                      f"began: the list changed under it; run it again")
            planned = plan_shards(images, samples_per_shard, resize_shorter, f"{seed}/{place}", first)
            del images  # the jobs hold the images, each dropped here once handed out
            planned.reverse()
            while planned:
                yield planned.pop()
            first += count

    return ConversionPlan(jobs(), sum(counts), class_names, "class" if single else "multi_label", len(parts))


@dataclasses.dataclass
class ConversionSummary(WriteSummary):
    kept: int = 0  # shards an earlier run had written, verified and kept
    processes: int = 1  # processes (Ray workers) that wrote or verified shards
    ray: bool = False  # written by Ray tasks
    parts: int = 1  # the parts of a list given as a pattern

    def line(self) -> str:
        extra = f"; {self.kept} shards already written and kept" if self.kept else ""
        source = f" from {self.parts} list parts" if self.parts > 1 else ""
        if self.ray:
            where = f" by {self.processes} Ray worker{'s' if self.processes > 1 else ''}"
        else:
            where = f" by {self.processes} processes" if self.processes > 1 else ""
        return (f"wrote {self.written} samples in {len(self.manifest.shards)} shards{source} to {self.output}{where}"
                f" ({self.skipped} undecodable inputs skipped{extra})")


def make_shards(
    input_url: str,
    output: str,
    *,
    samples_per_shard: int = 1000,
    resize_shorter: int | None = None,
    workers: int | None = None,
    seed: int = 0,
    factory: S3ClientFactory | None = None,
    progress: bool = True,
    ray: bool = False,
) -> ConversionSummary:
    """The one function behind `launch/make_shards.py` for image folders and lists (local or
    on S3): lists the input, plans the shards, writes each (in this process, in `workers`
    processes, or as Ray tasks, `workers` at once or as many as the cluster has CPUs), and
    writes the manifest last, of the shards in plan order. Shards that an earlier run wrote
    and that verify are kept, so an interrupted conversion resumes."""
    if samples_per_shard < 1:
        raise ShardWriteError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    plan = plan_conversion(input_url, samples_per_shard, resize_shorter, seed, factory, ray, workers, progress)
    check_writable(output, factory)  # before decoding anything
    run = _run_on_ray if ray else _run_here
    reports = run(plan.jobs, plan.total, output, factory, workers, progress)
    shards = [ShardInfo(r.name, r.samples, r.bytes, r.sha256) for r in reports if r.samples]
    skipped = sum(r.skipped for r in reports)
    manifest = Manifest(shards=shards, class_names=list(plan.class_names), label_kind=plan.label_kind,
                        skipped=skipped)
    write_bytes(join_location(output, MANIFEST_NAME), manifest.to_json().encode("utf-8"), factory)
    return ConversionSummary(output=output, manifest=manifest, written=sum(r.samples for r in reports), skipped=skipped,
                             kept=sum(r.kept for r in reports), processes=len({r.process for r in reports}), ray=ray,
                             parts=plan.parts)


def _bar(total: int, output: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc=f"shards to {output}", disable=not progress)


def _run_here(jobs: Iterable[ShardJob], total: int, output: str, factory: S3ClientFactory | None,
              workers: int | None, progress: bool) -> list[ShardReport]:
    """The shards in this process, or in `workers` processes (whole shards each)."""
    reports: dict[int, ShardReport] = {}
    with _bar(total, output, progress) as bar:
        if (workers or 1) <= 1:
            for job in jobs:
                reports[job.index] = write_shard(job, output, factory)
                bar.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                upcoming = iter(jobs)
                pending = {pool.submit(write_shard, job, output, factory): job
                           for job in itertools.islice(upcoming, 2 * workers)}
                while pending:
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        reports[pending.pop(future).index] = future.result()
                        bar.update()
                        following = next(upcoming, None)
                        if following is not None:
                            pending[pool.submit(write_shard, following, output, factory)] = following
    return [reports[index] for index in sorted(reports)]


def connect_ray(workers: int | None = None):
    """Join the cluster this runs on (a Ray job, or RAY_ADDRESS), else start a local Ray with
    this machine's CPUs (or `workers`, if more) and the repository on its workers' import path."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", logging_level="WARNING")
        else:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 1), include_dashboard=False,
                     logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": root}})
    return ray


def _map_on_ray(function: Callable, items: Iterable, *args, workers: int | None = None,
                done: Callable[[int, object], None] | None = None) -> list:
    """`function(item, *args)` as a Ray task per item (1 CPU each), `workers` in flight or as
    many as the cluster has CPUs, the items taken from their iterable only as slots free up.
    A task whose worker dies is run again by Ray (max_retries); one that raises stops the
    rest with its error's line (what was written stays). Each result goes to `done(place,
    result)` as it comes; without `done`, the results are returned, in the items' order."""
    ray = connect_ray(workers)
    from ray.exceptions import RayTaskError

    results: dict[int, object] = {}
    done = done or results.__setitem__
    in_flight = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=3)(function)
    upcoming = enumerate(items)
    pending = {task.remote(item, *args): place for place, item in itertools.islice(upcoming, in_flight)}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                place = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as error:
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, (ShardWriteError, DataSourceError, InputError)):
                        raise cause from None  # its one line, not the task's traceback
                    raise
                done(place, result)
                following = next(upcoming, None)
                if following is not None:
                    pending[task.remote(following[1], *args)] = following[0]
    finally:
        for ref in pending:
            ray.cancel(ref)
    return [results[place] for place in sorted(results)]


def _run_on_ray(jobs: Iterable[ShardJob], total: int, output: str, factory: S3ClientFactory | None,
                workers: int | None, progress: bool) -> list[ShardReport]:
    """A Ray task a shard: the tasks read their images and write their shards themselves, the
    driver holds only the plan and the reports."""
    reports: dict[int, ShardReport] = {}
    with _bar(total, output, progress) as bar:
        def done(place: int, report: ShardReport) -> None:
            reports[place] = report
            bar.update()

        _map_on_ray(write_shard, jobs, output, factory, workers=workers, done=done)
    return [reports[place] for place in sorted(reports)]
