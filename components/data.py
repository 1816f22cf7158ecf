"""Image folders in, transformed TFRecords out: the data helpers every stage shares.

Nothing here imports tf.Transform: it switches tf.keras to Keras 2 in the importing process,
and the model stages use Keras 3.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data that cannot be used; the message names the path and the problem."""


def list_images(
    source: str | Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, list[Path]]:
    """Map each class to its files, sorted, after include/exclude filters.

    `source` is an image folder (one sub-folder per class) or a CSV manifest of `path,label`
    rows (paths relative to the CSV). Every entry is listed, unreadable ones too: the augment
    stage quarantines them with their reason rather than dropping them.
    """
    root = Path(source)
    if root.is_file() and root.suffix.lower() == ".csv":
        found = _read_manifest(root)
    elif root.is_dir():
        found = {p.name: sorted(f for f in p.iterdir() if not f.is_dir() and not f.name.startswith("."))
                 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    else:
        raise DataError(f"data folder not found: {root}")
    classes = sorted(found)
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder per class)")
    for name, wanted in (("include", include), ("exclude", exclude)):
        missing = sorted(set(wanted or []) - set(classes))
        if missing:
            raise DataError(f"{root}: {name}d classes {missing} are not sub-folders (found {classes})")
    keep = [c for c in classes if (not include or c in include) and c not in set(exclude or [])]
    folder = {c: found[c] for c in keep}
    empty = [c for c, files in folder.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) {empty} hold no files")
    if len(folder) < 2:
        raise DataError(f"{root}: needs at least 2 classes, found {len(folder)} ({keep})")
    return folder


def _read_manifest(path: Path) -> dict[str, list[Path]]:
    import csv

    found: dict[str, list[Path]] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (line == 1 and [c.strip() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{line}: expected 'path,label', got {row}")
            file = Path(row[0].strip())
            found.setdefault(row[1].strip(), []).append(file if file.is_absolute() else path.parent / file)
    return {label: sorted(files) for label, files in found.items()}


def write_digits_folder(target: str | Path) -> Path:
    """scikit-learn's 8x8 digits as a real PNG image folder, written once (atomically)."""
    target = Path(target)
    if (target / ".complete").exists():
        return target
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".digits-"))
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        (tmp / str(label)).mkdir(exist_ok=True)
        img = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(tmp / str(label) / f"{i:04d}.png")
    (tmp / ".complete").write_text("")
    import shutil

    try:
        os.rename(tmp, target)
    except OSError:  # a concurrent run published it first: keep theirs (a reader may be using it)
        shutil.rmtree(tmp)
        if not (target / ".complete").exists():
            raise
    return target


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def publish_dir(work: Path, output: Path) -> None:
    """Move a finished folder into place in one rename: no half output is ever visible."""
    import shutil

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
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


def load_model(model_dir: str | Path):
    import keras

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise DataError(f"no model at {path}")
    # Uncompiled: a stage that trains compiles its own optimizer (a saved one may not even load:
    # Keras brings a nested frozen backbone back trainable).
    return keras.models.load_model(path, compile=False)


def read_meta(dataset_dir: str | Path) -> dict:
    """The augment stage's description of its output: image size, classes, counts."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no {META_FILE}; is this an augment stage output?")
    return json.loads(path.read_text())


def load_split(dataset_dir: str | Path, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
               augmented: bool = True, epochs: tuple[int, int] = (0, 1)):
    """A tf.data pipeline of (image, label) batches from the transformed TFRecords.

    `augmented=False` keeps only the original images (drops the offline augmented copies), so a
    candidate can be trained without the augmentation lever on the same dataset. With `shuffle`,
    one pass per epoch in `range(*epochs)`, each shuffled by (seed, epoch): training resumed at
    epoch k sees the same batches as an uninterrupted run (fit it with steps_per_epoch).
    """
    import tensorflow as tf

    meta = read_meta(dataset_dir)
    size = meta["image_size"]
    files = sorted(str(p) for p in (Path(dataset_dir) / split).glob("*.tfrecord.gz"))
    if not files:
        raise DataError(f"{dataset_dir}/{split}: no TFRecord shards")
    spec = {
        "image": tf.io.FixedLenFeature([size, size, 3], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(batch):
        ex = tf.io.parse_example(batch, spec)
        return ex["image"], ex["label"], ex["key"]

    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    # Parse in large batches (fast), then cache the decoded split: small datasets fit in memory.
    ds = ds.batch(1024).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    if not augmented:
        ds = ds.filter(lambda image, label, key: tf.logical_not(tf.strings.regex_full_match(key, ".*-aug[0-9]+")))
    ds = ds.map(lambda image, label, key: (image, label)).cache()
    if shuffle:
        one = ds
        return tf.data.Dataset.range(*epochs).flat_map(
            lambda e: one.shuffle(20_000, seed=seed * 100_003 + e).batch(batch_size)).prefetch(tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def split_size(dataset_dir: str | Path, split: str, augmented: bool = True) -> int:
    written = read_meta(dataset_dir)["stats"]["written"]
    return int(written["by_split" if augmented else "originals_by_split"].get(split, 0))


def _child_main(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
        import traceback

        traceback.print_exc()
        conn.send(("error", exc))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # TensorFlow + tf.Transform + Beam can crash in interpreter teardown (segfault while
    # garbage-collecting modules); the work is done and sent, so skip the teardown.
    os._exit(0)


def in_child_process(fn, *args):
    """Run fn in a fresh process: tf.Transform stays out of the caller (it flips tf.keras to
    Keras 2 process-wide) and its teardown crash cannot take the stage down."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_conn, fn, args), name="kflift-worker")
    proc.start()
    child_conn.close()
    try:
        status, value = parent_conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"worker process died (exit code {proc.exitcode})") from None
    proc.join()
    if status == "error":
        raise value
    return value
