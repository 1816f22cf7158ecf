"""augment: bad input quarantined with its reason, determinism, splits, augmentation, serving equality."""
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import copy_subset, kflift
from kflift.components.augment import (Checked, augment, expand_training_record, keep_first, merge_kept,
                                       split_of)
from kflift.components.sources import DataError, list_images
from kflift.pipeline.config import AugmentOps
from conftest import settings, timeless

OPS = AugmentOps().model_dump()

MAX_PIXELS = 10_000  # the 32x32 shared images pass; the 200x200 "bomb" does not


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, cifar_dir) -> Path:
    """Real good images beside every bad kind the stage must treat."""
    root = copy_subset(cifar_dir, tmp_path_factory.mktemp("messy"), ["automobile", "truck"], 10)
    car, truck = root / "automobile", root / "truck"
    good_jpeg = (car / "0000.jpg").read_bytes()
    rgb = Image.open(car / "0001.jpg").convert("RGB")
    (car / "empty.jpg").write_bytes(b"")
    (car / "notes.png").write_text("this is not an image")
    (car / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (truck / "corrupt.png").write_bytes(png_bytes(rgb)[:40] + os.urandom(200))
    (truck / "bomb.png").write_bytes(png_bytes(Image.new("RGB", (200, 200), "red")))
    (truck / "gone.jpg").symlink_to(root / "does-not-exist.jpg")
    # modes converted to RGB, not lost
    (car / "gray.png").write_bytes(png_bytes(rgb.convert("L")))
    (car / "palette.png").write_bytes(png_bytes(rgb.convert("P")))
    (truck / "rgba.png").write_bytes(png_bytes(rgb.convert("RGBA")))
    (truck / "cmyk.jpg").write_bytes(png_bytes(rgb.convert("CMYK"), format="JPEG"))
    sixteen = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 250), mode="I;16")
    (truck / "sixteen.png").write_bytes(png_bytes(sixteen))
    shutil.copy(car / "0002.jpg", car / "0002-copy.jpg")  # an exact duplicate
    return root


def run_augment(src, out, **kw):
    args = dict(max_pixels=MAX_PIXELS, copies=2, val_fraction=0.2, test_fraction=0.3, shards=2)
    return augment(str(src), str(out), **settings("augment", **{**args, **kw}))


@pytest.fixture(scope="module")
def messy_run(messy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "out"
    return run_augment(messy_folder, out), out


def read_records(out: Path, split: str) -> list[dict]:
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([32, 32, 3], tf.float32),
            "label": tf.io.FixedLenFeature([], tf.int64), "key": tf.io.FixedLenFeature([], tf.string)}
    files = sorted(str(p) for p in (out / split).glob("*.tfrecord.gz"))
    return [{"raw": r.numpy(), **{k: v.numpy() for k, v in tf.io.parse_single_example(r, spec).items()}}
            for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


@pytest.mark.slow
def test_every_bad_kind_is_quarantined_with_its_reason(messy_run, messy_folder):
    result, out = messy_run
    stats = result["meta"]["stats"]
    assert stats["quarantined"] == {"zero-byte file": 1, "not an image": 1, "corrupt or truncated image": 2,
                                    "decompression bomb": 1, "unreadable": 1}
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    by_name = {Path(q["path"]).name: q["reason"] for q in quarantine}
    assert set(by_name) == {"empty.jpg", "notes.png", "truncated.jpg", "corrupt.png", "bomb.png", "gone.jpg"}
    assert by_name["bomb.png"].startswith("decompression bomb: 200x200")
    assert all(Path(q["path"]).is_absolute() or (messy_folder / q["label"]).exists() for q in quarantine)


@pytest.mark.slow
def test_modes_are_converted_duplicates_kept_once_and_counts_add_up(messy_run, messy_folder):
    stats = messy_run[0]["meta"]["stats"]
    n_files = sum(len(list((messy_folder / c).iterdir())) for c in ("automobile", "truck"))
    assert stats["read"] == n_files
    assert stats["converted"] == 5 and stats["duplicates"] == 1
    assert stats["read"] == stats["written"]["originals"] + stats["quarantined_total"] + stats["duplicates"]
    assert stats["written"]["originals"] == 20 + 5  # the good ones (the duplicate once) and the converted


@pytest.mark.slow
def test_k_copies_per_training_image_keep_their_label_and_change_pixels(messy_run):
    _, out = messy_run
    train = read_records(out, "train")
    originals = {r["key"]: r for r in train if b"-aug" not in r["key"]}
    copies = [r for r in train if b"-aug" in r["key"]]
    assert len(copies) == 2 * len(originals) and originals
    for copy in copies:
        source = originals[copy["key"].split(b"-aug")[0]]
        assert copy["label"] == source["label"]
        assert np.abs(copy["image"] - source["image"]).mean() > 0.01
    for split in ("val", "test"):  # never augmented
        assert not any(b"-aug" in r["key"] for r in read_records(out, split))


def content(out: Path, split: str) -> list[tuple]:
    """A split's (key, label, image) records by key: protobuf map order is not part of a record's content."""
    return sorted(((r["key"], int(r["label"]), r["image"]) for r in read_records(out, split)), key=lambda r: r[0])


def assert_same_records_up_to_float_sums(out: Path, other: Path) -> None:
    """Every split holds the same keys and labels, and images equal but for the last bits of the
    statistics' float sums (combined over other batches or in another order)."""
    for split in ("train", "val", "test"):
        before, after = content(out, split), content(other, split)
        assert [r[:2] for r in before] == [r[:2] for r in after]
        for (_, _, a), (_, _, b) in zip(before, after):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_rerun_writes_identical_records(messy_run, messy_folder, tmp_path):
    _, first = messy_run
    run_augment(messy_folder, tmp_path / "again")
    exact = lambda records: [(key, label, image.tobytes()) for key, label, image in records]  # noqa: E731
    for split in ("train", "val", "test"):
        assert exact(content(first, split)) == exact(content(tmp_path / "again", split))


@pytest.mark.slow
def test_another_batch_size_writes_the_same_records(messy_run, messy_folder, tmp_path):
    """The records do not depend on how tf.Transform's graph batches the images (augment.batch_size):
    the transform is per image, and the statistics combine over batches."""
    run_augment(messy_folder, tmp_path / "again", batch_size=3)
    assert_same_records_up_to_float_sums(messy_run[1], tmp_path / "again")


@pytest.mark.slow
def test_worker_processes_write_what_one_process_writes(messy_run, messy_folder, tmp_path):
    """The local runner with two worker processes (augment's default from `augment.parallel_from` images
    on a multi-core machine; each runs components/beam_worker.py): the same statistics and records as
    the runner's own process."""
    result = run_augment(messy_folder, tmp_path / "two", num_workers=2)
    assert result["params"]["num_workers"] == 2
    assert timeless(result["meta"]["stats"]) == timeless(messy_run[0]["meta"]["stats"])
    assert_same_records_up_to_float_sums(messy_run[1], tmp_path / "two")


@pytest.mark.slow
def test_statistics_come_from_the_pipeline_not_the_runners_metrics(messy_run, messy_folder, tmp_path):
    # Beam's portable runner (its embedded job service, SDK workers over the Fn API): the counts are
    # the pipeline's own outputs, so a runner reports the local runner's numbers whatever metrics it keeps.
    out = tmp_path / "portable"
    result = run_augment(messy_folder, out, beam_options=["--runner=PortableRunner", "--job_endpoint=embed",
                                                          "--environment_type=LOOPBACK"])
    assert timeless(result["meta"]["stats"]) == timeless(messy_run[0]["meta"]["stats"])
    for split in ("train", "test"):  # the same records, in any order (each runner shards its own way)
        portable = {r["key"]: r for r in read_records(out, split)}
        local = {r["key"]: r for r in read_records(messy_run[1], split)}
        assert portable.keys() == local.keys()
        for key, record in local.items():
            assert portable[key]["label"] == record["label"]
            np.testing.assert_allclose(portable[key]["image"], record["image"], rtol=0, atol=1e-5)


def test_split_is_stable_when_the_folder_grows(messy_run, messy_folder, cifar_dir, tmp_path):
    _, first = messy_run
    grown = copy_subset(cifar_dir, tmp_path / "grown", ["automobile", "truck"], 16)
    run_augment(grown, tmp_path / "out", copies=0)
    before = {s: {r["key"] for r in read_records(first, s) if b"-aug" not in r["key"]} for s in ("val", "test")}
    after = {s: {r["key"] for r in read_records(tmp_path / "out", s)} for s in ("val", "test")}
    shared = {hashlib.sha256(p.read_bytes()).hexdigest().encode() for p in grown.rglob("*.jpg")}
    for s in ("val", "test"):
        assert before[s] & shared <= after[s]


def hash_at(fraction: float) -> str:
    """A content hash whose first 12 hex digits lie `fraction` of the way through [0, 1)."""
    return f"{int(fraction * 16**12):012x}" + "0" * 52


def test_split_of_follows_the_hash_fraction_and_moves_only_across_the_changed_boundary():
    # test is [0, test_fraction), val the next val_fraction, train the rest
    expected = {0.0: "test", 0.29: "test", 0.31: "val", 0.49: "val", 0.51: "train", 0.999: "train"}
    assert {u: split_of(hash_at(u), 0.2, 0.3) for u in expected} == expected
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [split_of(sha, 0.2, 0.3) for sha in shas]
    for split, fraction in (("test", 0.3), ("val", 0.2), ("train", 0.5)):
        assert abs(splits.count(split) / len(shas) - fraction) < 0.03
    # a larger validation share takes images from train only; the test split stays as it was
    wider = [split_of(sha, 0.25, 0.3) for sha in shas]
    assert [s == "test" for s in wider] == [s == "test" for s in splits]
    moved = [(a, b) for a, b in zip(splits, wider) if a != b]
    assert moved and set(moved) == {("train", "val")}


def test_dedupe_keeps_the_first_path_and_counts_the_rest_however_the_workers_share_the_files():
    # The dedupe is a combiner: each worker folds its files with keep_first, then merge_kept joins
    # the workers' dicts, so every way of sharing out the files must give one answer.
    import functools
    import itertools

    same, other = "a" * 64, "b" * 64
    files = [Checked(f"/d/car/{name}.png", "car", sha, False, True)
             for name, sha in (("3", same), ("1", same), ("2", other), ("4", same))]
    for order in itertools.permutations(files):
        for cut in range(len(files) + 1):
            shares = [functools.reduce(keep_first, order[:cut], {}), functools.reduce(keep_first, order[cut:], {})]
            assert sorted(merge_kept(shares).values()) == [
                Checked("/d/car/1.png", "car", same, False, True, duplicates=2),
                Checked("/d/car/2.png", "car", other, False, True)]


def test_augmentation_is_seeded_and_each_op_applies():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    rec = {"image": png_bytes(rgb), "label": "x", "sha256": "c" * 64}
    a = expand_training_record(rec, 3, seed=1, ops=OPS)
    b = expand_training_record(rec, 3, seed=1, ops=OPS)
    c = expand_training_record(rec, 3, seed=2, ops=OPS)
    assert [e["image"] for e in a] == [e["image"] for e in b]
    assert [e["image"] for e in a[1:]] != [e["image"] for e in c[1:]]
    only_flip = {**OPS, "crop_probability": 0, "rotation_probability": 0, "jitter_probability": 0,
                 "flip_probability": 1.0}
    flipped = Image.open(io.BytesIO(expand_training_record(rec, 1, 1, only_flip)[1]["image"]))
    assert np.array_equal(np.asarray(flipped), np.asarray(rgb)[:, ::-1])
    only_cutout = {**only_flip, "flip_probability": 0.0, "cutout_probability": 1.0, "cutout_fraction": 0.25}
    erased = np.asarray(Image.open(io.BytesIO(expand_training_record(rec, 1, 1, only_cutout)[1]["image"])))
    changed = (erased != np.asarray(rgb)).any(axis=2)
    rows, cols = np.nonzero(changed)
    # One square of at most 8x8 pixels (a quarter of the side), all of one colour: the image's mean.
    assert 0 < changed.sum() <= 64 and np.ptp(rows) < 8 and np.ptp(cols) < 8
    assert len({tuple(p) for p in erased[changed]}) == 1


@pytest.mark.slow
def test_training_and_serving_tensors_of_the_same_image_are_equal(messy_run, messy_folder):
    import tensorflow as tf
    import tensorflow_transform as tft

    _, out = messy_run
    layer = tft.TFTransformOutput(str(out / "transform_fn")).transform_features_layer()
    # the RGB JPEGs as they came; converted files (CMYK, 16-bit, ...) were re-encoded by the stage
    files = {hashlib.sha256(p.read_bytes()).hexdigest().encode(): p for p in messy_folder.rglob("0*.jpg")}
    checked = 0
    for record in read_records(out, "test"):
        if record["key"] not in files:
            continue
        raw = files[record["key"]].read_bytes()  # the original file, as a client would send it
        served = layer({"image": tf.constant([raw]), "label": tf.constant([""]), "key": tf.constant([""])})
        np.testing.assert_array_equal(served["image"].numpy()[0], record["image"])
        checked += 1
    assert checked > 0


def test_the_local_runner_is_beams_own_engine_with_the_pipeline_options_not_prism():
    """Beam 2.77's DirectRunner first hands a pipeline Prism can run to the PrismRunner, which downloads its
    binary from GitHub (apache_beam/runners/direct/direct_runner.py, SwitchingDirectRunner.run_pipeline).
    augment builds the engine the DirectRunner falls back to, and hands the workers the same options."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    from kflift.components.augment import _local_engine

    engine = _local_engine(PipelineOptions(["--runner=DirectRunner", "--direct_num_workers=2",
                                            "--s3_endpoint_url=http://minio:9000"]))
    assert isinstance(engine, FnApiRunner)
    given = engine._provision_info.provision_info.pipeline_options
    assert given["beam:option:s3_endpoint_url:v1"] == "http://minio:9000"
    assert _local_engine(PipelineOptions(["--runner=PortableRunner", "--job_endpoint=embed"])) is None
    processes = _local_engine(PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"]))
    assert processes._default_environment.command_string.endswith(" -m kflift.components.beam_worker")


@pytest.mark.parametrize("slash", ["", "/"])
def test_fetch_brings_what_a_remote_runner_wrote_and_leaves_what_it_is_told(tmp_path, slash):
    """What the workers wrote under a staging URI (here Beam's local filesystem) comes into the output
    under the same relative names, with or without a trailing slash on the URI, and is deleted there."""
    from kflift.components.augment import fetch

    staging = tmp_path / "staging"
    for name in ("train/part-0.tfrecord.gz", "val/part-0.tfrecord.gz", ".results.jsonl"):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(name.encode())
    fetch(str(staging) + slash, tmp_path / "out", leave=("val",))
    fetched = sorted(str(f.relative_to(tmp_path / "out")) for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert fetched == [".results.jsonl", "train/part-0.tfrecord.gz"]
    assert (tmp_path / "out/train/part-0.tfrecord.gz").read_bytes() == b"train/part-0.tfrecord.gz"
    assert [str(f.relative_to(staging)) for f in staging.rglob("*") if f.is_file()] == ["val/part-0.tfrecord.gz"]


def test_bad_folders_stop_with_a_clear_error(tmp_path, cifar_dir):
    only = copy_subset(cifar_dir, tmp_path / "one", ["truck"], 2)
    with pytest.raises(DataError, match="needs at least 2 classes"):
        list_images(only)
    empty = copy_subset(cifar_dir, tmp_path / "empty", ["truck"], 2)
    (empty / "ship").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['ship'\] hold no files"):
        list_images(empty)


@pytest.mark.slow
def test_a_folder_without_a_valid_image_stops_augment_and_writes_nothing(tmp_path):
    junk = tmp_path / "junk"
    for c in ("a", "b"):
        (junk / c).mkdir(parents=True)
        (junk / c / "x.jpg").write_text("no image")
    with pytest.raises(DataError, match="no valid image"):
        augment(str(junk), str(tmp_path / "out"), **settings("augment"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_csv_manifest_and_stage_cli(tmp_path, cifar_dir):
    lines = ["path,label"] + [f"{cifar_dir}/{c}/{i:04d}.jpg,{c}" for c in ("ship", "airplane") for i in range(8)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    proc = kflift("stage", "augment", "--data", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out"),
                  "--set", "augment.copies=1", "--beam-option=--direct_num_workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["read"] == 16 and stats["written"]["originals"] == 16
    assert (tmp_path / "out" / "preview.png").stat().st_size > 1000
    (tmp_path / "bad.csv").write_text("path,label\nonly-one-column\n")
    proc = kflift("stage", "augment", "--data", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "o2"))
    assert proc.returncode == 1 and "bad.csv:2: expected 'path,label'" in proc.stderr
