"""augment on real engines: its data in a real MinIO server (s3://), on the local runner and on a real
Spark standalone cluster (a master and two workers, each its own JVM) through Beam's Spark job server.

The engines come from `scripts/engines.sh` (`make test` runs it first) into .venv/engines/; a missing
one FAILS, naming the command. Credentials reach every process (this one, augment's child, Beam's
workers) only through the environment: AWS_* for Beam's S3 filesystem (boto3).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, copy_subset, settings
from kflift.components.augment import augment

pytestmark = [pytest.mark.engines, pytest.mark.slow, pytest.mark.xdist_group("engines")]

ENGINES = REPO / ".venv" / "engines"
HINT = "run scripts/engines.sh (make engines)"
BUCKET = "kflift"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, seconds: float = 120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not up after {seconds:.0f} s")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def minio(tmp_path_factory):
    """A MinIO server on loopback with bucket `kflift`; its endpoint and keys in os.environ for the
    processes this test starts. Yields a boto3 client."""
    binary = ENGINES / "bin" / "minio"
    if not binary.is_file():
        pytest.fail(f"no MinIO at {binary}: {HINT}")
    port = free_port()
    keys = {"AWS_ACCESS_KEY_ID": "kflift-test", "AWS_SECRET_ACCESS_KEY": os.urandom(12).hex(),
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    env = {**os.environ, "MINIO_ROOT_USER": keys["AWS_ACCESS_KEY_ID"],
           "MINIO_ROOT_PASSWORD": keys["AWS_SECRET_ACCESS_KEY"], "MINIO_BROWSER": "off"}
    log = tmp_path_factory.mktemp("minio") / "minio.log"
    proc = subprocess.Popen([str(binary), "server", "--address", f"127.0.0.1:{port}", "--console-address",
                             f"127.0.0.1:{free_port()}", str(log.parent / "data")],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        wait_for(lambda: urllib.request.urlopen(f"{keys['AWS_ENDPOINT_URL']}/minio/health/ready").status == 200,
                 "MinIO")
        import boto3

        client = boto3.client("s3")  # endpoint and keys from the environment, as Beam's client takes them
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        proc.terminate()
        proc.wait(30)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


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


def timeless(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("wall_seconds", "images_per_second")}


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


# Spark 3.5 on Java 17 needs these opens (as Spark's own launcher adds them to its driver).
JAVA_OPENS = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
    "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
    "java.util.concurrent", "java.util.concurrent.atomic", "jdk.internal.ref", "sun.nio.ch", "sun.nio.cs",
    "sun.security.action", "sun.util.calendar")]


@pytest.fixture(scope="module")
def spark(minio, tmp_path_factory):
    """A Spark standalone cluster (a master and two workers, one core each, each its own JVM), Beam's
    Spark job server in front of it, and the Beam worker pool its executors hand Python work to
    (this virtualenv's python, the MinIO keys in its environment). Yields the augment Beam options."""
    spark_home = next((ENGINES / "spark" / "lib").glob("python3*/site-packages/pyspark"), None)
    jar = ENGINES / "beam-spark-jobserver.jar"
    if spark_home is None or not jar.is_file():
        pytest.fail(f"no Spark or Beam job server in {ENGINES}: {HINT}")
    logs = tmp_path_factory.mktemp("spark")
    java = shutil.which("java")
    cp = f"{spark_home}/jars/*"
    master, ui, job, artifact, expansion, pool = (free_port() for _ in range(6))
    procs = []

    def start(name, args, **kw):
        procs.append(subprocess.Popen(args, stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, **spark_env, **kw.pop("env", {})}, **kw))

    # What Spark's launch scripts would set: the worker builds each executor's command from them.
    spark_env = {"SPARK_HOME": str(spark_home), "SPARK_SCALA_VERSION": "2.12", "SPARK_LOCAL_IP": "127.0.0.1"}

    start("master", [java, "-Xmx256m", "-cp", cp, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                     "--port", str(master), "--webui-port", str(ui)])
    for i in (1, 2):
        start(f"worker{i}", [java, "-Xmx256m", "-cp", cp, "org.apache.spark.deploy.worker.Worker", "--host",
                             "127.0.0.1", "--cores", "1", "--memory", "2g", "--webui-port", str(free_port()),
                             "--work-dir", str(logs / f"work{i}"), f"spark://127.0.0.1:{master}"])
    start("jobserver", [java, "-Xmx1g", *JAVA_OPENS, "-Dspark.executor.memory=1g", "-Dspark.executor.cores=1",
                        f"-Dbeam.stage.exclude.prefixes={spark_home}/jars/", "-Dspark.driver.host=127.0.0.1",
                        "-Dspark.driver.bindAddress=127.0.0.1", "-cp", f"{cp}:{jar}",
                        "org.apache.beam.runners.spark.SparkJobServerDriver",
                        f"--spark-master-url=spark://127.0.0.1:{master}", "--job-host=127.0.0.1",
                        f"--job-port={job}", f"--artifact-port={artifact}", f"--expansion-port={expansion}",
                        f"--artifacts-dir={logs / 'artifacts'}"])
    venv_bin = Path(os.sys.executable).parent
    start("pool", [os.sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool}"],
          env={"PATH": f"{venv_bin}:{os.environ['PATH']}"})
    try:
        alive = lambda: sum(w["state"] == "ALIVE" for w in spark_status(ui)["workers"]) == 2
        wait_for(alive, "two Spark workers")
        wait_for(lambda: listening(job) and listening(pool), "Beam's job server and worker pool")
        yield {"ui": ui, "options": [
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job}", f"--artifact_endpoint=localhost:{artifact}",
            "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool}",
            "--environment_cache_millis=600000"]}  # one Python worker per executor, not one per task
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(60)


def spark_status(ui: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/") as r:
        return json.load(r)


def test_augment_on_a_spark_cluster_with_data_in_minio_matches_the_local_runner(
        spark, minio, images, local_reference, tmp_path):
    data = upload(minio, images, "spark-in")
    out = tmp_path / "out"
    start = time.time()
    augment(data, str(out), **settings("augment", copies=1, staging_uri=f"s3://{BUCKET}/spark-staging",
                                       beam_options=spark["options"]))
    print(f"augment on Spark: {time.time() - start:.1f} s")
    assert_same_output(out, local_reference)
    # It ran as applications of the cluster, on both workers' executors: none is left running.
    status = spark_status(spark["ui"])
    assert status["completedapps"] and not status["activeapps"]
    assert {w["state"] for w in status["workers"]} == {"ALIVE"}
    assert keys_under(minio, "spark-staging/") == []
