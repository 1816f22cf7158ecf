"""Faults injected into real `kflift run` processes: step cache, resume after kill -9, concurrent
runs, MLflow store failures, stage failures, bad config. Runs share one output folder (module
fixture), so the cache made by the first run serves the later ones."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS_SOURCE, FAST, broken_image_folder, kflift

# Its own pytest-xdist worker (and digits run, which these tests go on adding runs to).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reliability")]
CONFIG = FAST + DIGITS_SOURCE  # the shared digits run's settings: its output folder and cache are the first run's
TRAIN_ONWARD = {"train-baseline", "train-regularized", "train-backbone", "finetune", "evaluate"}
UPSTREAM = {"augment", "augment-source", "build-baseline", "build-regularized", "build-backbone"}


def run_id_of(stdout: str) -> str:
    return re.search(r"^run id: (\S+)$", stdout, re.M).group(1)


def summary_of(out: Path, run_id: str) -> dict:
    return json.loads((out / "runs" / run_id / "summary.json").read_text())


def stage_runs(out: Path, parent: str) -> dict:
    """Stage -> its latest nested MLflow run."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                              order_by=["attributes.start_time ASC"])
    return {r.data.tags["kflift.stage"]: r for r in runs}


class Background:
    """`kflift run` in its own process group, output to a file, killed as a whole by pid."""

    def __init__(self, *args: str, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "kflift.pipeline.cli", "run", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for(self, what: str, found, timeout: float = 600):
        """Poll (no sleep-and-hope) until `found()` is truthy; fail if the run ends first."""
        deadline = time.monotonic() + timeout
        while not (hit := found()):
            assert self.proc.poll() is None, f"run ended before {what}:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.1)
        return hit

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 900) -> str:
        assert self.proc.wait(timeout) == 0, self.log.read_text()[-4000:]
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill9()


@pytest.fixture(scope="module")
def first(digits_run, tiny_digits):
    """One uninterrupted run, the reference for every later one: the session's shared digits run
    (conftest), whose output folder and cache the later runs here go on using."""
    proc, out = digits_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = run_id_of(proc.stdout)
    return {"out": out, "run_id": run_id, "summary": summary_of(out, run_id), "data": tiny_digits}


def test_rerun_unchanged_takes_every_stage_from_the_cache(first):
    out = first["out"]
    assert first["summary"]["cached"] == []
    entries = sorted(p.name for p in (out / "cache").iterdir() if p.is_dir())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    registered = len(client.search_model_versions("name='kflift-classifier'"))
    proc = kflift("run", "--data", str(first["data"]), "--output", str(out), *CONFIG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = summary_of(out, run_id_of(proc.stdout))
    assert set(summary["cached"]) == UPSTREAM | TRAIN_ONWARD == set(summary["stages"])
    assert summary["candidates"] == first["summary"]["candidates"]
    # nothing recomputed: this run's outputs are the cache entries' files (hard links), not new ones
    models = list((out / "runs" / summary["run_id"] / "kfp").glob("*/*/model/model.keras"))
    stored = list((out / "cache").glob("*/outputs/model/model.keras"))
    assert len(models) == 7 and all(any(os.path.samefile(m, p) for p in stored) for m in models)
    # each cached stage run links to the run that produced its outputs, in the first pipeline run
    producers = {s: r.info.run_id for s, r in stage_runs(out, first["summary"]["mlflow_run_id"]).items()}
    for stage, run in stage_runs(out, summary["mlflow_run_id"]).items():
        assert run.data.tags["kflift.cached_from"] == producers[stage] and run.info.status == "FINISHED"
        if stage.startswith("train"):  # the stored metrics, logged again on the new stage run
            assert run.data.metrics["epochs_run"] == 2
    assert sorted(p.name for p in (out / "cache").iterdir() if p.is_dir()) == entries  # nothing new stored
    # there is always a winner (the default gate, min_metric 0, passes the baseline at least): the first
    # run's, whose cached evaluate registers it again, from the producer's artifacts
    assert summary["winner"] is not None and summary["winner"] == first["summary"]["winner"]
    champion = client.get_model_version_by_alias("kflift-classifier", "champion")
    assert int(champion.version) == registered + 1 and champion.run_id == producers["evaluate"]
    assert champion.tags["kflift.candidate"] == summary["winner"]
    assert (out / "runs" / summary["run_id"] / "serving" / "saved_model.pb").exists()
    # a resume of an unknown run, or with settings of its own, is refused in one clear line
    bad = kflift("run", "--output", str(out), "--resume", "no-such-run")
    assert bad.returncode == 1 and "no-such-run" in bad.stderr and "config.json not found" in bad.stderr
    bad = kflift("run", "--output", str(out), "--resume", summary["run_id"], "--no-cache")
    assert bad.returncode == 2 and "--resume runs the saved config" in bad.stderr


def test_two_concurrent_runs_with_a_changed_train_parameter(first, tmp_path):
    """Both succeed with separate, complete records; augment and build come from the cache, train
    onward reruns once: the run that waits on the other's lock takes its result."""
    out, changed = first["out"], [*CONFIG, "--set", "train.learning_rate=0.002"]
    runs = [Background("--data", str(first["data"]), "--output", str(out), *changed, log=tmp_path / f"{i}.log")
            for i in range(2)]
    try:
        logs = [r.finish() for r in runs]
    finally:
        for r in runs:
            r.stop()
    summaries = [summary_of(out, run_id_of(log)) for log in logs]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    produced = {}
    for summary in summaries:
        assert UPSTREAM <= set(summary["cached"])
        stages = stage_runs(out, summary["mlflow_run_id"])
        assert set(stages) == UPSTREAM | TRAIN_ONWARD and all(r.info.status == "FINISHED" for r in stages.values())
        for stage in TRAIN_ONWARD - set(summary["cached"]):
            produced[stage] = stages[stage].info.run_id
        assert (out / "runs" / summary["run_id"] / "summary.json").is_file()
    assert set(produced) == TRAIN_ONWARD  # each retrained exactly once, by one run or the other
    for summary in summaries:
        for stage, run in stage_runs(out, summary["mlflow_run_id"]).items():
            if stage in TRAIN_ONWARD and stage in summary["cached"]:
                assert run.data.tags["kflift.cached_from"] == produced[stage]
    assert summaries[0]["candidates"] == summaries[1]["candidates"]
    lr = stage_runs(out, summaries[0]["mlflow_run_id"])["train-baseline"].data.params["learning_rate"]
    assert lr == "0.002"


def test_kill_9_during_augment_then_during_training_and_resume(first, tmp_path):
    """A fresh output (nothing cached): kill -9 in augment, resume, kill -9 in training, resume: the
    result equals the uninterrupted first run, epoch for epoch."""
    out = tmp_path / "out"
    run = Background("--data", str(first["data"]), "--output", str(out), *CONFIG, log=tmp_path / "1.log")
    try:
        run.wait_for("augment at work",
                     lambda: list((out / "runs").glob("*/kfp/*/augment-step/.dataset-partial-*")))
        run.kill9()
    finally:
        run.stop()
    run_id = run_id_of(run.log.read_text())
    assert not list((out / "cache").glob("*/entry.json"))  # nothing half-made looks finished
    assert not list((out / "runs").glob("*/kfp/*/augment-step/dataset"))

    run = Background("--output", str(out), "--resume", run_id, log=tmp_path / "2.log")
    try:
        ckpt = run.wait_for("a training checkpoint",
                            lambda: list((out / "cache").glob("*.partial/epoch-001.keras")))
        run.kill9()
    finally:
        run.stop()
    log = run.log.read_text()
    assert "augment: running" in log and "augment: cached" not in log  # redone from the images

    run = Background("--output", str(out), "--resume", run_id, log=tmp_path / "3.log")
    try:
        log = run.finish()
    finally:
        run.stop()
    assert f"run id: {run_id}" in log
    assert re.search(r"resuming epoch from .*\.partial/epoch-00[12]\.keras", log), log[-3000:]
    assert re.search(r"augment: cached", log)
    summary = summary_of(out, run_id)
    for name, metrics in first["summary"]["candidates"].items():
        for key, value in metrics.items():
            assert summary["candidates"][name][key] == pytest.approx(value, rel=0.01, abs=1e-6), (name, key)
    # one MLflow parent run, reused; the killed stage runs marked KILLED, the last ones FINISHED
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parents = [r for r in client.search_runs([client.get_experiment_by_name("kflift").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [summary["mlflow_run_id"]]
    assert parents[0].info.status == "FINISHED"
    every = client.search_runs([parents[0].info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert "KILLED" in {r.info.status for r in every} and "RUNNING" not in {r.info.status for r in every}
    reference = stage_runs(first["out"], first["summary"]["mlflow_run_id"])
    for stage, run in stage_runs(out, summary["mlflow_run_id"]).items():
        assert run.info.status == "FINISHED"
        if stage.startswith("train"):  # the same number of epochs as without the kill
            assert run.data.metrics["epochs_run"] == reference[stage].data.metrics["epochs_run"]
    assert ckpt and not list((out / "cache").glob("*.partial"))  # checkpoints dropped once stored


def test_mlflow_store_down_or_unwritable_is_a_clear_error_and_loses_nothing(first, tmp_path):
    out = first["out"]
    before = sorted(str(p) for p in out.rglob("*") if "mlflow.db" not in p.name)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = kflift("run", "--data", str(first["data"]), "--output", str(out), *CONFIG,
                  "--tracking-uri", f"http://127.0.0.1:{port}", timeout=300)
    (tmp_path / "mlflow.db").mkdir()  # a store path SQLite cannot open, even as root
    unwritable = kflift("run", "--data", str(first["data"]), "--output", str(out), *CONFIG,
                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", timeout=300)
    for proc, uri in ((down, f"http://127.0.0.1:{port}"), (unwritable, "mlflow.db")):
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert re.match(r"kflift: MLflow tracking (server|store) ", lines[-1]) and uri in lines[-1], proc.stderr[-2000:]
    after = sorted(str(p) for p in out.rglob("*") if "mlflow.db" not in p.name)
    assert set(before) <= set(after)  # earlier runs and the cache untouched
    assert not [p for p in set(after) - set(before) if "summary.json" in p or "/cache/" in p]


def test_a_failing_stage_names_itself_its_input_the_cause_and_the_log(tmp_path):
    data = broken_image_folder(tmp_path / "broken")
    out = tmp_path / "out"
    proc = kflift("run", "--data", str(data), "--output", str(out), *FAST)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    run_id = run_id_of(proc.stdout)
    log = out / "runs" / run_id / "run.log"
    assert line.startswith("kflift: stage augment (input ") and str(data) in line, line
    assert "DataError" in line and "no valid image" in line and f"Log: {log}" in line and "--resume" in line
    assert "augment: running" in log.read_text()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kflift").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # the parent and the augment stage


def test_bad_config_on_the_command_line_exits_2_naming_the_key(tmp_path):
    proc = kflift("run", "--output", str(tmp_path), "--set", "augment.copies=-1", timeout=120)
    assert proc.returncode == 2 and "augment.copies" in proc.stderr and not (tmp_path / "runs").exists()
