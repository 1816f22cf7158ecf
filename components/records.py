"""The augment stage's output as the model stages read it: meta.json and tf.data over the TFRecord splits."""
from __future__ import annotations

import json
from pathlib import Path

from .sources import DataError

META_FILE = "meta.json"


SPLITS = ("train", "val", "test")


def read_meta(dataset_dir: str | Path) -> dict:
    """The augment stage's description of its output: image size, classes, counts."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no {META_FILE}; is this an augment stage output?")
    return json.loads(path.read_text())


def split_files(dataset_dir: str | Path, split: str) -> list[str]:
    """A split's TFRecord shards, in the order every reader takes them."""
    files = sorted(str(p) for p in (Path(dataset_dir) / split).glob("*.tfrecord.gz"))
    if not files:
        raise DataError(f"{dataset_dir}/{split}: no TFRecord shards")
    return files


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
    files = split_files(dataset_dir, split)
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
        ds = tf.data.Dataset.range(*epochs).flat_map(
            lambda e: one.shuffle(20_000, seed=seed * 100_003 + e).batch(batch_size))
    else:
        ds = ds.batch(batch_size)
    # No autotuning: deleting an autotuned iterator (Keras drops the validation one each epoch, the
    # training one after fit) waited for the tuner's thread, about 10 s at the end of most epochs on
    # 2 cores (found with py-spy); the data is cached in memory after the first pass, so the tuner
    # buys nothing.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def split_size(dataset_dir: str | Path, split: str, augmented: bool = True) -> int:
    written = read_meta(dataset_dir)["stats"]["written"]
    return int(written["by_split" if augmented else "originals_by_split"].get(split, 0))
