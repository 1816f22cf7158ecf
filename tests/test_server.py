"""`kflift server`: the real MLflow server on a real PostgreSQL, used by a real `kflift run`."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS_SOURCE, finished_stage_runs, kflift
from kflift.pipeline.server import Cluster, create_database, free_port
from test_e2e import STAGES

TINY = ["--set", "train.epochs=1", "--set", "transfer.pretrain_epochs=1", "--set", "transfer.frozen_epochs=1",
        "--set", "transfer.finetune_epochs=1", "--set", "augment.copies=1", "--set", "augment.shards=1"]


@pytest.fixture
def open_dir():
    """A temp folder others may traverse: as root, PostgreSQL runs as user `postgres` and must reach it."""
    path = Path(tempfile.mkdtemp(prefix="kflift-server-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def postgres(open_dir):
    """A real PostgreSQL cluster (initdb, pg_ctl) on a free loopback port; stopped at the end."""
    cluster = Cluster(open_dir / "pg")
    cluster.init()
    port = free_port()
    cluster.start(port)
    yield cluster, port
    cluster.stop()
    assert_port_free(port)


def start_server(args, log: Path) -> tuple[subprocess.Popen, int]:
    """`kflift server` in its own process group; returns once /health answers."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kflift.pipeline.cli", "server", "--port", str(port),
                                 "--workers", "1", *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"kflift server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)  # polling the server's start-up, bounded by the deadline
    stop_server(proc, port)
    raise AssertionError(f"kflift server did not answer /health within 180 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, port: int) -> int:
    """SIGTERM to the whole group (kflift, mlflow, uvicorn), as a terminal's Ctrl-C reaches them all."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("kflift server did not stop within 60 s of SIGTERM") from None
    assert_port_free(port)
    return rc


def assert_port_free(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # worker processes exit shortly after their parent
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"something still listens on port {port}")


@pytest.mark.slow
def test_pipeline_tracks_into_the_server_on_postgres(postgres, open_dir, tiny_digits, tmp_path):
    cluster, pg_port = postgres
    backend = create_database(pg_port, "mlflow_test")
    artifacts = open_dir / "artifacts"
    proc, port = start_server(["--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
                               "--output", str(tmp_path / "server")], tmp_path / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        out = tmp_path / "out"
        run = kflift("run", "--data", str(tiny_digits), "--output", str(out), "--tracking-uri", uri, *TINY,
                     *DIGITS_SOURCE)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"MLflow: {uri}" in run.stdout
        run_id = re.search(r"^run id: (\S+)$", run.stdout, re.M).group(1)
        summary = json.loads((out / "runs" / run_id / "summary.json").read_text())
        assert not (out / "mlflow.db").exists()  # nothing went to the local SQLite default

        client = MlflowClient(tracking_uri=uri)
        by_stage = finished_stage_runs(client, summary)
        assert set(by_stage) == STAGES
        parent = client.get_run(summary["mlflow_run_id"])
        version = client.get_model_version_by_alias("kflift-classifier", "champion")
        assert version.run_id == by_stage["evaluate"].info.run_id
        assert version.tags["kflift.candidate"] == summary["winner"]

        # Artifacts go through the server (--serve-artifacts) into --artifacts-destination.
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
        got = Path(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path / "dl")))
        assert json.loads(got.read_text())["run_id"] == run_id
        assert list(artifacts.rglob("report.json")), "the evaluate stage's report is not on the server's disk"

        with psycopg.connect(backend) as conn:  # the rows really are in PostgreSQL
            rows = dict(conn.execute("SELECT run_uuid, status FROM runs").fetchall())
            models = {r[0] for r in conn.execute("SELECT name FROM registered_models")}
        assert rows[parent.info.run_id] == "FINISHED"
        assert {rows[r.info.run_id] for r in by_stage.values()} == {"FINISHED"}
        assert "kflift-classifier" in models
    finally:
        stop_server(proc, port)
    assert cluster.running_port() == pg_port  # the server leaves a PostgreSQL it did not start alone


@pytest.mark.slow
def test_server_starts_and_stops_its_own_postgres(open_dir, tmp_path):
    output = open_dir / "out"
    proc, port = start_server(["--output", str(output)], tmp_path / "server.log")
    try:
        log = (tmp_path / "server.log").read_text()
        backend = re.search(r"^PostgreSQL: (postgresql://\S+)", log, re.M).group(1)
        assert f"kflift run --tracking-uri http://127.0.0.1:{port}" in log
        exp_id = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").create_experiment("server-test")
        with psycopg.connect(backend) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM experiments")}
        assert "server-test" in names and exp_id
    finally:
        rc = stop_server(proc, port)
    assert rc == 0, (tmp_path / "server.log").read_text()[-3000:]
    # Stopping the server stopped its PostgreSQL too: no postmaster, its port closed.
    assert Cluster(output / "postgres").running_port() is None
    assert_port_free(int(backend.rsplit(":", 1)[1].split("/")[0]))


def test_run_fails_fast_when_the_server_is_down(tmp_path):
    port = free_port()  # nobody listens there
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    start = time.monotonic()
    proc = kflift("run", "--output", str(out), "--tracking-uri", f"http://127.0.0.1:{port}", timeout=10)
    took = time.monotonic() - start
    assert proc.returncode == 1
    assert f"kflift: MLflow tracking server http://127.0.0.1:{port} is not reachable:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 10
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt"]  # no dataset, no run folder, no store


def test_bad_backend_uri_and_busy_port_are_refused_in_one_line(tmp_path):
    proc = kflift("server", "--backend-store-uri", "mysql://u@127.0.0.1/db", "--port", str(free_port()),
                  "--output", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and "bad --backend-store-uri" in proc.stderr and "Traceback" not in proc.stderr
    dead = f"postgresql://kflift:secret@127.0.0.1:{free_port()}/mlflow"  # nobody listens there
    proc = kflift("server", "--backend-store-uri", dead, "--port", str(free_port()), "--output", str(tmp_path),
                  timeout=60)
    assert proc.returncode == 1 and "cannot connect to the backend store postgresql://kflift:***@" in proc.stderr
    assert "secret" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = kflift("server", "--port", str(port), "--output", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert not (tmp_path / "postgres").exists()  # refused before a cluster was made
