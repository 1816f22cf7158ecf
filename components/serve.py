"""Serving: the champion model wrapped with the transform graph, taking raw encoded image bytes.

The export runs tf.Transform's own layer, so serving applies exactly the training-time
preprocessing. It runs in a child process: tf.Transform changes tf.keras process-wide.
"""
from __future__ import annotations

from pathlib import Path

from kflift.components.data import in_child_process


def _export(model_dir: str, transform_dir: str, export_dir: str, labels: list[str]) -> str:
    import tensorflow as tf
    import tensorflow_transform as tft

    from kflift.components.data import load_model, publish_dir, staging_dir

    layer = tft.TFTransformOutput(transform_dir).transform_features_layer()
    model = load_model(model_dir)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.transform, self.model = layer, model
            self.labels = tf.constant(labels)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            blank = tf.fill(tf.shape(image_bytes), "")  # label and key are not known when serving
            images = self.transform({"image": image_bytes, "label": blank, "key": blank})["image"]
            probs = self.model(images, training=False)
            if probs.shape[-1] == 1:  # one sigmoid unit: P(second class)
                probs = tf.concat([1.0 - probs, probs], axis=-1)
            best = tf.argmax(probs, axis=-1)
            return {"probabilities": probs, "label": tf.gather(self.labels, best),
                    "probability": tf.reduce_max(probs, axis=-1)}

    module = Serving()
    work = staging_dir(export_dir)
    tf.saved_model.save(module, str(work), signatures={"serving_default": module.serve})
    publish_dir(work, Path(export_dir))
    return export_dir


def export_serving(model_dir: str, transform_dir: str, export_dir: str, labels: list[str]) -> str:
    """Write a SavedModel whose `serving_default` maps image bytes to class probabilities."""
    return in_child_process(_export, model_dir, transform_dir, export_dir, labels)


def predict_files(export_dir: str, paths: list[str]) -> list[tuple[str, str, float]]:
    """(path, label, probability) for each image file, through the serving model."""
    import tensorflow as tf

    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    rows = []
    for path in paths:
        out = serving(image_bytes=tf.constant([Path(path).read_bytes()]))
        rows.append((path, out["label"].numpy()[0].decode(), float(out["probability"].numpy()[0])))
    return rows
