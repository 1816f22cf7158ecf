"""Submit the compiled pipeline to a Kubeflow Pipelines backend with kfp.Client."""
from __future__ import annotations

import json
import posixpath
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..components.sources import is_uri
from .config import Config


class SubmitError(RuntimeError):
    """The KFP host cannot be reached or refuses us; one line for the user."""


def check_host(host: str, token: str | None, timeout: float = 10.0) -> None:
    """Fail fast with a clear message: kfp.Client itself retries for ~25 s on auth errors."""
    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SubmitError(f"KFP host {host} refused the request ({exc.code} {exc.reason}): "
                              "check --token or your access") from None
        raise SubmitError(f"KFP host {host} answered {exc.code} {exc.reason} on /apis/v2beta1/healthz") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(f"KFP host {host} is unreachable: {reason}") from None


def check_data_dir(cfg: Config, path: str, flag: str = "--data-dir") -> None:
    """The pods see data only on the claim mounted at cluster.data_mount, or in an object store (a
    URI such as s3://bucket/images, read with credentials from the pod's environment)."""
    if is_uri(path):
        return
    mount = posixpath.normpath(cfg.cluster.data_mount)
    if not cfg.cluster.data_pvc:
        raise SubmitError(f"{flag} {path}: no data volume is set; name the claim that holds your images "
                          f"(kind/minikube: --set cluster.data_pvc=kflift-data) and give the path under {mount}")
    inside = posixpath.normpath(path) if path.startswith("/") else ""
    if not (inside == mount or inside.startswith(mount.rstrip("/") + "/")):
        raise SubmitError(f"{flag} {path} is not under {mount}, where the pods mount claim "
                          f"{cfg.cluster.data_pvc} (cluster.data_mount)")


def check_tracking_uri(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        raise SubmitError(f"--tracking-uri {uri}: a cluster run needs an MLflow server (http:// or https://); "
                          "a file or SQLite store would vanish with the pod")


def submit(cfg: Config, host: str, data_dir: str, source_dir: str = "", experiment: str = "kflift",
           namespace: str | None = None, token: str | None = None, tracking_uri: str = "",
           run_name: str | None = None) -> tuple[str, str]:
    """Compile with this config and create a run; returns (run id, run URL).

    Tracking defaults to the in-cluster MLflow (cluster.tracking_uri); each KFP run gets its own MLflow
    parent run, found or made by the stages under the KFP run id."""
    import kfp
    from kfp import compiler

    from .pipeline import make_pipeline

    tracking_uri = tracking_uri or cfg.cluster.tracking_uri
    check_tracking_uri(tracking_uri)
    check_data_dir(cfg, data_dir)
    if source_dir:
        check_data_dir(cfg, source_dir, "--source-dir")
    check_host(host, token)
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / "kflift.yaml")
        compiler.Compiler().compile(make_pipeline(cfg), package)
        client = kfp.Client(host=host, namespace=namespace, existing_token=token)
        result = client.create_run_from_pipeline_package(
            package, arguments={"data_dir": data_dir, "source_dir": source_dir or data_dir,
                                "tracking_uri": tracking_uri, "experiment": cfg.experiment},
            run_name=run_name, experiment_name=experiment, namespace=namespace)
    return result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
