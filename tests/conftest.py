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


def settings(stage: str, **overrides) -> dict:
    """A stage function's keyword arguments, as pipeline.py composes them for the baseline candidate
    (no regularization, no early stopping), with `overrides` on top. From configs/seed-cnn.yaml: the
    stage tests look at the seed CNN's named layers and train quickly (the end-to-end runs use the
    defaults, the residual net)."""
    from kflift.pipeline.config import load_config
    from kflift.pipeline.pipeline import UNREGULARIZED

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "seed-cnn.yaml")
    fit = {**cfg.train.fit_kwargs(), "monitor": cfg.regularization.monitor, "augmented": True,
           "batch_mixing": cfg.augment.ops.batch_mixing()}
    return {**{
        "augment": lambda: cfg.augment.stage_kwargs(),
        "build": lambda: {**cfg.model.stage_kwargs(), **UNREGULARIZED, "seed": cfg.train.seed, "online_ops": {}},
        "train": lambda: {**cfg.train.stage_kwargs(), **fit, "patience": 0, "name": "model"},
        "finetune": lambda: {**cfg.transfer.stage_kwargs(), **fit, "patience": cfg.regularization.patience},
        "evaluate": lambda: cfg.evaluate.stage_kwargs(),
    }[stage](), **overrides}


def pytest_collection_finish(session):
    """Under `--dist loadgroup` each worker must see its xdist_group in the node ids, or tests that share
    one run (or one Docker image build) land on two workers and each makes its own. pytest 9.2 broke
    this silently in pytest-xdist 3.8 (it sets Item._nodeid, which 9.2 no longer reads)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist ignores the xdist_group of {len(lost)} tests (e.g. {lost[0]}): "
                                "pin a pytest that pytest-xdist supports")


def timeless(stats: dict) -> dict:
    """An augment run's stats.json without its timings: what two runs of the same input share."""
    return {k: v for k, v in stats.items() if k not in ("wall_seconds", "images_per_second")}


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
    from kflift.components.sources import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_subset(digits_dir, tmp_path_factory.mktemp("tiny-digits"), [str(d) for d in range(10)], 15)


@pytest.fixture(scope="session")
def cifar_dataset(tmp_path_factory, tiny_cifar) -> Path:
    """The augment stage's output for automobile vs truck, shared by the model-stage tests."""
    from kflift.components.augment import augment

    out = tmp_path_factory.mktemp("augmented") / "target"
    augment(str(tiny_cifar), str(out), include_classes=["automobile", "truck"],
            **settings("augment", copies=1, val_fraction=0.2, test_fraction=0.25))
    return out


@pytest.fixture(scope="session")
def source_dataset(tmp_path_factory, tiny_cifar) -> Path:
    from kflift.components.augment import augment

    out = tmp_path_factory.mktemp("augmented") / "source"
    augment(str(tiny_cifar), str(out), include_classes=["airplane", "ship"], **settings("augment", copies=0))
    return out


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, its tables made once: making them (MLflow's migrations) takes seconds."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{db}", (db.parent / "mlartifacts").as_uri())
    return db


@pytest.fixture
def sqlite_tracking_uri(tmp_path, mlflow_store_template) -> str:
    """A fresh SQLite tracking store in tmp_path (a copy of the template), as `kflift run` makes one there."""
    from kflift.components.tracking import default_tracking_uri

    shutil.copy(mlflow_store_template, tmp_path / "mlflow.db")
    return default_tracking_uri(tmp_path)


def kflift(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "kflift.pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


_COMPILED: dict = {}  # (working folder, its last image build, sets) -> the pipeline YAML


def compiled(tmp_path: Path, *sets: str) -> tuple[dict, dict]:
    """`kflift compile` with these `--set`s: the pipeline spec and its Kubernetes platform spec.
    The CLI's own entry point, in this process (a child process per compile costs a second of
    imports), once per session for the same arguments; each caller gets its own parsed copy."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from kflift.pipeline.cli import main

    out = tmp_path / "pipeline.yaml"
    last_build = Path("kflift-output") / "images.json"  # the default output's: compile reads it
    key = (os.getcwd(), last_build.read_text() if last_build.is_file() else None, sets)
    if key in _COMPILED:
        out.write_text(_COMPILED[key])
    else:
        # In a thread of its own: KFP calls inspect.stack() for every task, and under pytest the deep
        # stack's frames without a source file (<frozen runpy>, xdist's <string>) each cost a walk over
        # every loaded module (thousands, once TensorFlow is in), seconds per compile.
        with ThreadPoolExecutor(1) as thread:
            args = ["compile", "-o", str(out), *[arg for s in sets for arg in ("--set", s)]]
            assert thread.submit(main, args).result() == 0
        _COMPILED[key] = out.read_text()
    docs = list(yaml.load_all(_COMPILED[key], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
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
