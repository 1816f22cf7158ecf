"""Serving the champion: `kflift predict` on good and bad files, the registered MLflow pyfunc model,
and the scoring server (`kflift serve`) answering /invocations like predict.

One small champion for the module: a 1-epoch model on the shared augmented dataset, evaluated and
registered through runner.run_stage into a SQLite store, as a pipeline run registers it.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import settings

from conftest import kflift, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]  # one worker builds the champion once

CHAMPION = "models:/kflift-classifier@champion"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, cifar_dataset, tiny_cifar) -> dict:
    from kflift.components import build, evaluate, tracking, train
    from kflift.components.runner import StageContext, run_stage

    root = tmp_path_factory.mktemp("champion")
    build.build(str(cifar_dataset), str(root / "untrained"), **settings("build"))
    train.train(str(cifar_dataset), str(root / "untrained"), str(root / "model"), **settings("train", epochs=1))
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    parent = tracking.start_parent_run(uri, "kflift", "serve-test", {})
    result = run_stage("evaluate", evaluate.evaluate, StageContext(uri, "kflift", parent, "serve-test"),
                       dataset_dir=str(cifar_dataset), candidates={"baseline": str(root / "model")},
                       output_dir=str(root / "evaluation"), **settings("evaluate"))
    assert result["register"]["artifact_path"] == "evaluation/mlflow_model"
    images = [sorted((tiny_cifar / c).iterdir())[0] for c in ("automobile", "truck")]
    return {"uri": uri, "serving": root / "evaluation" / "serving", "mlflow_model": root / "evaluation" / "mlflow_model",
            "labels": result["report"]["labels"], "images": images}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, champion) -> dict[Path, str]:
    """Each kind of file predict must survive, with the start of the reason it gives."""
    d = tmp_path_factory.mktemp("bad")
    good = champion["images"][0].read_bytes()
    (d / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (d / "notes.txt").write_text("not an image at all\n")
    (d / "empty.png").write_bytes(b"")
    (d / "folder.jpg").mkdir()
    return {d / "truncated.jpg": "corrupt or truncated image", d / "notes.txt": "not an image",
            d / "missing.jpg": "unreadable: No such file or directory", d / "folder.jpg": "unreadable: Is a directory",
            d / "empty.png": "zero-byte file"}


@pytest.fixture(scope="module")
def predicted(champion, bad_files) -> dict:
    """`kflift predict` (text) on good files with every kind of bad one between them."""
    good = [str(p) for p in champion["images"]]
    paths = [good[0], *map(str, bad_files), good[1]]
    proc = kflift("predict", "--model", str(champion["serving"]), *paths)
    return {"proc": proc, "paths": paths, "good": good,
            "rows": [line.split("\t") for line in proc.stdout.splitlines()]}


def test_predict_classifies_the_good_files_and_names_each_bad_one(predicted, champion, bad_files):
    proc, rows = predicted["proc"], predicted["rows"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{len(bad_files)} of {len(predicted['paths'])} image(s) could not be classified" in proc.stderr
    assert [r[0] for r in rows] == predicted["paths"] and all(len(r) == 3 for r in rows)  # one line each, in order
    for path, label, prob in rows:
        if path in predicted["good"]:
            assert label in champion["labels"] and 0.5 <= float(prob) <= 1.0
        else:
            assert label == "error" and prob.startswith(bad_files[Path(path)]), (path, prob)


def test_predict_json_lines_from_stdin_in_small_batches(predicted, champion, bad_files):
    """The same answers as JSON Lines, paths read lazily from stdin, two images a batch (so good
    and bad files share batches)."""
    paths = predicted["paths"]
    proc = subprocess.run([sys.executable, "-m", "kflift.pipeline.cli", "predict", "--model", str(champion["serving"]),
                           "--output", "json", "--batch-size", "2", "-"], input="\n".join(paths) + "\n",
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in records] == paths
    for record, (_, label, prob) in zip(records, predicted["rows"]):
        if label == "error":
            assert set(record) == {"path", "error"} and record["error"].startswith(prob)
        else:
            assert record["label"] == label and abs(record["probability"] - float(prob)) < 1e-4
            assert list(record["probabilities"]) == champion["labels"]
            assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
            assert record["probabilities"][label] == record["probability"]


def test_scorer_isolates_undecodable_bytes_within_a_batch(champion):
    """Bytes TensorFlow cannot decode fail alone; the rest of their batch scores as it does alone."""
    from kflift.components.serve import Scorer

    scorer = Scorer(champion["serving"], batch_size=8)
    good = [p.read_bytes() for p in champion["images"]]
    alone = scorer.score(good)
    mixed = scorer.score([good[0], b"junk", good[0][:300], b"", good[1]])
    assert [m.error is None for m in mixed] == [True, False, False, False, True]
    assert mixed[1].error.startswith("cannot decode: Unknown image file format")
    assert mixed[3].error == "empty image (zero bytes)"
    for m, a in zip((mixed[0], mixed[4]), alone):
        assert m.label == a.label and m.probabilities == pytest.approx(a.probabilities, abs=1e-6)


def good_predictions(predicted) -> dict[str, tuple[str, float]]:
    return {path: (label, float(prob)) for path, label, prob in predicted["rows"] if path in predicted["good"]}


def test_champion_is_an_mlflow_pyfunc_that_matches_predict(champion, predicted):
    """models:/kflift-classifier@champion loads with mlflow.pyfunc in a process where kflift,
    tf.Transform and Pillow cannot be imported, and classifies as `kflift predict` does."""
    model = champion["mlflow_model"]
    requirements = (model / "requirements.txt").read_text()
    assert "tensorflow==" in requirements and "kflift" not in requirements and "tensorflow-transform" not in requirements
    script = """
import json, sys
for name in ("kflift", "tensorflow_transform", "PIL"):
    sys.modules[name] = None  # importing any of them now fails
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
schema = model.metadata.get_input_schema()
out = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in sys.argv[2:]]}))
print(json.dumps({"inputs": [[c.name, c.type.name] for c in schema.inputs], "rows": out.to_dict("records")}))
"""
    paths = predicted["good"]
    proc = subprocess.run([sys.executable, "-c", script, CHAMPION, *paths], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": champion["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["inputs"] == [["image", "binary"]]
    expected = good_predictions(predicted)
    for path, row in zip(paths, answer["rows"]):
        label, prob = expected[path]
        assert row["label"] == label and row["error"] is None
        assert abs(row["probability"] - prob) < 1e-4 and row[f"probability_{label}"] == row["probability"]
        assert abs(sum(row[f"probability_{c}"] for c in champion["labels"]) - 1) < 1e-5


def test_scoring_server_answers_invocations_like_predict(champion, predicted):
    """`kflift serve` (mlflow models serve on loopback) answers a POST of two real images, base64 in
    JSON, with the labels and probabilities `kflift predict` gives; a bad image gets its error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "kflift.pipeline.cli", "serve", "--tracking-uri", champion["uri"],
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        first = server.stdout.readline()
        assert first.startswith(f"Scoring server: http://127.0.0.1:{port}/invocations"), first
        assert "version 1 of kflift-classifier" in first
        base = f"http://127.0.0.1:{port}"
        deadline, ready = time.monotonic() + 180, False
        while time.monotonic() < deadline and not ready:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    ready = resp.status == 200
            except OSError:
                assert server.poll() is None, f"the scoring server exited: {server.stdout.read()[-3000:]}"
                time.sleep(0.5)  # polling the server's start-up, bounded by the deadline
        assert ready, "the scoring server did not answer /ping in 180 s"
        paths = predicted["good"]
        images = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths] + [base64.b64encode(b"junk").decode()]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            rows = json.loads(resp.read())["predictions"]
    finally:  # the server and its uvicorn worker: the whole process group
        stop_process_group(server)
    expected = good_predictions(predicted)
    assert len(rows) == 3
    for path, row in zip(paths, rows):
        label, prob = expected[path]
        assert row["label"] == label and abs(row["probability"] - prob) < 1e-4 and row["error"] is None
    assert rows[2]["label"] is None and rows[2]["error"].startswith("cannot decode")


def test_serve_without_a_champion_fails_in_one_line(champion, tmp_path):
    proc = kflift("serve", "--output", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no MLflow store at" in proc.stderr and str(tmp_path) in proc.stderr
    proc = kflift("serve", "--tracking-uri", champion["uri"], "--model", "models:/kflift-classifier@nobody")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "models:/kflift-classifier@nobody is not in the model registry" in proc.stderr
