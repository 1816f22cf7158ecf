"""The whole DAG through kfp.local (real Beam, tf.Transform, Keras, MLflow), as a user runs it."""
import json
import re

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, finished_stage_runs, kflift
from kflift.pipeline.config import Config

pytestmark = pytest.mark.slow  # whole pipeline runs

STAGES = {"augment", "augment-source", "build-baseline", "build-regularized", "build-backbone",
          "train-baseline", "train-regularized", "train-backbone", "finetune", "evaluate"}


@pytest.mark.parametrize("dataset", ["cifar", pytest.param("digits", marks=pytest.mark.xdist_group("digits-run"))])
def test_whole_pipeline_runs_and_is_tracked(dataset, request, tmp_path):
    stages, candidates = set(STAGES), {"baseline", "regularized", "transfer"}
    if dataset == "cifar":  # with a two-point learning-rate sweep fanned out by dsl.ParallelFor
        out = tmp_path / "out"
        proc = kflift("run", "--output", str(out), "--data", str(request.getfixturevalue("tiny_cifar")),
                      "--set", "transfer.source_classes=airplane,ship",
                      "--set", "train.sweep={learning_rate: [0.001, 0.003]}", *FAST)
        stages |= {"build-sweep-0", "build-sweep-1", "train-sweep-0", "train-sweep-1", "sweep-select"}
        candidates.add("sweep-best")
    else:  # the default demo: digits 0-4 are the transfer source (the run is shared with test_docker)
        proc, out = request.getfixturevalue("digits_run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_id = re.search(r"^run id: (\S+)$", proc.stdout, re.M).group(1)
    summary_path = out / "runs" / run_id / "summary.json"
    assert f"summary: {summary_path}" in proc.stdout
    assert "winner:" in proc.stdout and "kflift ui --output" in proc.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["run_id"] == run_id
    assert set(summary["stages"]) == stages and all(s > 0 for s in summary["stages"].values())
    assert set(summary["candidates"]) == candidates
    # The default gate (min_metric 0) passes the baseline at least: a run always has a winner.
    best = max(summary["candidates"], key=lambda n: summary["candidates"][n]["accuracy"])
    assert summary["candidates"][summary["winner"]]["accuracy"] == summary["candidates"][best]["accuracy"]
    for metrics in summary["candidates"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "f1" in metrics
    assert ("roc_auc" in summary["candidates"]["baseline"]) == (dataset == "cifar")

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    by_stage = finished_stage_runs(client, summary)
    assert set(by_stage) == stages
    parent = client.get_run(summary["mlflow_run_id"])

    def artifacts(stage, path=""):
        return {a.path for a in client.list_artifacts(by_stage[stage].info.run_id, path)}

    assert by_stage["augment"].data.metrics["read"] > 0
    assert "transform_fn" in artifacts("augment") and "stats.json" in artifacts("augment")
    assert {"model/model.keras", "plots/learning_curve.png"} <= artifacts("train-regularized", "model") | \
        artifacts("train-regularized", "plots")
    patience = by_stage["train-regularized"].data.params["early_stopping_patience"]
    assert patience == str(Config().regularization.patience)
    history = client.get_metric_history(by_stage["train-baseline"].info.run_id, "accuracy")
    assert [m.step for m in history] == [0, 1]
    assert "frozen_weights_changed_in_phase1" in by_stage["finetune"].data.metrics
    if dataset == "cifar":
        lrs = {by_stage[f"train-sweep-{i}"].data.params["learning_rate"] for i in (0, 1)}
        assert lrs == {"0.001", "0.003"}
        assert by_stage["sweep-select"].data.params["best.learning_rate"] in lrs
    assert {"evaluation/confusion_baseline.png", "evaluation/comparison.md", "evaluation/report.json"} <= \
        artifacts("evaluate", "evaluation")
    assert by_stage["evaluate"].data.metrics["transfer.accuracy"] == summary["candidates"]["transfer"]["accuracy"]
    assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # registered, alias `champion`, from this run's evaluate stage
    version = client.get_model_version_by_alias("kflift-classifier", "champion")
    assert version.run_id == by_stage["evaluate"].info.run_id
    assert version.tags["kflift.candidate"] == summary["winner"]
    assert (out / "runs" / run_id / "serving" / "saved_model.pb").exists()


@pytest.mark.xdist_group("digits-run")
def test_the_console_shows_each_stage_and_the_winner_and_the_log_holds_the_rest(digits_run):
    """A default run in a pipe: one plain line per stage state, the comparison, the winner and
    where to look, well under 60 lines; kfp.local's dumps and the stages' own output only in run.log."""
    proc, out = digits_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert len(console.splitlines()) < 60, console
    assert "\r" not in console and "\x1b[" not in console  # no redraws, no colours in a pipe
    run_id = re.search(r"^run id: (\S+)$", proc.stdout, re.M).group(1)
    run_dir = (out / "runs" / run_id).resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in summary["stages"]:  # every stage's final state, its time and (but for build) its figure
        assert re.search(rf"^{re.escape(stage)}: (done|cached) in \d+(\.\d)?s", proc.stdout, re.M), stage
    assert re.search(r"^augment: (done|cached) in .*, [\d,]+ images written$", proc.stdout, re.M)
    assert re.search(r"^train-baseline: (done|cached) in .*, val accuracy \d\.\d{3}$", proc.stdout, re.M)
    accuracy = summary["candidates"][summary["winner"]]["accuracy"]
    assert re.search(rf"^evaluate: (done|cached) in .*, winner {summary['winner']}, test accuracy "
                     rf"{accuracy:.3f}$", proc.stdout, re.M)
    assert f"winner: {summary['winner']} (" in proc.stdout
    assert re.search(r"^\| candidate \| accuracy \|", proc.stdout, re.M)  # the comparison table
    assert f"log: {run_dir / 'run.log'}" in proc.stdout and f"summary: {run_dir / 'summary.json'}" in proc.stdout
    for noise in ("Got executor_input", "Executing task", "cuInit", "kflift-progress", "Epoch 1/"):
        assert noise not in console, noise
    log = (run_dir / "run.log").read_text()
    assert "Got executor_input" in log and "Executing task" in log  # kfp.local's executor dumps
    assert "evaluate: running (fingerprint" in log and "kflift-progress" in log  # the stages' own lines
    assert re.search(r"kflift-progress \{\"stage\": \"train-baseline\", \"epoch\": 2, \"epochs\": 2", log)
