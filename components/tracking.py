"""MLflow layout: one parent run per pipeline run, one nested run per stage or candidate.

This is the only module that talks to MLflow. A stage returns a `results.StageResult` and the
runner (runner.py) logs it through `stage_run`.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from . import progress

RUN_ID_TAG = "kflift.run_id"
STAGE_TAG = "kflift.stage"
CACHED_FROM_TAG = "kflift.cached_from"  # on a cache hit: the MLflow run that produced the outputs
ERROR_TAG = "kflift.error"  # on a failed stage: the cause, in one line
INPUTS_TAG = "kflift.inputs"  # the stage's input artifacts and data folders
STAGE_SECONDS = "stage_seconds"  # the stage function's own work
PROCESS_SECONDS = "process_seconds"  # from its process start: interpreter, imports, tracking too


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or written."""


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer GET /health, checked before a run writes or tracks anything."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable: /health answered "
                            f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # a timeout while reading, or a malformed URL
        raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable: {_first_line(exc)}") from None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    # Fail fast when a server is down, instead of MLflow's long default retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    with _sqlite_lock(tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if tracking_uri.startswith("sqlite:///"):
            # Artifacts beside the SQLite file, not in the current directory.
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def _sqlite_lock(tracking_uri: str):
    """Concurrent runs on one SQLite store: one at a time creates its tables and the experiment
    (both would otherwise race to create them). A server store serializes this itself."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from .files import file_lock

    db = Path(tracking_uri[len("sqlite:///"):])
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def start_parent_run(tracking_uri: str, experiment: str, run_id: str, params: dict) -> str:
    """Create the pipeline run's parent MLflow run; returns its MLflow id."""
    try:
        client = _client(tracking_uri)
        exp_id = _experiment_id(client, experiment, tracking_uri)
        run = client.create_run(exp_id, run_name=f"kflift-{run_id}", tags={RUN_ID_TAG: run_id})
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user needs one message
        raise TrackingError(f"MLflow tracking store {tracking_uri} is not usable: {_first_line(exc)}") from None
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_summary(tracking_uri: str, mlflow_run_id: str, summary_path: Path, metrics: dict) -> None:
    """The pipeline run's summary and headline metrics on its parent run."""
    StageRun(_client(tracking_uri), mlflow_run_id).log({"metrics": metrics, "artifacts": [(None, summary_path)]})


def end_run(tracking_uri: str, mlflow_run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(mlflow_run_id, status)


def resume_parent_run(tracking_uri: str, experiment: str, run_id: str) -> str:
    """The parent run of pipeline run `run_id`, RUNNING again; the stage runs a crash left RUNNING
    are marked KILLED (their stages rerun or come from the cache under new nested runs)."""
    try:
        client = _client(tracking_uri)
        exp_id = _experiment_id(client, experiment, tracking_uri)
        tagged = client.search_runs([exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"MLflow tracking store {tracking_uri} is not usable: {_first_line(exc)}") from None
    found = [r for r in tagged if "mlflow.parentRunId" not in r.data.tags]  # the stages carry the tag too
    if not found:
        raise TrackingError(f"run {run_id}: no MLflow parent run tagged {RUN_ID_TAG}={run_id} in {tracking_uri}")
    parent = found[0].info.run_id
    client.update_run(parent, status="RUNNING")
    for stage in stage_runs(tracking_uri, parent).values():
        if stage["status"] == "RUNNING":
            client.set_terminated(stage["run_id"], "KILLED")
    return parent


class StageRun:
    """Handle on a nested run: `log(result)` records a stage's result dict."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, result: dict) -> None:
        from mlflow.entities import Metric

        _log_params(self.client, self.run_id, result.get("params", {}))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in scalar_metrics(result.get("metrics", {})).items()]
        for step, epoch in enumerate(result.get("history", [])):
            metrics += [Metric(k, float(v), now, step) for k, v in epoch.items()]
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        for folder, path in result.get("artifacts", []):  # (MLflow folder or None for the root, path)
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=folder)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def register(self, name: str, artifact_path: str, candidate: str, alias: str = "champion",
                 source_run: str | None = None) -> str:
        """Register a logged artifact folder (of this run, or of `source_run` that logged it) as a
        new model version and point `alias` at it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:  # not registered yet
            self.client.create_registered_model(name)
        source_run = source_run or self.run_id
        source = f"{self.client.get_run(source_run).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=source_run,
                                                   tags={"kflift.candidate": candidate})
        self.client.set_registered_model_alias(name, alias, version.version)
        return version.version


def resolve_model(tracking_uri: str, model_uri: str) -> str:
    """What a registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) stands for in this store,
    in words, or a TrackingError in one line on why it cannot be served; other URIs as given."""
    rest = model_uri[len("models:/"):].strip("/") if model_uri.startswith("models:/") else ""
    name, alias = rest.split("@", 1) if "@" in rest else (rest.rpartition("/")[0], None)
    version = None if alias else rest.rpartition("/")[2]
    if not name or not (alias or (version or "").isdigit()):
        return model_uri  # a path, runs:/..., a logged model id: MLflow itself says what is wrong
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise TrackingError(f"no MLflow store at {tracking_uri[len('sqlite:///'):]}: run the pipeline first "
                            "(kflift run), or name the store with --output or --tracking-uri")
    check_server(tracking_uri)
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise TrackingError(f"{model_uri} is not in the model registry of {tracking_uri} ({_first_line(exc)}); "
                            "a pipeline run whose evaluate stage finds a winner registers it") from None
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user needs one message
        raise TrackingError(f"MLflow tracking store {tracking_uri} is not usable: {_first_line(exc)}") from None
    return f"{model_uri} = version {found.version} of {name}, candidate {found.tags.get('kflift.candidate', '?')}"


def find_or_start_parent_run(tracking_uri: str, experiment: str, run_id: str) -> str:
    """The parent run tagged with this pipeline run id (a cluster run has no driver to make it)."""
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment, tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else start_parent_run(tracking_uri, experiment, run_id, {})


@contextlib.contextmanager
def stage_run(tracking_uri: str, parent_run_id: str, stage: str, experiment: str = "kflift", run_id: str = "",
              inputs: list | None = None):
    """A nested MLflow run around one stage; records wall seconds, and FAILED with the cause on error.

    Without a `parent_run_id` the parent is found (or made) by the pipeline `run_id`.
    """
    start = time.time()
    client = _client(tracking_uri)
    try:
        if not parent_run_id:
            parent_run_id = find_or_start_parent_run(tracking_uri, experiment, run_id)
        parent = client.get_run(parent_run_id)
        run = client.create_run(
            parent.info.experiment_id, run_name=stage,
            tags={"mlflow.parentRunId": parent_run_id, STAGE_TAG: stage,
                  RUN_ID_TAG: parent.data.tags.get(RUN_ID_TAG, ""),
                  **({INPUTS_TAG: ", ".join(map(str, inputs))[:5000]} if inputs else {})})
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"stage {stage}: MLflow store {tracking_uri} is not usable: {_first_line(exc)}") from None
    handle = StageRun(client, run.info.run_id)
    try:
        yield handle
    except BaseException as exc:
        client.set_tag(run.info.run_id, ERROR_TAG, _first_line(exc)[:5000])
        client.log_metric(run.info.run_id, STAGE_SECONDS, time.time() - start)
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.log_metric(run.info.run_id, STAGE_SECONDS, time.time() - start)
    client.log_metric(run.info.run_id, PROCESS_SECONDS, time.time() - progress.process_start())
    client.set_terminated(run.info.run_id, "FINISHED")


def stage_runs(tracking_uri: str, parent_run_id: str) -> dict[str, dict]:
    """The nested runs of a pipeline run: stage name -> {run_id, status, metrics}."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags.get(STAGE_TAG, r.info.run_name): {"run_id": r.info.run_id, "status": r.info.status,
                                                            "metrics": dict(r.data.metrics),
                                                            "tags": dict(r.data.tags)}
            for r in sorted(runs, key=lambda r: r.info.start_time)}


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in _flat(params).items()]
    for i in range(0, len(flat), 90):
        client.log_batch(run_id, params=flat[i:i + 90])


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> dotted keys; lists become comma-separated strings; None is dropped."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        elif v is not None:
            out[key] = v
    return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """A result's metrics as MLflow (and KFP) take them: dotted keys, numbers only."""
    return {k: float(v) for k, v in _flat(metrics).items() if isinstance(v, (int, float))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def pipeline_runs(tracking_uri: str, experiment: str, limit: int = 20) -> list[dict]:
    """The newest pipeline runs of an experiment: run id, start, status, winner and its score."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = client.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'kflift-%'",
                                 order_by=["attributes.start_time DESC"], max_results=limit)
    evaluations = client.search_runs([exp.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'evaluate'",
                                     order_by=["attributes.start_time DESC"])
    evaluated = {}  # parent id -> its newest evaluate run
    for run in evaluations:
        evaluated.setdefault(run.data.tags.get("mlflow.parentRunId"), run)
    rows = []
    for parent in parents:
        evaluation = evaluated.get(parent.info.run_id)
        params = evaluation.data.params if evaluation else {}
        winner, metric = params.get("winner", ""), params.get("metric", "accuracy")
        rows.append({"run_id": parent.data.tags.get(RUN_ID_TAG, ""), "mlflow_run_id": parent.info.run_id,
                     "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000)),
                     "status": parent.info.status, "winner": winner, "metric": metric,
                     "score": evaluation.data.metrics.get(f"{winner}.{metric}") if evaluation else None,
                     "evaluate_run_id": evaluation.info.run_id if evaluation else None})
    return rows


def find_pipeline_run(tracking_uri: str, experiment: str, run_id: str) -> dict:
    """One pipeline run (by kflift or KFP run id, or its MLflow run id) with its stages' runs and
    the evaluation's comparison table and artifact locations."""
    client = _client(tracking_uri)
    row = next((r for r in pipeline_runs(tracking_uri, experiment, limit=1000)
                if run_id in (r["run_id"], r["mlflow_run_id"])), None)
    if row is None:
        raise TrackingError(f"no pipeline run {run_id} in experiment {experiment} of {tracking_uri} "
                            "(`kflift runs` lists them)")
    row["stages"] = stage_runs(tracking_uri, row["mlflow_run_id"])
    row["comparison"], row["artifacts"] = "", {}
    if row["evaluate_run_id"]:
        import mlflow.artifacts

        base = client.get_run(row["evaluate_run_id"]).info.artifact_uri
        listed = {a.path for a in client.list_artifacts(row["evaluate_run_id"], "evaluation")}
        if "evaluation/comparison.md" in listed:  # absent while the stage runs, or if it failed
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            row["comparison"] = mlflow.artifacts.load_text(f"{base}/evaluation/comparison.md")
        row["artifacts"] = {name: f"{base}/{path}" for name, path in (
            ("lift chart", "evaluation/comparison.png"), ("mistakes", "evaluation/errors.png"),
            ("ROC", "evaluation/roc.png"), ("report", "evaluation/report.json"),
            ("serving model", "evaluation/serving")) if path in listed}
    return row

