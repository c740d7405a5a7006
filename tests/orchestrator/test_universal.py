"""Resuming on another number of workers through DeepSpeed's universal checkpoint: a real S3
server (SeaweedFS), real DeepSpeed on gloo, and the converter's loads kept weights-only."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from data_pipelines.s3 import parse_s3_url
from orchestrator import universal
from orchestrator.checkpoint import CheckpointError, FileEntry, Manifest
from tests.orchestrator.test_checkpoint import client, finish, free_port, load

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "universal_worker.py")


def run_ranks(s3_server, world, *args):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *map(str, args)], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(os.environ, **s3_server.environment(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                     LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        )
        for rank in range(world)
    ]
    codes, outputs = finish(procs)
    assert codes == [0] * world, "\n".join(o[-3000:] for o in outputs)
    return outputs


def assert_same_full_state(saved, restored):
    """Every parameter's fp32 weights and Adam moments, gathered whole, bit for bit."""
    assert saved["full"].keys() == restored["full"].keys() and saved["full"]
    for name, states in saved["full"].items():
        for key, value in states.items():
            torch.testing.assert_close(restored["full"][name][key], value, rtol=0, atol=0, msg=f"{name} {key}")
    assert restored["global_steps"] == saved["global_steps"]


def files_under(folder):
    return [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files]


# Stages 1 and 3: stage 2 saves and loads through the same code as stage 1 (DeepSpeed's
# stage_1_and_2.py, and ours: only stage 3 is told apart), and trains to a commit in
# test_pretraining.py's test_loss_falls_with_two_workers[2].
@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_resume_on_one(s3_server, run_url, tmp_path, stage):
    dumps = tmp_path / "dumps"
    run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "a", "--dumps", dumps,
              "--zero-stage", stage, "--steps", 2, "--save-at", 2)
    # One more step after restoring: the converted optimizer state also trains.
    outputs = run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "b", "--dumps", dumps,
                        "--zero-stage", stage, "--steps", 3)
    assert "resumed from step 2 (converted from 2 workers to 1); rank 0 restored its own RNG state" in outputs[0]
    saved, restored = load(dumps / "step-2-rank-0.pt"), load(dumps / "restored-rank-0.pt")
    assert_same_full_state(saved, restored)
    assert restored["loader_state"] == saved["loader_state"]
    torch.testing.assert_close(restored["rng_draw"], saved["rng_draw"], rtol=0, atol=0)
    assert files_under(tmp_path / "b") == []  # downloads and conversion scratch are gone


@pytest.mark.parametrize("stage", [1])  # the default stage; 2 and 3 pass too, left out for time
def test_one_rank_resumes_on_two_and_checkpoints_as_two(s3_server, run_url, tmp_path, stage):
    dumps = tmp_path / "dumps"
    run_ranks(s3_server, 1, "--url", run_url, "--staging", tmp_path / "a", "--dumps", dumps,
              "--zero-stage", stage, "--steps", 2, "--save-at", 2)
    outputs = run_ranks(s3_server, 2, "--url", run_url, "--staging", tmp_path / "b", "--dumps", dumps,
                        "--zero-stage", stage, "--steps", 3, "--save-at", 3)
    assert "resumed from step 2 (converted from 1 worker to 2); rank 0 restored its own RNG state" in outputs[0]
    assert "rank 1 is new: its RNG state is derived from rank 0's and its rank" in outputs[1]
    # One download and conversion for the machine, which both ranks load.
    assert "rank 0 downloads all of it and converts it for ranks 0, 1 on this machine" in outputs[0]
    assert "downloads all of it" not in outputs[1]
    saved = load(dumps / "step-2-rank-0.pt")
    restored = [load(dumps / f"restored-rank-{rank}.pt") for rank in (0, 1)]
    for state in restored:
        assert_same_full_state(saved, state)
    torch.testing.assert_close(restored[0]["rng_draw"], saved["rng_draw"], rtol=0, atol=0)
    assert not torch.equal(restored[1]["rng_draw"], restored[0]["rng_draw"])
    assert (restored[0]["loader_state"], restored[1]["loader_state"]) == (saved["loader_state"], {})
    location = parse_s3_url(f"{run_url}/step-00000003/manifest.json")
    manifest = json.loads(client(s3_server).get_object(Bucket=location.bucket, Key=location.prefix)["Body"].read())
    assert manifest["world_size"] == 2 and {r["rank"] for r in manifest["ranks"]} == {0, 1}


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a crafted checkpoint file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_converter_never_unpickles_arbitrary_objects(tmp_path):
    # ds_to_universal calls torch.load(weights_only=False) on the checkpoint's files.
    staging, marker = tmp_path / "staging", tmp_path / "unpickled"
    folder = staging / "resize" / "step-00000002"
    folder.mkdir(parents=True)
    names = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "mp_rank_00_model_states.pt"]
    for name in names:
        torch.save({"optimizer_state_dict": _Payload(str(marker)), "module": {}}, folder / name)
    manifest = Manifest(format=1, step=2, world_size=2, time=0.0, config={}, ranks=[],
                        files=[FileEntry(name=n, size=0, sha256="", rank=0) for n in names])
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 1)  # asked only for its stage: conversion fails first
    real_load = torch.load
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 \(2 workers\) could not be resumed on 1 worker \(ZeRO "
                       r"stage 1\): DeepSpeed's ds_to_universal failed on rank 0: UnpicklingError: Weights only"):
        universal.restore_resized(engine, manifest, folder=str(folder), scratch=str(staging / "resize"), converts=True,
                                  rank=0, world_size=1)
    assert not marker.exists()
    assert torch.load is real_load
    assert files_under(staging) == []
    # The file is a working exploit for a load that is not weights-only.
    torch.save(_Payload(str(marker)), tmp_path / "exploit.pt")
    torch.load(tmp_path / "exploit.pt", weights_only=False)
    assert marker.exists()
