#!/usr/bin/env bash
# Bring up a local kind cluster with Kubeflow Pipelines (standalone) and the kflift MLflow stack,
# then print the two UI URLs. Needs internet, docker, kind and kubectl. Re-runnable.
#
# Environment (defaults in brackets):
#   CLUSTER_NAME [kflift]       kind cluster name (must match k8s/overlays/kind/kind-cluster.yaml)
#   KFP_VERSION  [2.5.0]        Kubeflow Pipelines manifests tag
#   VERSION      [0.1.0]        kflift image tag; MLFLOW_IMAGE [kflift-mlflow:3.17.2]
#   SKIP_BUILD   [0]            1 = images are already built, only load them
#   SKIP_KFP     [0]            1 = do not install Kubeflow Pipelines
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-kflift}"
KFP_VERSION="${KFP_VERSION:-2.5.0}"
VERSION="${VERSION:-0.1.0}"
CPU_IMAGE="${CPU_IMAGE:-kflift-cpu:${VERSION}}"
GPU_IMAGE="${GPU_IMAGE:-kflift-gpu:${VERSION}}"
MLFLOW_IMAGE="${MLFLOW_IMAGE:-kflift-mlflow:3.17.2}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SKIP_KFP="${SKIP_KFP:-0}"
NAMESPACE=kflift
KFP_UI_NODEPORT=30080

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed or not on PATH. $2"
}
need docker  "Install Docker: https://docs.docker.com/get-docker/"
need kind    "Install kind (v0.29 or newer): https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "Install kubectl (1.31 or newer): https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 || die "docker is installed but the daemon is not reachable (is it running? may you use it?)"

cd "$REPO"

log "kind cluster '${CLUSTER_NAME}'"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  echo "already exists, reusing it"
else
  kind create cluster --name "$CLUSTER_NAME" --config k8s/overlays/kind/kind-cluster.yaml --wait 120s
fi
kubectl config use-context "kind-${CLUSTER_NAME}" >/dev/null

if [ "$SKIP_BUILD" != "1" ]; then
  log "building images"
  docker build -f containers/Dockerfile -t "$CPU_IMAGE" .
  docker build -f containers/Dockerfile -t "$GPU_IMAGE" \
    --build-arg FLAVOR=gpu --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu .
  docker build -f containers/Dockerfile.mlflow -t "$MLFLOW_IMAGE" .
fi

log "loading images into kind"
kind load docker-image --name "$CLUSTER_NAME" "$CPU_IMAGE" "$GPU_IMAGE" "$MLFLOW_IMAGE"

if [ "$SKIP_KFP" != "1" ]; then
  log "Kubeflow Pipelines ${KFP_VERSION} (standalone)"
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${KFP_VERSION}"
  kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${KFP_VERSION}"
  # Expose the UI on the NodePort that kind-cluster.yaml maps to localhost:8080.
  kubectl -n kubeflow patch service ml-pipeline-ui --type merge \
    -p "{\"spec\":{\"type\":\"NodePort\",\"ports\":[{\"name\":\"http\",\"port\":80,\"targetPort\":3000,\"nodePort\":${KFP_UI_NODEPORT}}]}}"
fi

log "MLflow + PostgreSQL (k8s/overlays/kind)"
kubectl apply -f k8s/base/namespace.yaml
if kubectl -n "$NAMESPACE" get secret kflift-postgres >/dev/null 2>&1; then
  echo "secret kflift-postgres exists, keeping it"
else
  need openssl "It generates the database password."
  kubectl -n "$NAMESPACE" create secret generic kflift-postgres \
    --from-literal=username=mlflow --from-literal=password="$(openssl rand -hex 24)"
fi
kubectl apply -k k8s/overlays/kind

log "waiting for the pods"
kubectl -n "$NAMESPACE" rollout status statefulset/kflift-postgres --timeout=300s
kubectl -n "$NAMESPACE" rollout status deployment/kflift-mlflow --timeout=600s
if [ "$SKIP_KFP" != "1" ]; then
  kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=900s \
    || echo "warning: some Kubeflow Pipelines deployments are not available yet (kubectl -n kubeflow get pods)" >&2
fi

cat <<MSG

kflift cluster '${CLUSTER_NAME}' is up.
  KFP UI:     http://localhost:8080
  MLflow UI:  http://localhost:5000
  In-cluster tracking URI for pipeline runs: http://kflift-mlflow.${NAMESPACE}.svc.cluster.local:5000

Compile and upload a run:  .venv/bin/kflift compile -o pipeline.yaml   (then upload it in the KFP UI)
If a port is taken, use:   kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8081:80
                           kubectl -n ${NAMESPACE} port-forward svc/kflift-mlflow 5001:5000
Tear down:                 kind delete cluster --name ${CLUSTER_NAME}
MSG
