"""Run the pipeline on this machine with kfp.local, tracked under one MLflow parent run."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from ..components import tracking
from ..components.sources import DataError, is_uri, list_images, write_digits_folder
from ..components.files import publish_dir, staging_dir, write_json
from .config import NO_SOURCE_NOTE, NO_TRANSFER, Config
from .console import RunConsole


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names it and where its log is."""


def resolve_data(cfg: Config) -> tuple[str, str]:
    """The target and transfer-source folders, checked before anything runs."""
    output = Path(cfg.output).resolve()
    local = lambda path: path if is_uri(path) else Path(path).resolve()  # a URI stays as it is
    data_dir = local(cfg.data) if cfg.data else write_digits_folder(output / "datasets" / "digits")
    tx = cfg.transfer
    list_images(data_dir, exclude=tx.source_classes if tx.weights == "pipeline" else None)
    if tx.weights == "pipeline":
        if tx.source_dir:
            list_images(tx.source_dir)
        else:
            list_images(data_dir, include=tx.source_classes)
    return str(data_dir), str(local(tx.source_dir)) if tx.source_dir else str(data_dir)


CONFIG_FILE = "config.json"
LOG_FILE = "run.log"


def saved_config(run_dir: Path) -> Config:
    """The resolved config a run started with (for --resume)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"cannot resume: {path} not found (is the run id right, and --output the run's?)")
    return Config.model_validate(json.loads(path.read_text()))


def _failure(tracking_uri: str, parent: str, exc: BaseException, log: Path, run_id: str, output: Path) -> str:
    """One message: the failed stage, its input, the cause, where its log is, how to resume. Marks
    the parent run FAILED (its stage run already is)."""
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    where = "stage (unknown)"
    try:
        tracking.end_run(tracking_uri, parent, "FAILED")
        failed = [r for r in tracking.stage_runs(tracking_uri, parent).values() if r["status"] == "FAILED"]
    except tracking.TrackingError as err:  # the store itself is what failed
        failed, cause = [], f"{cause} ({err})"
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; keep the stage's message
        failed, cause = [], f"{cause} (MLflow store {tracking_uri} not usable: {type(err).__name__})"
    if failed:
        tags = failed[-1]["tags"]
        where = f"stage {tags.get(tracking.STAGE_TAG)}"
        if tags.get(tracking.INPUTS_TAG):
            where += f" (input {tags[tracking.INPUTS_TAG]})"
        cause = tags.get(tracking.ERROR_TAG) or cause
    return (f"{where} failed: {cause}. Log: {log}. Fix the cause, then continue with "
            f"`kflift run --resume {run_id} --output {output}`")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_local(cfg: Config, runner: str = "subprocess", cache: bool = True, resume: str | None = None,
              console: RunConsole | None = None) -> dict:
    """Execute the whole DAG locally; returns the summary (also written as summary.json).

    Finished stages come from the step cache under `<output>/cache` (`cache=False` runs every stage
    afresh, still storing the results). `resume` continues that run id in its folder with its saved
    config and MLflow parent run: finished stages are cache hits, training goes on from its last
    checkpoint. `console` shows the stages as they go (default: one on stdout); everything the run
    prints goes to `runs/<run id>/run.log`.
    """
    import kfp.local

    from .pipeline import make_pipeline

    console = console or RunConsole()
    output = Path(cfg.output).resolve()
    if resume:
        run_id, run_dir = resume, output / "runs" / resume
        cfg = saved_config(run_dir)
    else:
        run_id = new_run_id()
        run_dir = output / "runs" / run_id
    cfg = cfg.model_copy(update={"output": str(output)})
    client = docker_engine(cfg) if runner == "docker" else None  # before anything is written or tracked
    tracking_uri = cfg.tracking_uri or tracking.default_tracking_uri(output)
    tracking.check_server(tracking_uri)  # a dead server fails fast, before any data or run folder is written
    data_dir, source_dir = resolve_data(cfg)
    if client is not None:
        kfp_runner = docker_runner(client, [output], [data_dir, source_dir], tracking_uri)
    else:
        kfp_runner = kfp.local.SubprocessRunner(use_venv=False)
    console.say(f"run id: {run_id}")
    if cfg.transfer.weights == NO_TRANSFER:
        console.say(NO_SOURCE_NOTE)
    log = run_dir / LOG_FILE
    with console.capture():  # MLflow's, kfp.local's and every stage's output: into the log
        if resume:
            parent = tracking.resume_parent_run(tracking_uri, cfg.experiment, run_id)
        else:
            parent = tracking.start_parent_run(tracking_uri, cfg.experiment, run_id,
                                               {"data": data_dir, **cfg.model_dump(mode="json", exclude={"data"})})
        run_dir.mkdir(parents=True, exist_ok=bool(resume))  # once the parent run exists: a store error leaves none
        console.log_to(log)
        write_json(run_dir / CONFIG_FILE, cfg.model_dump(mode="json"))  # what --resume runs again
        # Fewer of TensorFlow's C++ lines in the stages' output (its start-up lines before absl's log is
        # initialized, cuInit errors among them, ignore this: they reach run.log, never the console).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        kfp.local.init(runner=kfp_runner, pipeline_root=str(run_dir / "kfp"))
        start = time.time()
        try:
            pipeline = make_pipeline(cfg)
            console.plan(planned_stages(pipeline))
            task = pipeline(data_dir=data_dir, source_dir=source_dir, tracking_uri=tracking_uri,
                            parent_run_id=parent, run_id=run_id, cache_dir=str(output / "cache"),
                            cache_mode="use" if cache else "refresh")
        except BaseException as exc:
            raise StageFailed(_failure(tracking_uri, parent, exc, log, run_id, output)) from None
        wall = time.time() - start
        runs = tracking.stage_runs(tracking_uri, parent)
        failed = [s for s, r in runs.items() if r["status"] != "FINISHED"]
        if failed:  # KFP's DockerRunner may report a removed container's failure as success
            tracking.end_run(tracking_uri, parent, "FAILED")
            raise StageFailed(f"stage {', '.join(failed)} failed. Log: {log}; outputs so far are under {run_dir}")
        evaluation = Path(task.output.path)
        report = json.loads((evaluation / "report.json").read_text())
        stages = {s: r["metrics"].get(tracking.PROCESS_SECONDS) for s, r in runs.items()}
        summary = {
            "run_id": run_id,
            "mlflow_run_id": parent,
            "tracking_uri": tracking_uri,
            "data": data_dir,
            "stages": stages,
            "cached": sorted(s for s, r in runs.items() if tracking.CACHED_FROM_TAG in r["tags"]),
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
            work = staging_dir(run_dir / "serving")
            shutil.copytree(evaluation / "serving", work, dirs_exist_ok=True)
            publish_dir(work, run_dir / "serving")  # replaces a resumed run's earlier copy
        write_json(run_dir / "summary.json", summary)
        tracking.log_summary(tracking_uri, parent, run_dir / "summary.json",
                             {"wall_seconds": wall, **{f"{report['winner']}.{k}": v for k, v in
                                                       report["candidates"].get(report["winner"] or "", {}).items()}})
        tracking.end_run(tracking_uri, parent, "FINISHED")
    summary["path"] = str(run_dir / "summary.json")
    summary["log"] = str(log)
    summary["comparison"] = str(evaluation / "comparison.md")
    return summary


# Stages that name themselves (their component takes no `stage` argument), by kind of task.
SELF_NAMED = {"evaluate": "evaluate", "select-best": "sweep-select"}


def planned_stages(pipeline) -> list[str]:
    """The stage names a pipeline runs, in kfp.local's order: each task's `stage` argument, a
    ParallelFor point's own names (`<kind>_stage` in the point), and the stages that name themselves."""
    from kfp.local import graph_utils

    spec = pipeline.pipeline_spec

    def names(dag, point: dict) -> list[str]:
        found = []
        order = graph_utils.topological_sort_tasks(dag.tasks)
        while order:  # kfp.local pops its tasks from the end
            task = dag.tasks[order.pop()]
            component = spec.components[task.component_ref.name]
            if component.HasField("dag"):
                raw = task.parameter_iterator.items.raw if task.HasField("parameter_iterator") else ""
                for item in json.loads(raw) if raw else [{}]:
                    found += names(component.dag, item)
                continue
            kind = re.sub(r"-step(-\d+)?$", "", task.component_ref.name.removeprefix("comp-"))
            given = task.inputs.parameters["stage"].runtime_value.constant.string_value \
                if "stage" in task.inputs.parameters else SELF_NAMED.get(kind, kind)
            found.append(point.get(f"{kind}_stage", given))
        return found

    return names(spec.root.dag, {})


def docker_engine(cfg: Config):
    """The engine for --runner docker, once it holds the configured images (else ImageError)."""
    from .images import ImageError, engine, missing_images, stage_images

    client = engine()
    missing = missing_images(client, set(stage_images(cfg).values()))
    if missing:
        what = f"image {missing[0]} is" if len(missing) == 1 else f"images {', '.join(missing)} are"
        raise ImageError(f"{what} not in the Docker engine; build {'it' if len(missing) == 1 else 'them'} "
                         f"with `kflift images build` (same --config/--set images.* as this run)")
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
