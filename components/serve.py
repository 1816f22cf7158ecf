"""Serving: the champion model wrapped with the transform graph, taking raw encoded image bytes.

The export runs tf.Transform's own layer, so serving applies exactly the training-time
preprocessing. It runs in a child process: tf.Transform changes tf.keras process-wide.

One scorer (`Scorer`) serves both ways in: `predict_files` (`kflift predict`) and the MLflow pyfunc
model registered as the champion (`save_mlflow_model`, components/serve_model.py). MLflow saves a
copy of this file with that model and imports it there without kflift, so the module imports only
the standard library at the top and `Scorer` needs only TensorFlow and NumPy.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# The file name MLflow gives this module inside a saved pyfunc model (its `code_paths`); a distinct
# top-level name, so nothing else called `serve` can stand in for it.
MODEL_CODE_MODULE = "kflift_serve"


def _export(model_dir: str, transform_dir: str, export_dir: str, labels: list[str], tta: bool) -> str:
    import tensorflow as tf
    import tensorflow_transform as tft

    from kflift.components.files import load_model, publish_dir, staging_dir

    layer = tft.TFTransformOutput(transform_dir).transform_features_layer()
    model = load_model(model_dir)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.transform, self.model = layer, model
            # A variable, not a constant: the loaded model names its classes (`Scorer.classes`).
            self.classes = tf.Variable(labels, trainable=False, name="classes")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            blank = tf.fill(tf.shape(image_bytes), "")  # label and key are not known when serving
            images = self.transform({"image": image_bytes, "label": blank, "key": blank})["image"]
            probs = self.model(images, training=False)
            if tta:  # the mean over the image and its mirror, as evaluate scored it
                probs = (probs + self.model(tf.image.flip_left_right(images), training=False)) / 2
            if probs.shape[-1] == 1:  # one sigmoid unit: P(second class)
                probs = tf.concat([1.0 - probs, probs], axis=-1)
            best = tf.argmax(probs, axis=-1)
            return {"probabilities": probs, "label": tf.gather(self.classes, best),
                    "probability": tf.reduce_max(probs, axis=-1)}

    module = Serving()
    work = staging_dir(export_dir)
    tf.saved_model.save(module, str(work), signatures={"serving_default": module.serve})
    publish_dir(work, Path(export_dir))
    return export_dir


def export_serving(model_dir: str, transform_dir: str, export_dir: str, labels: list[str], tta: bool) -> str:
    """Write a SavedModel whose `serving_default` maps image bytes to class probabilities (with
    `tta`, the mean over each image and its mirror)."""
    from kflift.components.processes import in_child_process

    return in_child_process(_export, model_dir, transform_dir, export_dir, labels, tta)


@dataclass(frozen=True)
class Scored:
    """One image's result: its label, that label's probability and every class's (in the order
    of `classes`), or `error`, the reason it could not be classified."""
    label: str | None = None
    probability: float | None = None
    probabilities: tuple[float, ...] | None = None
    error: str | None = None
    classes: tuple[str, ...] | None = None


class Scorer:
    """The serving SavedModel on batches of encoded images (JPEG, PNG, GIF, BMP, WebP: what
    tf.io.decode_image reads). An image the graph cannot decode fails alone, with TensorFlow's
    reason, instead of failing its whole batch: a failing batch is split in halves until each
    bad image stands alone, so a good batch costs one call and each bad image about log2(batch)."""

    def __init__(self, export_dir: str | Path, batch_size: int = 256):
        import tensorflow as tf

        self._tf, self.batch_size = tf, batch_size
        loaded = tf.saved_model.load(str(export_dir))
        self._serve = loaded.signatures["serving_default"]
        self._loaded = loaded  # keeps the variables the signature reads alive
        classes = getattr(loaded, "classes", None)  # exports before class names were kept: None
        self.classes = tuple(c.decode() for c in classes.numpy()) if classes is not None else None

    def score(self, blobs: list[bytes]) -> list[Scored]:
        """One result per encoded image, in order."""
        out: list[Scored | None] = [None if blob else Scored(error="empty image (zero bytes)") for blob in blobs]
        todo = [i for i, blob in enumerate(blobs) if blob]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            for i, result in zip(batch, self._score([blobs[i] for i in batch])):
                out[i] = result
        return out

    def _score(self, blobs: list[bytes]) -> list[Scored]:
        tf = self._tf
        try:
            out = self._serve(image_bytes=tf.constant(blobs))
        except tf.errors.OpError as exc:
            if len(blobs) == 1:
                return [Scored(error=f"cannot decode: {_op_reason(exc)}")]
            half = len(blobs) // 2
            return self._score(blobs[:half]) + self._score(blobs[half:])
        return [Scored(label.decode(), float(best), tuple(float(p) for p in probs), classes=self.classes)
                for label, best, probs in zip(out["label"].numpy(), out["probability"].numpy(),
                                              out["probabilities"].numpy())]


def _op_reason(exc) -> str:
    """TensorFlow's own words for a failed op, without the graph-execution boilerplate."""
    for line in (exc.message or "").splitlines():
        line = line.strip()
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack traces", "[[")):
            return line
    return type(exc).__name__


def predict_files(export_dir: str, paths: Iterable[str], batch_size: int, max_pixels: int
                  ) -> Iterator[tuple[str, Scored]]:
    """(path, result) for each file, in order, read and scored `batch_size` files at a time, so
    any number of paths takes the same memory.

    Each file is read and checked as the augment stage checks its inputs (unreadable, zero bytes,
    not an image, corrupt or truncated, more than `max_pixels`: a result with that reason) and
    converted as it converts them (formats TensorFlow does not decode become PNG), so a file is
    served exactly as it would have been trained on.
    """
    from kflift.components.augment import decode_image

    scorer = Scorer(export_dir, batch_size)  # here, not on the first next(): a bad model fails now

    def results():
        it = iter(paths)
        while batch := list(itertools.islice(it, batch_size)):
            checked = [decode_image(str(path), "", max_pixels) for path in batch]
            scored = iter(scorer.score([rec["image"] for rec in checked if "reason" not in rec]))
            for path, rec in zip(batch, checked):
                yield str(path), Scored(error=rec["reason"]) if "reason" in rec else next(scored)

    return results()


def save_mlflow_model(serving_dir: str | Path, model_dir: str | Path, labels: list[str]) -> Path:
    """Package the serving SavedModel as an MLflow pyfunc model in `model_dir` (a new folder).

    Input: a DataFrame column `image` of encoded image bytes (base64 strings in the JSON of
    `/invocations`; the scoring server decodes them by the signature). Output per image: `label`,
    `probability`, `probability_<class>` for each class and `error` (see serve_model.py). The
    model loads with MLflow, pandas, NumPy and TensorFlow alone: its code is serve_model.py (models
    from code) and a copy of this file, its requirements are pinned to the versions installed here
    (the project's constraints).
    """
    from importlib.metadata import version

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    from kflift.components import serve_model

    inputs = Schema([ColSpec(DataType.binary, "image")])
    outputs = Schema([ColSpec(DataType.string, "label", required=False),
                      ColSpec(DataType.double, "probability", required=False),
                      *[ColSpec(DataType.double, column, required=False) for column in serve_model.class_columns(labels)],
                      ColSpec(DataType.string, "error", required=False)])
    requirements = [f"{name}=={version(name)}" for name in ("mlflow", "tensorflow", "numpy", "pandas")]
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / f"{MODEL_CODE_MODULE}.py"
        shutil.copyfile(__file__, code)
        mlflow.pyfunc.save_model(
            str(model_dir), python_model=serve_model.__file__, artifacts={"serving": str(serving_dir)},
            code_paths=[str(code)], signature=ModelSignature(inputs, outputs),
            input_example=pd.DataFrame({"image": [_example_png()]}), pip_requirements=requirements,
            metadata={"kflift.classes": list(labels)})
    return Path(model_dir)


def _example_png() -> bytes:
    """A small grey PNG: the model's input example (and the body of serving_input_example.json)."""
    import tensorflow as tf

    return tf.io.encode_png(tf.fill([32, 32, 3], tf.constant(128, tf.uint8))).numpy()
