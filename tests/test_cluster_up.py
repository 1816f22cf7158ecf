"""Offline checks of scripts/cluster-up.sh: no Docker engine, kind, kubectl or cluster is used.

The script runs in two ways here: DRY_RUN=1 (it prints every command and runs none), and a full
walk with stand-ins for docker/kind/kubectl/openssl/kflift on PATH that only record their
arguments (so what it would load into kind and what it feeds `kind create cluster` are seen).
shellcheck must be installed (CI's .ci/run installs it); a missing shellcheck FAILS.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s  # the cluster script and its manifests: `make test` runs them

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cluster-up.sh"
KFP_TAG = "2.17.0"
TOOLS = ("docker", "kind", "kubectl", "openssl", "kflift")
# The only programs on PATH besides the stand-ins: a real docker/kind/kubectl is never reachable.
BASICS = ("bash", "dirname", "basename", "cat", "sed", "head", "grep")

# A stand-in tool: records `name args...` in $STUB_LOG; a few answers the script reads.
STUB = r"""#!/usr/bin/env bash
name="$(basename "$0")"
printf '%s %s\n' "$name" "$*" >> "$STUB_LOG"
[ -z "${STUB_FAIL:-}" ] || exit 97
case "$name $*" in
  "kind get clusters") [ -z "${STUB_CLUSTER:-}" ] || echo "$STUB_CLUSTER" ;;
  "kind create cluster"*) cat > "$STUB_DIR/kind-config.yaml" ;;
  "docker inspect"*) echo "${STUB_MOUNTS:-}" ;;
  "docker port kflift-control-plane 30500/tcp") echo "${STUB_MLFLOW_MAP:-}" ;;
  "kflift images build --flavor cpu") printf 'kflift-cpu:0abc\n' > "$STUB_DIR/tags" ;;
  "kflift images build --flavor all") printf 'kflift-cpu:0abc\nkflift-gpu:0abc\n' > "$STUB_DIR/tags" ;;
  "kflift images tags") cat "$STUB_DIR/tags" ;;
  "kubectl -n kflift get secret"*) exit 1 ;;
  "openssl rand"*) echo 5ec7e75ec7e75ec7e7 ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in TOOLS:
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    for name in BASICS:
        (bin_dir / name).symlink_to(shutil.which(name))
    (tmp_path / "log").write_text("")
    return tmp_path


def cluster_up(stubs: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the script with only the stand-ins and the base system on PATH."""
    full_env = {"PATH": str(stubs / "bin"), "HOME": str(stubs), "STUB_DIR": str(stubs),
                "STUB_LOG": str(stubs / "log"), "KFLIFT": str(stubs / "bin" / "kflift"), **env}
    return subprocess.run([shutil.which("bash"), str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=60, cwd=stubs)


def dry_run(stubs: Path, *args: str, **env: str) -> list[str]:
    """The `+ ` command lines of a DRY_RUN=1 run; the stand-ins fail if anything is called."""
    proc = cluster_up(stubs, *args, DRY_RUN="1", STUB_FAIL="1", KFLIFT=".venv/bin/kflift", **env)
    assert proc.returncode == 0, proc.stderr
    assert (stubs / "log").read_text() == "", "a dry run ran a tool"
    return proc.stdout


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def calls(stubs: Path) -> list[str]:
    return (stubs / "log").read_text().splitlines()


def first(lines: list[str], pattern: str) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert hits, f"no line matches {pattern!r} in:\n" + "\n".join(lines)
    return hits[0]


def kind_config(stubs: Path, *args: str, **env: str) -> dict:
    proc = cluster_up(stubs, "--print-kind-config", *args, **env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def host_ports(config: dict) -> dict[int, int]:
    return {m["containerPort"]: m["hostPort"] for n in config["nodes"] for m in n.get("extraPortMappings", [])}


# ----------------------------------------------------------------------------- lint

def test_shellcheck_passes_offline():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.fail("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck; "
                    ".ci/run installs it)", pytrace=False)
    proc = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "set -euo pipefail" in SCRIPT.read_text()


# ----------------------------------------------------------------------------- dry run

def test_dry_run_prints_the_steps_in_order_and_runs_nothing_offline(stubs, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    out = dry_run(stubs, "--data", str(data))
    lines = commands(out)
    order = [
        first(lines, r"^kind create cluster --name kflift --config - "),
        first(lines, rf"^kubectl apply -k '?github\.com/kubeflow/pipelines/manifests/kustomize/"
                     rf"cluster-scoped-resources\?ref={re.escape(KFP_TAG)}'?$"),
        first(lines, rf"^kubectl apply -k '?github\.com/kubeflow/pipelines/manifests/kustomize/"
                     rf"env/platform-agnostic\?ref={re.escape(KFP_TAG)}'?$"),
        first(lines, r"^\.venv/bin/kflift images build "),
        first(lines, r"^kind load docker-image --name kflift "),
        first(lines, r"^kubectl apply -k k8s/overlays/kind$"),
        first(lines, r"^kubectl apply -k k8s/data/kind$"),
    ]
    assert order == sorted(order), "expected: cluster -> KFP -> images -> MLflow -> data volume"
    assert "2.5.0" not in out
    # The password is generated at run time: the dry run shows how, never a value.
    secret = lines[first(lines, r"create secret generic kflift-postgres")]
    assert "$(openssl rand -hex 24)" in secret
    # The final message: both UIs and the submit command with the data claim.
    assert "KFP UI:     http://localhost:8080" in out and "MLflow UI:  http://localhost:5000" in out
    submit = next(line.strip() for line in out.splitlines() if " submit " in line)
    assert submit.startswith(".venv/bin/kflift submit --host http://localhost:8080 ")
    assert "--set cluster.data_pvc=kflift-data --data-dir /data" in submit
    assert "--tracking-uri" not in submit, "the in-cluster MLflow is the default"


def test_cpu_mode_is_the_default_and_never_touches_the_gpu_image_offline(stubs):
    out = dry_run(stubs)
    lines = commands(out)
    assert ".venv/bin/kflift images build --flavor cpu" in lines
    assert not [line for line in lines if "gpu" in line.lower()], "CPU mode builds or loads a GPU image"
    load = lines[first(lines, r"^kind load docker-image ")]
    assert load.split()[5:] == ["kflift-cpu:BUILD_HASH", "kflift-mlflow:3.17.2"]
    assert "--set resources.gpu_limit=0" in out


def test_gpu_1_builds_and_loads_the_gpu_image_offline(stubs):
    out = dry_run(stubs, GPU="1")
    lines = commands(out)
    assert ".venv/bin/kflift images build --flavor all" in lines
    assert "kflift-gpu:BUILD_HASH" in lines[first(lines, r"^kind load docker-image ")]
    assert "resources.gpu_limit=0" not in out


def test_skip_build_loads_without_building_offline(stubs):
    lines = commands(dry_run(stubs, SKIP_BUILD="1"))
    assert not [line for line in lines if " images build" in line or line.startswith("docker build")]
    first(lines, r"^kind load docker-image --name kflift kflift-cpu:BUILD_HASH kflift-mlflow:3\.17\.2$")


def test_printed_commands_are_shell_words_offline(stubs):
    """Every `+ ` line reads back (shell quoting) as the arguments the script passes."""
    lines = commands(dry_run(stubs, MLFLOW_IMAGE="it's odd:1"))
    patch = shlex.split(lines[first(lines, r"^kubectl -n kubeflow patch service ml-pipeline-ui ")])
    assert json.loads(patch[patch.index("-p") + 1])["spec"]["ports"][0]["nodePort"] == 30080
    assert shlex.split(lines[first(lines, r"^docker build ")])[-2] == "it's odd:1"


# ----------------------------------------------------------------------------- full walk on stand-ins

def test_walk_loads_exactly_the_built_tags_offline(stubs, tmp_path):
    """Every step against stand-in tools: kind gets the names `kflift images tags` prints."""
    data = tmp_path / "my images"
    data.mkdir()
    proc = cluster_up(stubs, "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = calls(stubs)
    assert "kflift images build --flavor cpu" in log
    assert "kind load docker-image --name kflift kflift-cpu:0abc kflift-mlflow:3.17.2" in log
    assert log.index("kflift images build --flavor cpu") < log.index("kflift images tags")
    assert "kubectl apply -k k8s/data/kind" in log
    config = yaml.safe_load((stubs / "kind-config.yaml").read_text())
    assert config["nodes"][0]["extraMounts"] == [
        {"hostPath": str(data), "containerPath": "/kflift-data", "readOnly": True}]
    # the generated password reaches kubectl but is never printed
    assert any("--from-literal=password=5ec7e75ec7e75ec7e7" in c for c in log)
    assert "5ec7e75ec7e75ec7e7" not in proc.stdout + proc.stderr


def test_walk_gpu_and_stale_gpu_tag_offline(stubs):
    proc = cluster_up(stubs, GPU="1")
    assert proc.returncode == 0, proc.stderr
    assert "kind load docker-image --name kflift kflift-cpu:0abc kflift-gpu:0abc kflift-mlflow:3.17.2" \
        in calls(stubs)
    # CPU mode after that GPU build, without building: the left-over GPU image stays out of kind.
    (stubs / "log").write_text("")
    proc = cluster_up(stubs, SKIP_BUILD="1")
    assert proc.returncode == 0, proc.stderr
    loads = [c for c in calls(stubs) if c.startswith("kind load")]
    assert loads == ["kind load docker-image --name kflift kflift-cpu:0abc kflift-mlflow:3.17.2"]
    assert not [c for c in calls(stubs) if " images build" in c]


def test_walk_reuses_a_cluster_with_the_ports_it_maps_offline(stubs, tmp_path):
    """An existing cluster is kept; the printed URLs are its real host ports."""
    proc = cluster_up(stubs, STUB_CLUSTER="kflift", STUB_MLFLOW_MAP="127.0.0.1:5001")
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls(stubs) if c.startswith("kind create")]
    assert "MLflow UI:  http://localhost:5001" in proc.stdout
    assert "KFP UI:     http://localhost:8080" in proc.stdout, "no mapping found: the configured port"
    # --data needs the node mount, which kind sets only at creation: one clear line, nothing applied
    (stubs / "log").write_text("")
    data = tmp_path / "images"
    data.mkdir()
    proc = cluster_up(stubs, "--data", str(data), STUB_CLUSTER="kflift", STUB_MOUNTS="/var /lib/modules")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "created without --data" in proc.stderr
    assert not [c for c in calls(stubs) if c.startswith(("kubectl", "kflift"))]
    proc = cluster_up(stubs, "--data", str(data), STUB_CLUSTER="kflift", STUB_MOUNTS="/var /kflift-data")
    assert proc.returncode == 0, proc.stderr
    assert "kubectl apply -k k8s/data/kind" in calls(stubs)


# ----------------------------------------------------------------------------- kind config

def test_data_adds_a_read_only_extra_mount_at_the_pv_path_offline(stubs, tmp_path):
    data = tmp_path / "it's data"  # a quote in the path survives the YAML
    data.mkdir()
    config = kind_config(stubs, "--data", str(data))
    node = config["nodes"][0]
    pv = next(d for d in yaml.safe_load_all((REPO / "k8s/data/base/volume.yaml").read_text())
              if d["kind"] == "PersistentVolume")
    assert node["extraMounts"] == [{"hostPath": str(data), "containerPath": pv["spec"]["hostPath"]["path"],
                                    "readOnly": True}]
    assert "extraMounts" not in kind_config(stubs)["nodes"][0]
    assert "k8s/data/kind" not in dry_run(stubs), "no --data, no data volume"


def test_mlflow_and_kfp_ports_set_the_kind_host_ports_offline(stubs):
    assert host_ports(kind_config(stubs)) == {30500: 5000, 30080: 8080}
    config = kind_config(stubs, MLFLOW_PORT="5001", KFP_PORT="8081")
    assert host_ports(config) == {30500: 5001, 30080: 8081}
    assert all(m["listenAddress"] == "127.0.0.1" for m in config["nodes"][0]["extraPortMappings"])
    out = dry_run(stubs, MLFLOW_PORT="5001", KFP_PORT="8081")
    assert "MLflow UI:  http://localhost:5001" in out and "KFP UI:     http://localhost:8081" in out
    assert "kflift submit --host http://localhost:8081 " in out


def test_committed_kind_config_is_the_scripts_default_offline(stubs):
    proc = cluster_up(stubs, "--print-kind-config")
    assert proc.returncode == 0, proc.stderr
    assert (REPO / "k8s/overlays/kind/kind-cluster.yaml").read_text() == proc.stdout, \
        "regenerate: scripts/cluster-up.sh --print-kind-config > k8s/overlays/kind/kind-cluster.yaml"


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("args, env, words", [
    (["--data", "/nonexistent/kflift-images"], {}, ["--data", "/nonexistent/kflift-images", "no such directory"]),
    ([], {"MLFLOW_PORT": "50x0"}, ["port", "50x0"]),
    ([], {"MLFLOW_PORT": "8080"}, ["MLFLOW_PORT", "KFP_PORT"]),
    (["--bogus"], {}, ["unknown argument", "--bogus"]),
])
def test_bad_input_is_one_clear_line_offline(stubs, args, env, words):
    proc = cluster_up(stubs, *args, **env)
    assert proc.returncode != 0
    assert proc.stdout == "" and calls(stubs) == [], "nothing may run before the input is checked"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cluster-up: ") and all(w in lines[0] for w in words), lines[0]


def test_missing_tools_are_named_offline(stubs):
    (stubs / "bin" / "kind").unlink()
    proc = cluster_up(stubs)
    assert proc.returncode != 0
    assert "'kind' is not installed" in proc.stderr
    assert not [c for c in calls(stubs) if c.startswith(("kubectl", "kflift"))]
