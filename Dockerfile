# The image k8s/pretrain runs on every Ray pod: Ray's own GPU image (Python 3.11, CUDA with
# nvcc for DeepSpeed's CUDA ops, the user and paths KubeRay expects) plus this repository
# at /home/ray/vitscale and the packages constraints.txt pins, installed in `make venv`'s order.
#   docker build -t <registry>/vitscale:<tag> .
# Its Ray is the one constraints.txt pins and the RayJob's rayVersion names (a test checks).
# Not built on the machines this was written on (no container runtime). DeepSpeed's FusedAdam
# (the GPU optimizer) is compiled here, once, with the image's nvcc (DS_BUILD_FUSED_ADAM), not
# JIT-built at every pod's first start (~45 s on an H200); nvcc's CUDA major version must be
# torch's (`python -c 'import torch; print(torch.version.cuda)'`): where the -gpu alias's CUDA
# is not, name the rayproject/ray:<version>-py311-cu<XYZ> tag that is. TORCH_CUDA_ARCH_LIST:
# A100 and H100/H200 (plain "9.0": DeepSpeed cannot parse torch's "9.0a").
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/vitscale
COPY --chown=ray:users pyproject.toml constraints.txt ./
# torch first (deepspeed's setup imports it), deepspeed without build isolation, then the rest.
RUN pip install --no-cache-dir -c constraints.txt torch \
    && DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
        pip install --no-cache-dir -c constraints.txt --no-build-isolation deepspeed \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --chown=ray:users . .
ENV PYTHONPATH=/home/ray/vitscale
