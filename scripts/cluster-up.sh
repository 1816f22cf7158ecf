#!/usr/bin/env bash
# Bring up a local kind cluster with Kubeflow Pipelines (standalone, pinned) and the kflift MLflow
# stack, optionally with a host folder of images as the PVC `kflift-data`, then print the submit
# command and the two UI URLs. Needs internet, docker, kind and kubectl. Re-runnable.
#
# Usage: scripts/cluster-up.sh [--data HOST_DIR] [--print-kind-config]
#   --data HOST_DIR      mount HOST_DIR read-only into the kind node (/kflift-data) and apply the
#                        PV + PVC `kflift-data` (namespace kubeflow, k8s/data/kind); pipeline pods
#                        then see it at /data. Only when the cluster is created.
#   --print-kind-config  print the kind cluster config (ports, --data mount) and exit
#
# Environment (defaults in brackets):
#   CLUSTER_NAME [kflift]       kind cluster name
#   KFP_VERSION  [2.17.0]       Kubeflow Pipelines manifests tag (backend matching the kfp SDK 2.17)
#   MLFLOW_PORT  [5000]         host port of the MLflow UI (127.0.0.1 only; macOS: 5000 is AirPlay)
#   KFP_PORT     [8080]         host port of the KFP UI and API
#   GPU          [0]            1 = also build and load the GPU image (train/finetune on GPU nodes);
#                               0 = CPU-only cluster: no GPU image, submit with resources.gpu_limit=0
#   SKIP_BUILD   [0]            1 = do not build, load the images of the last `kflift images build`
#   SKIP_KFP     [0]            1 = do not install Kubeflow Pipelines
#   DRY_RUN      [0]            1 = print every command, run none (no tools needed)
#   MLFLOW_IMAGE [kflift-mlflow:3.17.2]   KFLIFT [.venv/bin/kflift]
set -euo pipefail
# Bash 3.2 compatible (macOS /bin/bash): no mapfile, no associative arrays.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-kflift}"
KFP_VERSION="${KFP_VERSION:-2.17.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
KFP_PORT="${KFP_PORT:-8080}"
GPU="${GPU:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SKIP_KFP="${SKIP_KFP:-0}"
DRY_RUN="${DRY_RUN:-0}"
MLFLOW_IMAGE="${MLFLOW_IMAGE:-kflift-mlflow:3.17.2}"
KFLIFT="${KFLIFT:-.venv/bin/kflift}"
KIND_NODE_IMAGE=kindest/node:v1.33.1
NAMESPACE=kflift
MLFLOW_NODEPORT=30500        # k8s/components/nodeport
KFP_UI_NODEPORT=30080        # ml-pipeline-ui is patched onto it below
NODE_DATA_PATH=/kflift-data  # k8s/data/base/volume.yaml hostPath
KFP_MANIFESTS=github.com/kubeflow/pipelines/manifests/kustomize
DATA_DIR=""
PRINT_KIND_CONFIG=0

die() { printf 'cluster-up: %s\n' "$*" >&2; exit 1; }
log() { printf '\n==> %s\n' "$*"; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ $# -ge 2 ] || die "--data needs a directory"; DATA_DIR="$2"; shift 2 ;;
    --data=*) DATA_DIR="${1#--data=}"; shift ;;
    --print-kind-config) PRINT_KIND_CONFIG=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (usage: scripts/cluster-up.sh [--data HOST_DIR] [--print-kind-config])" ;;
  esac
done

if [ -n "$DATA_DIR" ]; then
  [ -d "$DATA_DIR" ] || die "--data $DATA_DIR: no such directory"
  DATA_DIR="$(cd "$DATA_DIR" && pwd)"  # kind needs an absolute host path
fi
for port in "$MLFLOW_PORT" "$KFP_PORT"; do
  if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "MLFLOW_PORT/KFP_PORT must be port numbers, got '$port'"
  fi
done
[ "$MLFLOW_PORT" != "$KFP_PORT" ] || die "MLFLOW_PORT and KFP_PORT are both $KFP_PORT"

# Print a command as `+ cmd args` (quoted only where the shell needs it), then run it unless DRY_RUN=1.
# Quotes are escaped with sed: ${var//\'/...} treats backslashes differently across bash 3.2 - 5.2.
show() {
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line="$line $arg"
    else
      line="$line '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
    fi
  done
  printf '%s\n' "$line"
}
run() {
  show "$@"
  if [ "$DRY_RUN" != "1" ]; then "$@"; fi
}
# Same, for a command reading its stdin: a dry run shows the input as a here-document.
run_with_input() {
  if [ "$DRY_RUN" = "1" ]; then
    printf "%s <<'EOF'\n" "$(show "$@")"
    cat
    printf 'EOF\n'
  else
    show "$@"
    "$@"
  fi
}

# The host port a kind node maps to a NodePort, or $3 when it maps none.
host_port() {
  local mapped
  mapped="$(docker port "$1" "$2/tcp" 2>/dev/null | head -n1)" || true
  if [ -n "$mapped" ]; then echo "${mapped##*:}"; else echo "$3"; fi
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed or not on PATH. $2"
}

# The kind cluster config: host ports and the data mount are only settable at creation.
# k8s/overlays/kind/kind-cluster.yaml is this output with the defaults (tests/test_cluster_up.py).
kind_config() {
  cat <<EOF
# kind cluster for kflift: \`kind create cluster --config k8s/overlays/kind/kind-cluster.yaml\`
# This is \`scripts/cluster-up.sh --print-kind-config\`; the script itself applies MLFLOW_PORT,
# KFP_PORT and --data (a read-only mount of the data folder) to it.
# Not a Kubernetes object: this file is not listed in kustomization.yaml.
# Host ports are bound to 127.0.0.1 only:
#   localhost:${MLFLOW_PORT} -> MLflow   (NodePort ${MLFLOW_NODEPORT}, k8s/overlays/kind)
#   localhost:${KFP_PORT} -> KFP UI   (NodePort ${KFP_UI_NODEPORT}, ml-pipeline-ui patched by scripts/cluster-up.sh)
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: ${CLUSTER_NAME}
nodes:
  - role: control-plane
    image: ${KIND_NODE_IMAGE}
    extraPortMappings:
      - containerPort: ${MLFLOW_NODEPORT}
        hostPort: ${MLFLOW_PORT}
        listenAddress: "127.0.0.1"
        protocol: TCP
      - containerPort: ${KFP_UI_NODEPORT}
        hostPort: ${KFP_PORT}
        listenAddress: "127.0.0.1"
        protocol: TCP
EOF
  if [ -n "$DATA_DIR" ]; then
    # YAML single quotes: a path is taken literally ('' is a quote).
    cat <<EOF
    # --data: the host folder, read-only, at the hostPath of k8s/data (PV kflift-data)
    extraMounts:
      - hostPath: '$(printf '%s' "$DATA_DIR" | sed "s/'/''/g")'
        containerPath: ${NODE_DATA_PATH}
        readOnly: true
EOF
  fi
}

if [ "$PRINT_KIND_CONFIG" = "1" ]; then kind_config; exit 0; fi

cd "$REPO"

if [ "$DRY_RUN" = "1" ]; then
  echo "# DRY_RUN=1: commands are printed, not run; a fresh machine is assumed (no cluster yet)."
else
  need docker  "Install Docker: https://docs.docker.com/get-docker/"
  need kind    "Install kind (v0.29 or newer): https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  need kubectl "Install kubectl (1.31 or newer): https://kubernetes.io/docs/tasks/tools/"
  docker info >/dev/null 2>&1 || die "docker is installed but the daemon is not reachable (is it running? may you use it?)"
  command -v "$KFLIFT" >/dev/null 2>&1 || die "$KFLIFT not found: run \`make .venv/bin/.installed\` first"
fi

# ------------------------------------------------------------------ 1. kind cluster
log "kind cluster '${CLUSTER_NAME}'"
# (Outputs are captured before matching: `cmd | grep -q` can fail under pipefail when grep exits first.)
clusters=""
if [ "$DRY_RUN" != "1" ]; then clusters="$(kind get clusters 2>/dev/null)" || true; fi
if printf '%s\n' "$clusters" | grep -qx -- "$CLUSTER_NAME"; then
  echo "already exists, reusing it (its ports and mounts are those it was created with)"
  node="${CLUSTER_NAME}-control-plane"
  if [ -n "$DATA_DIR" ]; then
    mounts="$(docker inspect -f '{{range .Mounts}}{{.Destination}} {{end}}' "$node")"
    case " $mounts " in
      *" $NODE_DATA_PATH "*) ;;
      *) die "cluster '$CLUSTER_NAME' was created without --data; a kind mount is set only at creation: kind delete cluster --name $CLUSTER_NAME, then rerun" ;;
    esac
  fi
  # The URLs printed at the end are the ports this cluster really maps (kept when it maps none).
  MLFLOW_PORT="$(host_port "$node" "$MLFLOW_NODEPORT" "$MLFLOW_PORT")"
  KFP_PORT="$(host_port "$node" "$KFP_UI_NODEPORT" "$KFP_PORT")"
else
  kind_config | run_with_input kind create cluster --name "$CLUSTER_NAME" --config - --wait 120s
fi
run kubectl config use-context "kind-${CLUSTER_NAME}"

# ------------------------------------------------------------------ 2. Kubeflow Pipelines
if [ "$SKIP_KFP" != "1" ]; then
  log "Kubeflow Pipelines ${KFP_VERSION} (standalone)"
  run kubectl apply -k "${KFP_MANIFESTS}/cluster-scoped-resources?ref=${KFP_VERSION}"
  run kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
  run kubectl apply -k "${KFP_MANIFESTS}/env/platform-agnostic?ref=${KFP_VERSION}"
  # The UI (which also proxies the API for `kflift submit`) on the NodePort the kind config maps.
  run kubectl -n kubeflow patch service ml-pipeline-ui --type merge \
    -p "{\"spec\":{\"type\":\"NodePort\",\"ports\":[{\"name\":\"http\",\"port\":80,\"targetPort\":3000,\"nodePort\":${KFP_UI_NODEPORT}}]}}"
fi

# ------------------------------------------------------------------ 3. images
# Every build tags the stage images :<build hash>, so a node never keeps stale code under a
# reused tag; `kflift images tags` prints the names of the last build, and compile/submit use them.
if [ "$GPU" = "1" ]; then flavor=all; else flavor=cpu; fi
if [ "$SKIP_BUILD" != "1" ]; then
  log "building images (--flavor ${flavor})"
  run "$KFLIFT" images build --flavor "$flavor"
  run docker build -f containers/Dockerfile.mlflow -t "$MLFLOW_IMAGE" .
fi
log "loading images into kind"
show "$KFLIFT" images tags
images=()
if [ "$DRY_RUN" = "1" ]; then
  images=("kflift-cpu:BUILD_HASH")
  if [ "$GPU" = "1" ]; then images+=("kflift-gpu:BUILD_HASH"); fi
else
  tags="$("$KFLIFT" images tags)" || die "\`$KFLIFT images tags\` failed: build the images first (unset SKIP_BUILD)"
  while IFS= read -r image; do
    [ -n "$image" ] || continue
    # CPU mode: a GPU image left over from an earlier GPU=1 build is not loaded (GBs, unused).
    case "$GPU:$image" in 0:*kflift-gpu:*) echo "CPU mode: not loading $image"; continue ;; esac
    images+=("$image")
  done <<<"$tags"
  [ "${#images[@]}" -gt 0 ] || die "\`$KFLIFT images tags\` printed no image: build them first (unset SKIP_BUILD)"
fi
run kind load docker-image --name "$CLUSTER_NAME" "${images[@]}" "$MLFLOW_IMAGE"

# ------------------------------------------------------------------ 4. MLflow + PostgreSQL
log "MLflow + PostgreSQL (k8s/overlays/kind)"
run kubectl apply -f k8s/base/namespace.yaml
if [ "$DRY_RUN" != "1" ] && kubectl -n "$NAMESPACE" get secret kflift-postgres >/dev/null 2>&1; then
  echo "secret kflift-postgres exists, keeping it"
else
  # The password is generated here and never printed (so the shown command is literal).
  # shellcheck disable=SC2016
  show kubectl -n "$NAMESPACE" create secret generic kflift-postgres \
    --from-literal=username=mlflow '--from-literal=password=$(openssl rand -hex 24)'
  if [ "$DRY_RUN" != "1" ]; then
    need openssl "It generates the database password."
    kubectl -n "$NAMESPACE" create secret generic kflift-postgres \
      --from-literal=username=mlflow --from-literal=password="$(openssl rand -hex 24)"
  fi
fi
run kubectl apply -k k8s/overlays/kind
run kubectl -n "$NAMESPACE" rollout status statefulset/kflift-postgres --timeout=300s
run kubectl -n "$NAMESPACE" rollout status deployment/kflift-mlflow --timeout=600s

# ------------------------------------------------------------------ 5. data volume
if [ -n "$DATA_DIR" ]; then
  log "data volume kflift-data (${DATA_DIR} -> ${NODE_DATA_PATH} in the node, /data in the pods)"
  # In namespace kubeflow, where KFP standalone runs the pipeline's pods.
  run kubectl apply -k k8s/data/kind
fi

if [ "$SKIP_KFP" != "1" ]; then
  log "waiting for Kubeflow Pipelines"
  if ! run kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=900s; then
    echo "warning: some Kubeflow Pipelines deployments are not available yet (kubectl -n kubeflow get pods)" >&2
  fi
fi

# ------------------------------------------------------------------ the next step
submit="$KFLIFT submit --host http://localhost:${KFP_PORT}"
if [ -n "$DATA_DIR" ]; then
  submit="$submit --set cluster.data_pvc=kflift-data --data-dir /data"
else
  submit="$submit --set cluster.data_pvc=CLAIM --data-dir /data/FOLDER"
fi
if [ "$GPU" != "1" ]; then submit="$submit --set resources.gpu_limit=0"; fi

cat <<MSG

kflift cluster '${CLUSTER_NAME}' is up.
  KFP UI:     http://localhost:${KFP_PORT}
  MLflow UI:  http://localhost:${MLFLOW_PORT}

Submit a run (it logs to the in-cluster MLflow, http://kflift-mlflow.${NAMESPACE}:5000, by default):
  ${submit}
MSG
if [ -n "$DATA_DIR" ]; then
  echo "  (/data is ${DATA_DIR}; a sub-folder of it is /data/SUB)"
else
  echo "  (no --data: give the pipeline a claim with the images, or recreate the cluster with --data HOST_DIR)"
fi
if [ "$GPU" != "1" ]; then
  echo "  (CPU-only cluster: no GPU image was loaded; GPU=1 builds and loads it)"
fi
cat <<MSG
Tear down:  kind delete cluster --name ${CLUSTER_NAME}
MSG
