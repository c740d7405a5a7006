"""launch/finetune.py as a user runs it: the plan is the seed's table 2, bad input is one line, exit 2."""

import json
import os
import re
import sys

from tests.launch.conftest import main_of
from tests.conftest import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "finetune.py")

# The seed's table 2, verbatim: steps and LR grid.
TABLE_2 = {
    "ImageNet": (20_000, [0.003, 0.01, 0.03, 0.06]),
    "CIFAR100": (10_000, [0.001, 0.003, 0.01, 0.03]),
    "CIFAR10": (10_000, [0.001, 0.003, 0.01, 0.03]),
    "Oxford-IIIT Pets": (500, [0.001, 0.003, 0.01, 0.03]),
    "Oxford Flowers-102": (500, [0.001, 0.003, 0.01, 0.03]),
}
HOLDOUT = {"ImageNet": "1%", "CIFAR100": "2%", "CIFAR10": "2%", "Oxford-IIIT Pets": "10%", "Oxford Flowers-102": "10%"}
WARMUP = {"ImageNet": 500, "CIFAR100": 500, "CIFAR10": 500, "Oxford-IIIT Pets": 100, "Oxford Flowers-102": 100}
VTAB = ["Caltech101", "CIFAR-100", "DTD", "Flowers102", "Pets", "Sun397", "SVHN", "Patch Camelyon", "EuroSAT",
        "Resisc45", "Retinopathy", "Clevr/count", "Clevr/distance", "DMLab", "KITTI/distance", "dSprites/location",
        "dSprites/orientation", "SmallNORB/azimuth", "SmallNORB/elevation"]


def finetune(*args, env=None):
    return run_process([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd="/",
                          env=env)


def test_print_plan_is_the_seeds_table_exactly():
    # No S3 and no Ray may be contacted: an endpoint that answers nothing would hang or fail.
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", RAY_ADDRESS="127.0.0.1:9")
    out = finetune("--print-plan", env=env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    fields = ["dataset", "stage", "lr", "steps", "warmup_steps", "batch_size", "image_size", "train_split", "eval_split"]
    assert all(list(t) == fields for t in plan)
    assert all((t["batch_size"], t["image_size"]) == (512, 384) for t in plan)
    for dataset, (steps, grid) in TABLE_2.items():
        trials = [t for t in plan if t["dataset"] == dataset]
        sweep = [t for t in trials if t["stage"] == "sweep"]
        assert [t["lr"] for t in sweep] == grid
        assert {(t["steps"], t["warmup_steps"]) for t in trials} == {(steps, WARMUP[dataset])}
        assert {(t["train_split"], t["eval_split"]) for t in sweep} == {
            (f"train less held-out {HOLDOUT[dataset]}", f"held-out {HOLDOUT[dataset]} of train")}
        (final,) = [t for t in trials if t["stage"] == "final"]
        assert (final["lr"], final["train_split"], final["eval_split"]) == (None, "train", "test")  # the sweep picks
    vtab = [t for t in plan if t["dataset"].startswith("VTAB/")]
    assert [t["dataset"] for t in vtab] == ["VTAB/" + task for task in VTAB]
    assert all((t["stage"], t["lr"], t["steps"], t["warmup_steps"], t["train_split"], t["eval_split"])
               == ("final", 0.01, 2500, 200, "train800val200", "test") for t in vtab)
    assert len(plan) == 5 * 5 + 19


def test_print_plan_of_chosen_datasets_scaled():
    out = finetune("--print-plan", "--datasets", "Oxford-IIIT Pets,VTAB/DTD", "--steps-scale", "0.1")
    plan = json.loads(out.stdout)
    assert [(t["dataset"], t["stage"], t["steps"], t["warmup_steps"]) for t in plan] == [
        ("Oxford-IIIT Pets", "sweep", 50, 10)] * 4 + [("Oxford-IIIT Pets", "final", 50, 10), ("VTAB/DTD", "final", 250, 20)]
    # One dataset's steps set outright (the dry run's digits): its warm-up in proportion, the others scaled.
    out = finetune("--print-plan", "--datasets", "Oxford-IIIT Pets,VTAB/DTD", "--steps-scale", "0.1",
                   "--set", 'steps={"VTAB/DTD": 1000, "CIFAR10": 7}')
    plan = json.loads(out.stdout)
    assert [(t["dataset"], t["steps"], t["warmup_steps"]) for t in plan][-2:] == [
        ("Oxford-IIIT Pets", 50, 10), ("VTAB/DTD", 1000, 80)]


BAD_INPUTS = [
    (["--print-plan", "--datasets", "CIFAR10,Food101"], ["'Food101'", "CIFAR10", "VTAB/DTD"]),
    (["--print-plan", "--datasets", ","], ["names no dataset", "ImageNet"]),
    (["--print-plan", "--steps-scale", "0"], ["steps_scale=0.0"]),
    (["--print-plan", "--set", 'steps={"CIFAR11": 30}'], ["'CIFAR11'", "not a dataset of the table", "CIFAR10"]),
    (["--print-plan", "--set", "steps=3000"], ["invalid steps=3000", "must map dataset names"]),
    (["--print-plan", "--set", 'steps={"CIFAR10": 0}'], ["invalid steps 0 for 'CIFAR10'", ">= 1"]),
    (["--datasets", "CIFAR10"], ["--weights and --data-root are required"]),
    (["--weights", "s3://vitscale-x/run/model.ckpt", "--data-root", "s3://vitscale-x/d"], ["not a vitscale export", "model.ckpt"]),
    (["--print-plan", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
]
def test_bad_input_is_one_line_and_exit_2():
    for (args, named), (code, stderr) in zip(BAD_INPUTS, main_of(SCRIPT, [a for a, _ in BAD_INPUTS])):
        assert code == 2, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, (args, stderr)
        for text in named:
            assert text in stderr, (args, stderr)


def test_cli_surface_is_frozen():
    out = finetune("--help")
    assert set(re.findall(r"(--[a-z][a-z-]+)", out.stdout)) == {
        "--help", "--weights", "--data-root", "--datasets", "--results", "--workers-per-trial", "--gpus-per-worker",
        "--max-concurrent-trials", "--steps-scale", "--set", "--print-plan"}
