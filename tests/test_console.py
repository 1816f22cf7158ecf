"""The `kflift run` console: the progress-line protocol, the plain and live renderings, and what goes
to run.log, fed a recorded stream (no TensorFlow, no pipeline run)."""
import io
import json
import re

import pytest

from kflift.components import progress, tracking
from kflift.components.runner import StageContext, run_stage
from kflift.pipeline.console import Board, RunConsole, Stage, activity, figure

EXECUTOR_JSON = ['    [KFP Executor 2026-11-27 17:13:45,445 INFO]: Got executor_input:', '    {',
                 '        "inputs": {', '            "parameterValues": {', '                "stage": "augment",',
                 '            }', '        }', '    }']


def line(stage, **fields):
    """A progress line as kfp.local relays it: indented by four spaces."""
    return f"    {progress.MARKER} {json.dumps({'stage': stage, **fields})}"


# A recorded default run, shortened: kfp.local's own log lines, each stage's output with its
# progress lines, TensorFlow's C++ noise, a Keras epoch line.
STREAM = [
    "17:13:45.356 - INFO - Running pipeline: \x1b[95m'kflift'\x1b[0m",
    "-" * 80,
    "17:13:45.360 - INFO - Executing task \x1b[96m'augment-step'\x1b[0m",
    *EXECUTOR_JSON,
    "    E0000 00:00:1795799694.108263    9667 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
    "    augment: running (fingerprint 2a1b6a53a14c)",
    line("augment", state="running", since=1000.0),
    line("augment", worker="a", checked=40, images=75),
    line("augment", worker="b", checked=35, images=75),
    line("augment", worker="c", written=126),
    line("augment", state="done", seconds=22.04, metrics={"read": 75, "written.total": 126}),
    "17:14:02.556 - INFO - Task \x1b[96m'augment-step'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
    "    build-baseline: cached (fingerprint 905f55941915, produced by MLflow run 1234)",
    line("build-baseline", state="cached", seconds=3.5, metrics={"parameters": 281925}),
    line("train-baseline", state="running", since=1030.0),
    "    Epoch 1/2",
    "    3/3 - 2s - 600ms/step - accuracy: 0.2000 - loss: 1.6 - val_accuracy: 0.3000 - val_loss: 1.5",
    line("train-baseline", epoch=1, epochs=2, metrics={"loss": 1.6, "accuracy": 0.2, "val_loss": 1.5,
                                                       "val_accuracy": 0.3, "learning_rate": 0.001}),
    line("train-baseline", note="resuming epoch from /o/cache/x.partial/epoch-001.keras (epoch 1 of 2)"),
    line("train-baseline", epoch=2, epochs=2, metrics={"loss": 1.2, "accuracy": 0.5, "val_accuracy": 0.55}),
    line("train-baseline", state="done", seconds=12.0, metrics={"final_val_accuracy": 0.55, "epochs_run": 2}),
    line("finetune", state="running", since=1050.0),
    line("finetune", epoch=1, epochs=1, phase="frozen", metrics={"loss": 1.0, "val_accuracy": 0.6}),
    line("finetune", state="done", seconds=9.0, metrics={"final_val_accuracy": 0.61}),
    line("evaluate", state="running", since=1070.0),
    line("evaluate", state="done", seconds=8.25, champion="transfer",
         metrics={"baseline.accuracy": 0.5, "transfer.accuracy": 0.913}),
    "17:14:58.246 - INFO - Pipeline \x1b[95m'kflift'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
]
PLANNED = ["augment", "build-baseline", "train-baseline", "finetune", "evaluate"]
PLAIN = [
    "stages: augment, build-baseline, train-baseline, finetune, evaluate",
    "augment: running",
    "augment: done in 22.0s, 126 images written",
    "build-baseline: cached in 3.5s, 281,925 parameters",
    "train-baseline: running",
    "train-baseline: resuming epoch from /o/cache/x.partial/epoch-001.keras (epoch 1 of 2)",
    "train-baseline: done in 12.0s, val accuracy 0.550",
    "finetune: running",
    "finetune: done in 9.0s, val accuracy 0.610",
    "evaluate: running",
    "evaluate: done in 8.2s, winner transfer, test accuracy 0.913",
]


def replay(console: RunConsole, log, stream=STREAM, chunks=7):
    """Write the stream through the console's capture as print() and kfp.local would, in ragged chunks."""
    text = "".join(f"{s}\n" for s in stream)
    with console.capture():
        print("mlflow: creating tables", flush=True)  # before the run folder exists: kept for the log
        console.log_to(log)
        console.plan(PLANNED)
        for i in range(0, len(text), chunks):
            print(text[i:i + chunks], end="")


@pytest.mark.parametrize("text", ["augment: running", "kflift-progress", "kflift-progress {not json}",
                                  'kflift-progress ["stage"]', 'kflift-progress {"state": "done"}', ""])
def test_other_lines_are_no_events(text):
    assert progress.parse(text) is None


def test_a_progress_line_round_trips_wherever_it_sits_in_the_line(capsys, monkeypatch):
    monkeypatch.delenv(progress.STAGE_ENV, raising=False)
    progress.progress("train", epoch=1, epochs=3, metrics={"loss": 0.5})
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and printed.startswith(progress.MARKER + " ")
    event = {"stage": "train", "epoch": 1, "epochs": 3, "metrics": {"loss": 0.5}}
    assert progress.parse(printed) == event
    assert progress.parse("        " + printed.strip() + " trailing") == event  # interleaved kfp.local indents


def test_inside_a_stage_its_name_is_used_and_an_exception_is_reported(capsys, monkeypatch):
    monkeypatch.delenv(progress.STAGE_ENV, raising=False)
    with pytest.raises(ValueError):
        with progress.reporting("train-regularized"):
            progress.progress("train", epoch=1, epochs=1)
            raise ValueError("bad input\nmore")
    events = [progress.parse(s) for s in capsys.readouterr().out.splitlines()]
    assert events == [{"stage": "train-regularized", "epoch": 1, "epochs": 1},
                      {"stage": "train-regularized", "state": "failed", "error": "ValueError: bad input"}]
    assert progress.STAGE_ENV not in __import__("os").environ


def test_run_stage_reports_running_then_done_with_its_metrics_and_champion_or_failed(tmp_path, capsys,
                                                                                     sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    parent = tracking.start_parent_run(uri, "exp", "run-1", {})
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "saved_model.pb").write_bytes(b"x")
    capsys.readouterr()

    def evaluate(fail):
        if fail:
            raise ValueError("no test split\nin x")
        return {"metrics": {"transfer": {"accuracy": 0.9}, "note": "text"},
                "artifacts": [("evaluation/serving", tmp_path / "serving")],
                "register": {"name": "clf", "artifact_path": "evaluation/serving", "candidate": "transfer"}}

    with pytest.raises(ValueError):
        run_stage("evaluate", evaluate, StageContext(uri, parent_run_id=parent), fail=True)
    run_stage("evaluate", evaluate, StageContext(uri, parent_run_id=parent), fail=False)
    events = [e for e in map(progress.parse, capsys.readouterr().out.splitlines()) if e]
    assert [e.get("state") for e in events] == ["running", "failed", "running", "done"]
    assert {e["stage"] for e in events} == {"evaluate"} and events[0]["since"] > 0
    assert events[1]["error"] == "ValueError: no test split"
    assert events[3]["metrics"] == {"transfer.accuracy": 0.9} and events[3]["champion"] == "transfer"
    assert events[3]["seconds"] > 0


def test_plain_mode_prints_one_line_per_state_change_and_the_log_gets_everything(tmp_path):
    out, log = io.StringIO(), tmp_path / "run.log"
    replay(RunConsole(out=out, live=False), log)
    assert out.getvalue().splitlines() == PLAIN
    assert "\r" not in out.getvalue()
    text = log.read_text()
    assert text.startswith("mlflow: creating tables\n")
    assert text.endswith("".join(f"{s}\n" for s in STREAM))  # every line of every stage, progress lines too


def test_verbose_streams_the_stage_output_beside_the_state_lines(tmp_path):
    out = io.StringIO()
    replay(RunConsole(out=out, verbose=True), tmp_path / "run.log")
    shown = out.getvalue().splitlines()
    assert all(s in shown for s in EXECUTOR_JSON) and "    augment: running (fingerprint 2a1b6a53a14c)" in shown
    # the state lines in order, among everything else
    assert [s for s in shown if not s.startswith((" ", "1", "-"))] == ["mlflow: creating tables", *PLAIN]
    assert not any(progress.MARKER in s for s in shown)


def test_the_live_table_shows_every_stage_its_bar_and_its_figure(tmp_path):
    from rich.console import Console

    console = RunConsole(out=io.StringIO(), live=True)
    upto = next(i for i, s in enumerate(STREAM) if '"stage": "finetune", "state": "done"' in s)
    replay(console, tmp_path / "run.log", STREAM[:upto])  # still in finetune's first epoch
    screen = io.StringIO()
    Console(file=screen, width=150, color_system=None).print(console._table())
    rows = screen.getvalue().splitlines()
    assert len(rows) == len(PLANNED)
    assert "126 images written" in rows[0] and "done" in rows[0]
    assert "cached" in rows[1] and "val accuracy 0.550" in rows[2]
    assert "running" in rows[3] and "frozen epoch 1/1 loss 1.000 val_acc 0.600" in rows[3] and "━" in rows[3]
    assert "waiting" in rows[4]


def test_a_stage_whose_process_dies_is_failed_and_the_rest_waits(tmp_path):
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with RunConsole(out=out, live=False).capture() as console:
            console.plan(["augment", "build-baseline"])
            print(line("augment", state="running"))
            print("Segmentation fault", end="")  # no newline: the last partial line still reaches the log
            raise RuntimeError("Task 'augment-step' finished with status FAILURE")
    shown = out.getvalue().splitlines()
    assert shown[:2] == ["stages: augment, build-baseline", "augment: running"] and len(shown) == 3
    assert re.fullmatch(r"augment: failed after \d+\.\ds: its process ended without a result \(see the log\)",
                        shown[2])


def test_a_failed_stage_says_after_how_long_and_why():
    board = Board(["train"])
    board.apply({"stage": "train", "state": "running", "since": 100.0}, 101.0)
    assert board.apply({"stage": "train", "state": "failed", "error": "ValueError: x"}, 112.5) == [
        "train: failed after 12.5s: ValueError: x"]
    assert board.end(ok=False, now=200.0) == []  # it said so itself


def test_augment_counts_add_up_over_workers_and_the_epoch_line_names_its_phase():
    board = Board(["augment", "train"])
    for event in ({"worker": "a", "checked": 10, "images": 30}, {"worker": "b", "checked": 5},
                  {"worker": "a", "checked": 20}, {"worker": "c", "written": 7}):
        board.apply({"stage": "augment", **event}, 0.0)
    assert activity(board.stages["augment"]) == "25/30 images checked, 7 written"
    board.apply({"stage": "train", "epoch": 3, "epochs": 8, "phase": "finetune",
                 "metrics": {"loss": 0.25, "accuracy": 0.9, "learning_rate": 0.1}}, 0.0)
    assert activity(board.stages["train"]) == "finetune epoch 3/8 loss 0.250 acc 0.900"


@pytest.mark.parametrize("stage, expected", [
    (Stage("augment", metrics={"written.total": 2940.0}), "2,940 images written"),
    (Stage("train-x", metrics={"final_val_accuracy": 0.8, "best_val_accuracy": 0.9}), "val accuracy 0.800"),
    (Stage("train-x", metrics={"final_accuracy": 0.7}), "train accuracy 0.700"),
    (Stage("sweep-select", metrics={"best_val_accuracy": 0.75}), "best val accuracy 0.750"),
    (Stage("evaluate", champion="regularized", metrics={"regularized.accuracy": 0.5}),
     "winner regularized, test accuracy 0.500"),
    (Stage("evaluate", metrics={"baseline.accuracy": 0.2}), "no winner (no candidate passed the gate)"),
    (Stage("other"), ""),
])
def test_each_stage_shows_its_key_figure(stage, expected):
    assert figure(stage) == expected


def test_the_report_shows_the_comparison_the_winner_and_where_to_look(tmp_path):
    (tmp_path / "comparison.md").write_text("| candidate | accuracy |\n|---|---|\n| baseline | 0.500 |\n")
    summary = {"candidates": {"baseline": {"accuracy": 0.5}}, "winner": "baseline", "cached": [],
               "path": "/o/summary.json", "log": "/o/run.log", "serving": None, "tracking_uri": "sqlite:///o/db",
               "comparison": str(tmp_path / "comparison.md")}
    out = io.StringIO()
    RunConsole(out=out, live=False).report(summary, tmp_path)
    assert out.getvalue().splitlines() == [
        "", "| candidate | accuracy |", "|---|---|", "| baseline | 0.500 |", "", "winner: baseline (accuracy=0.500)",
        "summary: /o/summary.json", "log: /o/run.log",
        f"MLflow: kflift ui --output {tmp_path}  (or `make ui`), then open http://127.0.0.1:5000"]


def test_the_planned_stages_are_those_the_pipeline_runs():
    from kflift.pipeline.config import load_config
    from kflift.pipeline.local_run import planned_stages
    from kflift.pipeline.pipeline import make_pipeline

    stages = planned_stages(make_pipeline(load_config(None, [])))
    assert sorted(stages) == sorted(["augment", "augment-source", "build-baseline", "build-regularized",
                                     "build-backbone", "train-baseline", "train-regularized", "train-backbone",
                                     "finetune", "evaluate"])
    assert stages[0] == "augment" and stages[-1] == "evaluate"
    assert stages.index("build-backbone") < stages.index("train-backbone") < stages.index("finetune")
    swept = planned_stages(make_pipeline(load_config(None, ["train.sweep={learning_rate: [0.001, 0.003]}"])))
    assert {"build-sweep-0", "train-sweep-0", "build-sweep-1", "train-sweep-1", "sweep-select"} <= set(swept)
    assert swept.index("train-sweep-1") < swept.index("sweep-select")


@pytest.mark.slow  # a real `kflift run` process
def test_verbose_streams_the_executor_logs_and_a_failure_still_ends_with_its_reason_and_log(tmp_path):
    """A real `kflift run -v` that fails fast in augment (no valid image)."""
    from conftest import broken_image_folder, kflift

    data = broken_image_folder(tmp_path / "broken")
    out = tmp_path / "out"
    proc = kflift("run", "-v", "--data", str(data), "--output", str(out), "--set", "transfer.weights=imagenet",
                  timeout=600)
    assert proc.returncode == 1
    assert "Got executor_input" in proc.stdout and "Executing task" in proc.stdout  # kfp.local's logs, streamed
    assert re.search(r"^augment: failed after [\d.]+s: DataError: .* no valid image", proc.stdout, re.M)
    run_id = re.search(r"^run id: (\S+)$", proc.stdout, re.M).group(1)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("kflift: stage augment (input ") and f"Log: {out / 'runs' / run_id / 'run.log'}" in line
