"""The MLflow layout on a real SQLite store: parent, nested stage runs, artifacts, registry alias."""
import pytest
from mlflow.tracking import MlflowClient

from kflift.components import tracking
from kflift.components.runner import StageContext, run_stage


def test_stage_runs_nest_under_the_parent_and_the_winner_is_registered(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    parent = tracking.start_parent_run(uri, "exp", "run-1", {"train": {"epochs": 3}})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "curve.png").write_bytes(b"png")

    def stage(value):
        return {"params": {"value": value, "classes": ["a", "b"]}, "metrics": {"acc": value, "nested": {"n": 2}},
                "history": [{"loss": 1.0}, {"loss": 0.5}],
                "artifacts": [("plots", tmp_path / "curve.png"), ("evaluation/serving", tmp_path / "model")],
                "register": {"name": "clf", "artifact_path": "evaluation/serving", "candidate": "transfer"}}

    run_stage("evaluate", stage, StageContext(uri, parent_run_id=parent), value=0.75)
    client = MlflowClient(uri)
    runs = tracking.stage_runs(uri, parent)
    assert set(runs) == {"evaluate"} and runs["evaluate"]["status"] == "FINISHED"
    child = client.get_run(runs["evaluate"]["run_id"])
    assert child.data.params == {"value": "0.75", "classes": "a,b"}
    assert child.data.metrics["acc"] == 0.75 and child.data.metrics["nested.n"] == 2
    assert [m.value for m in client.get_metric_history(child.info.run_id, "loss")] == [1.0, 0.5]
    assert {a.path for a in client.list_artifacts(child.info.run_id, "plots")} == {"plots/curve.png"}
    version = client.get_model_version_by_alias("clf", "champion")
    assert version.run_id == child.info.run_id and version.tags["kflift.candidate"] == "transfer"
    # a second run registers a new version and moves the alias
    run_stage("evaluate", stage, StageContext(uri, parent_run_id=parent), value=0.8)
    assert int(client.get_model_version_by_alias("clf", "champion").version) == int(version.version) + 1


def test_a_failing_stage_is_marked_failed(sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    parent = tracking.start_parent_run(uri, "exp", "run-2", {})

    def broken():
        raise ValueError("bad input file x.png")

    with pytest.raises(ValueError, match="x.png"):
        run_stage("train-baseline", broken, StageContext(uri, parent_run_id=parent))
    assert tracking.stage_runs(uri, parent)["train-baseline"]["status"] == "FAILED"


def test_cluster_runs_share_one_parent_found_by_run_id(sqlite_tracking_uri):
    """On a cluster each task gets the KFP run id (job_id) and no parent or pipeline run id: the stages
    of one KFP run share one MLflow parent run, and another KFP run gets a parent of its own."""
    uri = sqlite_tracking_uri
    client = MlflowClient(uri)
    for job, stages in (("kfp-job-7", ("augment", "build-baseline")), ("kfp-job-8", ("augment",))):
        ctx = StageContext(uri, "exp", parent_run_id="", run_id="", job_id=job, cache_dir="", cache_mode="")
        for stage in stages:
            run_stage(stage, lambda: {}, ctx)
        parents = client.search_runs([client.get_experiment_by_name("exp").experiment_id],
                                     filter_string=f"tags.`kflift.run_id` = '{job}'")
        top = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
        assert len(top) == 1 and set(tracking.stage_runs(uri, top[0].info.run_id)) == set(stages)


def test_unreachable_server_gives_one_clear_error():
    with pytest.raises(tracking.TrackingError, match="not usable"):
        tracking.start_parent_run("http://127.0.0.1:9", "exp", "run-3", {})


def test_a_stage_may_take_an_argument_called_name(sqlite_tracking_uri):
    """train takes `name` (its plot's title): it reaches the stage, not the runner's run name."""
    parent = tracking.start_parent_run(sqlite_tracking_uri, "exp", "run-n", {})
    result = run_stage("train-baseline", lambda name: {"params": {"title": name}},
                       StageContext(sqlite_tracking_uri, "exp", parent_run_id=parent), name="baseline curve")
    assert result["params"] == {"title": "baseline curve"}
    assert tracking.stage_runs(sqlite_tracking_uri, parent)["train-baseline"]["status"] == "FINISHED"
