"""JFT scale, simulated: the per-rank costs of an epoch's plan and of a resume's data position.

    .venv/bin/python benchmarks/scale.py [--rounds 5]

Metadata only, no images: a manifest of 30,000 shards of ~10,100 samples (JFT-300M's ~303M
images), 512 ranks x 8 data workers. Every rank computes the epoch's plan (the shard order,
what is left of it after a resume, its cut into 4,096 parts) at each epoch's start and each
resume, and merges every rank's loader state at each resume. Prints:

- `bench data_plan_jft_seconds`: the plan at that size, mid-epoch (half of every part consumed),
  median of the rounds (issue 26's goal: <= 1.0);
- `bench data_plan_growth`: its time at twice the shards and twice the parts over its time at
  1x (2.0 is linear; goal <= 2.3); both plans are timed 4 x rounds + 1 times, alternated;
- `bench data_plan_vs_before`: the plan as data_pipelines/stream.py cut it before (a loop over
  every part for every range), over today's, both at 4,000 shards x 1,024 parts in this run;
- `bench restore_merge_512_seconds`: merging the 512 ranks' loader states, mid-epoch (goal <= 1.0);
- `bench checkpoint_list_requests`: S3 requests of one commit's retention pass (list the steps,
  find their manifests, look for a killed writer's uploads) over 20 kept steps of 512 ranks
  (3 empty objects a rank and step, on a real SeaweedFS), counted with a botocore event hook
  (goal: <= 20 + a constant); `bench checkpoint_list_requests_before`: the same pass with the
  listing of every object that list_steps made before.
- `bench list_driver_bytes_per_image`: the driver's peak memory (tracemalloc) to plan a
  conversion of a 200,000-line list of ImageNet-21k's form and hand out its jobs, per image;
  `bench list_parts_driver_peak_ratio`: the same list as 10 parts (a brace pattern) over it as
  one file (goal: about 1/10: the driver holds one part at a time).
- `bench shard_write_scaling`: images per second that launch/make_shards.py's conversion writes
  as Ray tasks on a local Ray, 2 at a time over 1 at a time (goal >= 1.6 on 2 cores): 320 JPEG
  crops (384 px) of scikit-learn's two sample photographs, 10 classes, shrunk to 224 px, 16
  a shard, from a folder to a folder (an S3 server on the same 2 cores would take their CPU);
  `bench shard_write_images_per_second` is the rate at 2.

Runs alternate between the compared sizes and take medians (this machine drifts 5-10%).
"""

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.manifest import Manifest, ShardInfo  # noqa: E402
from data_pipelines.stream import (  # noqa: E402
    STATE_FORMAT, epoch_shard_order, merge_loader_states, remaining_ranges, split_ranges,
)

SHARDS, SAMPLES_PER_SHARD, RANKS, WORKERS = 30_000, 10_100, 512, 8


def manifest(shards: int) -> Manifest:
    rng = random.Random(shards)
    return Manifest(shards=[ShardInfo(name=f"shard-{i:06d}.tar", samples=SAMPLES_PER_SHARD + rng.randint(-50, 50),
                                      bytes=1) for i in range(shards)], class_names=[], label_kind="multi_label")


def mid_epoch_states(data: Manifest, ranks: int, workers: int) -> list[dict]:
    """Every rank's loader state with each of its workers half-way through its part."""
    pieces = split_ranges(remaining_ranges(data, epoch_shard_order(len(data.shards), 0, 0), {}), ranks * workers)
    states = []
    for rank in range(ranks):
        consumed: dict[str, list[list[int]]] = {}
        for worker in range(workers):
            piece = pieces[rank * workers + worker]
            budget = sum(end - start for _, start, end in piece) // 2
            for shard, start, end in piece:
                take = min(budget, end - start)
                if take <= 0:
                    break
                consumed.setdefault(data.shards[shard].name, []).append([start, start + take])
                budget -= take
        states.append({"format": STATE_FORMAT, "seed": 0, "epoch": 0, "consumed": consumed})
    return states


def plan_seconds(data: Manifest, consumed: dict, parts: int, split=split_ranges) -> float:
    began = time.perf_counter()
    order = epoch_shard_order(len(data.shards), 0, 0)
    split(remaining_ranges(data, order, consumed), parts)
    return time.perf_counter() - began


def split_before(ranges, parts):
    """data_pipelines/stream.py's split_ranges before issue 26: every part for every range."""
    total = sum(end - start for _, start, end in ranges)
    bounds = [total * k // parts for k in range(parts + 1)]
    pieces = [[] for _ in range(parts)]
    position = 0
    for shard, start, end in ranges:
        length = end - start
        for k in range(parts):
            lo, hi = max(bounds[k], position), min(bounds[k + 1], position + length)
            if lo < hi:
                pieces[k].append((shard, start + lo - position, start + hi - position))
        position += length
    return pieces


def checkpoint_requests(kept_steps: int = 20, ranks: int = RANKS) -> tuple[int, int]:
    """(requests of a retention pass today, requests of the listing it made before)."""
    import concurrent.futures
    import tempfile

    from data_pipelines.embedded_s3 import EmbeddedS3
    from data_pipelines.transfer import list_prefix
    from orchestrator.checkpoint import CheckpointManager, step_name

    with tempfile.TemporaryDirectory() as staging, EmbeddedS3(grace_seconds=2) as server:
        bucket = server.create_bucket("scale")
        factory = server.client_factory()
        client = factory.client()
        keys = [f"run/checkpoints/{step_name(step)}/{name}" for step in range(1, kept_steps + 1)
                for rank in range(ranks)
                for name in (f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng-rank-{rank}.json",
                             f"ranks/attempt/rank-{rank:05d}.json")]
        keys += [f"run/checkpoints/{step_name(step)}/manifest.json" for step in range(1, kept_steps + 1)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="scale", Key=key, Body=b""), keys))
        sent = []
        client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
        manager = CheckpointManager(f"{bucket}/run/checkpoints", staging_dir=staging, keep_last=kept_steps,
                                    factory=factory, log=lambda line: None)
        manager._apply_retention(kept_steps)  # the pass after committing the newest: nothing to delete
        today = len(sent)
        sent.clear()
        list_prefix(f"{bucket}/run/checkpoints", factory)  # what list_steps did before
        return today, len(sent) + 1  # + the multipart listing, which it made too


def shard_write_rates(rounds: int, images: int = 320) -> tuple[float, float]:
    """Median images/s of make_shards as Ray tasks, 1 at a time and 2 at a time, alternated."""
    import tempfile

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from data_pipelines.shard_writer import connect_ray, make_shards

    photos = load_sample_images().images
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "images")
        rng = random.Random(0)
        for i in range(images):
            photo = photos[i % len(photos)]
            top, left = rng.randrange(photo.shape[0] - 384), rng.randrange(photo.shape[1] - 384)
            os.makedirs(os.path.join(source, f"class{i % 10}"), exist_ok=True)
            Image.fromarray(photo[top:top + 384, left:left + 384]).save(
                os.path.join(source, f"class{i % 10}", f"img{i:04d}.jpg"), quality=90)
        ray = connect_ray(2)

        def rate(workers: int) -> float:
            began = time.perf_counter()
            make_shards(source, tempfile.mkdtemp(dir=folder), samples_per_shard=16, resize_shorter=224, workers=workers,
                        ray=True, progress=False)
            return images / (time.perf_counter() - began)

        rate(2)  # the workers start and import what a task needs
        rates = {1: [], 2: []}
        for _ in range(rounds):
            for workers in (1, 2):
                rates[workers].append(rate(workers))
        ray.shutdown()
    return statistics.median(rates[1]), statistics.median(rates[2])


def list_driver_peaks(images: int = 200_000, parts: int = 10) -> tuple[int, int]:
    """Peak bytes (tracemalloc) the driver holds to plan a conversion and hand out every job
    of a list of `images` lines of ImageNet-21k's form (absolute S3 URLs, 21,841 classes):
    as one .tsv, and as `parts` parts named by a brace pattern."""
    import tempfile
    import tracemalloc

    from data_pipelines.shard_writer import plan_conversion

    lines = [f"s3://bucket/raw/imagenet21k/n{i % 21841:08d}/n{i % 21841:08d}_{i}.JPEG\tn{i % 21841:08d}"
             for i in range(images)]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "whole.tsv"), "w") as f:
            f.write("\n".join(lines))
        size = -(-images // parts)
        for part in range(parts):
            with open(os.path.join(folder, f"part-{part}.tsv"), "w") as f:
                f.write("\n".join(lines[part * size:(part + 1) * size]))
        del lines
        peaks = []
        for url in (os.path.join(folder, "whole.tsv"), os.path.join(folder, f"part-{{0..{parts - 1}}}.tsv")):
            tracemalloc.start()
            plan = plan_conversion(url, 1000)
            for _ in plan.jobs:  # as the writing takes them
                pass
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            del plan
    return peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    jft, double, small = manifest(SHARDS), manifest(2 * SHARDS), manifest(4_000)
    states = mid_epoch_states(jft, RANKS, WORKERS)
    jft_consumed = merge_loader_states(states)["consumed"]
    double_consumed = merge_loader_states(mid_epoch_states(double, 2 * RANKS, WORKERS))["consumed"]
    small_consumed = merge_loader_states(mid_epoch_states(small, 128, WORKERS))["consumed"]

    at_1x, at_2x, merges, before, after = [], [], [], [], []
    for _ in range(4 * args.rounds + 1):  # a plan takes ~0.05 s: 5 medians swung 1.8-2.4 here, 21 hold 1.9-2.2
        at_1x.append(plan_seconds(jft, jft_consumed, RANKS * WORKERS))
        at_2x.append(plan_seconds(double, double_consumed, 2 * RANKS * WORKERS))
    for _ in range(args.rounds):
        began = time.perf_counter()
        merge_loader_states(states)
        merges.append(time.perf_counter() - began)
        before.append(plan_seconds(small, small_consumed, 1024, split=split_before))
        after.append(plan_seconds(small, small_consumed, 1024))
    one = statistics.median(at_1x)
    print(f"bench data_plan_jft_seconds {one:.3f}")
    print(f"bench data_plan_growth {statistics.median(at_2x) / one:.2f}")
    print(f"bench data_plan_vs_before {statistics.median(before) / statistics.median(after):.1f}")
    print(f"bench restore_merge_512_seconds {statistics.median(merges):.3f}")
    whole, in_parts = list_driver_peaks()
    print(f"bench list_driver_bytes_per_image {whole / 200_000:.0f}")
    print(f"bench list_parts_driver_peak_ratio {in_parts / whole:.2f}")
    today, before = checkpoint_requests()
    print(f"bench checkpoint_list_requests {today}")
    print(f"bench checkpoint_list_requests_before {before}")
    one, two = shard_write_rates(args.rounds)
    print(f"bench shard_write_scaling {two / one:.2f}")
    print(f"bench shard_write_images_per_second {two:.0f}")


if __name__ == "__main__":
    main()
