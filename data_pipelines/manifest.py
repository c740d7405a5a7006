"""The shard manifest: `manifest.json` beside the shards, written last by the shard writer.

    python -m data_pipelines.manifest s3://bucket/prefix     # print the resolved shard list

A manifest lists every shard's name, sample count, byte size and sha256, the class names
and the label kind (`class`: one integer `.cls` per sample; `multi_label`: a `.json` with
`{"labels": [class indices]}`). A prefix without a manifest still streams: its `*.tar`
objects are listed and their sample counts are unknown (None) until read.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from data_pipelines.s3 import DataSourceError, S3ClientFactory, join_location
from data_pipelines.storage import list_names, read_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vitscale-webdataset/1"
LABEL_KINDS = ("class", "multi_label", "none")  # "none": unlabeled, for self-supervision


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int | None  # None: listed from a prefix without a manifest
    bytes: int
    sha256: str | None = None


@dataclasses.dataclass
class Manifest:
    shards: list[ShardInfo]
    class_names: list[str]
    label_kind: str = "class"
    skipped: int = 0  # inputs the writer could not decode

    @property
    def total_samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if None in counts else sum(counts)

    def to_json(self) -> str:
        return json.dumps({
            "format": MANIFEST_FORMAT,
            "label_kind": self.label_kind,
            "class_names": self.class_names,
            "total_samples": self.total_samples,
            "skipped": self.skipped,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            if raw["label_kind"] not in LABEL_KINDS:
                raise ValueError(f"label_kind {raw['label_kind']!r}")
            return cls(
                shards=[ShardInfo(**s) for s in raw["shards"]],
                class_names=list(raw["class_names"]),
                label_kind=raw["label_kind"],
                skipped=int(raw.get("skipped", 0)),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise DataSourceError(f"{where}: not a valid shard manifest ({error})") from None


def load_shard_list(url: str, factory: S3ClientFactory | None = None) -> tuple[str, Manifest]:
    """(folder or prefix that holds the shards, manifest) for a manifest URL, a folder or a prefix."""
    if url.endswith(".json"):
        base = url.rsplit("/", 1)[0] if "/" in url else "."
        return base, Manifest.from_json(read_bytes(url, factory), url)
    names = dict(list_names(url, factory))
    if MANIFEST_NAME in names:
        return url, Manifest.from_json(read_bytes(join_location(url, MANIFEST_NAME), factory), join_location(url, MANIFEST_NAME))
    tars = [ShardInfo(name, None, size) for name, size in sorted(names.items()) if name.endswith(".tar") and "/" not in name]
    if not tars:
        raise DataSourceError(f"{url}: no {MANIFEST_NAME} and no .tar shards there")
    return url, Manifest(shards=tars, class_names=[])


if __name__ == "__main__":
    base, manifest = load_shard_list(sys.argv[1])
    print(f"{base}: {len(manifest.shards)} shards, {manifest.total_samples} samples, {len(manifest.class_names)} classes")
    for shard in manifest.shards:
        print(f"  {shard.name} {shard.samples} samples {shard.bytes} bytes")
