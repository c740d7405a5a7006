"""Writing shards: launch/make_shards.py as users run it, into a folder and onto a real S3."""

import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.manifest import load_shard_list
from data_pipelines.s3 import parse_s3_url
from data_pipelines.shard_writer import make_shards
from data_pipelines.synthetic import write_synthetic
from tests.conftest import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "make_shards.py")


def make_shards_cli(*args, env=None):
    return run_process([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _save(path, size, colour, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(abs(hash(path)) % 2**32).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = colour
    Image.fromarray(pixels).save(path, fmt)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 5 images (JPEG and PNG), plus one corrupt JPEG and one non-image file."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(5):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            _save(str(root / name / f"img.{i}.{ext}"), (60 + 7 * i, 40 + 5 * i), 80 * c, fmt)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "eel" / "notes.txt").write_text("ignored")
    return str(root)


def _read_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_cli_writes_image_folder_to_s3_with_bytes_unchanged(image_folder, s3_server, fresh_prefix, s3):
    out = make_shards_cli("--input", image_folder, "--output", f"{fresh_prefix}/train", "--samples-per-shard", "4",
                          "--workers", "2", env=s3_server.environment())
    assert out.returncode == 0, out.stderr
    assert "wrote 15 samples in 4 shards" in out.stdout and "1 undecodable inputs skipped" in out.stdout
    assert "broken.jpg" in out.stderr  # the warning names the file

    _, manifest = load_shard_list(f"{fresh_prefix}/train", s3)
    assert manifest.class_names == ["cat", "dog", "eel"] and manifest.label_kind == "class"
    assert manifest.skipped == 1 and manifest.total_samples == 15
    client, location = s3.client(), parse_s3_url(f"{fresh_prefix}/train")
    members = {}
    for shard in manifest.shards:
        data = client.get_object(Bucket=location.bucket, Key=location.key(shard.name))["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
        members.update(_read_tar(data))
    assert len([n for n in members if n.endswith(".cls")]) == 15
    original = open(os.path.join(image_folder, "dog", "img.1.jpg"), "rb").read()
    assert members["dog_img_1.jpg"] == original and members["dog_img_1.cls"] == b"1"
    assert members["eel_img_0.png"] == open(os.path.join(image_folder, "eel", "img.0.png"), "rb").read()
    first_shard_classes = {members[n] for n in sorted(members) if n.endswith(".cls")}
    assert len(first_shard_classes) > 1  # shuffled across classes


def test_resize_shorter_shrinks_only_larger_images(image_folder, tmp_path):
    summary = make_shards(image_folder, str(tmp_path / "out"), samples_per_shard=100, resize_shorter=45, progress=False)
    members = _read_tar(open(tmp_path / "out" / summary.manifest.shards[0].name, "rb").read())
    shorter = {n: min(Image.open(io.BytesIO(b)).size) for n, b in members.items() if n.endswith((".jpg", ".png"))}
    assert shorter["cat_img_0.png"] == 40 and shorter["cat_img_4.png"] == 45 and shorter["cat_img_3.jpg"] == 45


def test_multi_label_folder_writes_json_labels(tmp_path):
    root = tmp_path / "ml"
    _save(str(root / "a.jpg"), (32, 32), 10, "JPEG")
    _save(str(root / "b.png"), (32, 32), 20, "PNG")
    (root / "labels.json").write_text(json.dumps({"a.jpg": ["sky", "tree"], "b.png": []}))
    summary = make_shards(str(root), str(tmp_path / "out"), progress=False)
    assert summary.manifest.label_kind == "multi_label" and summary.manifest.class_names == ["sky", "tree"]
    members = _read_tar(open(tmp_path / "out" / "shard-000000.tar", "rb").read())
    assert json.loads(members["a.json"]) == {"labels": [0, 1]} and json.loads(members["b.json"]) == {"labels": []}


def test_cli_errors_are_one_line_with_status_2(tmp_path, image_folder, s3_server):
    (tmp_path / "empty").mkdir()
    for args, expected in [
        (["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "o")], "no such folder"),
        (["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")], "neither class subfolders nor labels.json"),
        (["--input", image_folder, "--output", "s3://no-such-bucket-anywhere/x"], "no-such-bucket-anywhere"),
        (["--input", image_folder, "--output", str(tmp_path / "o"), "--samples-per-shard", "0"], "must be >= 1"),
    ]:
        out = make_shards_cli(*args, env=s3_server.environment())
        assert out.returncode == 2, (args, out.stderr)
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert s3_server.secret_access_key not in out.stderr
        assert len([line for line in out.stderr.splitlines() if line.startswith(("make_shards.py", "usage"))]) == 1


@pytest.mark.parametrize("kind, classes, count", [("classification", 10, 64), ("multi_label", 6, 64), ("digits", 10, 1797)])
def test_generated_sets_go_through_the_same_writer(kind, classes, count, fresh_prefix, s3):
    summary = write_synthetic(kind, f"{fresh_prefix}/{kind}", num_samples=64, image_size=32, samples_per_shard=512, factory=s3)
    _, manifest = load_shard_list(f"{fresh_prefix}/{kind}", s3)
    assert manifest.total_samples == count == summary.written and len(manifest.class_names) == classes
    assert manifest.label_kind == ("multi_label" if kind == "multi_label" else "class")


def test_large_shards_go_up_as_multipart_uploads(fresh_prefix, s3, monkeypatch):
    import data_pipelines.shard_writer as shard_writer

    monkeypatch.setattr(shard_writer, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part size
    blobs = [np.random.default_rng(i).bytes(4 << 20) for i in range(3)]  # 12 MiB in one shard
    samples = [shard_writer.Sample(f"blob{i}", b, "png", i) for i, b in enumerate(blobs)]
    summary = shard_writer.write_shards(samples, f"{fresh_prefix}/big", class_names=["a", "b", "c"],
                                        samples_per_shard=3, factory=s3, progress=False)
    shard = summary.manifest.shards[0]
    location = parse_s3_url(f"{fresh_prefix}/big")
    head = s3.client().head_object(Bucket=location.bucket, Key=location.key(shard.name))
    assert head["ETag"].strip('"').endswith("-3")  # an S3 multipart ETag: md5-of-parts-N
    data = s3.client().get_object(Bucket=location.bucket, Key=location.key(shard.name))["Body"].read()
    assert hashlib.sha256(data).hexdigest() == shard.sha256 and _read_tar(data)["blob1.png"] == blobs[1]
