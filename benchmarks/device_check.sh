#!/usr/bin/env bash
# The checks that need a GPU (`bench vit_b16_mfu`, the worker's GPU path), for a session that is
# lent a device machine: a GPU with Python 3.12 and PyTorch, and no network.
#
#   bash benchmarks/device_check.sh prepare   # here, with the network: wheels of what the
#                                             # device lacks into .whl/ (gitignored)
#   bash benchmarks/device_check.sh run       # there, from the repository root, with .whl
#                                             # carried (the device tool's `carry: [".whl"]`)
#
# `run` installs the wheels into /tmp/site and writes its logs to $OUT (else /tmp/device-check):
# the MFU of the recipe's engine at batch 256 and compiled at 512/1024 (benchmarks/mfu.py, with
# the phases), plain PyTorch compiled for reference, the engine with torch's fused AdamW in
# place of DeepSpeed's FusedAdam, then the worker's whole step with a checkpoint and a resume
# (benchmarks/worker_step.py). About 7 minutes on an H200, DeepSpeed's first FusedAdam build
# (~45 s) included; each step has its own timeout.
#
# What the device lacks was found by running both benchmarks here with --cpu and listing the
# modules they imported (workers included) against the device's package list
# (/work/.library/device/KINDS.md): DeepSpeed (a source package: its wheel is built here against
# .venv's torch) and the pure or cp312 wheels below, at the versions constraints.txt pins.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand
        boto3 botocore s3transfer jmespath)

pin() {  # the version constraints.txt pins for a distribution
    local v
    v=$(grep -i -E "^${1//[-_]/[-_]}==" constraints.txt | head -1 | cut -d= -f3)
    [ -n "$v" ] || { echo "device_check: $1 is not pinned in constraints.txt" >&2; exit 2; }
    echo "$v"
}

prepare() {
    [ -x .venv/bin/python ] || make venv
    rm -rf .whl && mkdir -p .whl
    local sdist
    sdist=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary=:all: -d "$sdist" "deepspeed==$(pin deepspeed)"
    .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$sdist"/deepspeed-*.tar.gz
    rm -rf "$sdist"
    local specs=()
    for name in "${WHEELS[@]}"; do specs+=("$name==$(pin "$name")"); done
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl "${specs[@]}"
    ls .whl
    du -sh .whl
}

run() {
    [ -d .whl ] || { echo "device_check: no .whl/ here: run 'bash benchmarks/device_check.sh prepare' where there is a network, and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    # DeepSpeed's JIT builds read the arch list; it cannot parse torch's "9.0a" for Hopper.
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    local out="${OUT:-/tmp/device-check}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -c 'import sys, torch, deepspeed; print("python", sys.version.split()[0], "torch", torch.__version__, "deepspeed", deepspeed.__version__)' \
        | tee -a "$out/gpu.txt"
    local status=0
    step() {  # name, timeout in seconds, command...
        local name=$1 limit=$2
        shift 2
        echo "== $name: $*"
        timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || { echo "== $name failed or timed out"; status=1; }
    }
    step mfu 150 python3 benchmarks/mfu.py --phases
    step mfu_compiled_512 150 python3 benchmarks/mfu.py --compile --batch 512 --phases
    step mfu_compiled_1024 150 python3 benchmarks/mfu.py --compile --batch 1024
    step mfu_bare_compiled 120 python3 benchmarks/mfu.py --bare --compile --batch 512
    # torch's fused AdamW inside DeepSpeed (what CPU workers use) instead of DeepSpeed's JIT-built
    # FusedAdam: if it steps as fast, GPU pods need no nvcc and no ~45 s build at every start.
    step mfu_torch_fused_adam 150 python3 benchmarks/mfu.py --phases \
        --ds '{"optimizer": {"params": {"torch_adam": true, "fused": true}}}'
    step worker_step 200 python3 benchmarks/worker_step.py
    grep -h "^bench " "$out"/*.log | tee "$out/bench.txt" || true
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/device_check.sh prepare|run" >&2; exit 2 ;;
esac
