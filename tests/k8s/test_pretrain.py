"""k8s/pretrain: the KubeRay RayJob builds with kustomize, matches KubeRay's CRD schema (unknown
fields an error: the API server would prune them silently), and agrees with what it runs.

- Its entrypoint is a valid launch/pretrain.py command line (resolved here with --print-config)
  whose workers fill the GPUs of the worker groups, and whose CPUs fit theirs, counted as
  KubeRay declares a pod's resources to `ray start` (`KUBERAY_START_PARAMS` below, from
  ray-operator/controllers/ray/common/pod.go); every `ray start` option that makes is one Ray's
  CLI knows.
- The pods carry what k8s/monitoring's PodMonitor selects and keeps: the label, the driver's
  `metrics-driver` port on the head and one `metrics-<i>` port per worker of a pod, at the
  config's ports (`metrics` is left to Ray's own exporter).
- No credential is written into it: S3 settings come from a Secret, Ray's token from
  KubeRay's `authOptions`.
- The Ray it names is the one constraints.txt pins and the Dockerfile builds on, and the
  image's code lies where the entrypoint and PYTHONPATH look.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import sys

import pytest
import yaml

from tests.k8s.test_monitoring import REPO, kubectl, run, schema_errors
from tests.k8s.test_monitoring import render_kustomization as render_monitoring
from tests.conftest import run_process

PRETRAIN = os.path.join(REPO, "k8s", "pretrain")
CREDENTIAL_NAMES = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|SESSION", re.IGNORECASE)


def render_kustomization(folder: str = PRETRAIN) -> list[dict]:
    """What `kubectl kustomize` makes of k8s/pretrain: k8s/monitoring's rendering (resources,
    metadata `labels`) and the `images` entries (every container image of that name)."""
    objects = render_monitoring(folder)
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization.get("images", [])}
    for obj in objects:
        for container in containers(obj):
            container["image"] = images.get(container["image"], container["image"])
    return sorted(objects, key=by_kind_and_name)


def by_kind_and_name(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def cluster_spec(obj: dict) -> dict:
    """The Ray cluster of a RayJob (its rayClusterSpec) or of a RayCluster (its spec)."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def groups(job: dict) -> list[tuple[bool, dict]]:
    """(is the head, group spec) of the RayJob's or RayCluster's cluster."""
    spec = cluster_spec(job)
    return [(True, spec["headGroupSpec"])] + [(False, g) for g in spec.get("workerGroupSpecs", [])]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(what, pod template) of every pod a RayJob or RayCluster makes: head, worker groups, and a
    RayJob's submitter."""
    if obj["kind"] not in ("RayJob", "RayCluster"):
        return []
    found = [("head" if is_head else group["groupName"], group["template"]) for is_head, group in groups(obj)]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        found.append(("submitter", obj["spec"]["submitterPodTemplate"]))
    return found


def containers(job: dict) -> list[dict]:
    return [c for _, template in pod_templates(job) for c in template["spec"]["containers"]]


def ray_containers(job: dict) -> list[dict]:
    """The containers of the Ray pods (head and workers), where vitscale's code runs."""
    return [c for _, group in groups(job) for c in group["template"]["spec"]["containers"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]   # KubeRay's RayContainerIndex


@pytest.fixture(scope="module")
def built() -> list[dict]:
    rendered = render_kustomization()
    if (tool := kubectl()) is not None:
        by_kubectl = [d for d in yaml.safe_load_all(run([tool, "kustomize", PRETRAIN])) if d]
        assert sorted(by_kubectl, key=by_kind_and_name) == rendered
    return rendered


@pytest.fixture(scope="module")
def job(built) -> dict:
    assert sorted(by_kind_and_name(d) for d in built) == [
        ("NetworkPolicy", "vitscale-pretrain"), ("RayJob", "vitscale-pretrain"), ("ServiceAccount", "vitscale")]
    (rayjob,) = [d for d in built if d["kind"] == "RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    return rayjob


def quantity(text: str) -> float:
    """A Kubernetes quantity ("8", "500m", "32Gi") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and match.group(2) in ("", *units), f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def kuberay_start_params(group: dict, head: bool) -> dict[str, str]:
    """The `ray start` options KubeRay makes of a group (pod.go: setMissingRayStartParams and
    generateRayStartCommand): num-cpus from the Ray container's CPU limit (else its request),
    memory from its memory limit, num-gpus from a `*gpu` limit, unless rayStartParams sets them."""
    params = {k: str(v) for k, v in group.get("rayStartParams", {}).items()}
    resources = ray_container(group).get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    cpu = limits.get("cpu", requests.get("cpu"))
    if cpu is not None:
        params.setdefault("num-cpus", str(int(quantity(cpu))))
    if "memory" in limits:
        params.setdefault("memory", str(int(quantity(limits["memory"]))))
    for name in sorted(limits):
        if name.endswith("gpu") and quantity(limits[name]):
            params.setdefault("num-gpus", str(int(quantity(limits[name]))))
    return params


def entrypoint_config(job: dict) -> tuple[list[str], dict]:
    """The entrypoint's words and the config launch/pretrain.py resolves from them (here)."""
    words = shlex.split(job["spec"]["entrypoint"])
    return words, json.loads(print_config(tuple(words[2:])))


@functools.lru_cache(maxsize=None)
def print_config(args: tuple[str, ...]) -> str:
    """launch/pretrain.py's --print-config output for these flags (one process per command line)."""
    out = run_process([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), *args, "--print-config"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, f"the RayJob's entrypoint does not parse: {out.stderr}"
    return out.stdout


def test_the_rayjob_matches_kuberays_crd_schema(job):
    assert schema_errors(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParam"] = {"num-gpus": "8"}
    assert any("rayStartParam" in e for e in schema_errors(typo))
    misplaced = copy.deepcopy(job)
    misplaced["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["limits"] = {"cpu": "8"}
    assert any("limits" in e for e in schema_errors(misplaced))


def test_the_entrypoint_is_a_pretraining_run_that_fills_the_worker_groups(job):
    words, config = entrypoint_config(job)
    assert words[0] == "python" and words[1] == "/home/ray/vitscale/launch/pretrain.py"
    assert not config["dry_run"]
    assert config["data"].startswith("s3://") and config["checkpoints"].startswith("s3://")
    head = [g for is_head, g in groups(job) if is_head][0]
    head_params = kuberay_start_params(head, head=True)
    assert head_params["num-cpus"] == "0", "the head holds the driver, never a training worker"
    assert "num-gpus" not in head_params
    gpus = cpus = 0.0
    for is_head, group in groups(job):
        if is_head:
            continue
        params = kuberay_start_params(group, head=False)
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a fixed-size group"
        pod_gpus, pod_cpus = float(params["num-gpus"]), float(params["num-cpus"])
        per_pod = int(pod_gpus // config["gpus_per_worker"])
        assert per_pod * config["gpus_per_worker"] == pod_gpus, "every GPU of a pod trains"
        assert per_pod * config["cpus_per_worker"] <= pod_cpus, (per_pod, config["cpus_per_worker"], pod_cpus)
        gpus += group["replicas"] * pod_gpus
        cpus += group["replicas"] * pod_cpus
    assert config["workers"] * config["gpus_per_worker"] == gpus
    assert config["workers"] * config["cpus_per_worker"] <= cpus


def test_kuberay_starts_ray_with_options_ray_knows(job):
    from ray.scripts.scripts import start

    known = {o.removeprefix("--") for p in start.params for o in p.opts if o.startswith("--")}
    for is_head, group in groups(job):
        assert set(kuberay_start_params(group, head=is_head)) <= known, group.get("groupName", "head")
    typo = {"rayStartParams": {"num-gpu": "8"}, "template": {"spec": {"containers": [{"name": "ray-worker"}]}}}
    assert not set(kuberay_start_params(typo, head=False)) <= known


def test_every_pod_declares_the_metrics_ports_the_podmonitor_keeps(job):
    (monitor,) = [d for d in render_monitoring() if d["kind"] == "PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (keep,) = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
    _, config = entrypoint_config(job)
    for is_head, group in groups(job):
        labels = group["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        scraped = {name: port for name, port in ports.items() if re.fullmatch(keep["regex"], name)}
        if is_head:
            assert scraped == {"metrics-driver": config["metrics_port"]}
        else:
            per_pod = int(float(kuberay_start_params(group, head=False)["num-gpus"]) / config["gpus_per_worker"])
            assert scraped == {f"metrics-{i}": config["metrics_port"] + 1 + i for i in range(per_pod)}
        # KubeRay points Ray's own exporter at 8080 and names it `metrics` where no port has
        # that name: neither is ours to take.
        assert 8080 not in ports.values() and "metrics" not in ports


def test_no_credential_is_written_into_the_manifest(job):
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for container in containers(job):
        for variable in container.get("env", []):
            if CREDENTIAL_NAMES.search(variable["name"]) or variable["name"].startswith("AWS_"):
                assert "value" not in variable and "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]
        # S3 settings in the Ray pods only (the submitter sends the entrypoint, and KubeRay its token)
        expected = ["vitscale-s3"] if container in ray_containers(job) else []
        assert [e["secretRef"]["name"] for e in container.get("envFrom", [])] == expected
    words = shlex.split(job["spec"]["entrypoint"])
    assert not any(CREDENTIAL_NAMES.search(w) or "AWS_" in w for w in words)


def test_the_image_has_the_pinned_ray_and_the_code_where_the_job_looks(job):
    with open(os.path.join(REPO, "constraints.txt")) as f:
        (ray_pin,) = re.findall(r"^ray==(\S+)$", f.read(), re.MULTILINE)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
    with open(os.path.join(REPO, "Dockerfile")) as f:
        dockerfile = f.read()
    (base,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{ray_pin}-py311")
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.MULTILINE)
    assert re.search(rf"^ENV PYTHONPATH={re.escape(workdir)}$", dockerfile, re.MULTILINE)
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[1] == f"{workdir}/launch/pretrain.py"
    for container in containers(job):
        assert container["image"] == "registry.example.com/vitscale:0.1.0"
    for container in ray_containers(job):
        assert {"name": "PYTHONPATH", "value": workdir} in container["env"]


def test_an_overlay_sets_image_data_and_size(job, tmp_path):
    """The README's recipe: an overlay over k8s/pretrain with its own image, locations and
    group size; what it renders still resolves and fills its GPUs."""
    if (tool := kubectl()) is None:
        pytest.skip("VITSCALE_TESTS_WITHOUT_KUBECTL=1: the overlay needs kustomize's patches")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    entrypoint = job["spec"]["entrypoint"].replace("s3://example-bucket/", "s3://our-bucket/").replace(
        "--workers 64", "--workers 16")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(PRETRAIN, overlay)],
        "images": [{"name": "registry.example.com/vitscale", "newName": "ghcr.io/us/vitscale", "newTag": "1.2"}],
        "patches": [{"target": {"kind": "RayJob", "name": "vitscale-pretrain"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/spec/entrypoint", "value": entrypoint},
            {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/replicas", "value": 2},
            {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/minReplicas", "value": 2},
            {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas", "value": 2}])}]}))
    (ours,) = [d for d in yaml.safe_load_all(run([tool, "kustomize", str(overlay)])) if d and d["kind"] == "RayJob"]
    assert schema_errors(ours) == []
    assert {c["image"] for c in containers(ours)} == {"ghcr.io/us/vitscale:1.2"}
    _, config = entrypoint_config(ours)
    assert config["data"] == "s3://our-bucket/jft-300m/train" and config["workers"] == 16
    test_the_entrypoint_is_a_pretraining_run_that_fills_the_worker_groups(ours)
