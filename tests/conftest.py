"""Shared fixtures: small real image folders and one augmented dataset reused by stage tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFLIFT_SHARED", REPO.parent / "shared"))
CIFAR = SHARED / "datasets" / "cifar10-vehicles"


def copy_subset(src: Path, dst: Path, classes: list[str], per_class: int) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copy(f, dst / c / f.name)
    return dst


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR.is_dir():
        pytest.fail(f"shared dataset missing: {CIFAR} (CI lays ../shared beside the repo)")
    return CIFAR


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory, cifar_dir) -> Path:
    """automobile vs truck as target, airplane + ship as transfer source: 24 images each."""
    return copy_subset(cifar_dir, tmp_path_factory.mktemp("cifar"), ["airplane", "automobile", "ship", "truck"], 24)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from kflift.components.data import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_subset(digits_dir, tmp_path_factory.mktemp("tiny-digits"), [str(d) for d in range(10)], 15)


@pytest.fixture(scope="session")
def cifar_dataset(tmp_path_factory, tiny_cifar) -> Path:
    """The augment stage's output for automobile vs truck, shared by the model-stage tests."""
    from kflift.components.augment import augment

    out = tmp_path_factory.mktemp("augmented") / "target"
    augment(str(tiny_cifar), str(out), include_classes=["automobile", "truck"], copies=1,
            val_fraction=0.2, test_fraction=0.25)
    return out


@pytest.fixture(scope="session")
def source_dataset(tmp_path_factory, tiny_cifar) -> Path:
    from kflift.components.augment import augment

    out = tmp_path_factory.mktemp("augmented") / "source"
    augment(str(tiny_cifar), str(out), include_classes=["airplane", "ship"], copies=0)
    return out


def kflift(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "kflift.pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compiled(tmp_path: Path, *sets: str) -> tuple[dict, dict]:
    """`kflift compile` with these `--set`s: the pipeline spec and its Kubernetes platform spec."""
    import yaml

    out = tmp_path / "pipeline.yaml"
    proc = kflift("compile", "-o", str(out), *[arg for s in sets for arg in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def broken_image_folder(data: Path) -> Path:
    """Two classes of files that are not images: augment fails at once (no valid image)."""
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            (data / c / f"{i}.png").write_bytes(b"not an image")
    return data


def stop_process_group(proc: subprocess.Popen) -> None:
    """A server started with start_new_session and its workers: SIGTERM, then SIGKILL after 30 s."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# The digits demo's transfer source, named: with --data the digits' default source does not apply.
DIGITS_SOURCE = ["--set", "transfer.source_classes=0,1,2,3,4"]

# A small but complete run: every stage, a couple of epochs each.
FAST = ["--set", "train.epochs=2", "--set", "transfer.pretrain_epochs=2", "--set", "transfer.frozen_epochs=1",
        "--set", "transfer.finetune_epochs=1", "--set", "augment.copies=1", "--set", "augment.shards=1"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, tiny_digits) -> tuple[subprocess.CompletedProcess, Path]:
    """One `kflift run` of the default demo (digits) in subprocesses, shared by the tests that
    inspect such a run (test_e2e), compare another runner's records with it (test_docker) or go
    on from its cache (test_reliability, which adds runs to its store: under pytest-xdist it is in a
    group of its own, so its worker makes its own run; in one process it runs after the others)."""
    out = tmp_path_factory.mktemp("digits-run") / "out"
    return kflift("run", "--output", str(out), "--data", str(tiny_digits), *FAST, *DIGITS_SOURCE,
                  timeout=1800), out


def finished_stage_runs(client, summary: dict) -> dict:
    """A pipeline run's nested MLflow runs by stage, after checking that they and their parent
    (tagged with the run id) FINISHED."""
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kflift.run_id"] == summary["run_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(r.info.status == "FINISHED" for r in children)
    return {r.data.tags["kflift.stage"]: r for r in children}
