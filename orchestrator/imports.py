"""Foreign weights into vitscale exports and ours out to timm: the I/O around model/foreign.py.

    python launch/import_weights.py --input ViT-B_16.npz --model ViT-B/16 --output s3://b/imported/vit-b-16
    python launch/import_weights.py --input s3://b/runs/r/weights/model.safetensors --to timm --output vit.safetensors

An import is a vitscale export: `<output>/weights/model.safetensors` with its `model.json`
beside it (the model's name, the sha256, the classes and image size, the source file), which
`launch/finetune.py --weights` takes. The bytes are a function of the contents (the safetensors
header's metadata sorted: checkpoint.canonical_safetensors_header), so the same file imported
twice has the same sha256. Formats: `.npz` (numpy, allow_pickle=False), `.safetensors`, and
`.pth`/`.pt`/`.bin` read by torch.load(weights_only=True), which admits tensors and plain
containers only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import torch

from model.foreign import (ForeignWeightsError, check_state, detect_format, from_npz, from_timm, looks_like,
                           read_npz, timm_model_args, to_timm)

FORMATS = ("auto", "npz", "timm", "vitscale")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def read_state(url: str, data: bytes, fmt: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(our state dict, the format it was in) from a file's bytes."""
    if fmt not in FORMATS:
        raise ForeignWeightsError(f"invalid --format {fmt!r}; valid: {', '.join(FORMATS)}")
    name = url.rsplit("/", 1)[-1].lower()
    if fmt == "npz" or (fmt == "auto" and name.endswith(".npz")):
        arrays = read_npz(data)
        if detect_format(arrays) != "npz":
            raise ForeignWeightsError(f"{url}: an .npz that is not a ViT, R50+ViT or BiT tree")
        return from_npz(arrays), "npz"
    if name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as error:
            raise ForeignWeightsError(f"{url}: not a readable safetensors file ({error})") from None
    elif name.endswith(PICKLE_SUFFIXES):
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses anything but tensors and plain containers
            said = str(error).strip().splitlines()
            raise ForeignWeightsError(f"{url}: not a state dict torch.load(weights_only=True) reads "
                                      f"({said[0][:200] if said else type(error).__name__})") from None
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict") or tensors.get("model"), dict):
            tensors = tensors.get("state_dict") or tensors["model"]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ForeignWeightsError(f"{url}: not a state dict of tensors")
    else:
        raise ForeignWeightsError(f"{url}: unknown file type; valid: .npz, .safetensors, "
                                  f"{', '.join(PICKLE_SUFFIXES)}")
    found = detect_format(tensors)
    if fmt not in ("auto", found):
        raise ForeignWeightsError(f"{url}: --format {fmt} but the file is a {found} state")
    return (from_timm(tensors) if found == "timm" else {k: v.float() for k, v in tensors.items()}), found


def _safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save_file

    from orchestrator.checkpoint import canonical_safetensors_header

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
        canonical_safetensors_header(path)
        with open(path, "rb") as f:
            return f.read()


def import_weights(source: str, output: str, model: str | None = None, fmt: str = "auto") -> dict:
    """Writes `source` (npz, timm or vitscale) as a vitscale export under `output`
    (`<output>/weights/model.safetensors` and `model.json`; `output` may name the .safetensors
    itself). `model` None: the zoo model whose shapes the file has. Returns the record."""
    from data_pipelines.storage import read_bytes, write_bytes

    data = read_bytes(source)
    state, found = read_state(source, data, fmt)
    name = model or looks_like(state)
    if name is None:
        raise ForeignWeightsError(f"{source}: no model of the zoo has these shapes; give --model")
    build = check_state(state, name)
    weights = output if output.endswith(".safetensors") else output.rstrip("/") + "/weights/model.safetensors"
    body = _safetensors_bytes(state, {"model": name, "num_classes": str(build["num_classes"]),
                                      "image_size": str(build["image_size"]), "source": source.rsplit("/", 1)[-1]})
    digest = hashlib.sha256(body).hexdigest()
    record = {"model": name, "sha256": digest, "weights": weights, "num_classes": build["num_classes"],
              "image_size": build["image_size"], "representation_size": build["representation_size"],
              "source": source, "source_format": found, "step": None,
              "run": weights.rsplit("/", 3)[-3] if weights.count("/") >= 3 else "imported"}
    write_bytes(weights, body)
    write_bytes(weights[: -len(".safetensors")] + ".json", json.dumps(record, sort_keys=True).encode())
    return record


def export_to_timm(source: str, output: str, fmt: str = "auto") -> tuple[str, dict]:
    """Writes `source` (a vitscale export, or any format read_state reads) as a timm state dict
    in safetensors at `output`; returns (timm model name, create_model arguments), also in the
    file's metadata."""
    from data_pipelines.storage import read_bytes, write_bytes

    state, _ = read_state(source, read_bytes(source), fmt)
    name = looks_like(state)
    if name is None:
        raise ForeignWeightsError(f"{source}: no model of the zoo has these shapes")
    check_state(state, name)
    timm_name, args = timm_model_args(name, state)
    body = _safetensors_bytes(to_timm(state), {"timm_model": timm_name, "timm_args": json.dumps(args, sort_keys=True),
                                               "vitscale_model": name})
    write_bytes(output, body)
    return timm_name, args


def export_for(weights: str, log=print) -> str:
    """launch/finetune.py --weights: a vitscale export as it is; a foreign file (.npz, .pth, a
    timm .safetensors without a model.json beside it) imported first, beside itself:
    `<folder>/<file stem>/weights/model.safetensors`, the run named after the file."""
    import re

    from data_pipelines.s3 import DataSourceError
    from data_pipelines.storage import read_bytes

    if weights.endswith(".safetensors"):
        try:
            read_bytes(weights[: -len(".safetensors")] + ".json")
            return weights  # an export (finetuning.read_weights_record checks its record)
        except DataSourceError:
            pass
    elif not weights.lower().endswith((".npz", *PICKLE_SUFFIXES)):
        return weights  # read_weights_record says what it expects
    folder, _, file = weights.rpartition("/")
    stem = re.sub(r"[^a-z0-9.-]+", "-", file.rsplit(".", 1)[0].lower()).strip("-.") or "imported"
    from orchestrator.config import ConfigError

    try:
        record = import_weights(weights, f"{folder}/{stem}")
    except (ForeignWeightsError, DataSourceError) as error:
        raise ConfigError(f"--weights {weights}: {error}") from None
    log(f"imported {record['model']} from {weights} ({record['source_format']}, sha256 {record['sha256'][:12]}) "
        f"as {record['weights']}")
    return record["weights"]
