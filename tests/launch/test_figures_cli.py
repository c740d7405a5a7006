"""launch/figures.py as a user runs it: an export in, four PNGs and their folder out; bad input is one line, exit 2.

Run: .venv/bin/python -m pytest tests/launch/test_figures_cli.py -q
"""

import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file

from data_pipelines.synthetic import write_synthetic
from model import build_model
from tests.launch.conftest import main_of
from tests.conftest import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "figures.py")
PNGS = ["position_similarity_initial.png", "attention_distance_initial.png",
        "position_similarity_trained.png", "attention_distance_trained.png"]


def figures(*args, cwd="/"):
    return run_process([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=180, cwd=cwd)


def write_export(folder, model_name="ViT-Mu/4", data: bytes | None = None) -> str:
    """model.safetensors + model.json as the trainer's _export writes them; returns the weights' path."""
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "model.safetensors")
    if data is None:
        torch.manual_seed(5)
        save_file(build_model(model_name, num_classes=10, image_size=32).state_dict(), weights)
    else:
        with open(weights, "wb") as f:
            f.write(data)
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {"step": 10, "sha256": digest, "weights": weights, "model": model_name, "num_classes": 10,
              "image_size": 32, "run": "tiny-run"}
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(record, f)
    return weights


def test_an_export_and_shards_give_the_figures(tmp_path):
    weights = write_export(str(tmp_path / "run" / "weights"))
    shards = str(tmp_path / "shards")
    write_synthetic("classification", shards, num_samples=12, image_size=40, samples_per_shard=8)
    out = figures("--weights", weights, "--images", shards, "--out", str(tmp_path / "figs"), "--samples", "6")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "figs")
    # Random weights beside another seed's: the line must not claim the structure.
    assert lines[0].startswith("the position embeddings show no neighbour structure beyond initialisation")
    for name in PNGS:
        path = tmp_path / "figs" / name
        assert str(path) in lines
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((tmp_path / "figs" / "seed_figures.json").read_text())
    assert len(numbers["mean_attention_distance_px"]["trained"]) == 2  # ViT-Mu/4's two layers


def test_synthetic_images_and_the_default_folder(tmp_path):
    weights = write_export(str(tmp_path / "weights"))
    out = figures("--weights", weights, "--samples", "3", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == os.path.join("runs", "tiny-run", "figures")
    assert all((tmp_path / "runs" / "tiny-run" / "figures" / name).is_file() for name in PNGS)


def test_bad_weights_are_one_line_and_exit_2(tmp_path):
    cases = {
        "cannot be read": str(tmp_path / "nowhere" / "model.safetensors"),
        "not a safetensors file": write_export(str(tmp_path / "a"), data=b"not a safetensors file at all"),
        "no position embeddings": write_export(str(tmp_path / "b"), model_name="R50x1", data=b""),
    }
    argvs = [["--weights", weights, "--out", str(tmp_path / "figs")] for weights in cases.values()]
    for message, (code, stderr) in zip(cases, main_of(SCRIPT, argvs)):
        assert code == 2, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("figures.py: error: ") and message in stderr
    assert not (tmp_path / "figs").exists()
