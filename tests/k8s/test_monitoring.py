"""k8s/monitoring: the alert rules pass promtool and their unit tests, the kustomization builds,
the operator objects match the upstream CRD schemas (unknown fields included, which the API
server would silently prune), and the Grafana dashboard covers every metric family with
queries that stay within them.

Needs `promtool` (Debian package `prometheus`, which .ci/run installs); without it the tests
fail, they do not skip. So does `kubectl` (>= 1.27, its `kustomize`): its output must equal
the rendering `render_kustomization` makes, which the other tests use; without kubectl on PATH
they fail naming it, unless VITSCALE_TESTS_WITHOUT_KUBECTL=1 says to check only our own
rendering (a machine where kubectl cannot be installed). The CRD schemas are copies in
tests/k8s/crds/.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil

import jsonschema
import pytest
import yaml

from orchestrator.metrics import FAMILIES, FAMILY_NAMES
from orchestrator.metric_plots import DASHBOARD, dashboard_panels, panel_targets, panels
from tests.conftest import run_process

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MONITORING = os.path.join(REPO, "k8s", "monitoring")
RULES = os.path.join(MONITORING, "prometheusrule.yaml")
RULE_TESTS = os.path.join(MONITORING, "tests", "alerts.test.yaml")
CRDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crds")
CRD_FILES = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "RayJob": "ray.io_rayjobs.yaml",   # k8s/pretrain (tests/k8s/test_pretrain.py)
    "RayCluster": "ray.io_rayclusters.yaml",   # k8s/raycluster (tests/k8s/test_kubernetes.py)
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMTOOL = "Debian/Ubuntu: apt-get install prometheus; or promtool from a Prometheus 2.x release"


def tool(name: str, how: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; k8s/monitoring cannot be tested without it ({how})")
    return path


def kubectl() -> str | None:
    """kubectl's path; a failure naming it when it is missing, unless the run says to go without
    (then None: the comparisons with kustomize's own rendering are left out)."""
    found = shutil.which("kubectl")
    if found is None and os.environ.get("VITSCALE_TESTS_WITHOUT_KUBECTL") != "1":
        pytest.fail("kubectl (>= 1.27) is not on PATH: the k8s tests compare our rendering with kustomize's; install it, "
                    "or set VITSCALE_TESTS_WITHOUT_KUBECTL=1 to leave those comparisons out")
    return found


def run(args: list[str], cwd: str = REPO) -> str:
    done = run_process(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def load_rules() -> dict:
    with open(RULES) as f:
        return yaml.safe_load(f)


def alerts() -> list[dict]:
    return [r for g in load_rules()["spec"]["groups"] for r in g["rules"] if "alert" in r]


def render_kustomization(folder: str = MONITORING) -> list[dict]:
    """What `kubectl kustomize` makes of k8s/monitoring, for the features it uses: resources,
    `labels` (without selectors) and a `configMapGenerator` with fixed names."""
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    objects = []
    for resource in kustomization.get("resources", []):
        with open(os.path.join(folder, resource)) as f:
            objects += [d for d in yaml.safe_load_all(f) if d]
    for generator in kustomization.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash"), "the rendering knows fixed names only"
        data = {}
        for file in generator.get("files", []):
            with open(os.path.join(folder, file)) as f:
                data[os.path.basename(file)] = f.read()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "data": data,
                        "metadata": {"name": generator["name"], "labels": dict(options.get("labels", {}))}})
    for entry in kustomization.get("labels", []):
        assert not entry.get("includeSelectors"), "the rendering knows metadata labels only"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


@pytest.fixture(scope="module")
def built() -> list[dict]:
    rendered = render_kustomization()
    if (tool := kubectl()) is not None:
        by_kubectl = [d for d in yaml.safe_load_all(run([tool, "kustomize", MONITORING])) if d]
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(by_kubectl, key=key) == sorted(rendered, key=key)
    return rendered


# --- alert rules -----------------------------------------------------------------------------

def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    promtool = tool("promtool", PROMTOOL)
    # promtool reads plain rule files: the PrometheusRule's spec is one.
    with open(tmp_path / "vitscale-rules.yaml", "w") as f:
        yaml.safe_dump(load_rules()["spec"], f, sort_keys=False)
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yaml")
    run([promtool, "check", "rules", "vitscale-rules.yaml"], cwd=tmp_path)
    run([promtool, "test", "rules", "alerts.test.yaml"], cwd=tmp_path)


def test_every_alert_is_per_run_on_known_families_with_severity_and_text():
    assert alerts()
    for rule in alerts():
        name = rule["alert"]
        assert "by (run)" in rule["expr"], f"{name}: aggregate by (run), not one alert per rank"
        assert {n for n, _ in selectors(rule["expr"])} <= allowed_names(), f"{name}: unknown metric"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        for key in ("summary", "description"):
            assert "{{ $labels.run }}" in rule["annotations"][key], f"{name}: {key} must name the run"


def test_every_alert_has_a_firing_and_a_quiet_case():
    with open(RULE_TESTS) as f:
        cases = [c for t in yaml.safe_load(f)["tests"] for c in t.get("alert_rule_test", [])]
    for name in (rule["alert"] for rule in alerts()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it stays quiet"


# --- kustomize and CRD schemas ---------------------------------------------------------------

def strict(schema: dict) -> dict:
    """The schema with unknown fields forbidden wherever it lists properties and says nothing
    about others: the API server prunes such fields silently, so here they are an error."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    path = os.path.join(CRDS, CRD_FILES[kind])
    if not os.path.exists(path):
        pytest.fail(f"upstream CRD schema {path} is missing (see ../shared/k8s-crds/README.md)")
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # KubeRay's are 1.4 MB
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft4Validator(strict(served["schema"]["openAPIV3Schema"]))


def schema_errors(obj: dict) -> list[str]:
    validator = crd_validator(obj["kind"], obj["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_kustomization_builds_the_monitor_the_rules_and_the_dashboard(built):
    assert sorted(d["kind"] for d in built) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    (monitor,) = [d for d in built if d["kind"] == "PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    # Prometheus anchors relabeling regexes, as re.fullmatch does.
    (keep,) = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    for port in ("metrics-driver", "metrics-0", "metrics-7", "metrics-12"):
        assert re.fullmatch(keep["regex"], port), port
    # `metrics` is Ray's own exporter (KubeRay declares it, 8080, where a pod has none).
    for port in ("metrics", "dashboard", "gcs", "client", "serve", "metrics-x", "ray-metrics"):
        assert not re.fullmatch(keep["regex"], port), port
    (families,) = endpoint["metricRelabelings"]
    for name in FAMILY_NAMES + ("vitscale_step_seconds_bucket", "process_cpu_seconds_total"):
        assert re.fullmatch(families["regex"], name), name
    assert not re.fullmatch(families["regex"], "ray_node_cpu_utilization")
    assert monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "vitscale"}}
    (config_map,) = [d for d in built if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["name"] == "vitscale-grafana-dashboard"   # no hash suffix
    with open(DASHBOARD) as f:
        assert config_map["data"]["vitscale.json"] == f.read()


def test_operator_objects_match_the_upstream_crd_schemas(built):
    objects = [d for d in built if d["kind"] in CRD_FILES]
    assert len(objects) == 2
    for obj in objects:
        assert schema_errors(obj) == [], obj["kind"]


def test_the_schema_check_rejects_unknown_and_misplaced_fields(built):
    (monitor,) = [d for d in built if d["kind"] == "PodMonitor"]
    typo = copy.deepcopy(monitor)
    typo["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in schema_errors(typo))
    (rule,) = [d for d in built if d["kind"] == "PrometheusRule"]
    misplaced = copy.deepcopy(rule)
    misplaced["spec"]["groups"][0]["rules"][0]["severity"] = "critical"   # belongs under labels
    assert any("severity" in e for e in schema_errors(misplaced))


# --- the Grafana dashboard -------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every vector selector in a PromQL expression."""
    blocks = re.findall(r"\{[^}]*\}", expr)
    text = re.sub(r"\{[^}]*\}", lambda m: "{#%d}" % blocks.index(m.group(0)), expr)
    text = re.sub(r'"[^"]*"', '""', text)                                  # string arguments
    text = re.sub(r"\[[^\]]*\]", "", text)                                 # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = []
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\(|\{#(\d+)\})?", text):
        name, call, block = m.group(1), m.group(2) == "(", m.group(3)
        if call or name.lower() in KEYWORDS:
            continue
        found.append((name, blocks[int(block)] if block is not None else ""))
    assert "{#" not in re.sub(r"[A-Za-z_:][\w:]*\s*\{#\d+\}", "", text), f"selector without a metric name: {expr}"
    return found


def allowed_names() -> set[str]:
    names = {"up"}
    for family in FAMILIES:
        if family.kind == "histogram":
            names.update(family.name + s for s in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def family_of(name: str) -> str | None:
    if name in FAMILY_NAMES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in FAMILY_NAMES:
            return name[: -len(suffix)]
    return None


def load_dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def test_dashboard_has_the_run_variable():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert "run" in variables
    query = variables["run"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert re.fullmatch(r"label_values\((vitscale_run_info|vitscale_step),\s*run\)", query)


def test_every_panel_queries_only_known_families_of_the_chosen_runs():
    allowed = allowed_names()
    for panel in panels(load_dashboard()):
        exprs = [t["expr"] for t in panel_targets(panel)]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            assert set(re.findall(r"\$\{?(\w+)", expr)) <= {"run", "__rate_interval"}, expr
            found = selectors(expr)
            assert found, expr
            for name, matchers in found:
                assert name in allowed or name.startswith("process_"), f"{panel['title']!r}: unknown metric {name}"
                # The run's own series, or its fine-tuning trials' (runs of their own named <run>-ft-...).
                assert re.search(r'run=~"\$run(-ft-\.\*)?"', matchers), f"{panel['title']!r}: {name} not filtered on $run"


def test_every_family_has_a_panel():
    shown = {family_of(name) for expr in [e for _, exprs, _ in dashboard_panels() for e in exprs] for name, _ in selectors(expr)}
    assert set(FAMILY_NAMES) - shown == set()


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = tool("promtool", PROMTOOL)
    queries = [e for _, exprs, _ in dashboard_panels() for e in exprs]
    assert queries and not any("$" in q for q in queries)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    with open(tmp_path / "dashboard-rules.yaml", "w") as f:
        yaml.safe_dump(rules, f)
    run([promtool, "check", "rules", "dashboard-rules.yaml"], cwd=tmp_path)
