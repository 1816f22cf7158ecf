"""augment on real engines: its data in a real MinIO server (s3://), on the local runner and on a real
Spark standalone cluster (a master and two workers, each its own JVM) through Beam's Spark job server.

The engines come from `scripts/engines.sh` (`make test` runs it first) into .venv/engines/; a missing
one FAILS, naming the command. Credentials reach every process (this one, augment's child, Beam's
workers) only through the environment: AWS_* for Beam's S3 filesystem (boto3).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, copy_subset, settings, timeless
from kflift.components.augment import augment

sys.path.insert(0, str(REPO / "engines"))
from loopback import minio_server, spark_cluster, spark_status  # noqa: E402 - shared with bench/engines.py

pytestmark = [pytest.mark.engines, pytest.mark.slow, pytest.mark.xdist_group("engines")]

BUCKET = "kflift"


@pytest.fixture(scope="module")
def minio(tmp_path_factory):
    """A MinIO server on loopback with bucket `kflift`; its endpoint and keys in os.environ for the
    processes this test starts. Yields a boto3 client. A missing engine FAILS, naming the command."""
    try:
        with minio_server(tmp_path_factory.mktemp("minio"), BUCKET) as client:
            yield client
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


def upload(client, folder: Path, prefix: str) -> str:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder)}")
    return f"s3://{BUCKET}/{prefix}"


def keys_under(client, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def records(out: Path, split: str) -> dict:
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([32, 32, 3], tf.float32),
            "label": tf.io.FixedLenFeature([], tf.int64), "key": tf.io.FixedLenFeature([], tf.string)}
    files = sorted(str(p) for p in (out / split).glob("*.tfrecord.gz"))
    parsed = (tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    return {r["key"].numpy(): (int(r["label"]), r["image"].numpy()) for r in parsed}


def assert_same_output(out: Path, reference: Path):
    """The same records (any order: each runner shards its own way) and statistics as the reference run."""
    for split in ("train", "val", "test"):
        got, want = records(out, split), records(reference, split)
        assert got.keys() == want.keys(), split
        for key, (label, image) in want.items():
            assert got[key][0] == label
            # Mean/std are float sums Beam may combine in another order: equal to float32 rounding.
            np.testing.assert_allclose(got[key][1], image, rtol=0, atol=1e-5)
    read = lambda d: json.loads((d / "stats.json").read_text())
    assert timeless(read(out)) == timeless(read(reference))
    lines = lambda d: (d / "quarantine.jsonl").read_text().count("\n")
    assert lines(out) == lines(reference)


@pytest.fixture(scope="module")
def images(tmp_path_factory, cifar_dir) -> Path:
    """A few real photos per class, and one file that is not an image (quarantined)."""
    root = copy_subset(cifar_dir, tmp_path_factory.mktemp("images"), ["automobile", "truck"], 12)
    (root / "truck" / "notes.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def local_reference(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    augment(str(images), str(out), **settings("augment", copies=1))
    return out


def test_augment_reads_and_stages_in_minio_with_the_same_output(minio, images, local_reference, tmp_path):
    data = upload(minio, images, "in")
    out = tmp_path / "out"
    augment(data, str(out), **settings("augment", copies=1, staging_uri=f"s3://{BUCKET}/staging"))
    assert_same_output(out, local_reference)
    assert json.loads((out / "meta.json").read_text())["source"] == data
    assert keys_under(minio, "staging/") == []  # fetched into the output, then cleared
    # A file in the store that is not an image is quarantined by its URI, like a local one by its path.
    [bad] = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert bad["path"] == f"{data}/truck/notes.jpg" and bad["reason"].startswith("not an image")


def test_clean_images_stage_in_minio_too(minio, cifar_dir, tmp_path):
    """Nothing to quarantine: Beam's S3 writer fails to close an empty file (a multipart upload with no
    part), so the quarantine travels in the results file, which is never empty."""
    data = upload(minio, copy_subset(cifar_dir, tmp_path / "clean", ["automobile", "truck"], 12), "clean-in")
    out = tmp_path / "out"
    augment(data, str(out), **settings("augment", copies=0, staging_uri=f"s3://{BUCKET}/clean-staging"))
    assert (out / "quarantine.jsonl").read_text() == ""
    stats = json.loads((out / "stats.json").read_text())
    assert stats["quarantined_total"] == 0 and stats["written"]["total"] == 24
    assert keys_under(minio, "clean-staging/") == []


def test_a_failed_run_leaves_nothing_in_the_staging_store(minio, images, tmp_path):
    """A run that fails in a worker (here on an augmentation setting no op can use, once the listing,
    the quarantine and other splits' shards may be written) clears what it staged, and the error says why."""
    data = upload(minio, images, "fail-in")
    kwargs = settings("augment", copies=1, staging_uri=f"s3://{BUCKET}/fail-staging")
    kwargs["ops"] = {**kwargs["ops"], "rotation_degrees": "ten", "rotation_probability": 1.0}
    with pytest.raises(Exception, match="not supported between"):
        augment(data, str(tmp_path / "out"), **kwargs)
    assert keys_under(minio, "fail-staging/") == []
    assert not (tmp_path / "out").exists()


def download_prefix(client, key: str, local: Path) -> Path:
    """KFP's launcher before a task: every object under an input artifact's key, to the same relative
    path under its local path (objectstore.DownloadBlob, object_store.go L176-205 at 2.17.0)."""
    for name in keys_under(client, key + "/"):
        target = local / name[len(key) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, name, str(target))
    return local


def test_on_a_cluster_the_records_stay_in_the_kfp_artifact_and_kfp_passes_them_on(
        minio, images, local_reference, tmp_path, sqlite_tracking_uri):
    """`augment.staging_uri=artifact`: the workers write the records straight to the Dataset artifact's
    URI in KFP's object store (minio://, KFP's MinIO), the pod only its small files; KFP's launcher
    uploads those beside them and downloads the whole artifact for the next stage. No KFP backend runs
    here: the launcher's two steps are ported from its code (upload_folder, download_prefix)."""
    from kfp.dsl import Dataset, Metrics

    from kflift.pipeline.kfp_components import augment_step

    data = upload(minio, images, "artifact-in")
    key = "v2/artifacts/kflift/run-1/augment/dataset"
    dataset = Dataset(name="dataset", uri=f"minio://{BUCKET}/{key}")
    dataset.custom_path = str(tmp_path / "pod" / "dataset")  # the pod's local path of the artifact
    augment_step(sqlite_tracking_uri, "kflift", "", "run-1", "", "", "", "augment", data, [], [],
                 settings("augment", copies=1, staging_uri="artifact"), dataset,
                 Metrics(name="stats", uri=str(tmp_path / "stats")))
    pod = Path(dataset.path)
    # The pod holds only the small files; the records went from the workers to the store.
    assert sorted(p.name for p in pod.iterdir()) == ["meta.json", "preview.png", "quarantine.jsonl",
                                                     "stats.json", "transform_fn"]
    assert json.loads((pod / "meta.json").read_text())["records_uri"] == f"s3://{BUCKET}/{key}"
    stored = keys_under(minio, key + "/")
    assert {k[len(key) + 1:].split("/")[0] for k in stored} == {"train", "val", "test"}  # the counts and quarantine: fetched
    # KFP's launcher after the task (launcher_v2.go L811-836 at 2.17.0): the artifact's local path is
    # uploaded file by file under its key (objectstore.UploadBlob, object_store.go L111-141); what is
    # already under the key stays. `upload` does exactly that.
    upload(minio, pod, key)
    downstream = download_prefix(minio, key, tmp_path / "next-task" / "dataset")
    assert_same_output(downstream, local_reference)


@pytest.fixture(scope="module")
def spark(minio, tmp_path_factory):
    """A Spark standalone cluster (a master and two workers, one core each, each its own JVM), Beam's
    Spark job server in front of it, and the Beam worker pool its executors hand Python work to. The
    workers cannot see this test session's folders (the pipeline's data, output and work folders):
    they run where those are an empty tmpfs; only `shared` (augment.transform_temp: a shared volume
    on a real cluster) is seen by both sides. Yields the augment Beam options and `shared`."""
    try:
        with spark_cluster(tmp_path_factory.mktemp("spark"), hide=tmp_path_factory.getbasetemp()) as cluster:
            yield cluster
    except (FileNotFoundError, PermissionError) as exc:
        pytest.fail(str(exc))


def test_augment_on_a_spark_cluster_with_data_in_minio_matches_the_local_runner(
        spark, minio, images, local_reference, tmp_path):
    data = upload(minio, images, "spark-in")
    out = tmp_path / "out"
    start = time.time()
    augment(data, str(out), **settings("augment", copies=1, staging_uri=f"s3://{BUCKET}/spark-staging",
                                       transform_temp=str(spark["shared"]), beam_options=spark["options"]))
    print(f"augment on Spark: {time.time() - start:.1f} s")
    assert_same_output(out, local_reference)
    assert list(spark["shared"].iterdir()) == []  # the transform graph came back into the output
    # It ran as applications of the cluster, on both workers' executors: none is left running.
    status = spark_status(spark["ui"])
    assert status["completedapps"] and not status["activeapps"]
    assert {w["state"] for w in status["workers"]} == {"ALIVE"}
    assert keys_under(minio, "spark-staging/") == []
