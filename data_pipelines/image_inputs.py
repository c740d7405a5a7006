"""The images make_shards converts: where they are, their sample keys and their labels.

Three forms of input, told from the URL:
  * a local folder: an ImageFolder tree (one subfolder per class) or images plus labels.json
    (file name -> list of class names);
  * `s3://bucket/prefix`: an ImageFolder tree there (`<prefix>/<class>/.../<image>`); the
    classes are listed with a delimiter (one request per thousand classes), the classes'
    images 16 listings at a time;
  * a list file, `*.tsv` or `*.csv`, local or on S3, one image a line, no header:
        images/n01440764/a.jpg<TAB>n01440764                  (.tsv: URL, tab, labels)
        s3://other-bucket/b.jpg<TAB>dog,ball                  (labels separated by commas)
        images/c.jpg,dog,ball                                 (.csv: URL, then one label a field)
    A URL is an s3:// URL, an absolute path, or a path relative to the list file's folder
    (an S3 key below it when the list is on S3). Every line with exactly one label: single
    label ("class"); otherwise multi-label (a line may have none). Blank lines and lines
    starting with '#' are skipped. A list may come in parts named by a brace pattern, as
    webdataset names shards (`train-{00000..00999}.tsv`): its classes and label kind are
    those of all its parts; sample keys are checked unique within each part.

Class names are sorted (as integers when every name is one, so label "10" follows "9"): a
class's index is its place in that order, as in torchvision's and timm's ImageFolder. A
sample's key comes from its path relative to the folder, prefix or list file (the whole URL
for an absolute one), so that the same tree on disk and on S3 gives the same shards.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import re

from data_pipelines.s3 import S3ClientFactory, is_s3_url, join_location
from data_pipelines.storage import list_names, read_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABELS_FILE = "labels.json"
LIST_SUFFIXES = (".tsv", ".csv")
LISTINGS_AT_ONCE = 16


class InputError(Exception):
    """The input cannot be listed or parsed: one line that says why."""


@dataclasses.dataclass(frozen=True)
class InputImage:
    url: str  # a path or an s3:// URL
    key: str  # unique, no dots (webdataset splits the key from the extension at the first dot)
    label: int | tuple[int, ...]  # a class index, or the sorted class indices present (multi-label)


def key_for(relative_path: str) -> str:
    stem = os.path.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def is_list_file(url: str) -> bool:
    return url.lower().endswith(LIST_SUFFIXES)


def find_inputs(url: str, factory: S3ClientFactory | None = None) -> tuple[list[InputImage], list[str], str]:
    """(images sorted by key, class names, label kind) for any of the three forms."""
    if is_list_file(url):
        images, class_names, label_kind = read_list_file(url, factory)
    elif is_s3_url(url):
        images, class_names, label_kind = _s3_image_folder(url, factory)
    else:
        images, class_names, label_kind = _local_folder(url)
    return sorted(images, key=lambda image: image.key), class_names, label_kind


def sorted_classes(names) -> list[str]:
    names = set(names)
    if names and all(name.isdigit() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _local_folder(input_dir: str) -> tuple[list[InputImage], list[str], str]:
    if not os.path.isdir(input_dir):
        raise InputError(f"{input_dir}: no such folder")
    labels_path = os.path.join(input_dir, LABELS_FILE)
    images: list[InputImage] = []
    if os.path.exists(labels_path):
        try:
            with open(labels_path) as f:
                labels = json.load(f)
            if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
                raise ValueError("expected an object mapping file name -> list of class names")
        except ValueError as error:
            raise InputError(f"{labels_path}: {error}") from None
        class_names = sorted({str(c) for names in labels.values() for c in names})
        index = {name: i for i, name in enumerate(class_names)}
        for file_name in sorted(labels):
            path = os.path.join(input_dir, file_name)
            if not os.path.isfile(path):
                raise InputError(f"{labels_path}: lists {file_name!r}, which is not in {input_dir}")
            images.append(InputImage(path, key_for(file_name), tuple(sorted({index[str(c)] for c in labels[file_name]}))))
        return _unique(images, input_dir), class_names, "multi_label"
    class_names = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if not class_names:
        raise InputError(f"{input_dir}: neither class subfolders nor {LABELS_FILE}")
    for label, class_name in enumerate(class_names):
        for root, _, files in os.walk(os.path.join(input_dir, class_name)):
            for file_name in files:
                if file_name.lower().endswith(IMAGE_SUFFIXES):
                    relative = os.path.relpath(os.path.join(root, file_name), input_dir)
                    images.append(InputImage(os.path.join(root, file_name), key_for(relative), label))
    if not images:
        raise InputError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class subfolders")
    return _unique(images, input_dir), class_names, "class"


def _s3_image_folder(url: str, factory: S3ClientFactory | None) -> tuple[list[InputImage], list[str], str]:
    from data_pipelines.transfer import list_folders

    class_names = list_folders(url, factory)  # an unreadable prefix (no bucket, no access) raises here
    if not class_names:
        raise InputError(f"{url}: no class folders under this prefix (an ImageFolder tree is <prefix>/<class>/<image>; "
                         f"a list of images is a .tsv or .csv file)")

    def listing(class_name: str) -> list[tuple[str, int]]:
        return list_names(join_location(url, class_name), factory)

    images: list[InputImage] = []
    with concurrent.futures.ThreadPoolExecutor(min(LISTINGS_AT_ONCE, len(class_names))) as pool:
        for label, (class_name, names) in enumerate(zip(class_names, pool.map(listing, class_names))):
            for name, _ in names:
                if name.lower().endswith(IMAGE_SUFFIXES):
                    relative = f"{class_name}/{name}"
                    images.append(InputImage(join_location(url, relative), key_for(relative), label))
    if not images:
        raise InputError(f"{url}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return _unique(images, url), class_names, "class"


def list_parts(url: str) -> list[str]:
    """A list file's URL, or a pattern of its parts in webdataset's brace notation
    (`s3://bucket/jft/train-{00000..00999}.tsv`): the parts' URLs, in order."""
    from braceexpand import braceexpand

    return list(braceexpand(url))


@dataclasses.dataclass(frozen=True)
class ListSummary:
    """One part of a list, counted (make_shards' first pass over a list in parts)."""
    url: str
    images: int
    class_names: frozenset[str]
    single: bool  # every line has exactly one label


def _parse_list(url: str, factory: S3ClientFactory | None) -> list[tuple[str, str, list[str]]]:
    """(image URL, sample key, label names) per listed image; a malformed line or a key
    given twice is an InputError naming the line."""
    try:
        text = read_bytes(url, factory).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{url}: not UTF-8 text (byte {error.start})") from None
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    tsv = url.lower().endswith(".tsv")
    form = "URL<TAB>label[,label...]" if tsv else "URL,label[,label...]"
    entries, lines = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if tsv:
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(f"{url}: line {number}: expected {form}, got {line[:120]!r}")
            location, names = fields[0].strip(), [n.strip() for n in fields[1].split(",")] if fields[1].strip() else []
        else:
            fields = next(csv.reader([line]))
            if len(fields) < 2:
                raise InputError(f"{url}: line {number}: expected {form}, got {line[:120]!r}")
            location, names = fields[0].strip(), [n.strip() for n in fields[1:] if n.strip()]
        if not location or "" in names:
            raise InputError(f"{url}: line {number}: {'an empty label' if location else 'no URL'} in {line[:120]!r}")
        absolute = is_s3_url(location) or os.path.isabs(location)
        key = key_for(location.split("://", 1)[-1].lstrip("/") if absolute else location)
        if key in lines:
            raise InputError(f"{url}: line {number}: {location!r} gives the sample key {key!r} of line {lines[key]}")
        lines[key] = number
        entries.append((location if absolute else join_location(base, location), key, names))
    if not entries:
        raise InputError(f"{url}: no images listed (expected lines {form})")
    return entries


def summarise_list(url: str, factory: S3ClientFactory | None = None) -> ListSummary:
    """A part of a list checked line by line and counted, its images not kept."""
    return _summary(url, _parse_list(url, factory))


def _summary(url: str, entries: list[tuple[str, str, list[str]]]) -> ListSummary:
    return ListSummary(url, len(entries), frozenset(name for *_, names in entries for name in names),
                       all(len(names) == 1 for *_, names in entries))


def list_images(url: str, class_names: list[str], single: bool,
                factory: S3ClientFactory | None = None) -> list[InputImage]:
    """A part's images, sorted by key, labelled with the whole list's classes: a class index
    when `single` (every line of every part has one label), else the sorted indices."""
    return sorted(_labelled(_parse_list(url, factory), class_names, single), key=lambda image: image.key)


def read_list_file(url: str, factory: S3ClientFactory | None = None) -> tuple[list[InputImage], list[str], str]:
    """A .tsv or .csv list of images and their labels (the module's docstring), in one pass."""
    entries = _parse_list(url, factory)
    summary = _summary(url, entries)
    class_names = sorted_classes(summary.class_names)
    return (_labelled(entries, class_names, summary.single), class_names,
            "class" if summary.single else "multi_label")


def _labelled(entries, class_names: list[str], single: bool) -> list[InputImage]:
    index = {name: i for i, name in enumerate(class_names)}
    return [InputImage(image_url, key, index[names[0]] if single else tuple(sorted({index[n] for n in names})))
            for image_url, key, names in entries]


def _unique(images: list[InputImage], where: str) -> list[InputImage]:
    seen: dict[str, str] = {}
    for image in images:
        if image.key in seen:
            raise InputError(f"{where}: {image.url} and {seen[image.key]} give the same sample key {image.key!r}")
        seen[image.key] = image.url
    return images
