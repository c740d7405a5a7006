"""Fine-tuning datasets as downloaded (CIFAR python pickles, VTAB-1k task folders) through
launch/make_shards.py's main(), into a folder and onto a real S3, read back with ShardLoader."""

import importlib.util
import io
import os
import pickle
import random
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.augment import augmentation_for
from data_pipelines.downstream import DataUnpickler, detect_format, load_data_pickle
from data_pipelines.manifest import load_shard_list
from data_pipelines.shard_writer import ShardWriteError
from data_pipelines.storage import read_bytes
from data_pipelines.s3 import join_location
from data_pipelines.stream import ShardLoader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_shards_cli", os.path.join(ROOT, "launch", "make_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards_cli = _load_cli()


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str with Python 2's str opcodes, as cPickle wrote the CIFAR files
    (Python 3's protocol 2 writes bytes as a call to _codecs.encode, which those files never hold)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _python2_pickle(obj) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    # numpy 1.x, which wrote the real files, named its array rebuilder numpy.core.multiarray
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_folder(root, kind: str):
    """A CIFAR-10 or CIFAR-100 python folder with a few images per file; returns
    (folder, class names, {split: {key: (HxWx3 pixels, label)}})."""
    rng = np.random.default_rng(7 if kind == "cifar10" else 8)
    if kind == "cifar10":
        folder, classes = root / "cifar-10-batches-py", [f"class{i}" for i in range(10)]
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_name, meta, label_field = "batches.meta", {b"label_names": [c.encode() for c in classes],
                                                        b"num_cases_per_batch": 3, b"num_vis": 3072}, b"labels"
    else:
        folder, classes = root / "cifar-100-python", [f"fine{i}" for i in range(100)]
        files = {"train": ["train"], "test": ["test"]}
        meta_name, meta, label_field = "meta", {b"fine_label_names": [c.encode() for c in classes],
                                                b"coarse_label_names": [b"coarse"]}, b"fine_labels"
    folder.mkdir()
    (folder / meta_name).write_bytes(_python2_pickle(meta))
    expected = {}
    for split, names in files.items():
        expected[split] = {}
        for name in names:
            count = 3 if kind == "cifar10" else 7
            data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, len(classes), count)]
            batch = {b"batch_label": b"batch", label_field: labels, b"data": data,
                     b"filenames": [f"img_{i}.png".encode() for i in range(count)]}
            if kind == "cifar100":
                batch[b"coarse_labels"] = [0] * count
            (folder / name).write_bytes(_python2_pickle(batch))
            for i in range(count):
                expected[split][f"{name}-{i:05d}"] = (data[i].reshape(3, 32, 32).transpose(1, 2, 0), labels[i])
    return str(folder), classes, expected


def _vtab_folder(root):
    """A VTAB-1k task folder: 10 small images (JPEG and PNG, nested folders) and the four lists.
    The largest label (4) is only in test.txt. Returns (folder, {split: {key: (path, label)}})."""
    folder = root / "caltech101"
    lists = {"train800": [], "val200": [], "test": []}
    rng = np.random.default_rng(3)
    for i in range(10):
        sub, ext, fmt = ("images/a", "jpg", "JPEG") if i % 2 else ("images/b/deep", "png", "PNG")
        relative = f"{sub}/img.{i}.{ext}"
        os.makedirs(folder / sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(folder / relative, fmt)
        split = "train800" if i < 4 else "val200" if i < 6 else "test"
        lists[split].append((relative, 4 if i == 9 else i % 3))
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, entries in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{p} {label}\n" for p, label in entries))
    key = lambda p: os.path.splitext(p)[0].replace("/", "_").replace(".", "_")  # noqa: E731
    return str(folder), {s: {key(p): (str(folder / p), label) for p, label in e} for s, e in lists.items()}


def _members(url) -> dict[str, bytes]:
    base, manifest = load_shard_list(url)
    members = {}
    for shard in manifest.shards:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(join_location(base, shard.name)))) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def _loaded(url) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (HxWx3 uint8 image, label)} as ShardLoader's eval path hands them out at 32 px."""
    out = {}
    for batch in ShardLoader(url, batch_size=4, augmentation="eval", image_size=32, num_workers=0, dtype="uint8"):
        for key, image, label in zip(batch["key"], batch["image"].permute(0, 2, 3, 1).numpy(), batch["label"].tolist()):
            out[key] = (image, label)
    return out


def _eval_view(image_bytes: bytes) -> np.ndarray:
    return augmentation_for("eval", 32).apply(image_bytes, random.Random(0))


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _s3_output(s3_server, test_bucket, monkeypatch, name):
    for variable, value in s3_server.environment().items():
        monkeypatch.setenv(variable, value)
    return f"{test_bucket}/downstream-{name}"


def _run(capsys, *args):
    code = make_shards_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("kind, where", [("cifar10", "s3"), ("cifar100", "folder")])
def test_cifar_batches_become_train_and_test_shards(kind, where, tmp_path, s3_server, test_bucket, monkeypatch, capsys):
    folder, classes, expected = _cifar_folder(tmp_path, kind)
    output = _s3_output(s3_server, test_bucket, monkeypatch, kind) if where == "s3" else str(tmp_path / "out")
    code, stdout, stderr = _run(capsys, "--input", folder, "--output", output, "--samples-per-shard", "4")
    assert code == 0, stderr
    train, test = len(expected["train"]), len(expected["test"])
    assert stdout.splitlines() == [
        f"wrote {train} samples in {-(-train // 4)} shards to {output}/train (0 undecodable inputs skipped)",
        f"wrote {test} samples in {-(-test // 4)} shards to {output}/test (0 undecodable inputs skipped)",
    ]
    for split in ("train", "test"):
        url = f"{output}/{split}"
        _, manifest = load_shard_list(url)
        assert manifest.class_names == classes and manifest.label_kind == "class"
        assert manifest.total_samples == len(expected[split])
        members = _members(url)
        assert sorted(members) == sorted(f"{key}.{ext}" for key in expected[split] for ext in ("cls", "png"))
        for key, (pixels, label) in expected[split].items():
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"]))), pixels)  # lossless
            assert members[f"{key}.cls"] == str(label).encode()
        loaded = _loaded(url)
        assert sorted(loaded) == sorted(expected[split])
        for key, (pixels, label) in expected[split].items():
            assert loaded[key][1] == label
            assert np.array_equal(loaded[key][0], _eval_view(_png(pixels)))  # eval: centre 28 px, resized to 32


def test_vtab_task_folder_becomes_four_splits(tmp_path, s3_server, test_bucket, monkeypatch, capsys):
    folder, expected = _vtab_folder(tmp_path)
    output = _s3_output(s3_server, test_bucket, monkeypatch, "vtab")
    code, stdout, stderr = _run(capsys, "--input", folder, "--output", output, "--samples-per-shard", "3")
    assert code == 0, stderr
    assert [line.split(" to ")[1].split(" ")[0] for line in stdout.splitlines()] == [
        f"{output}/{split}" for split in ("train800", "val200", "train800val200", "test")]
    assert "wrote 6 samples in 2 shards" in stdout.splitlines()[2]
    keys = {}
    for split, entries in expected.items():
        url = f"{output}/{split}"
        _, manifest = load_shard_list(url)
        assert manifest.class_names == ["0", "1", "2", "3", "4"] and manifest.total_samples == len(entries)
        members = _members(url)
        keys[split] = set(entries)
        for key, (path, label) in entries.items():
            ext = os.path.splitext(path)[1][1:]
            assert members[f"{key}.{ext}"] == open(path, "rb").read()  # the original bytes
            assert members[f"{key}.cls"] == str(label).encode()
        loaded = _loaded(url)
        assert {key: label for key, (_, label) in loaded.items()} == {k: label for k, (_, label) in entries.items()}
        for key, (path, _) in entries.items():
            assert np.array_equal(loaded[key][0], _eval_view(open(path, "rb").read()))
    assert keys["train800val200"] == keys["train800"] | keys["val200"]  # same image, same key
    assert "images_a_img_1" in keys["train800"]


def test_vtab_to_a_folder_with_workers_and_resize(tmp_path, capsys):
    folder, expected = _vtab_folder(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "--input", folder, "--output", str(out), "--resize-shorter", "20",
                                "--workers", "2", "--format", "vtab")
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 4
    members = _members(str(out / "test"))
    shorter = {n: min(Image.open(io.BytesIO(b)).size) for n, b in members.items() if not n.endswith(".cls")}
    assert len(shorter) == len(expected["test"]) and set(shorter.values()) == {20}


def test_the_unpickler_refuses_code(tmp_path, capsys):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = _python2_pickle({b"data": Payload()})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os|nt)\.system"):
        DataUnpickler(io.BytesIO(evil), encoding="bytes").load()
    assert not marker.exists()

    folder, _, _ = _cifar_folder(tmp_path, "cifar10")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(evil)
    code, stdout, stderr = _run(capsys, "--input", folder, "--output", str(tmp_path / "out"))
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert "data_batch_3" in stderr and "refusing to load" in stderr and ".system" in stderr
    assert not marker.exists() and not (tmp_path / "out").exists()  # checked before anything was written

    # what Python 3 itself writes at protocol 2 holds a call (_codecs.encode for bytes): refused too
    path = tmp_path / "py3.pickle"
    path.write_bytes(pickle.dumps({b"data": b"xyz"}, protocol=2))
    with pytest.raises(ShardWriteError, match=r"_codecs\.encode"):
        load_data_pickle(str(path))


@pytest.mark.parametrize("split, line, expected", [
    ("val200", "images/a/img.1.jpg", "val200.txt:3: expected 'relative/path/to/image label'"),
    ("test", "images/a/img.1.jpg cat", "test.txt:5: expected"),
    ("train800", "images/a/img.1.jpg -1", "train800.txt:5: expected"),
    ("train800val200", "images/a/absent.jpg 1", "train800val200.txt:7: 'images/a/absent.jpg' is not in"),
    ("train800", "images/a/img.1.jpg 2", "train800.txt:5: 'images/a/img.1.jpg' repeats line 2"),
])
def test_bad_vtab_lists_are_one_line_and_status_2(split, line, expected, tmp_path, capsys):
    folder, _ = _vtab_folder(tmp_path)
    with open(os.path.join(folder, f"{split}.txt"), "a") as f:
        f.write(line + "\n")
    code, stdout, stderr = _run(capsys, "--input", folder, "--output", str(tmp_path / "out"))
    assert code == 2 and len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("make_shards.py: error: ") and expected in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_formats_are_told_apart_and_can_be_forced(tmp_path, capsys):
    cifar10, _, _ = _cifar_folder(tmp_path, "cifar10")
    cifar100, _, _ = _cifar_folder(tmp_path, "cifar100")
    vtab, _ = _vtab_folder(tmp_path)
    image_folder = tmp_path / "imagefolder"
    (image_folder / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(image_folder / "cat" / "a.png")
    assert [detect_format(p) for p in (cifar10, cifar100, vtab, str(image_folder))] == ["cifar", "cifar", "vtab", "imagefolder"]

    code, stdout, _ = _run(capsys, "--input", str(image_folder), "--output", str(tmp_path / "o1"))
    assert code == 0 and stdout.startswith("wrote 1 samples in 1 shards")
    os.remove(os.path.join(vtab, "val200.txt"))
    for args, message in [
        (["--input", vtab, "--format", "cifar"], "not a CIFAR python folder"),
        (["--input", str(image_folder), "--format", "vtab"], "not a VTAB-1k task folder: train800.txt, val200.txt"),
        (["--input", vtab], "not a VTAB-1k task folder: val200.txt missing"),
        (["--input", cifar10, "--format", "imagefolder"], "neither class subfolders nor labels.json"),
        (["--input", str(tmp_path / "absent"), "--format", "cifar"], "no such folder"),
    ]:
        code, _, stderr = _run(capsys, *args, "--output", str(tmp_path / "o2"))
        assert code == 2 and len(stderr.splitlines()) == 1 and message in stderr, (args, stderr)
    os.remove(os.path.join(cifar10, "data_batch_4"))
    code, _, stderr = _run(capsys, "--input", cifar10, "--output", str(tmp_path / "o2"))
    assert code == 2 and "CIFAR files missing: data_batch_4" in stderr
    with pytest.raises(SystemExit) as exit_info:
        make_shards_cli.main(["--input", cifar10, "--output", str(tmp_path / "o2"), "--format", "tfrecord"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
