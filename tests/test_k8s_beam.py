"""Offline checks of k8s/beam (Flink session cluster + Beam job server) and k8s/storage/kind (MinIO),
with the tools tests/test_k8s.py uses (kubectl kustomize, kubernetes-validate, checkov) and the
project's rules on the rendered objects. No cluster, operator or registry is reached.

The FlinkDeployment is a custom resource kubernetes-validate has no schema for: its fields are
checked against the operator's CRD (FLINK_DEPLOYMENT_SPEC below) and its pod templates, which the
CRD types as core Pods, are validated as Pods.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from test_k8s import (CONTAINERS, K8S, K8S_VERSIONS, REPO, WORKLOADS, checkov, containers, dockerfile_stages,
                      load_rendered, one, render, run, selects, tool)

pytestmark = pytest.mark.k8s  # manifest tools (kustomize, kubernetes-validate, checkov): `make test` runs them

BEAM_TARGETS = ["beam", "storage/kind"]
NAMESPACE = "kflift-beam"
FLINK = "kflift-flink"  # the FlinkDeployment
OPERATOR_NAMESPACE = "flink-operator"  # where k8s/README.md installs the operator
SECRET = "kflift-minio"
# Flink's REST port (rest.port default); flink-session.yaml does not change it.
FLINK_REST_PORT = 8081
# The worker pool sidecar (apache_beam.runners.worker.worker_pool_main --service_port) serves on this port.
WORKER_POOL_PORT = 50000
WORKER_POOL_COMMAND = ["python", "-m", "apache_beam.runners.worker.worker_pool_main",
                       f"--service_port={WORKER_POOL_PORT}"]
# tf.Transform's shared folder: the claim and path of config cluster.transform_pvc / augment.transform_temp.
TRANSFORM_CLAIM = "kflift-transform"
TRANSFORM_PATH = "/kflift-transform"
KFP_NAMESPACE = "kubeflow"  # where KFP standalone runs the augment tasks

# The FlinkDeployment fields as flink-kubernetes-operator 1.15.0 declares them: tag release-1.15.0
# (commit 79d730b), helm/flink-kubernetes-operator/crds/flinkdeployments.flink.apache.org-v1.yml,
# version v1beta1, openAPIV3Schema.properties.spec; every spec field is listed, the nested ones
# this repository uses are spelled out. additionalProperties is false where the CRD lists
# properties: the API server prunes unknown fields of a structural schema, so a misspelt field
# would vanish without an error. podTemplate is the core Pod schema: checked as a Pod instead.
_RESOURCE = {"type": "object", "additionalProperties": False,
             "properties": {"cpu": {"type": "number"}, "memory": {"type": "string"},
                            "ephemeralStorage": {"type": "string"}}}
_COMPONENT = {"type": "object", "additionalProperties": False,
              "properties": {"podTemplate": {"type": "object"}, "replicas": {"type": "integer"},
                             "resource": _RESOURCE}}
FLINK_DEPLOYMENT_SPEC = {
    "type": "object", "additionalProperties": False,
    "properties": {
        # preserve-unknown-fields in the CRD; earlier operators typed it a map of strings, as used here
        "flinkConfiguration": {"type": "object", "additionalProperties": {"type": "string"}},
        "flinkVersion": {"enum": ["v1_13", "v1_14", "v1_15", "v1_16", "v1_17", "v1_18", "v1_19", "v1_20",
                                 "v2_0", "v2_1", "v2_2"], "type": "string"},
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "ingress": {"type": "object"},
        "job": {"type": "object"},
        "jobManager": _COMPONENT,
        "logConfiguration": {"type": "object", "additionalProperties": {"type": "string"}},
        "mode": {"enum": ["native", "standalone"], "type": "string"},
        "podTemplate": {"type": "object"},
        "restartNonce": {"type": "integer"},
        "serviceAccount": {"type": "string"},
        "taskManager": _COMPONENT,
    },
}


# ----------------------------------------------------------------------------- rendering

@pytest.fixture(scope="session")
def beam_rendered_dir(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("k8s-beam-rendered"), BEAM_TARGETS)


@pytest.fixture(scope="session")
def rendered(beam_rendered_dir) -> dict[str, list[dict]]:
    return load_rendered(beam_rendered_dir, BEAM_TARGETS)


def flink_pods(docs: list[dict]) -> dict[str, dict]:
    """The FlinkDeployment's pod templates as the pods Flink makes of them: the template's labels
    plus the ones Flink adds in native mode (app: <name>, component: <role>, type)."""
    fd = one(docs, "FlinkDeployment", FLINK)
    pods = {}
    for role, key in (("jobmanager", "jobManager"), ("taskmanager", "taskManager")):
        template = fd["spec"][key]["podTemplate"]
        labels = {**template["metadata"]["labels"], "app": FLINK, "component": role,
                  "type": "flink-native-kubernetes"}
        pods[role] = {"apiVersion": "v1", "kind": "Pod",
                      "metadata": {**template["metadata"], "name": f"{FLINK}-{role}", "labels": labels},
                      "spec": template["spec"]}
    return pods


def pod_specs(docs: list[dict]):
    """(where, pod spec, pod labels) of every workload, the Flink pods included."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"], \
                d["spec"]["template"]["metadata"]["labels"]
        if d["kind"] == "FlinkDeployment":
            for role, pod in flink_pods([d]).items():
                yield f"FlinkDeployment/{FLINK} {role}", pod["spec"], pod["metadata"]["labels"]


def sidecar(docs: list[dict]) -> dict:
    tm = flink_pods(docs)["taskmanager"]["spec"]
    [c] = [c for c in tm["containers"] if c["name"] == "beam-worker-pool"]
    return c


def claims(spec: dict) -> dict[str, str]:
    """A pod spec's volume names -> the claims they mount."""
    return {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts(container: dict) -> dict[str, dict]:
    """A container's mount paths -> their volumeMounts entries."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def cpu_image() -> str:
    """kflift's CPU stage image as k8s/ names it (what `kflift images build` tags besides the hash)."""
    try:
        from kflift.pipeline.images import DEFAULT_NAMES
        return DEFAULT_NAMES["cpu"]
    except ImportError:
        return "kflift-cpu:0.1.0"


def cpu_image_runtime() -> dict:
    """containers/Dockerfile's runtime stage: its USER, ENV and whether it sets an ENTRYPOINT."""
    _, stages = dockerfile_stages(CONTAINERS / "Dockerfile")
    final = stages[-1]
    env = {}
    for line in final:
        if line.startswith("ENV "):
            env |= dict(kv.split("=", 1) for kv in line.split()[1:])
    user, _, group = [i for i in final if i.startswith("USER ")][-1].split()[1].partition(":")
    return {"user": int(user), "group": int(group or user), "env": env,
            "entrypoint": any(i.upper().startswith("ENTRYPOINT") for i in final)}


def readme_section() -> str:
    text = (K8S / "README.md").read_text()
    start = text.index("## Beam on Flink")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


# ----------------------------------------------------------------------------- the tools' verdicts

def test_targets_render_into_the_beam_namespace(rendered):
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered["beam"]) == [
        ("Deployment", "kflift-beam-jobserver"), ("FlinkDeployment", FLINK), ("Namespace", NAMESPACE),
        ("NetworkPolicy", "beam-jobserver-ingress"), ("NetworkPolicy", "default-deny-ingress"),
        ("NetworkPolicy", "flink-jobmanager-ingress"), ("NetworkPolicy", "flink-taskmanager-ingress"),
        ("PersistentVolumeClaim", "kflift-beam-artifacts"), ("Service", "kflift-beam-jobserver"),
        ("ServiceAccount", "default"), ("ServiceAccount", "kflift-beam-jobserver")]
    assert sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
                  for d in rendered["storage/kind"]) == [
        ("Deployment", "kflift-minio", NAMESPACE), ("Job", "kflift-minio-buckets", NAMESPACE),
        ("NetworkPolicy", "minio-ingress", NAMESPACE),
        ("PersistentVolume", f"{TRANSFORM_CLAIM}-{NAMESPACE}", None),
        ("PersistentVolume", f"{TRANSFORM_CLAIM}-{KFP_NAMESPACE}", None),
        ("PersistentVolumeClaim", "kflift-minio-data", NAMESPACE),
        ("PersistentVolumeClaim", TRANSFORM_CLAIM, NAMESPACE),
        ("PersistentVolumeClaim", TRANSFORM_CLAIM, KFP_NAMESPACE),
        ("Service", "kflift-minio", NAMESPACE), ("ServiceAccount", "kflift-minio", NAMESPACE)]
    for target, docs in rendered.items():
        for d in docs:
            where = f"k8s/{target} {d['kind']}/{d['metadata']['name']}"
            if d["kind"] not in ("Namespace", "PersistentVolume") and \
                    (d["kind"], d["metadata"]["name"]) != ("PersistentVolumeClaim", TRANSFORM_CLAIM):
                assert d["metadata"].get("namespace") == NAMESPACE, where
            assert d["metadata"]["labels"].get("app.kubernetes.io/part-of") == "kflift", where
    ns = one(rendered["beam"], "Namespace", NAMESPACE)["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", BEAM_TARGETS)
def test_kubernetes_validate_strict(rendered, tmp_path, target, version):
    """Every standard object, and the Flink pod templates as the Pods they become; kubernetes-validate
    must have had a schema for each (it only warns about kinds it does not know)."""
    docs = [d for d in rendered[target] if d["kind"] != "FlinkDeployment"]
    docs += list(flink_pods(rendered[target]).values()) if target == "beam" else []
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, path])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"k8s/{target} invalid for Kubernetes {version}:\n{out}"
    assert "did not validate" not in out and "Couldn't find schema" not in out, out
    assert out.count(" passed for resource ") == len(docs), out


def schema_errors(schema: dict, instance: dict) -> list[str]:
    """jsonschema (in the tools venv, beside kubernetes-validate) on one instance."""
    code = ("import json, sys, jsonschema; schema, doc = json.load(sys.stdin); "
            "print(json.dumps([f'{list(e.absolute_path)}: {e.message}' "
            "for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]))")
    proc = run([tool("python"), "-c", code], input=json.dumps([schema, instance]))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_flinkdeployment_matches_the_operator_crd(rendered):
    fd = one(rendered["beam"], "FlinkDeployment", FLINK)
    assert fd["apiVersion"] == "flink.apache.org/v1beta1"
    assert schema_errors(FLINK_DEPLOYMENT_SPEC, fd["spec"]) == []
    spec = fd["spec"]
    assert "job" not in spec, "a session cluster: the job server submits the jobs"
    assert spec["mode"] == "native"
    for key in ("jobManager", "taskManager"):
        assert {"cpu", "memory"} <= set(spec[key]["resource"]), f"{key}: the operator sizes Flink's container from it"
    # ... and the check can fail: a misspelt field, a wrong type, a version the operator does not know
    for bad in ({**spec, "flinkConfig": {}}, {**spec, "taskManager": {**spec["taskManager"], "resources": {}}},
                {**spec, "jobManager": {**spec["jobManager"], "resource": {"cpu": "1", "memory": "1g"}}},
                {**spec, "flinkVersion": "1.20"}):
        assert schema_errors(FLINK_DEPLOYMENT_SPEC, bad), bad


def test_checkov_rendered_manifests(beam_rendered_dir):
    result = checkov(beam_rendered_dir, "kubernetes")
    assert result["passed"] > 100
    # each skip is annotated where it is taken; secrets as env only where the tool reads env
    assert result["skipped"] <= {"CKV_K8S_43", "CKV_K8S_35"}


# ----------------------------------------------------------------------------- project rules

def test_images_are_pinned_and_match_the_pipelines_beam(rendered):
    """Beam's images carry the SDK version and Python the pipeline is built with (the job server,
    the SDK workers and the submitting client must agree); the Flink image, the operator's
    flinkVersion and the job server's Flink are one version, which Beam publishes."""
    docs = rendered["beam"] + rendered["storage/kind"]
    images = [c["image"] for _, spec, _ in pod_specs(docs) for c in containers(spec) if "image" in c]
    fd = one(rendered["beam"], "FlinkDeployment", FLINK)["spec"]
    images.append(fd["image"])
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"image {image} not pinned"
    beam_pin = re.search(r"^apache-beam==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    python = re.search(r'requires-python = ">=(3\.\d+)', (REPO / "pyproject.toml").read_text()).group(1)
    # the worker pool runs kflift's CPU stage image: the project's Python (its base) and Beam (its constraints)
    assert sidecar(rendered["beam"])["image"] == cpu_image()
    args, stages = dockerfile_stages(CONTAINERS / "Dockerfile")
    assert re.fullmatch(rf"python:{re.escape(python)}-slim", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert any("--constraint constraints.txt" in i for i in stages[0] if i.startswith("RUN")), "Beam not pinned"
    server = one(rendered["beam"], "Deployment", "kflift-beam-jobserver")["spec"]["template"]["spec"]["containers"][0]
    match = re.fullmatch(rf"apache/beam_flink(\d+\.\d+)_job_server:{re.escape(beam_pin)}", server["image"])
    assert match, f"{server['image']}: not Beam {beam_pin}'s Flink job server"
    flink = match.group(1)
    try:  # the Flink versions the installed Beam publishes job servers for
        from apache_beam.options.pipeline_options import FlinkRunnerOptions
        published = FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    except ImportError:
        published = ["1.19", "1.20", "2.0", "2.1", "2.2"]  # Beam 2.77.0
    assert flink in published
    assert fd["flinkVersion"] == "v" + flink.replace(".", "_")
    assert re.fullmatch(rf"flink:{re.escape(flink)}\.\d+-scala_2\.12-java\d+", fd["image"]), fd["image"]
    for image in images:
        if image.startswith("quay.io/minio/"):
            assert re.fullmatch(r"quay\.io/minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image), image


@pytest.mark.parametrize("target", BEAM_TARGETS)
def test_every_pod_and_container_is_hardened(rendered, target):
    specs = list(pod_specs(rendered[target]))
    assert len(specs) == (3 if target == "beam" else 2)
    for where, spec, _ in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        # Only the JobManager talks to the API (it starts the TaskManagers), as the operator's `flink`.
        if where.endswith("jobmanager"):
            assert spec["automountServiceAccountToken"] is True, where
            assert one(rendered[target], "FlinkDeployment", FLINK)["spec"]["serviceAccount"] == "flink"
        else:
            assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        emptydirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            cw = f"k8s/{target} {where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1) > 0, cw
            assert sc.get("readOnlyRootFilesystem") is True, cw
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("privileged", False) is False, cw
            assert "ALL" in sc.get("capabilities", {}).get("drop", []) and not sc["capabilities"].get("add"), cw
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", cw
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in emptydirs, f"{cw}: read-only root needs an emptyDir at /tmp"
            if c["name"] == "flink-main-container":
                # the operator gives Flink's own container its image, resources and ports
                assert "image" not in c and "resources" not in c, cw
                continue
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{cw}: no {kind}"
            assert "livenessProbe" in c and "readinessProbe" in c, f"{cw}: probes"


def test_credentials_come_from_the_secret_as_env_never_on_a_command_line(rendered):
    """The MinIO credentials reach each pod as variables set from the Secret by reference: no
    literal value, no command-line flag, and no $(VAR) expansion of them into an argument."""
    example = yaml.safe_load((K8S / "storage" / "kind" / "secret.example.yaml").read_text())
    keys = set(example["stringData"])
    docs = rendered["beam"] + rendered["storage/kind"]
    readers = 0
    for where, spec, _ in pod_specs(docs):
        for c in containers(spec):
            cw = f"{where} container {c['name']}"
            env = c.get("env", [])
            from_secret = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            for e in env:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET and ref["key"] in keys, f"{cw}: {e['name']} -> {ref}"
                    assert not ref.get("optional"), f"{cw}: a missing Secret must stop the pod"
                elif re.search(r"KEY|SECRET|PASSWORD|TOKEN|ROOT_USER", e["name"]):
                    pytest.fail(f"{cw}: credential {e['name']} is not read from the Secret")
                # a variable composed from credentials carries them too
                if any(f"$({n})" in e.get("value", "") for n in from_secret):
                    from_secret.add(e["name"])
            readers += bool(from_secret)
            argv = " ".join(c.get("command", []) + c.get("args", []))
            for name in from_secret:
                assert f"$({name})" not in argv and f"${name}" not in argv and "${" + name not in argv, \
                    f"{cw}: {name} expanded onto the command line"
            assert not re.search(r"--s3_(access_key_id|secret_access_key|session_token)|CHANGE-ME", argv), cw
            assert not re.search(r"secret|password|access.?key", argv, re.I), f"{cw}: {argv}"
    assert readers == 3, "MinIO, the bucket Job and the Beam worker pool read the Secret"
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets must be created out of band"
    assert example["metadata"]["name"] == SECRET and example["metadata"]["namespace"] == NAMESPACE
    assert "CHANGE-ME" in example["stringData"]["secret-access-key"]


def test_the_bucket_job_composes_its_alias_from_earlier_secret_variables(rendered):
    """Kubernetes expands $(VAR) in a value only from variables listed before it: MC_HOST_local
    must follow the two it uses, and name the MinIO Service."""
    docs = rendered["storage/kind"]
    job = one(docs, "Job", "kflift-minio-buckets")["spec"]["template"]["spec"]
    c = job["containers"][0]
    assert c["command"] == ["mc"] and c["args"][:2] == ["mb", "--ignore-existing"]
    assert sorted(c["args"][2:]) == ["local/kflift-data", "local/kflift-staging"]
    names = [e["name"] for e in c["env"]]
    alias = env_of(c)["MC_HOST_local"]["value"]
    used = re.findall(r"\$\((\w+)\)", alias)
    assert used and all(names.index(u) < names.index("MC_HOST_local") for u in used), (used, names)
    assert {env_of(c)[u]["valueFrom"]["secretKeyRef"]["key"] for u in used} == {"access-key-id", "secret-access-key"}
    url = urlsplit(alias)
    svc = one(docs, "Service", "kflift-minio")
    assert url.scheme == "http" and url.hostname == svc["metadata"]["name"]
    assert url.port == svc["spec"]["ports"][0]["port"]
    assert job["restartPolicy"] == "OnFailure" and one(docs, "Job", "kflift-minio-buckets")["spec"]["backoffLimit"] > 0


def test_minio_has_probes_resources_and_its_volume(rendered):
    docs = rendered["storage/kind"]
    dep = one(docs, "Deployment", "kflift-minio")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"][:2] == ["server", "/data"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("startupProbe", "/minio/health/live"), ("livenessProbe", "/minio/health/live"),
                        ("readinessProbe", "/minio/health/ready")):
        assert c[probe]["httpGet"]["path"] == path, probe
        assert c[probe]["httpGet"]["port"] in ("s3", ports["s3"]), probe
    assert {"requests", "limits"} <= set(c["resources"])
    assert {env_of(c)[n]["valueFrom"]["secretKeyRef"]["key"] for n in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")} == \
        {"access-key-id", "secret-access-key"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert claims(spec).get(mounts.get("/data")) == "kflift-minio-data"
    one(docs, "PersistentVolumeClaim", "kflift-minio-data")
    assert dep["spec"]["strategy"]["type"] == "Recreate", "RWO data volume: no rolling overlap"
    svc = one(docs, "Service", "kflift-minio")["spec"]
    assert selects({"matchLabels": svc["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(9000, "s3")] and ports["s3"] == 9000


def test_the_job_server_submits_to_the_operators_rest_service(rendered):
    """The operator names the session cluster's REST Service <name>-rest (its quick start:
    `kubectl port-forward svc/basic-example-rest 8081`); artifacts go where the TaskManagers read."""
    docs = rendered["beam"]
    dep = one(docs, "Deployment", "kflift-beam-jobserver")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    flags = dict(a.split("=", 1) for a in c["args"])
    host, _, port = flags["--flink-master"].partition(":")
    assert host.split(".")[0] == f"{one(docs, 'FlinkDeployment', FLINK)['metadata']['name']}-rest"
    assert host.split(".")[1:2] in ([], [NAMESPACE]) and int(port) == FLINK_REST_PORT
    assert flags["--job-host"] == "0.0.0.0", "listen on the pod's address, not localhost"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(flags["--job-port"]) == ports["job"] and int(flags["--artifact-port"]) == ports["artifact"]
    svc = one(docs, "Service", "kflift-beam-jobserver")["spec"]
    assert selects({"matchLabels": svc["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    assert {p["targetPort"]: p["port"] for p in svc["ports"]} == {"job": ports["job"], "artifact": ports["artifact"]}
    # the job server writes the staged artifacts to a claim the TaskManagers mount at the same path
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = claims(spec)[mounts[flags["--artifacts-dir"]]]
    one(docs, "PersistentVolumeClaim", claim)
    tm = flink_pods(docs)["taskmanager"]["spec"]
    [main] = [x for x in tm["containers"] if x["name"] == "flink-main-container"]
    assert {m["mountPath"]: claims(tm).get(m["name"]) for m in main["volumeMounts"]}[flags["--artifacts-dir"]] == claim
    assert dep["spec"]["strategy"]["type"] == "Recreate", "RWO artifact volume: one job server at a time"


def test_the_documented_beam_options_reach_this_cluster(rendered):
    """k8s/README.md's option set, through kflift's own --set parsing and Beam's option parser: the
    job and artifact endpoints are the job server's Service, the worker pool is the TaskManager's
    sidecar port, and no option carries a credential or the store's address (those are env)."""
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, S3Options
    from kflift.pipeline.config import load_config

    doc = readme_section()
    sets = re.findall(r"--set (augment\.beam_options=\S+)", doc)
    assert len(sets) == 1, sets
    options = load_config(overrides=sets).augment.beam_options
    assert re.findall(r"--beam-option=(\S+)", doc) == options, "kflift stage augment gets the same set"
    parsed = PipelineOptions(options)
    portable = parsed.view_as(PortableOptions)
    docs = rendered["beam"]
    svc = one(docs, "Service", "kflift-beam-jobserver")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    address = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}"
    assert parsed.get_all_options()["runner"] == "PortableRunner"
    assert portable.job_endpoint == f"{address}:{ports['job']}"
    # the job server advertises its --job-host (0.0.0.0) for artifacts: the client must name the Service
    assert portable.artifact_endpoint == f"{address}:{ports['artifact']}"
    assert portable.environment_type == "EXTERNAL"
    pool = sidecar(docs)
    assert pool["command"] + pool["args"] == WORKER_POOL_COMMAND
    assert [p["containerPort"] for p in pool["ports"]] == [WORKER_POOL_PORT]
    assert portable.environment_config == f"localhost:{WORKER_POOL_PORT}"
    s3 = parsed.view_as(S3Options)
    assert (s3.s3_access_key_id, s3.s3_secret_access_key, s3.s3_endpoint_url, s3.s3_region_name) == (None,) * 4
    assert not re.search(r"key|secret|password|token", " ".join(options), re.I)


def test_the_worker_pool_runs_kflifts_cpu_image_as_its_user(rendered):
    """The sidecar runs kflift's CPU stage image (everything augment imports) with Beam's worker pool
    entry point on the port the TaskManager is told, as the image's own user, and the kubelet never
    pulls the locally loaded image from a registry."""
    fd = one(rendered["beam"], "FlinkDeployment", FLINK)
    pool = sidecar(rendered["beam"])
    assert pool["image"] == cpu_image()
    assert pool["imagePullPolicy"] == "IfNotPresent", "kind-loaded image: Always would pull from a registry"
    skips = " ".join(v for k, v in fd["metadata"].get("annotations", {}).items() if k.startswith("checkov.io/skip"))
    assert "CKV_K8S_15=" in skips and "CKV_K8S_43=" in skips, "the locally loaded image's skips and reasons"
    assert pool["command"] + pool["args"] == WORKER_POOL_COMMAND
    ports = {p["name"]: p["containerPort"] for p in pool["ports"]}
    assert list(ports.values()) == [WORKER_POOL_PORT]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = pool[probe]["tcpSocket"]["port"]
        assert ports.get(port, port) == WORKER_POOL_PORT, probe
    image = cpu_image_runtime()
    # `python` is the image's venv (PATH), and no ENTRYPOINT prefixes the command
    assert image["env"]["PATH"].split(":")[0] == f"{image['env']['VIRTUAL_ENV']}/bin", image["env"]
    assert not image["entrypoint"]
    # the image's user: the one the augment KFP task runs as, so either's files in the shared folder are the other's
    sc = pool["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (image["user"], image["group"]) and image["user"] > 0
    # HOME must be writable under the read-only root (the image's /home/kflift is not)
    home = env_of(pool)["HOME"]["value"]
    assert home in mounts(pool) and not mounts(pool)[home].get("readOnly")


@pytest.mark.slow
def test_the_worker_pool_command_serves_its_port(tmp_path):
    """The sidecar's command, run with the project's Python and Beam (the image's pins): it serves
    the port it is given (what the TaskManager and the tcpSocket probes dial), and the flag is the
    one its parser requires."""
    from apache_beam.runners.worker import worker_pool_main  # noqa: F401  (the module the command names)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable] + WORKER_POOL_COMMAND[1:-1] + [f"--service_port={port}"]
    assert WORKER_POOL_COMMAND[-1].startswith("--service_port=")
    log = (tmp_path / "pool.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "pool.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"not listening:\n{(tmp_path / 'pool.log').read_text()}"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # ... and without the port (a misspelt flag is ignored by its parser) it refuses to start
    bad = subprocess.run([sys.executable] + WORKER_POOL_COMMAND[1:-1] + [f"--port={port}"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and "--service_port" in bad.stderr


def test_the_sidecar_image_is_set_by_kustomize_edit_set_image(rendered, tmp_path):
    """`kustomize edit set image kflift-cpu=NAME:TAG` in an overlay of k8s/beam (what it writes:
    an `images` entry) reaches the sidecar inside the FlinkDeployment, and only it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    repo, _, _ = cpu_image().rpartition(":")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "beam", overlay)],  # kustomize refuses an absolute root
        "images": [{"name": repo, "newName": "registry.example:5000/kflift-cpu", "newTag": "0123abcd"}]}))
    proc = run([tool("kubectl"), "kustomize", overlay])
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sidecar(docs)["image"] == "registry.example:5000/kflift-cpu:0123abcd"

    def others(ds):
        return sorted(c["image"] for _, spec, _ in pod_specs(ds) for c in containers(spec)
                      if "image" in c and c["name"] != "beam-worker-pool")
    assert others(docs) == others(rendered["beam"]) and others(docs)
    fd, before = one(docs, "FlinkDeployment", FLINK), one(rendered["beam"], "FlinkDeployment", FLINK)
    assert fd["spec"]["image"] == before["spec"]["image"]


def test_the_workers_share_the_transform_folder_with_augment(rendered):
    """The worker pool mounts the claim kflift-transform read-write at /kflift-transform: the claim
    and path that k8s/README.md's `--set` give the augment KFP task (config checked by kflift)."""
    from kflift.pipeline.config import load_config

    pool = sidecar(rendered["beam"])
    tm = flink_pods(rendered["beam"])["taskmanager"]["spec"]
    mount = mounts(pool)[TRANSFORM_PATH]
    assert claims(tm)[mount["name"]] == TRANSFORM_CLAIM
    [volume] = [v for v in tm["volumes"] if v["name"] == mount["name"]]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), "tf.Transform writes"
    assert "subPath" not in mount and "subPathExpr" not in mount, "the same folder as augment's, not a part"
    # the kind claim beside the workers is ReadWriteMany
    pvc = [d for d in rendered["storage/kind"] if d["kind"] == "PersistentVolumeClaim"
           and d["metadata"]["name"] == TRANSFORM_CLAIM and d["metadata"]["namespace"] == NAMESPACE]
    assert len(pvc) == 1 and pvc[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    # the documented pipeline settings name the same claim and path
    doc = readme_section()
    sets = re.findall(r"--set ((?:augment\.transform_temp|cluster\.transform_pvc)=\S+)", doc)
    assert len(sets) == 2 and len({s.split("=")[0] for s in sets}) == 2, sets
    cfg = load_config(overrides=sets)
    assert (cfg.augment.transform_temp, cfg.cluster.transform_pvc) == (TRANSFORM_PATH, TRANSFORM_CLAIM)


def test_kind_transform_volume_is_one_node_folder_bound_per_namespace(rendered):
    """k8s/storage/kind: a claim kflift-transform in kflift-beam (the workers) and in kubeflow (the
    augment tasks), each pre-bound both ways to its own hostPath PV, ReadWriteMany, both PVs on the
    same node folder; and k8s/README.md makes that folder for the workers' and the tasks' user."""
    docs = rendered["storage/kind"]
    pvcs = {d["metadata"]["namespace"]: d for d in docs
            if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == TRANSFORM_CLAIM}
    assert sorted(pvcs) == sorted([NAMESPACE, KFP_NAMESPACE])
    pvs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolume"}
    assert len(pvs) == 2
    bound = set()
    for ns, pvc in pvcs.items():
        pv = pvs[pvc["spec"]["volumeName"]]
        bound.add(pv["metadata"]["name"])
        assert "namespace" not in pv["metadata"], "a PersistentVolume is cluster-scoped"
        # bound both ways, outside every storage class: no provisioner hands the claim a volume of its own
        assert pv["spec"]["claimRef"] == {"namespace": ns, "name": TRANSFORM_CLAIM}, ns
        assert pv["spec"]["storageClassName"] == "" and pvc["spec"]["storageClassName"] == "", ns
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and "ReadWriteMany" in pv["spec"]["accessModes"], ns
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain", "hostPath volumes are not deletable"
        request, capacity = pvc["spec"]["resources"]["requests"]["storage"], pv["spec"]["capacity"]["storage"]
        assert request.endswith("Gi") and capacity.endswith("Gi") and int(request[:-2]) <= int(capacity[:-2]), ns
    assert bound == set(pvs), "each PV binds one claim"
    [host] = {json.dumps(pv["spec"]["hostPath"], sort_keys=True) for pv in pvs.values()}
    host = json.loads(host)
    assert host["path"].startswith("/") and host["path"] != "/"
    assert host["type"] in ("Directory", "DirectoryOrCreate")
    # the node folder: made before the pods mount it, owned by the user the workers and the tasks run as
    # (the kubelet would make it root:root 0755, and applies no fsGroup to a hostPath volume)
    pool = sidecar(rendered["beam"])["securityContext"]
    image = cpu_image_runtime()
    match = re.search(r"docker exec kflift-control-plane install -d -o (\d+) -g (\d+) -m (0?[0-7]{3}) (\S+)",
                      readme_section())
    assert match, "k8s/README.md does not make the transform folder on the kind node"
    uid, gid, mode, path = int(match[1]), int(match[2]), int(match[3], 8), match[4]
    assert path == host["path"]
    assert uid == pool["runAsUser"] == image["user"] and gid == pool["runAsGroup"] == image["group"]
    assert mode & 0o700 == 0o700, "the owner must read, write and enter it"


def test_the_worker_environment_is_what_boto3_reads(rendered):
    """boto3 (in the tools venv) given the sidecar's S3 variables and no S3 option, as Beam's S3
    client builds it (apache_beam/io/aws/clients/s3/boto3_client.py: every s3_* option None): the
    MinIO Service, path-style bucket addressing, the region and the Secret's keys."""
    docs = rendered["beam"] + rendered["storage/kind"]
    env = env_of(sidecar(rendered["beam"]))
    variables = {n: e["value"] for n, e in env.items() if "value" in e}
    variables |= {"AWS_ACCESS_KEY_ID": "test-access", "AWS_SECRET_ACCESS_KEY": "test-secret"}  # from the Secret
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {n for n, e in env.items() if "valueFrom" in e}
    code = ("import json, boto3; s = boto3.session.Session(); c = s.client(service_name='s3', region_name=None, "
            "api_version=None, use_ssl=True, verify=None, endpoint_url=None, aws_access_key_id=None, "
            "aws_secret_access_key=None, aws_session_token=None); k = s.get_credentials(); "
            "print(json.dumps([c.meta.region_name, k.access_key, k.secret_key, "
            "c.generate_presigned_url('get_object', Params={'Bucket': 'kflift-data', 'Key': 'a/b.png'})]))")
    proc = run(["env", "-i", "HOME=/nonexistent", *[f"{k}={v}" for k, v in variables.items()],
                tool("python"), "-c", code])
    assert proc.returncode == 0, proc.stderr
    region, access, secret, url = json.loads(proc.stdout)
    svc = one(docs, "Service", "kflift-minio")
    assert url.startswith(f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}:"
                          f"{svc['spec']['ports'][0]['port']}/kflift-data/a/b.png?"), url
    assert region == variables["AWS_REGION"] == variables["AWS_DEFAULT_REGION"]
    assert (access, secret) == ("test-access", "test-secret")


def test_network_policies_admit_exactly_the_beam_traffic(rendered):
    docs = rendered["beam"] + rendered["storage/kind"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "no default-deny ingress policy"
    pods = flink_pods(rendered["beam"])
    jm, tm = (pods[r]["metadata"]["labels"] for r in ("jobmanager", "taskmanager"))
    jobserver = one(docs, "Deployment", "kflift-beam-jobserver")["spec"]["template"]["metadata"]["labels"]
    minio = one(docs, "Deployment", "kflift-minio")["spec"]["template"]["metadata"]["labels"]
    buckets = one(docs, "Job", "kflift-minio-buckets")["spec"]["template"]["metadata"]["labels"]
    stage_pod = {"workflows.argoproj.io/workflow": "kflift-abc"}  # a KFP stage pod: no kflift label

    def ns(name: str, **labels: str) -> dict:
        return {"kubernetes.io/metadata.name": name, **labels}

    def admitted(target: dict, port: int, source_ns: dict, source: dict) -> bool:
        """NetworkPolicy semantics: a peer without namespaceSelector is the policy's own namespace."""
        for p in policies:
            if not selects(p["spec"]["podSelector"], target) or not p["spec"].get("ingress"):
                continue
            for rule in p["spec"]["ingress"]:
                if port not in [x["port"] for x in rule.get("ports", [])]:
                    continue
                for peer in rule["from"]:
                    in_ns = (selects(peer["namespaceSelector"], source_ns) if "namespaceSelector" in peer
                             else source_ns["kubernetes.io/metadata.name"] == NAMESPACE)
                    if in_ns and selects(peer.get("podSelector"), source):
                        return True
        return False

    here, kubeflow, mallory = ns(NAMESPACE), ns("kubeflow"), ns("mallory")
    # augment (KFP standalone, a profile namespace, a kflift pod anywhere) -> job server; no one else
    for port in (8099, 8098):
        assert admitted(jobserver, port, kubeflow, stage_pod)
        assert admitted(jobserver, port, ns("alice", **{"app.kubernetes.io/part-of": "kubeflow-profile"}), stage_pod)
        assert admitted(jobserver, port, mallory, {"app.kubernetes.io/part-of": "kflift"})
        assert not admitted(jobserver, port, mallory, stage_pod)
    assert not admitted(jobserver, 8097, kubeflow, stage_pod), "the expansion service stays closed"
    # job server and operator -> JobManager REST; TaskManagers -> JobManager RPC and blobs
    assert admitted(jm, FLINK_REST_PORT, here, jobserver)
    operator = {"app.kubernetes.io/name": "flink-kubernetes-operator"}
    assert admitted(jm, FLINK_REST_PORT, ns(OPERATOR_NAMESPACE), operator)
    assert not admitted(jm, FLINK_REST_PORT, kubeflow, stage_pod)
    assert not admitted(jm, FLINK_REST_PORT, here, tm)
    cfg = one(docs, "FlinkDeployment", FLINK)["spec"]["flinkConfiguration"]
    for key in ("jobmanager.rpc.port", "blob.server.port"):
        assert admitted(jm, int(cfg[key]), here, tm) and not admitted(jm, int(cfg[key]), here, jobserver), key
    for key in ("taskmanager.rpc.port", "taskmanager.data.port"):
        port = int(cfg[key])
        assert admitted(tm, port, here, jm) and admitted(tm, port, here, tm), key
        assert not admitted(tm, port, here, jobserver) and not admitted(tm, port, kubeflow, stage_pod), key
    # MinIO: the Beam workers, the bucket Job and augment's namespaces; not kflift pods elsewhere
    assert admitted(minio, 9000, here, tm) and admitted(minio, 9000, here, buckets)
    assert admitted(minio, 9000, kubeflow, stage_pod)
    assert not admitted(minio, 9000, mallory, {"app.kubernetes.io/part-of": "kflift"})
    assert not admitted(minio, 9000, mallory, stage_pod)
    assert not admitted(minio, 9001, kubeflow, stage_pod), "the console is for port-forwards only"


def test_readme_apply_order_and_operator_install():
    """The documented steps name these targets in an order that works: the namespace before the
    operator's chart (which puts `flink` there), the Secret before the pods that read it, the
    namespace's default-deny policy (k8s/beam) before MinIO."""
    doc = readme_section()
    steps = ["kubectl apply -f k8s/beam/namespace.yaml", "helm install flink-kubernetes-operator",
             "create secret generic kflift-minio", "kubectl kustomize k8s/beam", "docker exec kflift-control-plane",
             "kubectl apply -k k8s/storage/kind"]
    at = [doc.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
    # k8s/beam is applied with the CPU image's tag as loaded into kind (the sed replaces the sidecar's image)
    assert re.search(rf"kubectl kustomize k8s/beam \| sed \"s\|{re.escape(cpu_image())}\|\$\(.*kflift images tags", doc)
    assert f"--namespace {OPERATOR_NAMESPACE}" in doc and "watchNamespaces={" + NAMESPACE + "}" in doc
    assert "flink-kubernetes-operator-1.15.0" in doc, "the operator release whose CRD the test checks"
