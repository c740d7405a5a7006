"""Streaming from a real S3: round trip, determinism, and exact resumption across world sizes."""

import collections
import itertools
import json
import random

import numpy as np
import pytest
import torch

from data_pipelines.augment import Augmentation, augmentation_for, random_resized_crop_box
from data_pipelines.stream import ShardLoader, merge_loader_states, split_ranges
from data_pipelines.synthetic import classification_samples, write_synthetic

SAMPLES = 150


@pytest.fixture(scope="module")
def train_shards(s3_server, test_bucket):
    """150 samples in 7 shards (6 x 24 + 6) on S3."""
    write_synthetic("classification", f"{test_bucket}/stream-tests/train", num_samples=SAMPLES, image_size=48, samples_per_shard=24,
                    factory=s3_server.client_factory())
    return f"{test_bucket}/stream-tests/train"


def loader(source, s3, **kwargs):
    settings = dict(batch_size=8, image_size=32, num_workers=2, seed=7, factory=s3)
    return ShardLoader(source, **{**settings, **kwargs})


def test_round_trip_from_s3_gives_normalised_batches_and_true_labels(train_shards, s3):
    truth = {s.key: s.label for s in classification_samples(SAMPLES, 10, 48, 0)}
    stream = loader(train_shards, s3, augmentation="eval")
    seen = []
    for batch in stream:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 32, 32)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["label"].tolist() == [truth[k] for k in batch["key"]]
        seen += batch["key"]
    assert sorted(seen) == sorted(truth) and stream.stats["samples"] == SAMPLES
    assert stream.class_names == [f"class{c}" for c in range(10)] and stream.remaining_samples() == 0


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def test_order_is_deterministic_for_seed_and_epoch(train_shards, s3):
    first = keys_of(loader(train_shards, s3))
    assert keys_of(loader(train_shards, s3)) == first
    other_epoch = loader(train_shards, s3)
    other_epoch.set_epoch(1)
    second = keys_of(other_epoch)
    assert second != first and sorted(second) == sorted(first)
    assert keys_of(other_epoch) == []  # the epoch is consumed until set_epoch moves on


def take(stream, batches):
    return keys_of(itertools.islice(iter(stream), batches))


def assert_exactly_the_epoch(*key_lists):
    counts = collections.Counter(k for keys in key_lists for k in keys)
    duplicated = [k for k, n in counts.items() if n > 1]
    assert not duplicated, f"repeated: {duplicated[:5]}"
    assert len(counts) == SAMPLES, f"{SAMPLES - len(counts)} samples never seen"


@pytest.mark.parametrize("resume_world, resume_workers", [(2, 2), (1, 2), (3, 1)])
def test_resume_is_exact_from_two_ranks_of_two_workers(train_shards, s3, resume_world, resume_workers):
    ranks = [loader(train_shards, s3, rank=r, world_size=2) for r in range(2)]
    before = [take(ranks[0], 3), take(ranks[1], 5)]  # stopped at arbitrary, different batches
    states = [json.loads(json.dumps(r.state_dict())) for r in ranks]  # plain data, as a checkpoint holds it
    assert sum(len(k) for k in before) == 64

    resumed = [loader(train_shards, s3, rank=r, world_size=resume_world, num_workers=resume_workers)
               for r in range(resume_world)]
    for stream in resumed:
        stream.load_state_dict(states)
        assert stream.remaining_samples() == SAMPLES - 64
    after = [keys_of(stream) for stream in resumed]
    assert_exactly_the_epoch(*before, *after)
    assert max(map(len, after)) - min(map(len, after)) <= resume_workers  # balanced


def test_resume_twice_and_in_process_worker_mode(train_shards, s3):
    ranks = [loader(train_shards, s3, rank=r, world_size=2) for r in range(2)]
    first = [take(ranks[0], 2), take(ranks[1], 1)]
    middle = [loader(train_shards, s3, rank=r, world_size=3, num_workers=0) for r in range(3)]
    for stream in middle:
        stream.load_state_dict([r.state_dict() for r in ranks])
    second = [take(middle[0], 4), take(middle[1], 1), []]
    merged = merge_loader_states([m.state_dict() for m in middle])
    last = loader(train_shards, s3)
    last.load_state_dict(merged)
    assert_exactly_the_epoch(*first, *second, keys_of(last))
    assert last.remaining_samples() == 0


def test_states_from_different_epochs_or_seeds_are_refused(train_shards, s3):
    a, b = loader(train_shards, s3), loader(train_shards, s3)
    b.set_epoch(1)
    with pytest.raises(ValueError, match="disagree"):
        merge_loader_states([a.state_dict(), b.state_dict()])
    with pytest.raises(ValueError, match="seed"):
        loader(train_shards, s3, seed=1).load_state_dict(a.state_dict())


def test_split_ranges_cuts_contiguous_equal_pieces():
    pieces = split_ranges([(3, 0, 10), (1, 4, 10), (0, 0, 5)], 4)
    assert [sum(e - s for _, s, e in p) for p in pieces] == [5, 5, 5, 6]
    assert pieces[0] == [(3, 0, 5)] and pieces[1] == [(3, 5, 10)] and pieces[2] == [(1, 4, 9)]
    assert pieces[3] == [(1, 9, 10), (0, 0, 5)]


def _jpeg(width, height):
    import io
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_augmentations_have_the_configured_sizes_and_draft_mode_keeps_quality():
    data = _jpeg(1024, 768)
    assert augmentation_for("pretrain").apply(data, random.Random(0)).shape == (224, 224, 3)
    assert augmentation_for("finetune").apply(data, random.Random(0)).shape == (384, 384, 3)
    evaluation = augmentation_for("eval")
    assert np.array_equal(evaluation.apply(data, random.Random(1)), evaluation.apply(data, random.Random(2)))
    # A large crop decoded at 1/2 or 1/4 scale is close to the full decode.
    full = Augmentation("eval", 128, use_draft=False).apply(data, random.Random(0)).astype(float)
    drafted = Augmentation("eval", 128).apply(data, random.Random(0)).astype(float)
    assert np.abs(full - drafted).mean() < 12
    for seed in range(50):
        left, top, right, bottom = random_resized_crop_box(500, 375, random.Random(seed))
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375


def _rank_process(rank, world_size, port, source, factory, stop_after, results):
    import torch.distributed as dist

    from data_pipelines.storage import write_bytes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        stream = ShardLoader(source, batch_size=8, image_size=32, num_workers=2, seed=7, rank=rank,
                             world_size=world_size, factory=factory)
        keys = take(stream, stop_after[rank])
        states = [None] * world_size
        dist.all_gather_object(states, stream.state_dict())  # what a trainer puts in its checkpoint
        if rank == 0:
            write_bytes(f"{source}-checkpoint/data_position.json", json.dumps(states).encode(), factory)
        results.put((rank, keys))
    finally:
        dist.destroy_process_group()


def test_real_ranks_gather_their_positions_and_one_rank_finishes_the_epoch(train_shards, s3):
    import multiprocessing

    from data_pipelines.storage import read_bytes
    from tests.conftest import free_port

    port = free_port()  # below the ephemeral range, never handed out twice (tests/conftest.py)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_rank_process, args=(r, 2, port, train_shards, s3, [4, 2], results)) for r in range(2)]
    for process in ranks:
        process.start()
    before = dict(results.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0

    resumed = loader(train_shards, s3, num_workers=1)
    resumed.load_state_dict(json.loads(read_bytes(f"{train_shards}-checkpoint/data_position.json", s3)))
    assert_exactly_the_epoch(before[0], before[1], keys_of(resumed))


def test_merged_states_leave_exactly_the_unconsumed_ranges():
    from data_pipelines.manifest import Manifest, ShardInfo
    from data_pipelines.stream import STATE_FORMAT, remaining_ranges

    manifest = Manifest([ShardInfo("a.tar", 10, 1), ShardInfo("b.tar", 5, 1)], class_names=[])
    state = lambda consumed: {"format": STATE_FORMAT, "seed": 0, "epoch": 3, "consumed": consumed}  # noqa: E731
    merged = merge_loader_states([state({"a.tar": [[0, 2], [5, 7]]}), state({"a.tar": [[2, 4]], "b.tar": [[4, 5]]})])
    assert merged["consumed"] == {"a.tar": [[0, 4], [5, 7]], "b.tar": [[4, 5]]} and merged["epoch"] == 3
    assert remaining_ranges(manifest, [1, 0], merged["consumed"]) == [(1, 0, 4), (0, 4, 5), (0, 7, 10)]


def test_unlabeled_shards_stream_when_labels_are_not_wanted(s3, fresh_prefix):
    from data_pipelines.synthetic import write_synthetic

    write_synthetic("unlabeled", fresh_prefix, num_samples=40, image_size=32, samples_per_shard=16, factory=s3, progress=False)
    images = ShardLoader(fresh_prefix, batch_size=8, image_size=32, num_workers=0, factory=s3, labels=False)
    keys = [k for batch in images for k in batch["key"]]
    assert sorted(keys) == [f"synthetic{i:07d}" for i in range(40)]
    needs_labels = ShardLoader(fresh_prefix, batch_size=8, image_size=32, num_workers=0, factory=s3)
    assert [b for b in needs_labels] == [] and needs_labels.stats["skipped_samples"] == 40


def test_the_held_out_part_is_chosen_by_key_whatever_the_shard_layout(tmp_path):
    """KeySplit: the digits' held-out 10% is the same set of samples written as 8 shards or as 3,
    train and held-out parts are disjoint and together everything, and the data position of a
    filtered epoch still records every sample read."""
    from data_pipelines.stream import KeySplit

    def keys(url, part, workers=0):
        loader = ShardLoader(url, batch_size=16, augmentation="eval", image_size=8, num_workers=workers,
                             keep=KeySplit(0.1, part))
        seen = [k for batch in loader for k in batch["key"]]
        return seen, loader

    write_synthetic("digits", str(tmp_path / "small"), image_size=8, samples_per_shard=64, split="train")
    write_synthetic("digits", str(tmp_path / "large"), image_size=8, samples_per_shard=600, split="train")
    held_small, loader = keys(str(tmp_path / "small"), "holdout")
    held_large, _ = keys(str(tmp_path / "large"), "holdout", workers=2)
    rest, _ = keys(str(tmp_path / "small"), "train")
    everything, _ = keys(str(tmp_path / "small"), "all")
    assert set(held_small) == set(held_large) and len(held_small) == len(set(held_small))
    assert 0.07 * 1437 < len(held_small) < 0.13 * 1437  # about, not exactly, 10%
    assert not set(held_small) & set(rest) and set(held_small) | set(rest) == set(everything)
    assert len(everything) == 1437
    assert loader.remaining_samples() == 0  # the samples passed over count as consumed
    with pytest.raises(ValueError, match="part 'test'"):
        KeySplit(0.1, "test")


def test_a_data_position_naming_shards_the_manifest_no_longer_lists_is_refused_with_one_line(tmp_path):
    """A checkpoint's data position over data rewritten since (other shard names): refused with
    one line naming the shards, not resumed as if they had never been read (the training loop
    does not retry it: orchestrator/train_loop.py _fatal_line)."""
    from data_pipelines.stream import StaleDataPosition
    from orchestrator.train_loop import _fatal_line

    old, new = tmp_path / "old", tmp_path / "new"
    write_synthetic("classification", str(old), num_samples=40, image_size=16, samples_per_shard=10)
    write_synthetic("classification", str(new), num_samples=40, image_size=16, samples_per_shard=8)
    before = ShardLoader(str(old), batch_size=8, image_size=16, num_workers=0, seed=7, augmentation="eval")
    assert len(take(before, 2)) == 16
    state = before.state_dict()
    rewritten = json.loads((new / "manifest.json").read_text())
    for shard in rewritten["shards"]:  # the same data under other names, as a re-conversion writes it
        (new / shard["name"]).rename(new / f"v2-{shard['name']}")
        shard["name"] = f"v2-{shard['name']}"
    (new / "manifest.json").write_text(json.dumps(rewritten))
    after = ShardLoader(str(new), batch_size=8, image_size=16, num_workers=0, seed=7, augmentation="eval")
    with pytest.raises(StaleDataPosition) as caught:
        after.load_state_dict(state)
    line = str(caught.value)
    assert "\n" not in line and f"{new}'s manifest no longer lists" in line and "shard-000000.tar" in line
    assert _fatal_line(caught.value) == line
    ShardLoader(str(old), batch_size=8, image_size=16, num_workers=0, seed=7, augmentation="eval").load_state_dict(state)


# ---- the epoch's plan, linear: the same output as the implementations it replaced ------------

def _split_ranges_before(ranges, parts):
    """split_ranges as it was (O(ranges x parts)), the reference for the linear one."""
    if any(end is None for _, _, end in ranges):
        return [ranges[k::parts] for k in range(parts)]
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


def _remaining_ranges_before(manifest, order, consumed):
    """remaining_ranges as it was (a Python loop over the shards), the reference for the array one."""
    from data_pipelines.stream import _subtract

    return [(shard, a, b) for shard in order
            for a, b in _subtract(0, manifest.shards[shard].samples, consumed.get(manifest.shards[shard].name, []))]


def _epoch_shard_order_before(num_shards, seed, epoch):
    order = list(range(num_shards))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _merge_before(states):
    """merge_loader_states' union as it was (an insert and a sort per interval)."""
    from data_pipelines.stream import _add_interval

    consumed = {}
    for state in states:
        for shard, intervals in state["consumed"].items():
            target = consumed.setdefault(shard, [])
            for a, b in intervals:
                _add_interval(target, a, b)
    return consumed


def test_the_linear_plan_cuts_exactly_as_before_on_random_manifests_and_resumed_states():
    from data_pipelines.manifest import Manifest, ShardInfo
    from data_pipelines.stream import STATE_FORMAT, epoch_shard_order, remaining_ranges

    rng = random.Random(26)
    for trial in range(300):
        shards = rng.randint(1, 40)
        lengths = [rng.choice([0, 1, 2, 7, rng.randint(1, 300)]) for _ in range(shards)]
        manifest = Manifest(shards=[ShardInfo(name=f"s{i}.tar", samples=n, bytes=1)
                                    for i, n in enumerate(lengths)], class_names=[], label_kind="none")
        # A resumed state: random consumed intervals per shard, from several "ranks".
        states = []
        for _ in range(rng.randint(1, 5)):
            consumed = {}
            for i, n in enumerate(lengths):
                if n and rng.random() < 0.4:
                    a = rng.randrange(n)
                    consumed[f"s{i}.tar"] = [[a, rng.randint(a, n)]]
            states.append({"format": STATE_FORMAT, "seed": 1, "epoch": 0, "consumed": consumed})
        merged = merge_loader_states(states)["consumed"]
        assert merged == _merge_before(states)
        order = epoch_shard_order(shards, 1, trial)
        assert order == _epoch_shard_order_before(shards, 1, trial)
        ranges = remaining_ranges(manifest, order, merged)
        assert ranges == _remaining_ranges_before(manifest, order, merged)
        # A consumed list as a state file may hold it: intervals past the end, empty, touching,
        # overlapping or out of order (the last two are not what merging leaves: the loop takes them).
        raw = {}
        for i, n in enumerate(lengths):
            if rng.random() < 0.5:
                ends = sorted(rng.randint(0, n + 5) for _ in range(2 * rng.randint(1, 3)))
                raw[f"s{i}.tar"] = [[ends[k], ends[k + 1]] for k in range(0, len(ends), 2)]
                if rng.random() < 0.2:
                    raw[f"s{i}.tar"].reverse()
        assert remaining_ranges(manifest, order, raw) == _remaining_ranges_before(manifest, order, raw), trial
        some = [rng.randrange(shards) for _ in range(rng.randint(1, 2 * shards))]  # repeats, and a subset
        assert remaining_ranges(manifest, some, raw) == _remaining_ranges_before(manifest, some, raw), trial
        for parts in (1, 2, 3, rng.randint(1, 64), rng.randint(100, 600)):
            assert split_ranges(ranges, parts) == _split_ranges_before(ranges, parts), (trial, parts)
        unknown = [(s, a, None if rng.random() < 0.3 else b) for s, a, b in ranges]  # lengths unknown
        assert split_ranges(unknown, 7) == _split_ranges_before(unknown, 7)
    # Inputs the array cut leaves to the loop: positions past int64, a range that ends before it begins.
    for odd in ([(0, 0, 2**70), (1, 5, 2**70 + 9)], [(0, 0, 2**61), (1, 0, 2**61)], [(0, 0, 10), (1, 8, 3), (2, 0, 40)]):
        for parts in (1, 3, 8):
            assert split_ranges(odd, parts) == _split_ranges_before(odd, parts)
