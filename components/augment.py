"""augment: image folder -> quarantine, split, expanded training split, tf.Transform -> TFRecords.

Beam does the per-image work (decode, validate, deduplicate, split, augment); tf.Transform
analyzes the training split (per-channel mean/std, label vocabulary) and writes the transform
graph that serving reuses, so training and serving see the same tensors.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from kflift.components.data import (DataError, META_FILE, SPLITS, list_image_folder, publish_dir,
                                    staging_dir, write_json)

# Formats tf.io.decode_image reads directly: their original bytes go to tf.Transform untouched,
# so serving the same file gives the same tensor as training.
TF_DECODABLE = {"JPEG", "PNG", "BMP", "GIF"}
TF_DECODABLE_MODES = {"RGB", "L"}


def _hash_fraction(sha: str) -> float:
    return int(sha[:12], 16) / float(16**12)


def split_of(sha: str, val_fraction: float, test_fraction: float) -> str:
    """The split an image belongs to, from its content hash: stable across runs and machines."""
    u = _hash_fraction(sha)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def decode_image(path: str, label: str, max_pixels: int) -> dict:
    """Read and check one file. Returns a record, or a quarantine entry with its reason."""
    base = {"path": path, "label": label}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {**base, "reason": f"unreadable: {exc.strerror or exc}"}
    if not data:
        return {**base, "reason": "zero-byte file"}
    sha = hashlib.sha256(data).hexdigest()
    Image.MAX_IMAGE_PIXELS = None  # checked below against our own limit, before decoding
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format, img.mode, img.size
            if w * h > max_pixels:
                return {**base, "sha256": sha, "reason": f"decompression bomb: {w}x{h} pixels > {max_pixels}"}
            img.load()  # a truncated or corrupt file fails here
            rgb = _to_rgb(img)
    except Image.UnidentifiedImageError:
        return {**base, "sha256": sha, "reason": "not an image"}
    except (OSError, ValueError, SyntaxError) as exc:
        return {**base, "sha256": sha, "reason": f"corrupt or truncated image: {exc}"}
    converted = mode not in TF_DECODABLE_MODES
    if fmt in TF_DECODABLE and not converted:
        encoded = data
    else:
        encoded = _png_bytes(rgb)
    return {**base, "sha256": sha, "image": encoded, "format": fmt, "mode": mode, "converted": converted}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def augment_image(rgb: Image.Image, rng: np.random.Generator, *, flip: bool, crop_fraction: float,
                  rotation: float, jitter: float) -> Image.Image:
    """One random variant of an image: pad-and-crop, rotation, flip, colour jitter."""
    w, h = rgb.size
    if crop_fraction > 0:
        pad = max(1, round(crop_fraction * max(w, h)))
        padded = _reflect_pad(rgb, pad)
        dx, dy = rng.integers(0, 2 * pad + 1, size=2)
        rgb = padded.crop((int(dx), int(dy), int(dx) + w, int(dy) + h))
    if rotation > 0:
        rgb = rgb.rotate(float(rng.uniform(-rotation, rotation)), resample=Image.BILINEAR)
    if flip and rng.random() < 0.5:
        rgb = ImageOps.mirror(rgb)
    if jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            rgb = enhancer(rgb).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    return rgb


def _reflect_pad(rgb: Image.Image, pad: int) -> Image.Image:
    arr = np.asarray(rgb)
    return Image.fromarray(np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))


def expand_training_record(record: dict, copies: int, seed: int, ops: dict) -> list[dict]:
    """The original plus `copies` augmented variants; randomness from the run seed and the hash."""
    out = [{"image": record["image"], "label": record["label"]}]
    if copies:
        rgb = _to_rgb(Image.open(io.BytesIO(record["image"])))
        for k in range(copies):
            rng = np.random.default_rng([seed, int(record["sha256"][:15], 16), k])
            out.append({"image": _png_bytes(augment_image(rgb, rng, **ops)), "label": record["label"]})
    return out


def preprocessing_fn(inputs, image_size: int):
    """tf.Transform: raw encoded bytes + label string -> normalized float image + label id."""
    import tensorflow as tf
    import tensorflow_transform as tft

    def decode(raw):
        img = tf.io.decode_image(raw, channels=3, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32) / 255.0, [image_size, image_size])
        return tf.reshape(img, [image_size, image_size, 3])  # TFT needs fully known shapes

    images = tf.map_fn(decode, tf.reshape(inputs["image"], [-1]), fn_output_signature=tf.float32)
    pixels = tf.reshape(images, [-1, 3])
    mean = tft.mean(pixels, reduce_instance_dims=False)
    std = tf.sqrt(tft.var(pixels, reduce_instance_dims=False)) + 1e-6
    label = tft.compute_and_apply_vocabulary(tf.reshape(inputs["label"], [-1]), vocab_filename="labels")
    return {"image": (images - mean) / std, "label": label}


def augment(
    data_dir: str,
    output_dir: str,
    image_size: int = 32,
    include_classes: list[str] | None = None,
    exclude_classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    copies: int = 2,
    flip: bool = True,
    crop_fraction: float = 0.1,
    rotation: float = 10.0,
    jitter: float = 0.1,
    shards: int = 2,
    num_workers: int = 1,
    max_pixels: int = 50_000_000,
    seed: int = 42,
    beam_options: list[str] | None = None,
) -> dict:
    """Run the stage; returns its stats (also written to `stats.json` in the output)."""
    start = time.time()
    folder = list_image_folder(data_dir, include_classes, exclude_classes)
    items = [(str(p), label) for label, files in folder.items() for p in files]
    output = Path(output_dir)
    work = staging_dir(output)
    try:
        counters, labels = _in_child_process(_run_beam, items, work, image_size, val_fraction, test_fraction, copies, seed,
                             {"flip": flip, "crop_fraction": crop_fraction, "rotation": rotation,
                              "jitter": jitter}, shards, num_workers, max_pixels, beam_options or [])
        stats = _stats(counters, len(items), time.time() - start)
        if stats["written"]["originals"] == 0:
            raise DataError(f"{data_dir}: no valid image (all {len(items)} files quarantined, see reasons)")
        missing = [s for s in SPLITS if stats["written"]["by_split"].get(s, 0) == 0 and s != "val"]
        if missing:
            raise DataError(f"{data_dir}: too few valid images to fill split(s) {missing}")
        meta = {"image_size": image_size, "labels": labels, "num_classes": len(labels),
                "source": str(data_dir), "stats": stats}
        write_json(work / META_FILE, meta)
        write_json(work / "stats.json", stats)
        publish_dir(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "params": {"data_dir": data_dir, "image_size": image_size, "include_classes": include_classes or [],
                   "exclude_classes": exclude_classes or [], "val_fraction": val_fraction,
                   "test_fraction": test_fraction, "copies": copies, "flip": flip,
                   "crop_fraction": crop_fraction, "rotation": rotation, "jitter": jitter, "seed": seed,
                   "shards": shards, "num_workers": num_workers, "labels": labels},
        "metrics": {k: v for k, v in stats.items() if k != "written"} | {"written": stats["written"]},
        "artifacts": [(None, output / "stats.json"), (None, output / "quarantine.jsonl"),
                      (None, output / META_FILE), ("transform_fn", output / "transform_fn")],
        "meta": meta,
    }


def _run_beam(items, work: Path, image_size, val_fraction, test_fraction, copies, seed, ops,
              shards, num_workers, max_pixels, beam_options) -> dict[str, int]:
    """Build and run the Beam pipeline; returns its counters."""
    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    # The local runner is named: Beam's default would first try to download Prism.
    args = ["--runner=DirectRunner", f"--direct_num_workers={num_workers}",
            "--direct_running_mode=" + ("multi_processing" if num_workers > 1 else "in_memory")]
    options = PipelineOptions(args + list(beam_options))
    raw_meta = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec({
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.string),
    }))
    coder = tft.coders.ExampleProtoCoder(schema_utils.schema_from_feature_spec({
        "image": tf.io.FixedLenFeature([image_size, image_size, 3], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }))

    def checked(item):
        rec = decode_image(item[0], item[1], max_pixels)
        if "reason" in rec:
            Metrics.counter("kflift", "quarantined:" + rec["reason"].split(":")[0]).inc()
            return beam.pvalue.TaggedOutput("bad", {k: rec[k] for k in ("path", "label", "reason")})
        if rec["converted"]:
            Metrics.counter("kflift", "converted").inc()
        return rec

    def keep_first(kv):
        records = sorted(kv[1], key=lambda r: r["path"])
        Metrics.counter("kflift", "duplicates").inc(len(records) - 1)
        rec = records[0]
        split = split_of(rec["sha256"], val_fraction, test_fraction)
        Metrics.counter("kflift", f"originals:{split}:{rec['label']}").inc()
        return beam.pvalue.TaggedOutput(split, rec)

    def raw_examples(rec, split):
        examples = expand_training_record(rec, copies, seed, ops) if split == "train" else [rec]
        Metrics.counter("kflift", f"written:{split}:{rec['label']}").inc(len(examples))
        return [{"image": e["image"], "label": e["label"]} for e in examples]

    tmp = work / ".tft-tmp"
    p = beam.Pipeline(options=options)
    with tft_beam.Context(temp_dir=str(tmp)):
        decoded = (p | "List" >> beam.Create(items, reshuffle=False)
                   | "Decode" >> beam.Map(checked).with_outputs("bad", main="good"))
        _ = (decoded.bad | "QuarantineJson" >> beam.Map(json.dumps, sort_keys=True)
             | "WriteQuarantine" >> beam.io.WriteToText(
                 str(work / "quarantine"), file_name_suffix=".jsonl", shard_name_template=""))
        splits = (decoded.good | "ByHash" >> beam.Map(lambda r: (r["sha256"], r))
                  | "Dedupe" >> beam.GroupByKey()
                  | "Split" >> beam.Map(keep_first).with_outputs(*SPLITS))
        raw = {s: getattr(splits, s) | f"Raw-{s}" >> beam.FlatMap(raw_examples, s) for s in SPLITS}
        (train, _), transform_fn = (
            (raw["train"], raw_meta)
            | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
                lambda inputs: preprocessing_fn(inputs, image_size)))
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(str(work / "transform_fn"))
        transformed = {"train": train}
        for s in ("val", "test"):
            transformed[s], _ = (((raw[s], raw_meta), transform_fn)
                                 | f"Transform-{s}" >> tft_beam.TransformDataset())
        for s, data in transformed.items():
            (work / s).mkdir()
            _ = (data | f"Encode-{s}" >> beam.Map(coder.encode)
                 | f"Write-{s}" >> beam.io.WriteToTFRecord(
                     str(work / s / "part"), file_name_suffix=".tfrecord.gz", num_shards=shards))
        result = p.run()
        result.wait_until_finish()
    shutil.rmtree(tmp, ignore_errors=True)
    labels = [v.decode() if isinstance(v, bytes) else v for v in
              tft.TFTransformOutput(str(work / "transform_fn")).vocabulary_by_name("labels")]
    counters = result.metrics().query(MetricsFilter().with_namespace("kflift"))["counters"]
    totals: dict[str, int] = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return totals, labels


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


def _in_child_process(fn, *args):
    """Run fn in a fresh process: tf.Transform stays out of the caller (it flips tf.keras to
    Keras 2 process-wide) and its teardown crash cannot take the stage down."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_conn, fn, args), name="kflift-augment")
    proc.start()
    child_conn.close()
    try:
        status, value = parent_conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"augment worker process died (exit code {proc.exitcode})") from None
    proc.join()
    if status == "error":
        raise value
    return value


def _stats(counters: dict[str, int], n_read: int, seconds: float) -> dict:
    """Turn counters into stats.json, and check that every file read is accounted for."""
    def grouped(prefix):
        out: dict = {}
        for name, n in counters.items():
            if name.startswith(prefix + ":"):
                split, label = name.split(":", 2)[1:]
                out.setdefault(split, {})[label] = n
        return out

    quarantined = {k.split(":", 1)[1]: n for k, n in counters.items() if k.startswith("quarantined:")}
    originals = grouped("originals")
    written = grouped("written")
    n_originals = sum(sum(v.values()) for v in originals.values())
    duplicates = counters.get("duplicates", 0)
    accounted = n_originals + sum(quarantined.values()) + duplicates
    if accounted != n_read:
        raise RuntimeError(f"augment lost images: read {n_read}, but written {n_originals} + "
                           f"quarantined {sum(quarantined.values())} + duplicates {duplicates} = {accounted}")
    n_written = sum(sum(v.values()) for v in written.values())
    return {
        "read": n_read,
        "quarantined": quarantined,
        "quarantined_total": sum(quarantined.values()),
        "duplicates": duplicates,
        "converted": counters.get("converted", 0),
        "written": {
            "originals": n_originals,
            "originals_by_split": {s: sum(v.values()) for s, v in originals.items()},
            "by_split": {s: sum(v.values()) for s, v in written.items()},
            "by_split_and_class": written,
            "total": n_written,
        },
        "wall_seconds": round(seconds, 3),
        "images_per_second": round(n_read / seconds, 2) if seconds else None,
    }
