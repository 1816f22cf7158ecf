"""The local step cache (components/cache.py) on small fake artifacts: what changes a key and what does
not, how keys chain, and that a stage that dies publishes nothing. No TensorFlow, no KFP run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kflift.components import cache, files
from kflift.components.cache import FINGERPRINT, Spec, StageCache

# Real stage modules: the code version reads their source (and that of what they import), never imports them.
AUGMENT, BUILD, TRAIN = ("kflift.components.augment:augment", "kflift.components.build:build",
                         "kflift.components.train:train")


@dataclass
class Artifact:
    """What the cache reads of a KFP artifact: its name, local path and metadata."""
    name: str
    path: str
    metadata: dict = field(default_factory=dict)


def artifact(folder: Path, name: str, fingerprint: str | None = None) -> Artifact:
    return Artifact(name, str(folder / name), {FINGERPRINT: fingerprint} if fingerprint else {})


def build_key(dataset: Artifact, model: Artifact, **params) -> str:
    """The key of a build stage: one input artifact, one output artifact, parameters."""
    return cache.fingerprint(BUILD, {"dataset_dir": dataset.path, "output_path": model.path, **params},
                             Spec(inputs=[dataset], outputs=[model]))


def image_folder(root: Path) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{i}.png").write_bytes(b"png" * (i + 1))
    return root


def test_the_key_is_the_same_wherever_the_outputs_and_inputs_lie(tmp_path):
    dataset = artifact(tmp_path / "run-1", "dataset", "d" * 64)
    key = build_key(dataset, artifact(tmp_path / "run-1", "model"), dropout=0.1)
    assert len(key) == 64
    assert build_key(dataset, artifact(tmp_path / "run-2" / "deeper", "model"), dropout=0.1) == key
    # an input counts by its fingerprint, not its path: the same dataset in another run's folder
    moved = artifact(tmp_path / "run-3", "dataset", "d" * 64)
    assert build_key(moved, artifact(tmp_path / "run-3", "model"), dropout=0.1) == key
    # a parameter is part of the key; so is the stage
    assert build_key(dataset, artifact(tmp_path / "run-1", "model"), dropout=0.2) != key
    model = artifact(tmp_path / "run-1", "model")
    assert cache.fingerprint(TRAIN, {"dataset_dir": dataset.path, "output_path": model.path, "dropout": 0.1},
                             Spec(inputs=[dataset], outputs=[model])) != key


def test_keys_chain_through_the_fingerprints_of_the_inputs(tmp_path):
    model = artifact(tmp_path / "down", "model")
    assert build_key(artifact(tmp_path / "up", "dataset", "a" * 64), model) != \
        build_key(artifact(tmp_path / "up", "dataset", "b" * 64), model)

    # end to end: the upstream stage marks its output with its key, which the downstream key reads
    def chained(copies: int) -> tuple[str, str]:
        dataset = artifact(tmp_path / "up", "dataset")
        upstream = StageCache(str(tmp_path / "cache"), "use", AUGMENT, {"output_dir": dataset.path, "copies": copies},
                              Spec(outputs=[dataset]))
        upstream.mark()
        assert dataset.metadata == {FINGERPRINT: upstream.key}
        return upstream.key, build_key(dataset, model)

    (up1, down1), (up1_again, down1_again), (up2, down2) = chained(1), chained(1), chained(2)
    assert (up1, down1) == (up1_again, down1_again)
    assert up1 != up2 and down1 != down2  # an upstream parameter changes every key below it

    # an input made outside the cache (no fingerprint in its metadata) counts by its bytes
    outside = artifact(tmp_path / "outside", "dataset")
    Path(outside.path).mkdir(parents=True)
    (Path(outside.path) / "meta.json").write_text('{"num_classes": 2}')
    before = build_key(outside, model)
    assert build_key(outside, model) == before
    (Path(outside.path) / "meta.json").write_text('{"num_classes": 3}')
    assert build_key(outside, model) != before


def test_a_data_change_gives_a_new_key(tmp_path):
    folder = image_folder(tmp_path / "images")
    dataset = artifact(tmp_path / "run", "dataset")

    def key() -> str:
        return cache.fingerprint(AUGMENT, {"data_dir": str(folder), "output_dir": dataset.path, "copies": 1},
                                 Spec(outputs=[dataset], data=[str(folder)]))

    seen = [key()]
    assert key() == seen[0]
    (folder / "cat" / ".DS_Store").write_bytes(b"not listed")  # hidden files are not data
    assert key() == seen[0]

    def changed() -> None:
        new = key()
        assert new not in seen
        seen.append(new)

    f = folder / "cat" / "0.png"
    mtime = f.stat().st_mtime_ns
    f.write_bytes(b"another image, another size")
    os.utime(f, ns=(mtime, mtime))  # the old mtime: the size alone tells
    changed()
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))  # touched, same size
    changed()
    (folder / "dog" / "2.png").write_bytes(b"png")  # a new file
    changed()
    (folder / "dog" / "2.png").rename(folder / "cat" / "2.png")  # moved to another class
    changed()
    (folder / "cat" / "2.png").unlink()  # removed: the listing, and so the key, of before it came
    assert key() == seen[2]


@pytest.fixture
def stage_package(tmp_path, monkeypatch):
    """A stage module on sys.path in a package standing in for kflift.components, with modules it
    imports (absolute, relative, from the package) and a module it does not."""
    name = "kflift_test_stages"
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("SCALE = 1\n")
    (pkg / "files.py").write_text("")
    (pkg / "records.py").write_text("")
    (pkg / "stage.py").write_text(f"from {name} import helpers\nfrom .files import *\nfrom . import records\n\n\n"
                                  "def run(x):\n    return x * helpers.SCALE\n")
    (pkg / "unrelated.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(cache, "PACKAGE", name)
    yield pkg
    sys.modules.pop(name, None)  # find_spec imported the (empty) package


def test_a_code_change_gives_a_new_key(stage_package, tmp_path, monkeypatch):
    out = artifact(tmp_path / "run", "result")

    def key() -> str:
        return cache.fingerprint(f"{stage_package.name}.stage:run", {"x": 1, "output_path": out.path},
                                 Spec(outputs=[out]))

    seen = [key()]
    assert key() == seen[0]
    (stage_package / "unrelated.py").write_text("CHANGED = True\n")  # a module the stage does not import
    assert key() == seen[0]
    for path, source in [(stage_package / "stage.py", None),  # the stage's own source
                         (stage_package / "helpers.py", "SCALE = 2\n"),  # a component module it imports
                         (stage_package / "files.py", "X = 1\n"),  # relative: from .files import
                         (stage_package / "records.py", "Y = 1\n")]:  # relative: from . import records
        path.write_text(source or path.read_text() + "\n# a comment is a change too\n")
        assert key() not in seen
        seen.append(key())
    monkeypatch.setattr("importlib.metadata.version", lambda dist: "99.0.0")  # kflift's own version
    assert key() not in seen


def test_each_real_stage_fingerprints_its_own_code_not_every_stages():
    """The stage table imports every stage; a stage module that imported it for its result type
    took every stage's code into its key, so an edit to evaluate.py reran augment (found when a
    benchmark's cache missed). The real modules, read as the cache reads them."""
    def code(stage: str) -> set[str]:
        return {m.rsplit(".", 1)[1] for m in cache.code_modules(f"kflift.components.{stage}")}

    for stage, others in {"augment": {"train", "finetune", "evaluate"}, "train": {"augment", "finetune", "evaluate"},
                          "finetune": {"augment", "evaluate"}, "evaluate": {"train", "finetune"}}.items():
        assert "results" in code(stage) and "stages" not in code(stage), stage
        assert not code(stage) & others, stage
    assert "train" in code("finetune")  # finetune trains through train.fit
    assert "augment" in code("evaluate")  # the serving model decodes images as augment does


CACHE_MODES = ("use", "refresh", "")


def train_cache(tmp_path: Path, run: str, mode: str = "use") -> tuple[StageCache, dict, Artifact]:
    """A training stage's view of the cache in pipeline run `run`: same inputs, its own output path."""
    assert mode in CACHE_MODES
    dataset = artifact(tmp_path / "up", "dataset", "d" * 64)
    model = artifact(tmp_path / run, "model")
    kwargs = {"dataset_dir": dataset.path, "output_path": model.path, "epochs": 3}
    spec = Spec(inputs=[dataset], outputs=[model], checkpoints=True)
    return StageCache(str(tmp_path / "cache"), mode, TRAIN, kwargs, spec), kwargs, model


def write_output(model: Artifact, content: bytes = b"weights") -> None:
    Path(model.path).mkdir(parents=True, exist_ok=True)
    (Path(model.path) / "model.keras").write_bytes(content)


def test_a_finished_stage_is_a_hit_for_the_next_run_with_its_outputs_linked(tmp_path):
    store, kwargs, model = train_cache(tmp_path, "run-1")
    assert store.lookup() is None
    write_output(model)
    store.store("train", {"metrics": {"accuracy": 0.9}}, producer="mlflow-1")
    again, _, moved = train_cache(tmp_path, "run-2")
    assert again.key == store.key
    assert again.lookup() == {"stage": "train", "producer": "mlflow-1", "result": {"metrics": {"accuracy": 0.9}}}
    again.restore()
    assert os.path.samefile(Path(moved.path) / "model.keras", Path(model.path) / "model.keras")  # no copy
    # --no-cache reads nothing but stores afresh; a cluster run ("") leaves the cache alone
    fresh, _, other = train_cache(tmp_path, "run-3", mode="refresh")
    assert fresh.lookup() is None
    write_output(other, b"retrained")
    fresh.store("train", {"metrics": {"accuracy": 0.8}}, producer="mlflow-3")
    assert again.lookup()["producer"] == "mlflow-3"
    off, off_kwargs, _ = train_cache(tmp_path, "run-4", mode="")
    assert not off.on and off.lookup() is None and off.prepare(off_kwargs) == off_kwargs


def test_a_stage_that_raises_midway_publishes_nothing_and_its_rerun_resumes(tmp_path):
    store, kwargs, model = train_cache(tmp_path, "run-1")
    with pytest.raises(RuntimeError, match="epoch 2"):
        with store.locked("train"):
            assert store.lookup() is None
            args = store.prepare(kwargs)
            assert args == {**kwargs, "checkpoint_dir": str(store.partial), "resume": False}
            Path(args["checkpoint_dir"]).mkdir()
            (Path(args["checkpoint_dir"]) / "epoch-001.keras").write_bytes(b"epoch 1")
            write_output(model, b"half written")
            raise RuntimeError("died in epoch 2")
    assert not store.entry.exists()
    rerun, kwargs, _ = train_cache(tmp_path, "run-2")
    assert rerun.key == store.key and rerun.lookup() is None
    assert rerun.prepare(kwargs)["resume"] is True  # it continues from the dead run's checkpoints
    # --no-cache starts over: the checkpoints go
    fresh, kwargs, _ = train_cache(tmp_path, "run-3", mode="refresh")
    assert fresh.prepare(kwargs)["resume"] is False and not fresh.partial.exists()


def test_a_stage_killed_while_publishing_leaves_no_entry(tmp_path, monkeypatch):
    store, _, model = train_cache(tmp_path, "run-1")
    write_output(model)

    def killed(*args, **kwargs):  # after the outputs are linked, before the entry file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        store.store("train", {"metrics": {}}, producer="mlflow-1")
    assert not store.entry.exists() and store.lookup() is None
    assert train_cache(tmp_path, "run-2")[0].lookup() is None
    monkeypatch.undo()
    store.store("train", {"metrics": {}}, producer="mlflow-1")
    assert train_cache(tmp_path, "run-2")[0].lookup()["producer"] == "mlflow-1"


KILLED_STAGE = """
import os, signal, sys
from pathlib import Path
from kflift.components.cache import Spec, StageCache

class Artifact:
    def __init__(self, name, path, metadata):
        self.name, self.path, self.metadata = name, path, metadata

root, dataset_dir, output_path = sys.argv[1:]
dataset, model = Artifact("dataset", dataset_dir, {"kflift.fingerprint": "d" * 64}), Artifact("model", output_path, {})
kwargs = {"dataset_dir": dataset_dir, "output_path": output_path, "epochs": 3}
store = StageCache(root, "use", "kflift.components.train:train", kwargs,
                   Spec(inputs=[dataset], outputs=[model], checkpoints=True))
with store.locked("train"):
    checkpoints = Path(store.prepare(kwargs)["checkpoint_dir"])
    checkpoints.mkdir()
    (checkpoints / "epoch-001.keras").write_bytes(b"epoch 1")
    Path(output_path).mkdir(parents=True)
    (Path(output_path) / "model.keras").write_bytes(b"half written")
    print(store.key, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_stage_killed_9_publishes_nothing_and_its_lock_is_free(tmp_path, monkeypatch):
    store, kwargs, model = train_cache(tmp_path, "run-2")
    first_model = tmp_path / "run-1" / "model"
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGE, str(tmp_path / "cache"), kwargs["dataset_dir"],
                           str(first_model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == store.key  # the child computed the same key
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{store.key}.lock", f"{store.key}.partial"]
    assert store.lookup() is None

    def still_held(message, **kwargs):  # file_lock prints this before it would wait
        raise AssertionError(f"the killed run's lock is still held: {message}")

    monkeypatch.setattr(files, "print", still_held, raising=False)
    with store.locked("train"):  # released by the OS on kill -9: taken at once
        assert store.prepare(kwargs)["resume"] is True  # and the rerun continues from its checkpoints


def test_a_second_run_of_the_same_key_waits_for_the_first(tmp_path, monkeypatch):
    first, _, _ = train_cache(tmp_path, "run-1")
    second, _, _ = train_cache(tmp_path, "run-2")
    printed, waiting, entered = [], threading.Event(), threading.Event()
    monkeypatch.setattr(files, "print", lambda *a, **k: (printed.append(a[0]), waiting.set()), raising=False)

    def second_run():
        with second.locked("train"):
            entered.set()

    thread = threading.Thread(target=second_run, daemon=True)
    with first.locked("train"):
        thread.start()
        assert waiting.wait(30), "the second run did not find the lock taken"
        assert not entered.is_set()
    assert entered.wait(30)
    thread.join(30)
    assert printed == [f"train: another run is computing fingerprint {first.key[:12]}; waiting for it"]
