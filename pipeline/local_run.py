"""Run the pipeline on this machine with kfp.local, tracked under one MLflow parent run."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from kflift.components import tracking
from kflift.components.data import DataError, list_images, write_digits_folder, write_json
from kflift.pipeline.config import Config


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names it and where its log is."""


def resolve_data(cfg: Config) -> tuple[str, str]:
    """The target and transfer-source folders, checked before anything runs."""
    output = Path(cfg.output).resolve()
    data_dir = Path(cfg.data).resolve() if cfg.data else write_digits_folder(output / "datasets" / "digits")
    tx = cfg.transfer
    list_images(data_dir, exclude=tx.source_classes if tx.weights == "pipeline" else None)
    if tx.weights == "pipeline":
        if tx.source_dir:
            list_images(tx.source_dir)
        else:
            list_images(data_dir, include=tx.source_classes)
    return str(data_dir), str(Path(tx.source_dir).resolve()) if tx.source_dir else str(data_dir)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_local(cfg: Config, runner: str = "subprocess") -> dict:
    """Execute the whole DAG locally; returns the summary (also written as summary.json)."""
    import kfp.local

    from kflift.pipeline.pipeline import make_pipeline

    client = docker_engine(cfg) if runner == "docker" else None  # before anything is written or tracked
    output = Path(cfg.output).resolve()
    tracking_uri = cfg.tracking_uri or tracking.default_tracking_uri(output)
    tracking.check_server(tracking_uri)  # a dead server fails fast, before any data or run folder is written
    data_dir, source_dir = resolve_data(cfg)
    if client is not None:
        kfp_runner = docker_runner(client, [output], [data_dir, source_dir], tracking_uri)
    else:
        kfp_runner = kfp.local.SubprocessRunner(use_venv=False)
    run_id = new_run_id()
    print(f"run id: {run_id}", flush=True)
    parent = tracking.start_parent_run(tracking_uri, cfg.experiment, run_id,
                                       {"data": data_dir, **cfg.model_dump(mode="json", exclude={"data"})})
    run_dir = output / "runs" / run_id  # made once the parent run exists: a store error leaves no folder
    run_dir.mkdir(parents=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the stages' logs without TF's C++ chatter
    kfp.local.init(runner=kfp_runner, pipeline_root=str(run_dir / "kfp"))
    start = time.time()
    try:
        task = make_pipeline(cfg)(data_dir=data_dir, source_dir=source_dir, tracking_uri=tracking_uri,
                                        parent_run_id=parent, run_id=run_id)
    except BaseException as exc:
        tracking.end_run(tracking_uri, parent, "FAILED")
        failed = [s for s, r in tracking.stage_runs(tracking_uri, parent).items() if r["status"] == "FAILED"]
        raise StageFailed(f"stage {', '.join(failed) or '(unknown)'} failed: {exc}. Its log is above; "
                          f"outputs so far are under {run_dir}") from None
    wall = time.time() - start
    runs = tracking.stage_runs(tracking_uri, parent)
    failed = [s for s, r in runs.items() if r["status"] != "FINISHED"]
    if failed:  # KFP's DockerRunner may report a removed container's failure as success
        tracking.end_run(tracking_uri, parent, "FAILED")
        raise StageFailed(f"stage {', '.join(failed)} failed. Its log is above; outputs so far are under {run_dir}")
    evaluation = Path(task.output.path)
    report = json.loads((evaluation / "report.json").read_text())
    stages = {s: r["metrics"].get(tracking.PROCESS_SECONDS) for s, r in runs.items()}
    summary = {
        "run_id": run_id,
        "mlflow_run_id": parent,
        "tracking_uri": tracking_uri,
        "data": data_dir,
        "stages": stages,
        "stage_work_seconds": {s: r["metrics"].get(tracking.STAGE_SECONDS) for s, r in runs.items()},
        "wall_seconds": wall,
        "orchestration_overhead": (wall - sum(v or 0 for v in stages.values())) / wall,
        "candidates": report["candidates"],
        "gate": report["gate"],
        "winner": report["winner"],
        "champion_model": str(evaluation / "champion") if report["winner"] else None,
        "serving": str(run_dir / "serving") if report["winner"] else None,
    }
    if report["winner"]:
        shutil.copytree(evaluation / "serving", run_dir / "serving")
    write_json(run_dir / "summary.json", summary)
    tracking.log_summary(tracking_uri, parent, run_dir / "summary.json",
                         {"wall_seconds": wall, **{f"{report['winner']}.{k}": v for k, v in
                                                   report["candidates"].get(report["winner"] or "", {}).items()}})
    tracking.end_run(tracking_uri, parent, "FINISHED")
    summary["path"] = str(run_dir / "summary.json")
    return summary


def docker_engine(cfg: Config):
    """The engine for --runner docker, once it holds the configured images (else ImageError)."""
    from kflift.pipeline.images import ImageError, engine, missing_images

    client = engine()
    missing = missing_images(client, {cfg.images.cpu, cfg.images.gpu})
    if missing:
        raise ImageError(f"image {', '.join(missing)} is not in the Docker engine; build it with "
                         f"`kflift images build` (same --config/--set images.* as this run)")
    return client


def docker_runner(client, writable: list[Path], readable: list[str], tracking_uri: str):
    """kfp.local.DockerRunner: stages run as this user, see the host paths they need at the same
    paths, reach a loopback MLflow server (host network) and get the GPUs when the engine has them."""
    import docker
    import kfp.local

    store = None
    if tracking_uri.startswith("sqlite:///"):  # the database and the artifacts beside it
        store = Path(tracking_uri[len("sqlite:///"):]).parent
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        store = Path(tracking_uri.removeprefix("file://")).resolve()
    paths = {Path(p).resolve(): False for p in readable}
    paths.update({Path(p).resolve(): True for p in writable + ([store] if store else [])})
    mounts = [docker.types.Mount(target=str(p), source=str(p), type="bind", read_only=not rw)
              for p, rw in sorted(paths.items())
              if not any(p != q and p.is_relative_to(q) and (qrw or not rw) for q, qrw in paths.items())]
    args = dict(user=f"{os.getuid()}:{os.getgid()}", network_mode="host", mounts=mounts,
                environment={"HOME": "/tmp", "TF_CPP_MIN_LOG_LEVEL": "2"})
    if host_gpus(client):
        args["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    print(f"docker runner: user {args['user']}, host network, "
          f"{'all GPUs' if 'device_requests' in args else 'no GPU'}, mounts "
          f"{', '.join(m['Target'] + (' (ro)' if m['ReadOnly'] else '') for m in mounts)}", flush=True)
    return kfp.local.DockerRunner(**args)


def host_gpus(client) -> bool:
    """An NVIDIA GPU on the host and an engine that can hand it to containers (nvidia runtime/hook)."""
    runtimes = client.info().get("Runtimes") or {}
    if "nvidia" not in runtimes and not shutil.which("nvidia-container-runtime-hook"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    import subprocess

    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    return listed.returncode == 0 and "GPU" in listed.stdout


__all__ = ["DataError", "StageFailed", "resolve_data", "run_local"]
