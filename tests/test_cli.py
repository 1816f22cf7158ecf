"""The CLI refuses bad input with one clear line and a non-zero exit, never a stack trace."""
import pytest

from conftest import copy_subset, kflift, stop_process_group


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr


def test_missing_data_folder(tmp_path):
    proc = kflift("run", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert_clean_failure(proc, "data folder not found", str(tmp_path / "nope"))


def test_one_class_only(tmp_path, cifar_dir):
    data = copy_subset(cifar_dir, tmp_path / "data", ["truck"], 3)
    proc = kflift("run", "--data", str(data), "--output", str(tmp_path / "out"),
                  "--set", "transfer.weights=imagenet", "--set", "transfer.backbone=mobilenetv2")
    assert_clean_failure(proc, "needs at least 2 classes", str(data))


def test_class_folders_without_images(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
    proc = kflift("run", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                  "--set", "transfer.weights=imagenet", "--set", "transfer.backbone=mobilenetv2")
    assert_clean_failure(proc, "hold no files", "['a', 'b']")


def test_named_source_classes_must_exist_in_the_data(tmp_path, cifar_dir):
    data = copy_subset(cifar_dir, tmp_path / "data", ["truck", "automobile"], 3)
    proc = kflift("run", "--data", str(data), "--output", str(tmp_path / "out"), "--set", "transfer.source_classes=0,1")
    assert_clean_failure(proc, "are not sub-folders", "'0'")


@pytest.mark.parametrize("override, key", [("train.epochs=0", "train.epochs"),
                                           ("augment.copies=-2", "augment.copies")])
def test_bad_config_value(tmp_path, override, key):
    proc = kflift("run", "--output", str(tmp_path / "out"), "--set", override)
    assert_clean_failure(proc, key)
    assert proc.returncode == 2


def test_help_explains_every_option():
    proc = kflift("run", "--help")
    assert proc.returncode == 0
    for option in ("--data", "--output", "--tracking-uri", "--runner", "--config", "--set"):
        assert option in proc.stdout


@pytest.mark.slow
def test_ui_serves_the_mlflow_store_on_loopback(tmp_path):
    """`kflift ui` starts the real MLflow UI and prints its URL."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kflift.pipeline.cli", "ui", "--output", str(tmp_path),
                             "--port", str(port)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith(f"MLflow UI: http://127.0.0.1:{port}")
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    status = resp.status
            except OSError:
                assert proc.poll() is None, "the UI process exited"
                time.sleep(0.5)  # polling the server's start-up, bounded by the deadline
        assert status == 200
    finally:  # the server and its workers: the whole process group
        stop_process_group(proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the workers exit after their parent; wait for the port
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"something still listens on port {port} after the UI was stopped")


def test_docker_runner_without_an_engine_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    proc = kflift("run", "--runner", "docker", "--output", str(tmp_path / "out"))
    assert_clean_failure(proc, "no Docker engine answers at unix://", "scripts/docker-engine.sh")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_images_build_refuses_an_empty_wheelhouse(tmp_path):
    proc = kflift("images", "build", "--wheelhouse", str(tmp_path))
    assert_clean_failure(proc, f"wheelhouse {tmp_path} holds no wheels", "kflift images wheelhouse")
