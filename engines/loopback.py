"""Real engines on loopback, from what scripts/engines.sh builds into .venv/engines/: a MinIO server,
and a Spark standalone cluster (a master and workers, each its own JVM) with Beam's Spark job server
and the Beam worker pool its executors hand Python work to. tests/test_engines.py and
bench/engines.py start them; credentials reach the processes only through the environment."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / ".venv" / "engines"
HINT = "run scripts/engines.sh (make engines)"

# Spark 3.5 on Java 17 needs these opens (as Spark's own launcher adds them to its driver).
JAVA_OPENS = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
    "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
    "java.util.concurrent", "java.util.concurrent.atomic", "jdk.internal.ref", "sun.nio.ch", "sun.nio.cs",
    "sun.security.action", "sun.util.calendar")]


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


@contextlib.contextmanager
def minio_server(folder: Path, bucket: str):
    """A MinIO server on loopback storing under `folder`, with `bucket`; its endpoint and keys are in
    os.environ (AWS_*, as boto3 and Beam's S3 filesystem read them) for the block. Yields a boto3 client."""
    binary = ENGINES / "bin" / "minio"
    if not binary.is_file():
        raise FileNotFoundError(f"no MinIO at {binary}: {HINT}")
    port = free_port()
    keys = {"AWS_ACCESS_KEY_ID": "kflift-test", "AWS_SECRET_ACCESS_KEY": os.urandom(12).hex(),
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    env = {**os.environ, "MINIO_ROOT_USER": keys["AWS_ACCESS_KEY_ID"],
           "MINIO_ROOT_PASSWORD": keys["AWS_SECRET_ACCESS_KEY"], "MINIO_BROWSER": "off"}
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(binary), "server", "--address", f"127.0.0.1:{port}", "--console-address",
                             f"127.0.0.1:{free_port()}", str(folder / "data")],
                            env=env, stdout=(folder / "minio.log").open("w"), stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        wait_for(lambda: urllib.request.urlopen(f"{keys['AWS_ENDPOINT_URL']}/minio/health/ready").status == 200,
                 "MinIO")
        import boto3

        client = boto3.client("s3")  # endpoint and keys from the environment, as Beam's client takes them
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        proc.terminate()
        proc.wait(30)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def spark_cluster(logs: Path, workers: int = 2, hide: Path | None = None):
    """A Spark standalone cluster (a master and `workers` workers, one core each), Beam's Spark job
    server in front of it, and the Beam worker pool (this virtualenv's python, the environment's
    AWS_* keys). Yields {"ui": master UI port, "shared": a folder the workers and this process both
    see (augment.transform_temp), "options": augment's Beam options}.

    `hide`: a folder the Python workers must not see: they run in a mount namespace where it is an
    empty 1 MB tmpfs, so a worker that touched a local path under it fails, or writes where the
    pipeline never looks."""
    spark_home = next((ENGINES / "spark" / "lib").glob("python3*/site-packages/pyspark"), None)
    jar = ENGINES / "beam-spark-jobserver.jar"
    if spark_home is None or not jar.is_file():
        raise FileNotFoundError(f"no Spark or Beam job server in {ENGINES}: {HINT}")
    if hide and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        raise PermissionError("`unshare --mount` is not permitted here: it hides the pipeline's folders "
                              "from the workers")
    logs.mkdir(parents=True, exist_ok=True)
    java = shutil.which("java")
    cp = f"{spark_home}/jars/*"
    master, ui, job, artifact, expansion, pool = (free_port() for _ in range(6))
    # What Spark's launch scripts would set: the worker builds each executor's command from them.
    spark_env = {"SPARK_HOME": str(spark_home), "SPARK_SCALA_VERSION": "2.12", "SPARK_LOCAL_IP": "127.0.0.1"}
    procs = []

    def start(name, args, **kw):
        procs.append(subprocess.Popen(args, stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, **spark_env, **kw.pop("env", {})}, **kw))

    shared = Path(tempfile.mkdtemp(prefix="kflift-shared-volume-"))  # outside `hide`
    try:
        start("master", [java, "-Xmx256m", "-cp", cp, "org.apache.spark.deploy.master.Master", "--host",
                         "127.0.0.1", "--port", str(master), "--webui-port", str(ui)])
        for i in range(1, workers + 1):
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
        pool_cmd = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool}"]
        if hide:
            pool_cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs -o size=1m kflift-hidden "$0" && exec "$@"', str(hide), *pool_cmd]
        start("pool", pool_cmd, env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        alive = lambda: sum(w["state"] == "ALIVE" for w in spark_status(ui)["workers"]) == workers
        wait_for(alive, f"{workers} Spark workers")
        wait_for(lambda: listening(job) and listening(pool), "Beam's job server and worker pool")
        yield {"ui": ui, "shared": shared, "options": [
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job}", f"--artifact_endpoint=localhost:{artifact}",
            "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool}",
            "--environment_cache_millis=600000"]}  # one Python worker per executor, not one per task
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(60)
        shutil.rmtree(shared, ignore_errors=True)


def spark_status(ui: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/") as r:
        return json.load(r)
