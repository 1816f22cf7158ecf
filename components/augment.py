"""augment: image folder -> quarantine, split, expanded training split, tf.Transform -> TFRecords.

Beam does the per-image work (decode, validate, deduplicate, split, augment); tf.Transform
analyzes the training split (per-channel mean/std, label vocabulary) and writes the transform
graph that serving reuses, so training and serving see the same tensors.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .sources import DataError, files_under, filesystems, list_images, read_bytes, store_uri
from .records import META_FILE, SPLITS
from .files import publish_dir, staging_dir, write_json
from .processes import in_child_process, usable_cpus
from .results import StageResult
from .progress import progress

# Formats tf.io.decode_image reads directly: their original bytes go to tf.Transform untouched,
# so serving the same file gives the same tensor as training.
TF_DECODABLE = {"JPEG", "PNG", "BMP", "GIF"}
TF_DECODABLE_MODES = {"RGB", "L"}
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
IMAGES_PER_LISTING = 500  # images per file of the list the workers read (why: _run_beam)
GROUP_PREFIX = 2  # hex digits of the content hash that group records for the shuffles: 256 groups (why: _run_beam)


def _hash_fraction(sha: str) -> float:
    return int(sha[:12], 16) / float(16**12)


def keep_first(kept: dict, rec: Checked) -> dict:
    """The dedupe's step: of the files with one content (by hash), the first path stays and the
    others are counted in its `duplicates`."""
    other = kept.get(rec.sha256)
    if other is None:
        kept[rec.sha256] = rec
    else:
        first = min(rec, other, key=lambda r: r.path)
        kept[rec.sha256] = first._replace(duplicates=rec.duplicates + other.duplicates + 1)
    return kept


def merge_kept(accumulators) -> dict:
    """Several workers' keep_first dicts as one (into the first)."""
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for kept in accumulators:
        for rec in kept.values():
            keep_first(merged, rec)
    return merged


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
        data = read_bytes(path)
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
        if data.startswith(IMAGE_SIGNATURES):  # looks like an image, but its content is broken
            return {**base, "sha256": sha, "reason": "corrupt or truncated image: unreadable image data"}
        return {**base, "sha256": sha, "reason": "not an image"}
    except (OSError, ValueError, SyntaxError) as exc:
        return {**base, "sha256": sha, "reason": f"corrupt or truncated image: {exc}"}
    converted = mode != "RGB"
    if fmt in TF_DECODABLE and mode in TF_DECODABLE_MODES:
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


def augment_image(rgb: Image.Image, rng: np.random.Generator, ops: dict) -> Image.Image:
    """One random variant: random crop, rotation, flip, colour jitter, cutout, each with its probability
    (`ops`: the fields of config's AugmentOps)."""
    o = ops
    w, h = rgb.size
    if o["crop_fraction"] > 0 and rng.random() < o["crop_probability"]:
        if o["crop_mode"] == "resized":  # a random sub-window of the image, scaled back up
            scale = rng.uniform(1 - o["crop_fraction"], 1.0)
            cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            rgb = rgb.crop((int(x), int(y), int(x) + cw, int(y) + ch)).resize((w, h), Image.BILINEAR)
        else:  # pad by reflection, then crop back to size: a random shift
            pad = max(1, round(o["crop_fraction"] * max(w, h)))
            padded = Image.fromarray(np.pad(np.asarray(rgb), ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
            dx, dy = rng.integers(0, 2 * pad + 1, size=2)
            rgb = padded.crop((int(dx), int(dy), int(dx) + w, int(dy) + h))
    if o["rotation_degrees"] > 0 and rng.random() < o["rotation_probability"]:
        angle = float(rng.uniform(-o["rotation_degrees"], o["rotation_degrees"]))
        rgb = rgb.rotate(angle, resample=Image.BILINEAR)
    if o["flip_horizontal"] and rng.random() < o["flip_probability"]:
        rgb = ImageOps.mirror(rgb)
    if o["flip_vertical"] and rng.random() < o["flip_probability"]:
        rgb = ImageOps.flip(rgb)
    if rng.random() < o["jitter_probability"]:
        for enhancer, amount in ((ImageEnhance.Brightness, o["brightness"]),
                                 (ImageEnhance.Contrast, o["contrast"]), (ImageEnhance.Color, o["saturation"])):
            if amount > 0:
                rgb = enhancer(rgb).enhance(float(rng.uniform(1 - amount, 1 + amount)))
        if o["hue"] > 0:
            hsv = np.asarray(rgb.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-o["hue"], o["hue"]) * 255)) % 256
            rgb = Image.fromarray(hsv, mode="HSV").convert("RGB")
    if o["cutout_probability"] > 0 and rng.random() < o["cutout_probability"]:
        # Cutout (random erasing): a square of the image's mean colour, centred anywhere, clipped at the edges.
        pixels = np.asarray(rgb).copy()
        side = max(1, round(o["cutout_fraction"] * min(w, h)))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        pixels[top:cy + side - side // 2, left:cx + side - side // 2] = pixels.reshape(-1, 3).mean(axis=0)
        rgb = Image.fromarray(pixels)
    return rgb


def expand_training_record(record: dict, copies: int, seed: int, ops: dict) -> list[dict]:
    """The original plus `copies` augmented variants; randomness from the run seed and the hash,
    so a rerun writes identical records."""
    out = [{"image": record["image"], "label": record["label"], "key": record["sha256"]}]
    if copies:
        rgb = _to_rgb(Image.open(io.BytesIO(record["image"])))
        for k in range(copies):
            rng = np.random.default_rng([seed, int(record["sha256"][:15], 16), k])
            out.append({"image": _png_bytes(augment_image(rgb, rng, ops)), "label": record["label"],
                        "key": f"{record['sha256']}-aug{k + 1}"})
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
    # float64 sums: Beam may combine partial sums in any order; rounded back to float32 the
    # statistics come out the same on every run, so reruns write identical records.
    pixels = tf.cast(tf.reshape(images, [-1, 3]), tf.float64)
    mean = tf.cast(tft.mean(pixels, reduce_instance_dims=False), tf.float32)
    std = tf.cast(tf.sqrt(tft.var(pixels, reduce_instance_dims=False)), tf.float32) + 1e-6
    label = tft.compute_and_apply_vocabulary(tf.reshape(inputs["label"], [-1]), vocab_filename="labels")
    # `key` (content hash, -augN for copies) passes through so a record can be traced to its file.
    return {"image": (images - mean) / std, "label": label, "key": inputs["key"]}


def augment(
    data_dir: str,
    output_dir: str,
    *,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    copies: int,
    ops: dict,
    shards: int,
    num_workers: int | str,
    parallel_from: int,
    max_pixels: int,
    batch_size: int,
    seed: int,
    beam_options: list[str],
    staging_uri: str,
    transform_temp: str,
    include_classes: list[str] | None = None,
    exclude_classes: list[str] | None = None,
    artifact_uri: str = "",
) -> StageResult:
    """Run the stage on an image folder or CSV manifest; settings from config
    (`AugmentConfig.stage_kwargs`; `ops`: `AugmentOps`). Returns the stage result; the output holds TFRecords per split, the
    transform graph, meta.json, stats.json, quarantine.jsonl and preview.png.

    `artifact_uri`: where KFP uploads the output folder on a cluster (its Dataset artifact's URI in KFP's
    object store); with `staging_uri="artifact"` the workers write the records straight there."""
    start = time.time()
    folder = list_images(data_dir, include_classes, exclude_classes)
    items = [(str(p), label) for label, files in folder.items() for p in files]
    output = Path(output_dir)
    work = staging_dir(output)
    try:
        places = _places(work, staging_uri, transform_temp, artifact_uri)
        workers = num_workers if num_workers != "auto" else usable_cpus() if len(items) >= parallel_from else 1
        counts, labels = in_child_process(_run_beam, items, work, places, image_size, val_fraction, test_fraction,
                                             copies, seed, ops, shards, workers, max_pixels, batch_size, beam_options or [])
        stats = _stats(counts, len(items), time.time() - start)
        if stats["written"]["originals"] == 0:
            raise DataError(f"{data_dir}: no valid image (all {len(items)} files quarantined, see reasons)")
        missing = [s for s in SPLITS if stats["written"]["by_split"].get(s, 0) == 0 and s != "val"]
        if missing:
            raise DataError(f"{data_dir}: too few valid images to fill split(s) {missing}")
        meta = {"image_size": image_size, "labels": labels, "num_classes": len(labels),
                "source": str(data_dir), "stats": stats,
                **({"records_uri": places.sink} if places.records_stay else {})}
        write_json(work / META_FILE, meta)
        write_json(work / "stats.json", stats)
        if copies:
            preview(items, work / "preview.png", copies, seed, ops, max_pixels, val_fraction, test_fraction)
        publish_dir(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "params": {"data_dir": data_dir, "image_size": image_size, "include_classes": include_classes or [],
                   "exclude_classes": exclude_classes or [], "val_fraction": val_fraction,
                   "test_fraction": test_fraction, "copies": copies, "ops": ops, "seed": seed,
                   "shards": shards, "num_workers": workers, "labels": labels},
        "metrics": {k: v for k, v in stats.items() if k != "written"} | {"written": stats["written"]},
        "artifacts": [(None, output / "stats.json"), (None, output / "quarantine.jsonl"),
                      (None, output / "preview.png"),
                      (None, output / META_FILE), ("transform_fn", output / "transform_fn")],
        "meta": meta,
    }


class Checked(NamedTuple):
    """A checked image's small record: what the dedupe groups and the splits carry on to where the
    bytes are read again. A tuple, not a dict: one per image is held and shuffled, and a dict
    carries its keys in each."""
    path: str
    label: str
    sha256: str
    converted: bool  # not RGB to begin with
    as_is: bool  # TensorFlow decodes the file's own bytes (else they are converted to PNG)
    duplicates: int = 0  # other files with the same content, after the dedupe


class Places(NamedTuple):
    """Where the Beam workers write (see `_places`)."""
    sink: str  # records, and the counts and quarantine (.results.jsonl)
    records_stay: bool  # the records stay at `sink` (a KFP artifact's URI): only the small files come back
    transform: str  # tf.Transform's temporary files and the transform graph


def _places(work: Path, staging_uri: str, transform_temp: str, artifact_uri: str) -> Places:
    """Where the workers write. The local runner: straight into the output (`work`). A remote runner's
    workers cannot reach this machine's disk: the records go to `staging_uri` (fetched back after the
    run) or, with "artifact" on a cluster, to the KFP Dataset artifact's own URI, where they stay (KFP's
    launcher uploads the small files beside them and hands the whole artifact to the next stages).
    tf.Transform's graph goes where TensorFlow can write and every worker can read: `transform_temp`
    (a shared volume's path, or gs://; TensorFlow 2.21 has no s3://)."""
    transform = f"{transform_temp.rstrip('/')}/{work.name}" if transform_temp else str(work)
    if staging_uri == "artifact" and artifact_uri:
        return Places(store_uri(artifact_uri), True, transform)
    if staging_uri and staging_uri != "artifact":
        return Places(f"{staging_uri.rstrip('/')}/{work.name}", False, transform)
    return Places(str(work), False, transform)


def _run_beam(items, work: Path, places: Places, image_size, val_fraction, test_fraction, copies, seed, ops,
              shards, num_workers, max_pixels, batch_size, beam_options) -> dict[str, int]:
    """Build and run the Beam pipeline; returns its counts (see _stats) and the label vocabulary.

    The records, quarantine and counts go to `places.sink`, the transform graph under
    `places.transform`; what is not in `work` is brought there after the run (records that stay in
    a KFP artifact excepted).

    Memory stays flat as the input grows: only small per-file records (path, label, hash) are
    grouped (for the dedupe); image bytes are read again where they are used, and everything
    from there to the TFRecord files streams through tf.Transform's RecordBatch (TFXIO) path.
    """
    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.public import tfxio

    args = ["--runner=DirectRunner", f"--direct_num_workers={num_workers}",
            "--direct_running_mode=" + ("multi_processing" if num_workers > 1 else "in_memory")]
    options = PipelineOptions(args + list(beam_options))
    raw_schema = schema_utils.schema_from_feature_spec(
        {name: tf.io.FixedLenFeature([], tf.string) for name in ("image", "label", "key")})
    raw_format = tfxio.TFExampleBeamRecord(physical_format="inmem", telemetry_descriptors=["kflift"],
                                           schema=raw_schema)
    # Progress lines (components/progress.py): counts so far of each copy of these functions that
    # Beam unpickles (a worker process, a bundle), named by a token it draws on first use.
    every = max(10, len(items) // 40)
    counts = {"checked": 0, "written": 0}

    def report(what, n):
        counts.setdefault("worker", os.urandom(4).hex())
        before = counts[what]
        counts[what] += n
        if counts[what] // every > before // every or (what == "checked" and counts[what] == len(items)):
            progress("augment", worker=counts["worker"], **{what: counts[what]},
                     **({"images": len(items)} if what == "checked" else {}))

    def checked(item):
        rec = decode_image(item[0], item[1], max_pixels)
        report("checked", 1)
        if "reason" in rec:
            return beam.pvalue.TaggedOutput("bad", {k: rec[k] for k in ("path", "label", "reason")})
        # Only this small record travels on (the dedupe groups it); the bytes are read again later.
        return rec["sha256"][:GROUP_PREFIX], Checked(
            rec["path"], rec["label"], rec["sha256"], rec["converted"],
            rec["format"] in TF_DECODABLE and rec["mode"] in TF_DECODABLE_MODES)

    class Dedupe(beam.CombineFn):
        """keep_first as a combiner: each worker dedupes its share first and sends a value per group."""
        create_accumulator = dict

        def add_input(self, kept, rec):
            return keep_first(kept, rec)

        def merge_accumulators(self, accumulators):
            return merge_kept(accumulators)

        def extract_output(self, kept):
            return list(kept.values())

        def get_accumulator_coder(self):
            return beam.coders.PickleCoder()  # one pickle: the record's class is named once, not per record

    def split_group(kv):
        by_split = {}
        for rec in kv[1]:
            by_split.setdefault(split_of(rec.sha256, val_fraction, test_fraction), []).append(rec)
        return [beam.pvalue.TaggedOutput(split, group) for split, group in by_split.items()]

    def raw_examples(group, split, expand=True, count=True):
        for rec in group:
            record = {"image": _reread(rec, max_pixels), "label": rec.label, "sha256": rec.sha256}
            examples = expand_training_record(record, copies, seed, ops) if expand else [
                {"image": record["image"], "label": rec.label, "key": rec.sha256}]
            if count:
                report("written", len(examples))
            yield from ((rec.label, _raw_example(e)) for e in examples)

    sink = places.sink
    # The file list reaches the workers as files they read, not a beam.Create of the items: Create
    # pickles its list into the pipeline graph, and every worker kept its own copy (24 MiB at 40k
    # files). Several files, so that Create's own reshuffle spreads them over the workers: the
    # runner holds their names, where a reshuffle of the items held a record per image (its peak at
    # 100k images: 1,070 -> 1,052 MiB). Read by a plain FlatMap, not ReadFromText: the Spark job
    # server fails on the text source's splittable DoFn.
    listings = [f"{sink}/.listing-{i:05d}.jsonl" for i in range(-(-len(items) // IMAGES_PER_LISTING) or 1)]
    p = beam.Pipeline(runner=_local_engine(options), options=options)
    with tft_beam.Context(temp_dir=f"{places.transform}/.tft-tmp"):
        decoded = (p | "Listing" >> beam.Create(listings) | "List" >> beam.FlatMap(_listed_items)
                   | "Check" >> beam.Map(checked).with_outputs("bad", main="good"))
        # The shuffles carry records in groups (by hash prefix), not one per image: the local runner
        # holds each shuffled element as a Python object and sends a stage its share as one block
        # (the largest process at 100k images: 1.24x its size at 10k with a record per image, 1.17x).
        splits = (decoded.good | "Dedupe" >> beam.CombinePerKey(Dedupe())
                  | "Split" >> beam.FlatMap(split_group).with_outputs(*SPLITS))
        # Statistics (mean/std, vocabulary) come from the training originals: the augmented
        # copies are perturbations of them, and serving sees originals.
        originals = (splits.train | "Originals" >> beam.FlatMap(raw_examples, "train", expand=False, count=False)
                     | "OriginalsOnly" >> beam.Values() | "OriginalsBatches" >> raw_format.BeamSource(batch_size))
        adapter = raw_format.TensorAdapterConfig()
        transform_fn = ((originals, adapter) | "Analyze" >> tft_beam.AnalyzeDataset(
            lambda inputs: preprocessing_fn(inputs, image_size)))
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(f"{places.transform}/transform_fn")
        # The statistics count the pipeline's own outputs, so every runner gives the same numbers
        # (not all report metrics): (name, n) tallies, summed by name into .results.jsonl. Each count is
        # summed where it is made (a lifted combiner: a few sums per bundle reach the runner, not a
        # tally per image, which the local runner held until the end and the workers queued to send).
        def count(pcoll, name, tallies_of, *args):
            return pcoll | name >> beam.FlatMap(tallies_of, *args) | f"Sum-{name}" >> beam.CombinePerKey(sum)

        tallies = [count(decoded.bad, "CountQuarantined", lambda r: [("quarantined:" + r["reason"].split(":")[0], 1)]),
                   count(decoded.good, "CountConverted", lambda kv: [("converted", int(kv[1].converted))])]
        for s in SPLITS:
            tallies.append(count(getattr(splits, s), f"CountOriginals-{s}",
                                 lambda group, s: [(f"originals:{s}:{r.label}", 1) for r in group]
                                 + [("duplicates", sum(r.duplicates for r in group))], s))
            # The fusion break sits on the small records: Transform waits for the transform_fn
            # side input, and the local runner holds what it waits on in memory, so the image
            # bytes (and their augmented copies) are read only once the graph is there.
            labelled = (getattr(splits, s) | f"Wait-{s}" >> beam.Reshuffle()
                        | f"Raw-{s}" >> beam.FlatMap(raw_examples, s, expand=s == "train"))
            tallies.append(count(labelled, f"CountWritten-{s}", lambda kv, s: [(f"written:{s}:{kv[0]}", 1)], s))
            batches = labelled | f"Examples-{s}" >> beam.Values() | f"Batches-{s}" >> raw_format.BeamSource(batch_size)
            transformed, _ = (((batches, adapter), transform_fn)
                              | f"Transform-{s}" >> tft_beam.TransformDataset(output_record_batches=True))
            if sink == str(work):
                (work / s).mkdir()
            # shards=0: a file per worker bundle, streamed; N: exactly N files (Beam groups the
            # split's records to deal them out, which holds them in memory on the local runner).
            _ = (transformed | f"Encode-{s}" >> beam.FlatMapTuple(lambda batch, _: _encoder().encode(batch))
                 | f"Write-{s}" >> beam.io.WriteToTFRecord(
                     f"{sink}/{s}/part", file_name_suffix=".tfrecord.gz", num_shards=shards))
        counts_json = (tallies | "AllCounts" >> beam.Flatten() | "SumCounts" >> beam.CombinePerKey(sum)
                       | "CountsJson" >> beam.Map(lambda kv: json.dumps({"name": kv[0], "n": kv[1]})))
        # The quarantine travels in the same file: one file that is never empty (Beam's S3 writer
        # fails to close an empty file: a multipart upload with no part).
        quarantine_json = decoded.bad | "QuarantineJson" >> beam.Map(lambda r: json.dumps({"quarantined": r}))
        _ = ((counts_json, quarantine_json) | "Results" >> beam.Flatten()
             | "WriteResults" >> beam.io.WriteToText(f"{sink}/.results", file_name_suffix=".jsonl",
                                                     shard_name_template=""))
        try:
            for i, listing in enumerate(listings):  # interleaved: each file a like mix of the folders
                with filesystems().create(listing) as f:
                    f.write("".join(json.dumps(item) + "\n" for item in items[i::len(listings)]).encode())
            p.run().wait_until_finish()
        except BaseException:
            # A failed run leaves nothing in a remote store: the listing, partial shards, Beam's and
            # tf.Transform's temporary files go (locally they sit in `work`, which augment discards).
            if sink != str(work):
                clear(sink)
            if places.transform != str(work) and tf.io.gfile.exists(places.transform):
                tf.io.gfile.rmtree(places.transform)
            raise
    filesystems().delete(listings)
    if places.transform == str(work):
        shutil.rmtree(work / ".tft-tmp", ignore_errors=True)
    else:  # the graph comes into the output, and the shared folder is cleared
        copy_tree(f"{places.transform}/transform_fn", work / "transform_fn")
        tf.io.gfile.rmtree(places.transform)
    if sink != str(work):
        fetch(sink, work, leave=SPLITS if places.records_stay else ())
    results = [json.loads(line) for line in (work / ".results.jsonl").read_text().splitlines()]
    (work / ".results.jsonl").unlink()
    totals = {r["name"]: r["n"] for r in results if "name" in r}
    bad = sorted(json.dumps(r["quarantined"], sort_keys=True) for r in results if "quarantined" in r)
    (work / "quarantine.jsonl").write_text("".join(line + "\n" for line in bad))
    labels = [v.decode() if isinstance(v, bytes) else v for v in
              tft.TFTransformOutput(str(work / "transform_fn")).vocabulary_by_name("labels")]
    return totals, labels


def _local_engine(options):
    """Beam's local engine (FnApiRunner) set up as the DirectRunner sets it up, when the runner is the
    DirectRunner; None (Beam resolves it) for any other. Beam's DirectRunner first hands a pipeline that
    Prism can run to the PrismRunner, which downloads its binary from GitHub: offline a failed lookup
    (or a wait on DNS), online another engine than the one `direct_num_workers` and the tests count on.
    In multi_processing mode the worker processes run `beam_worker` (Beam's harness, no teardown)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    if options.view_as(StandardOptions).runner not in (None, "DirectRunner", "SwitchingDirectRunner"):
        return None
    # The workers get the pipeline options (a filesystem's settings among them) through the provision info.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    workers = None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        # The same worker processes, started with beam_worker. Beam's engine puts its own worker command
        # in place of the environment when it sees this mode, so the mode is cleared once passed on.
        workers = SubprocessSDKEnvironment.from_command_string(
            f"{sys.executable} -m kflift.components.beam_worker")
        direct.direct_running_mode = None
    return fn_runner.FnApiRunner(default_environment=workers, provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _listed_items(listing: str):
    """The (path, label) items of a listing file that augment wrote, one JSON list per line."""
    with filesystems().open(listing) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            yield tuple(json.loads(line))


def fetch(uri: str, folder: Path, leave: tuple[str, ...] = ()) -> None:
    """Copy every file under a URI into a local folder (keeping the relative paths), then delete them
    there: what a remote runner wrote becomes the stage's output. Sub-folders named in `leave` stay."""
    from apache_beam.io.filesystem import CompressionTypes

    fs = filesystems()
    root = uri.rstrip("/") + "/"  # as files_under lists it, so that a trailing slash cuts no name short
    found = [m for m in files_under(uri) if m.path[len(root):].split("/")[0] not in leave]
    for meta in found:
        local = folder / meta.path[len(root):]
        local.parent.mkdir(parents=True, exist_ok=True)
        # Streamed: a record shard can be far larger than memory should hold.
        with fs.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    fs.delete([m.path for m in found])


def clear(uri: str) -> None:
    """Delete every file under a URI (a remote runner's staging folder)."""
    found = files_under(uri)
    if found:
        filesystems().delete([m.path for m in found])


def copy_tree(source: str, target: Path) -> None:
    """Copy a folder TensorFlow can read (a local path, gs://) into a local one."""
    import tensorflow as tf

    for folder, _, files in tf.io.gfile.walk(source):
        local = target / folder[len(source):].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        for name in files:
            tf.io.gfile.copy(f"{folder}/{name}", str(local / name), overwrite=True)


def _reread(rec: Checked, max_pixels: int) -> bytes:
    """A checked file's encoded bytes, read again: as they are when TF decodes them directly,
    converted to PNG otherwise. A file changed since it was checked stops the stage."""
    data = read_bytes(rec.path)
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        raise DataError(f"{rec.path}: the file changed while the augment stage ran; rerun the stage")
    return data if rec.as_is else decode_image(rec.path, rec.label, max_pixels)["image"]


def _raw_example(example: dict) -> bytes:
    """A raw record (encoded image, label, key) as a serialized tf.Example for TFXIO."""
    import tensorflow as tf

    def feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode() if isinstance(value, str)
                                                                     else value]))

    return tf.train.Example(features=tf.train.Features(feature={
        k: feature(example[k]) for k in ("image", "label", "key")})).SerializeToString()


@functools.cache
def _encoder():
    """tfx_bsl's C++ RecordBatch -> tf.Example encoder, made once per worker process."""
    from tfx_bsl.public.tfxio import RecordBatchToExamplesEncoder

    return RecordBatchToExamplesEncoder()


def preview(items, path: Path, copies: int, seed: int, ops: dict, max_pixels: int,
            val_fraction: float, test_fraction: float, rows: int = 6) -> Path | None:
    """A grid of training originals beside their augmented copies, exactly as written."""
    from .plots import image_grid

    grid, labels = [], []
    for file, label in items[:: max(1, len(items) // (4 * rows))]:  # spread over the classes
        rec = decode_image(file, label, max_pixels)
        if "reason" in rec or split_of(rec["sha256"], val_fraction, test_fraction) != "train":
            continue
        grid.append([Image.open(io.BytesIO(e["image"])).convert("RGB")
                     for e in expand_training_record(rec, copies, seed, ops)])
        labels.append(label)
        if len(grid) == rows:
            break
    if not grid:
        return None
    return image_grid(grid, path, ["original"] + [f"copy {k + 1}" for k in range(copies)], labels)


def _stats(counts: dict[str, int], n_read: int, seconds: float) -> dict:
    """Turn the pipeline's counts into stats.json, and check that every file read is accounted for."""
    def grouped(prefix):
        out: dict = {}
        for name, n in counts.items():
            if name.startswith(prefix + ":"):
                split, label = name.split(":", 2)[1:]
                out.setdefault(split, {})[label] = n
        return out

    quarantined = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("quarantined:")}
    originals = grouped("originals")
    written = grouped("written")
    n_originals = sum(sum(v.values()) for v in originals.values())
    duplicates = counts.get("duplicates", 0)
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
        "converted": counts.get("converted", 0),
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
