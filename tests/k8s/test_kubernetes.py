"""Every kustomization under k8s/ as a cluster admin would check it before a week-long run:

- it renders with `kubectl kustomize`; core objects validate against Kubernetes' own schemas
  (kubernetes-validate, offline, strict: an unknown field is an error), RayJob and RayCluster
  against KubeRay's CRD schemas;
- every pod (head, workers, a RayJob's submitter) meets the Pod Security Standards' restricted
  profile (the checks below are that profile's, field by field);
- every Ray pod mounts a memory-backed /dev/shm large enough for Ray's object store and the
  DataLoader workers' batches, and every worker pod stages checkpoints on node-local disk
  (VITSCALE_STAGING_DIR) with room for its share of a checkpoint twice over;
- the NetworkPolicy selects every pod of its cluster and admits, from outside it, the KubeRay
  operator on the job API and the monitoring namespace's Prometheus on the metrics ports only;
- every entrypoint is a launch/pretrain.py command line that resolves (--print-config), fills
  its worker groups and hands over to the fine-tuning fan-out.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex

import pytest
import yaml

from tests.k8s.test_monitoring import REPO, kubectl, run, schema_errors
from tests.k8s.test_pretrain import (
    CREDENTIAL_NAMES, entrypoint_config, groups, kuberay_start_params, pod_templates, quantity, ray_container,
    test_the_entrypoint_is_a_pretraining_run_that_fills_the_worker_groups as check_groups_are_filled,
)

K8S = os.path.join(REPO, "k8s")
KUSTOMIZATIONS = ["pretrain", "overlays/dev", "overlays/jft", "raycluster", "monitoring"]
RAY_KINDS = ("RayJob", "RayCluster")
KUBERNETES_VERSION = "1.30.0"  # the oldest API the manifests must pass (NetworkPolicy endPort: 1.25)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret", "name"}
PREFETCH_FACTOR = 2  # data_pipelines.stream.ShardLoader's default, which the training loop keeps


@functools.lru_cache(maxsize=None)
def _render(folder: str) -> str:
    tool = kubectl()
    if tool is None:
        pytest.skip("VITSCALE_TESTS_WITHOUT_KUBECTL=1: overlays need kustomize itself")
    return run([tool, "kustomize", folder])


def rendered(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(os.path.join(K8S, name))) if d]


def ray_objects(name: str) -> list[dict]:
    return [d for d in rendered(name) if d["kind"] in RAY_KINDS]


def all_pods() -> list[tuple[str, dict, dict]]:
    """(where, the Ray object, pod template) of every pod of every kustomization."""
    return [(f"{name}:{obj['kind']}/{what}", obj, template) for name in KUSTOMIZATIONS for obj in ray_objects(name)
            for what, template in pod_templates(obj)]


def restricted_violations(template: dict) -> list[str]:
    """What in a pod template the Pod Security Standards' restricted profile (v1.30) refuses."""
    spec, found = template["spec"], []
    pod_context = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    for volume in spec.get("volumes", []):
        if set(volume) - RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(set(volume) - RESTRICTED_VOLUMES)}")
    if pod_context.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        context, name = container.get("securityContext", {}), container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def test_every_kustomization_renders_and_validates_against_kubernetes_and_kuberay_schemas():
    import kubernetes_validate

    kinds = {name: sorted(d["kind"] for d in rendered(name)) for name in KUSTOMIZATIONS}
    assert kinds == {
        "pretrain": ["NetworkPolicy", "RayJob", "ServiceAccount"],
        "overlays/dev": ["NetworkPolicy", "RayJob", "ServiceAccount"],
        "overlays/jft": ["NetworkPolicy", "RayJob", "ServiceAccount"],
        "raycluster": ["NetworkPolicy", "RayCluster", "ServiceAccount"],
        "monitoring": ["ConfigMap", "PodMonitor", "PrometheusRule"],
    }
    for name in KUSTOMIZATIONS:
        for obj in rendered(name):
            if "." in obj["apiVersion"].split("/")[0] and obj["apiVersion"] != "networking.k8s.io/v1":
                assert schema_errors(obj) == [], (name, obj["kind"])  # ray.io, monitoring.coreos.com: the CRDs
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    policy = next(d for d in rendered("pretrain") if d["kind"] == "NetworkPolicy")
    typo = copy.deepcopy(policy)
    typo["spec"]["ingres"] = typo["spec"].pop("ingress")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_every_pod_meets_the_restricted_pod_security_standard():
    pods = all_pods()
    assert {where.split(":")[1] for where, _, _ in pods} == {"RayJob/head", "RayJob/gpu", "RayJob/submitter",
                                                            "RayCluster/head", "RayCluster/gpu"}
    for where, _, template in pods:
        assert restricted_violations(template) == [], where
        # the Ray image's user (uid 1000, group users) rather than whatever the image says
        assert template["spec"]["securityContext"]["runAsUser"] == 1000, where
    _, _, template = pods[0]
    for breach in ({"allowPrivilegeEscalation": True}, {"capabilities": {"drop": []}}, {"runAsUser": 0},
                   {"seccompProfile": {"type": "Unconfined"}}, {"privileged": True}):
        broken = copy.deepcopy(template)
        broken["spec"]["containers"][0]["securityContext"].update(breach)
        assert restricted_violations(broken), breach
    broken = copy.deepcopy(template)
    broken["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(broken) == ["volume host: ['hostPath']"]


def _volume(template: dict, mount_path: str) -> dict | None:
    container = template["spec"]["containers"][0]
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path] or [None]
    if mount is None:
        return None
    (volume,) = [v for v in template["spec"].get("volumes", []) if v["name"] == mount["name"]]
    return volume


def _config_of(obj: dict) -> dict:
    """The run a cluster is sized for: its RayJob's entrypoint; a RayCluster: the full recipe's."""
    source = obj if obj["kind"] == "RayJob" else next(d for d in rendered("pretrain") if d["kind"] == "RayJob")
    return entrypoint_config(source)[1]


def _checkpoint_share_bytes(config: dict, ranks_in_pod: int) -> float:
    """What the ranks of one pod stage of a checkpoint (DeepSpeed's layout): the model's fp32
    states (on the pod of rank 0) and the pod's share of the Adam states (fp32 master weights,
    two moments: 12 bytes a parameter, split over every rank from ZeRO stage 1 on)."""
    from model.registry import build_model

    model = build_model(config["model"], num_classes=config["num_classes"], image_size=config["image_size"],
                        device="meta")
    params = sum(p.numel() for p in model.parameters())
    optimizer = 12 * params * (ranks_in_pod / config["workers"] if config["zero_stage"] >= 1 else ranks_in_pod)
    return 4 * params + optimizer


def test_ray_pods_have_a_shm_for_the_object_store_and_the_loaders_and_workers_stage_on_node_disk():
    for name in KUSTOMIZATIONS:
        for obj in ray_objects(name):
            config = _config_of(obj)
            for is_head, group in groups(obj):
                where = f"{name}:{obj['kind']}/{'head' if is_head else group['groupName']}"
                template, params = group["template"], kuberay_start_params(group, head=is_head)
                shm = _volume(template, "/dev/shm")
                assert shm is not None and shm["emptyDir"].get("medium") == "Memory", where
                ranks = 0 if is_head else int(float(params["num-gpus"]) // config["gpus_per_worker"])
                batch = config["micro_batch_size"] * 3 * config["image_size"] ** 2  # uint8 batches on GPUs
                loaders = ranks * config["data_workers"] * PREFETCH_FACTOR * batch
                store = int(params["object-store-memory"])  # set: Ray's default (30% of memory) outgrows any shm
                assert quantity(shm["emptyDir"]["sizeLimit"]) >= store + 2 * loaders, where
                memory = quantity(ray_container(group)["resources"]["limits"]["memory"])
                assert quantity(shm["emptyDir"]["sizeLimit"]) <= memory / 2, where  # counted in the pod's memory
                if is_head:
                    continue
                env = {e["name"]: e.get("value") for e in ray_container(group)["env"]}
                staging = _volume(template, env.get("VITSCALE_STAGING_DIR", "-"))
                assert staging is not None and "medium" not in staging["emptyDir"], where  # node disk, not memory
                size = quantity(staging["emptyDir"]["sizeLimit"])
                assert size >= 2 * _checkpoint_share_bytes(config, ranks), where
                requests = ray_container(group)["resources"]["requests"]
                assert quantity(requests["ephemeral-storage"]) >= size, where  # scheduled where it fits


def test_the_network_policy_admits_the_cluster_itself_the_operator_and_prometheus_only():
    for name in KUSTOMIZATIONS:
        objects = rendered(name)
        rays = [d for d in objects if d["kind"] in RAY_KINDS]
        if not rays:
            continue
        (policy,) = [d for d in objects if d["kind"] == "NetworkPolicy"]
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        selector = spec["podSelector"]["matchLabels"]
        metrics_ports = set()
        for where, template in [(w, t) for obj in rays for w, t in pod_templates(obj)]:
            labels = template["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in selector.items()), (name, where)  # the policy holds it
            metrics_ports |= {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                              if p["name"].startswith("metrics")}
        own, operator, prometheus = spec["ingress"]
        assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}  # every port, from its own pods only
        assert operator["from"] == [{"namespaceSelector": {},
                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
        assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
        assert prometheus["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                                       "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
        admitted = set()
        for port in prometheus["ports"]:
            admitted |= set(range(port["port"], port.get("endPort", port["port"]) + 1))
        assert admitted == metrics_ports | {8080}, name  # Ray's exporter, the driver's and workers' /metrics
        assert not admitted & {6379, 8265, 10001}


def test_every_entrypoint_resolves_fills_its_groups_and_hands_over_to_the_fanout():
    for name in ("pretrain", "overlays/dev", "overlays/jft"):
        (job,) = ray_objects(name)
        words, config = entrypoint_config(job)
        assert words[1] == "/home/ray/vitscale/launch/pretrain.py"
        assert config["finetune"] and config["finetune_data"].startswith("s3://"), name
        check_groups_are_filled(job)
    _, dev = entrypoint_config(ray_objects("overlays/dev")[0])
    _, jft = entrypoint_config(ray_objects("overlays/jft")[0])
    assert (dev["workers"], dev["max_steps"], dev["finetune_datasets"]) == (1, 300, "CIFAR10")
    assert jft["workers"] == 64 and jft["max_steps"] is None and jft["finetune_datasets"] is None  # the recipe, whole
    assert dev["checkpoints"] != jft["checkpoints"]  # the same run name: a try must not resume the real run


def test_gpu_pods_tolerate_the_gpu_taint_and_the_jft_overlay_picks_the_gpu_product():
    for name in ("pretrain", "overlays/dev", "overlays/jft", "raycluster"):
        for obj in ray_objects(name):
            for is_head, group in groups(obj):
                spec = group["template"]["spec"]
                if is_head:
                    assert "nvidia.com/gpu" not in ray_container(group)["resources"]["limits"]
                    continue
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
                assert quantity(ray_container(group)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
                selector = spec.get("nodeSelector", {})
                if name == "overlays/jft":
                    assert selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_the_interactive_cluster_keeps_its_dashboard_inside_and_asks_for_the_token():
    (cluster,) = ray_objects("raycluster")
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and not spec["headGroupSpec"].get("enableIngress")
    assert kuberay_start_params(spec["headGroupSpec"], head=True)["num-cpus"] == "0"  # drivers only
    (job,) = ray_objects("pretrain")
    theirs = dict(pod_templates(job))
    for what, template in pod_templates(cluster):  # the same volumes, security and S3 settings as the RayJob's
        twin = theirs[what]
        for key in ("securityContext", "volumes", "serviceAccountName", "automountServiceAccountToken"):
            assert template["spec"].get(key) == twin["spec"].get(key), (what, key)
        for key in ("securityContext", "envFrom", "env", "volumeMounts", "ports"):
            assert template["spec"]["containers"][0].get(key) == twin["spec"]["containers"][0].get(key), (what, key)


def test_s3_credentials_come_from_a_secret_or_an_annotated_service_account(tmp_path):
    """No credential literal anywhere; the pods run as the ServiceAccount `vitscale`, which an
    overlay annotates for IAM roles for service accounts (k8s/README.md's example)."""
    for name in KUSTOMIZATIONS:
        text = _render(os.path.join(K8S, name))
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", text, re.IGNORECASE)
        for obj in ray_objects(name):
            for what, template in pod_templates(obj):
                assert template["spec"]["serviceAccountName"] == "vitscale", (name, what)
                for container in template["spec"]["containers"]:
                    for variable in container.get("env", []):
                        assert not CREDENTIAL_NAMES.search(variable["name"]) or "value" not in variable
        for entrypoint in [d["spec"]["entrypoint"] for d in ray_objects(name) if d["kind"] == "RayJob"]:
            assert not any(CREDENTIAL_NAMES.search(w) for w in shlex.split(entrypoint))
    overlay = tmp_path / "irsa"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(os.path.join(K8S, "overlays", "jft"), overlay)],
        "patches": [{"target": {"kind": "ServiceAccount", "name": "vitscale"}, "patch": yaml.safe_dump([
            {"op": "add", "path": "/metadata/annotations",
             "value": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/vitscale"}}])}]}))
    (account,) = [d for d in yaml.safe_load_all(run([kubectl(), "kustomize", str(overlay)])) if d
                  and d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/vitscale"}
