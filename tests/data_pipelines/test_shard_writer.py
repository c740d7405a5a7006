"""Writing shards: launch/make_shards.py as users run it, into a folder and onto a real S3."""

import hashlib
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.image_inputs import key_for
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


# ---- on S3, from lists, through Ray tasks, resumed --------------------------------------------

def _upload_tree(folder, url, s3):
    location = parse_s3_url(url)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            s3.client().upload_file(path, location.bucket, location.key(os.path.relpath(path, folder)))


def _shard_objects(url, s3):
    location = parse_s3_url(url)
    listed = s3.client().list_objects_v2(Bucket=location.bucket, Prefix=location.key(""))["Contents"]
    return {o["Key"][len(location.key("")):]: (o["ETag"], o["LastModified"]) for o in listed}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs in this process for the module's conversions (make_shards' own
    connect_ray, as the CLI's --ray calls it), shut down after them: the CLI's Ray start is
    tried by the bad-input test and the Ray job test."""
    from data_pipelines.shard_writer import connect_ray

    ray = connect_ray(2)
    yield ray
    ray.shutdown()


def _read_back(paths):
    """The samples as upstream webdataset reads them: {key: {extension: bytes}}."""
    import webdataset as wds

    return {sample["__key__"]: sample for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False)}


def test_an_image_folder_on_s3_converts_through_ray_tasks_and_a_rerun_writes_only_what_is_missing(
        image_folder, tmp_path, s3_server, fresh_prefix, s3, local_ray):
    """The fixture's tree copied to SeaweedFS, converted as 2 Ray tasks at once on a local Ray:
    the same shards, bit for bit, as the tree on disk converted in this process (the plan does
    not depend on where or how it runs). A run again writes nothing but the manifest; after a
    shard is deleted and another replaced (a conversion cut short, a stray write), it writes
    those two and their records and no other, and the manifest comes out the same."""
    reference = make_shards(image_folder, str(tmp_path / "on-disk"), samples_per_shard=4, progress=False)
    _upload_tree(image_folder, f"{fresh_prefix}/raw", s3)
    summary = make_shards(f"{fresh_prefix}/raw", f"{fresh_prefix}/out", samples_per_shard=4, workers=2, factory=s3,
                          progress=False, ray=True)
    # 2 tasks at a time; which of Ray's worker processes ran them is Ray's choice (one that ends
    # its first shard before a second process is leased may take the next)
    assert re.fullmatch(rf"wrote 15 samples in 4 shards to {re.escape(fresh_prefix)}/out by [12] Ray workers? "
                        r"\(1 undecodable inputs skipped\)", summary.line()), summary.line()
    _, manifest = load_shard_list(f"{fresh_prefix}/out", s3)
    assert manifest == reference.manifest and manifest.skipped == 1
    before = _shard_objects(f"{fresh_prefix}/out", s3)
    assert sorted(before) == ["_written/shard-00000%d.json" % i for i in range(4)] + [
        "manifest.json"] + ["shard-00000%d.tar" % i for i in range(4)]

    written = []  # the keys this process PUTs from here on (make_shards here runs in it)

    def record(request, **_):
        if request.method == "PUT" and ".vitscale-write-check" not in request.url:  # the preflight's probe
            written.append(request.url.split(f"/{location.key('')}", 1)[1].split("?")[0])

    location = parse_s3_url(f"{fresh_prefix}/out")
    s3.client().meta.events.register("before-send.s3", record)
    again = make_shards(f"{fresh_prefix}/raw", f"{fresh_prefix}/out", samples_per_shard=4, factory=s3, progress=False)
    assert (again.kept, again.manifest) == (4, reference.manifest)
    assert written == ["manifest.json"]
    assert {k: v for k, v in _shard_objects(f"{fresh_prefix}/out", s3).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}

    s3.client().delete_object(Bucket=location.bucket, Key=location.key("shard-000001.tar"))
    s3.client().put_object(Bucket=location.bucket, Key=location.key("shard-000002.tar"), Body=b"x" * manifest.shards[2].bytes)
    s3.client().delete_object(Bucket=location.bucket, Key=location.key("manifest.json"))
    written.clear()
    resumed = make_shards(f"{fresh_prefix}/raw", f"{fresh_prefix}/out", samples_per_shard=4, factory=s3, progress=False)
    assert (resumed.kept, resumed.manifest) == (2, reference.manifest)
    assert sorted(written) == ["_written/shard-000001.json", "_written/shard-000002.json", "manifest.json",
                               "shard-000001.tar", "shard-000002.tar"]
    s3.client().meta.events.unregister("before-send.s3", record)
    # another shard size is another plan: nothing of this one is taken for it
    other = make_shards(f"{fresh_prefix}/raw", f"{fresh_prefix}/out", samples_per_shard=5, factory=s3, progress=False)
    assert (other.kept, other.written, other.manifest.total_samples) == (0, 15, 15)


def test_a_list_file_on_s3_converts_through_ray_and_reads_back_with_webdataset(image_folder, tmp_path, s3_server,
                                                                                fresh_prefix, s3, local_ray):
    """A .tsv list on S3: keys relative to it, an absolute s3:// URL elsewhere, multi-label lines,
    a line with no label, a listed image that is not there (skipped and counted). Two Ray tasks
    at once write a local folder, which upstream webdataset reads back with every label."""
    _upload_tree(image_folder, f"{fresh_prefix}/lists/images", s3)
    _upload_tree(os.path.join(image_folder, "eel"), f"{fresh_prefix}/elsewhere", s3)
    lines = ["# url<TAB>labels", "images/cat/img.0.png\tcat,pet", "images/cat/img.1.jpg\tcat", "",
             "images/dog/img.2.png\tdog,pet,ball", "images/dog/img.3.jpg\t",
             f"{fresh_prefix}/elsewhere/img.4.png\teel", "images/dog/gone.jpg\tdog"]
    location = parse_s3_url(f"{fresh_prefix}/lists/train.tsv")
    s3.client().put_object(Bucket=location.bucket, Key=location.prefix, Body="\n".join(lines).encode())
    summary = make_shards(f"{fresh_prefix}/lists/train.tsv", str(tmp_path / "out"), samples_per_shard=2, workers=2,
                          factory=s3, progress=False, ray=True)
    assert re.fullmatch(rf"wrote 5 samples in 3 shards to {re.escape(str(tmp_path / 'out'))} by [12] Ray workers? "
                        r"\(1 undecodable inputs skipped\)", summary.line()), summary.line()
    _, manifest = load_shard_list(str(tmp_path / "out"))
    assert manifest.label_kind == "multi_label" and manifest.class_names == ["ball", "cat", "dog", "eel", "pet"]
    samples = _read_back([str(tmp_path / "out" / shard.name) for shard in manifest.shards])
    bucket_key = key_for(f"{location.bucket}/{parse_s3_url(fresh_prefix).prefix}/elsewhere/img.4.png")
    labels = {key: json.loads(sample["json"])["labels"] for key, sample in samples.items()}
    assert labels == {"images_cat_img_0": [1, 4], "images_cat_img_1": [1], "images_dog_img_2": [0, 2, 4],
                      "images_dog_img_3": [], bucket_key: [3]}
    assert samples["images_cat_img_1"]["jpg"] == open(os.path.join(image_folder, "cat", "img.1.jpg"), "rb").read()


def test_a_list_in_parts_on_s3_converts_part_by_part_through_ray_with_the_whole_lists_classes(
        image_folder, tmp_path, s3_server, fresh_prefix, s3, local_ray):
    """A list given as a brace pattern of 3 parts on S3 (JFT-sized lists come so): the first
    pass (Ray tasks) counts the parts and gathers their classes; the shards are planned part by
    part, numbered on across parts, each part's images read by the driver only then (one GET
    of each part in this process), and labelled with the whole list's classes: "eel", only in
    the last part, is class 2 and, as one line has two labels, every label is a list. A run
    again keeps every shard."""
    _upload_tree(image_folder, f"{fresh_prefix}/lists/images", s3)
    parts = ["images/cat/img.0.png\tcat\nimages/cat/img.1.jpg\tcat\nimages/dog/img.2.png\tdog\n"
             "images/cat/img.3.jpg\tcat\nimages/dog/img.4.png\tdog\n",
             "images/dog/img.0.png\tdog\nimages/dog/img.1.jpg\tdog,cat\n",
             "images/eel/img.0.png\teel\nimages/eel/img.1.jpg\teel\nimages/eel/img.2.png\teel\n"]
    location = parse_s3_url(f"{fresh_prefix}/lists")
    for place, text in enumerate(parts):
        s3.client().put_object(Bucket=location.bucket, Key=location.key(f"part-{place}.tsv"), Body=text.encode())
    reads = []
    s3.client().meta.events.register("before-send.s3", lambda request, **_: reads.append(request.url)
                                     if request.method == "GET" and ".tsv" in request.url else None)
    pattern = f"{fresh_prefix}/lists/part-{{0..2}}.tsv"
    summary = make_shards(pattern, f"{fresh_prefix}/out", samples_per_shard=2, workers=2, factory=s3, progress=False,
                          ray=True)
    assert sorted(url.rsplit("/", 1)[1] for url in reads) == ["part-0.tsv", "part-1.tsv", "part-2.tsv"]
    assert summary.line().startswith(f"wrote 10 samples in 6 shards from 3 list parts to {fresh_prefix}/out by ")
    _, manifest = load_shard_list(f"{fresh_prefix}/out", s3)
    assert manifest.class_names == ["cat", "dog", "eel"] and manifest.label_kind == "multi_label"
    # 5 images make shards 0-2 (2, 2, 1), 2 make shard 3, 3 make shards 4-5: no shard spans two parts
    assert [(shard.name, shard.samples) for shard in manifest.shards] == [
        (f"shard-{i:06d}.tar", n) for i, n in enumerate([2, 2, 1, 2, 2, 1])]
    client, out = s3.client(), parse_s3_url(f"{fresh_prefix}/out")
    for shard in manifest.shards:
        client.download_file(out.bucket, out.key(shard.name), str(tmp_path / shard.name))
    samples = _read_back([str(tmp_path / shard.name) for shard in manifest.shards])
    labels = {key: json.loads(sample["json"])["labels"] for key, sample in samples.items()}
    assert labels == {**{f"images_cat_img_{i}": [0] for i in (0, 1, 3)}, **{f"images_dog_img_{i}": [1] for i in (2, 4, 0)},
                      "images_dog_img_1": [0, 1], **{f"images_eel_img_{i}": [2] for i in range(3)}}
    assert {key[:-6] for key in list(samples)[:5]} <= {"images_cat", "images_dog"}  # part 0's first
    again = make_shards(pattern, f"{fresh_prefix}/out", samples_per_shard=2, workers=2, factory=s3, progress=False,
                        ray=True)
    assert (again.kept, again.written) == (6, 10)


def test_a_list_in_parts_here_numbers_classes_over_every_part(image_folder, tmp_path):
    """The same plan in this process, single-label: a class only the second part lists is
    indexed among all the list's classes, and the shards are the parts' plans one after another."""
    from data_pipelines.shard_writer import plan_shards
    from data_pipelines.image_inputs import list_images

    (tmp_path / "l-a.tsv").write_text(f"{image_folder}/cat/img.0.png\tcat\n{image_folder}/dog/img.1.jpg\tdog\n"
                                      f"{image_folder}/cat/img.2.png\tcat\n")
    (tmp_path / "l-b.tsv").write_text(f"{image_folder}/eel/img.3.jpg\teel\n{image_folder}/cat/img.4.png\tcat\n")
    summary = make_shards(str(tmp_path / "l-{a,b}.tsv"), str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert summary.line() == f"wrote 5 samples in 3 shards from 2 list parts to {tmp_path / 'out'} (0 undecodable inputs skipped)"
    _, manifest = load_shard_list(str(tmp_path / "out"))
    assert manifest.class_names == ["cat", "dog", "eel"] and manifest.label_kind == "class"
    samples = _read_back([str(tmp_path / "out" / shard.name) for shard in manifest.shards])
    assert {key.rsplit("_img_", 1)[1]: sample["cls"] for key, sample in samples.items()} == {
        "0": b"0", "1": b"1", "2": b"0", "3": b"2", "4": b"0"}
    # the shards of part b: its own plan, numbered after part a's two shards
    planned = plan_shards(list_images(str(tmp_path / "l-b.tsv"), ["cat", "dog", "eel"], True), 2, None, "0/1", 2)
    assert [(job.name, [image.key for image in job.images]) for job in planned] == [
        (manifest.shards[2].name, [key for key in samples if key.endswith(("img_3", "img_4"))])]


def test_list_files_tsv_and_csv_single_label_with_numeric_classes(image_folder, tmp_path):
    from data_pipelines.image_inputs import read_list_file

    (tmp_path / "a.tsv").write_text(f"{image_folder}/cat/img.0.png\t10\ndog/img.1.jpg\t9\ndog/img.3.jpg\t2\n")
    images, classes, kind = read_list_file(str(tmp_path / "a.tsv"))
    assert (classes, kind) == (["2", "9", "10"], "class")  # integers sort as integers
    assert [(i.url, i.label) for i in images] == [(f"{image_folder}/cat/img.0.png", 2),
                                                  (str(tmp_path / "dog/img.1.jpg"), 1), (str(tmp_path / "dog/img.3.jpg"), 0)]
    (tmp_path / "b.csv").write_text('dog/img.1.jpg,dog,"pet"\n"cat/img,0.png",cat\n')
    images, classes, kind = read_list_file(str(tmp_path / "b.csv"))
    assert (classes, kind) == (["cat", "dog", "pet"], "multi_label")
    assert [(i.key, i.label) for i in images] == [("dog_img_1", (1, 2)), ("cat_img_0", (0,))]


def test_bad_inputs_of_a_conversion_are_one_line_with_status_2(tmp_path, image_folder, s3_server, fresh_prefix, s3,
                                                                monkeypatch, capsys):
    (tmp_path / "bad.tsv").write_text("a.jpg\tcat\n\nb.jpg cat\n")
    (tmp_path / "bad.csv").write_text("a.jpg,cat\nb.jpg\n")
    (tmp_path / "empty-label.tsv").write_text("a.jpg\tcat,,dog\n")
    (tmp_path / "twice.tsv").write_text("x/a.jpg\tcat\nx_a.png\tdog\n")
    (tmp_path / "binary.tsv").write_bytes(b"\xff\xfe\x00a")
    (tmp_path / "no-bucket.tsv").write_text("s3://no-such-bucket-anywhere/a.jpg\tcat\n")  # fails in a Ray task
    for place in range(3):  # a list in parts, its last part with a bad line 2; part-{0,1,3} names one not there
        good = f"{image_folder}/cat/img.{place}.png\tcat\n"
        (tmp_path / f"part-{place}.tsv").write_text(good + ("cat.jpg cat\n" if place == 2 else ""))
    _upload_tree(os.path.join(image_folder, "cat"), f"{fresh_prefix}/flat", s3)  # images, no class folders
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    for number, (args, expected) in enumerate([
        (["--input", str(tmp_path / "bad.tsv")], "bad.tsv: line 3: expected URL<TAB>label[,label...], got 'b.jpg cat'"),
        (["--input", str(tmp_path / "bad.csv")], "bad.csv: line 2: expected URL,label[,label...], got 'b.jpg'"),
        (["--input", str(tmp_path / "empty-label.tsv")], "line 1: an empty label in"),
        (["--input", str(tmp_path / "twice.tsv")], "line 2: 'x_a.png' gives the sample key 'x_a' of line 1"),
        (["--input", str(tmp_path / "binary.tsv")], "binary.tsv: not UTF-8 text"),
        (["--input", str(tmp_path / "absent.tsv")], "absent.tsv"),
        (["--input", f"{fresh_prefix}/absent.tsv"], "NoSuchKey"),
        (["--input", "s3://no-such-bucket-anywhere/raw"], "no-such-bucket-anywhere"),
        (["--input", f"{fresh_prefix}/flat"], "no class folders under this prefix"),
        (["--input", f"{fresh_prefix}/flat", "--format", "cifar"], "--format cifar reads a local folder"),
        (["--input", str(tmp_path / "no-bucket.tsv"), "--ray"], "s3://no-such-bucket-anywhere/a.jpg: NoSuchBucket"),
        (["--input", str(tmp_path / "part-{0..2}.tsv")], "part-2.tsv: line 2: expected URL<TAB>label[,label...]"),
        (["--input", str(tmp_path / "part-{0,1,3}.tsv")], "part-3.tsv"),
    ]):
        output = tmp_path / f"o{number}"
        if "--ray" in args:  # a process of its own: its Ray, and the task's error back through it
            out = make_shards_cli(*args, "--output", str(output), env=s3_server.environment())
            status, stderr = out.returncode, out.stderr
        else:
            try:
                status = cli.main([*args, "--output", str(output)])
            except SystemExit as error:  # argparse's usage errors
                status = error.code
            stderr = capsys.readouterr().err
        assert status == 2, (args, stderr)
        assert expected in stderr and "Traceback" not in stderr, (expected, stderr)
        if "--ray" not in args:  # (that one fails in the task reading the image)
            assert not os.path.exists(output), args  # caught before anything is written
        assert len([line for line in stderr.splitlines() if line.startswith(("make_shards.py", "usage"))]) == 1
        assert s3_server.secret_access_key not in stderr
    assert not any((tmp_path / f"o{n}" / "manifest.json").exists() for n in range(number + 1))


def test_a_conversion_killed_half_way_keeps_its_shards_and_the_run_after_it_writes_the_rest(
        image_folder, tmp_path, s3_server, fresh_prefix, s3):
    """The CLI writes 16 one-image shards to SeaweedFS through a proxy that holds each shard's
    PUT for 0.4 s, and is SIGKILLed once 3 shards have their records: no manifest (a manifest
    only ever lists a whole conversion). The run after it keeps every shard that has a record,
    writes the others, and gives the manifest of an uninterrupted conversion."""
    import subprocess
    import time

    from tests.conftest import free_port, kill_group
    from tests.faultproxy import FaultProxy

    reference = make_shards(image_folder, str(tmp_path / "on-disk"), samples_per_shard=1, progress=False)
    output = f"{fresh_prefix}/out"
    location = parse_s3_url(output)
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as proxy:
        proxy.add("PUT", r"/out/shard-\d+\.tar$", "latency", seconds=0.4)
        child = subprocess.Popen([sys.executable, SCRIPT, "--input", image_folder, "--output", output,
                                  "--samples-per-shard", "1"], cwd=ROOT, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, **s3_server.environment(), "AWS_ENDPOINT_URL": proxy.endpoint_url})
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.poll() is None:
                listed = s3.client().list_objects_v2(Bucket=location.bucket, Prefix=location.key("_written/"))
                if listed.get("KeyCount", 0) >= 3:
                    break
                time.sleep(0.05)
            assert child.poll() is None, "the conversion ended before it could be killed"
            kill_group(child.pid)
            child.wait(10)
        finally:
            kill_group(child.pid)
    left = _shard_objects(output, s3)
    records = {k for k in left if k.startswith("_written/")}
    assert "manifest.json" not in left and 3 <= len(records) < 16
    resumed = make_shards(image_folder, output, samples_per_shard=1, factory=s3, progress=False)
    assert resumed.kept == len(records) and resumed.manifest == reference.manifest
    kept = records | {k.replace("_written/", "").replace(".json", ".tar") for k in records} & set(left)  # a
    # record of the one shard whose only image does not decode has no shard
    assert {k: v for k, v in _shard_objects(output, s3).items() if k in kept} == {k: left[k] for k in kept}
