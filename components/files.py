"""Files that appear whole or not at all: atomic JSON, staged folders published by one rename,
Keras models saved atomically, and the one flock every concurrent writer takes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .sources import DataError


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def publish_dir(work: Path, output: Path) -> None:
    """Move a finished folder into place in one rename: no half output is ever visible."""
    output = Path(output)
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(work, output)


def staging_dir(output: str | Path) -> Path:
    """A fresh sibling folder to build an output in before `publish_dir`."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-partial-"))


@contextlib.contextmanager
def file_lock(path: str | Path, waiting: str = ""):
    """Hold an exclusive flock on `path` (created if missing) for the block: one process at a time.
    The OS releases it when its holder dies, kill -9 included, so a crash never leaves a stale lock.
    `waiting` is printed when another process holds it, before waiting for it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


MODEL_FILE = "model.keras"


def save_model(model, model_dir: str | Path) -> Path:
    """Save a Keras model as `<dir>/model.keras`, atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    return save_atomically(model, model_dir / MODEL_FILE)


def save_atomically(model, path: Path) -> Path:
    """Save a Keras model to a temporary name, then rename: a kill mid-save leaves no half file."""
    tmp = _partial_file(path)
    model.save(tmp)
    os.replace(tmp, path)
    return path


def link_atomically(source: Path, path: Path) -> Path:
    """`path` as a second name of the finished file `source` (a hard link, or a copy where the
    filesystem has none), appearing whole: a model already on disk is not serialized again."""
    tmp = _partial_file(path)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


def _partial_file(path: Path) -> Path:
    """A hidden sibling of `path`, this process's own, to write before one rename into place."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def load_model(model_dir: str | Path):
    import keras

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise DataError(f"no model at {path}")
    # Uncompiled: a stage that trains compiles its own optimizer (a saved one may not even load:
    # Keras brings a nested frozen backbone back trainable).
    return keras.models.load_model(path, compile=False)
