"""The stage image built with a real Docker engine, and the whole DAG run in it (kfp.local.DockerRunner).

The engine comes from scripts/docker-engine.sh (CI runs it first; the fixture runs it when no engine
answers). Nothing can be pulled, so the image builds on kflift-base:bookworm (debootstrap + docker
import) from a wheelhouse kept in .venv/wheelhouse; an image whose inputs are unchanged is reused.
"""
import os
import re
import shutil
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS_SOURCE, FAST, REPO, kflift

# One pytest-xdist worker runs these with the digits case of test_e2e: they share one digits run.
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("digits-run")]
BASE = os.environ.get("KFLIFT_BASE_IMAGE", "kflift-base:bookworm")
IMAGE = "kflift-cpu:test"  # both flavours: the GPU base image cannot be pulled here
BUILD_NEEDS_GB = 12  # builder stage ~4.5 GB (removed after), runtime image ~3.6 GB, build context ~1 GB
IMAGES = ["--set", f"images.cpu={IMAGE}", "--set", f"images.gpu={IMAGE}"]
TIMINGS = {}  # written to the terminal at the end of the module (CI's cost of this test)


def timed(name):
    start = time.monotonic()
    return lambda: TIMINGS.__setitem__(name, round(time.monotonic() - start, 1))


@pytest.fixture(scope="module")
def engine(request):
    """A docker SDK client of an engine that holds the base image, or a skip saying why there is none."""
    from kflift.pipeline.images import ImageError, engine as connect

    done = timed("engine+base image (scripts/docker-engine.sh)")
    try:
        client = connect()
        ready = bool(client.images.list(name=BASE))
    except ImageError:
        ready = False
    if not ready:
        script = subprocess.run(["bash", str(REPO / "scripts" / "docker-engine.sh")], capture_output=True,
                                text=True, timeout=900, env={**os.environ, "KFLIFT_BASE_IMAGE": BASE})
        if script.returncode != 0:
            pytest.skip(f"no Docker engine can start here: {script.stderr.strip().splitlines()[-1]}")
        client = connect()
    done()
    yield client
    client.close()
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"\ntests/test_docker.py timings (s): {TIMINGS}")


@pytest.fixture(scope="module")
def image(engine):
    """kflift-cpu:test, built offline from the wheelhouse (kept when its inputs are unchanged)."""
    wheelhouse = REPO / ".venv" / "wheelhouse"
    # The disk may be shared with other machines' work: a build that cannot fit is a skip that says so.
    free_gb = shutil.disk_usage(engine.info()["DockerRootDir"]).free / 1e9
    if free_gb < BUILD_NEEDS_GB and not engine.images.list(name=IMAGE):
        pytest.skip(f"{free_gb:.1f} GB free for the Docker engine; building {IMAGE} needs ~{BUILD_NEEDS_GB} GB")
    done = timed("wheelhouse")
    proc = kflift("images", "wheelhouse", str(wheelhouse), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done()
    done = timed("image build")
    proc = kflift("images", "build", "--flavor", "cpu", "--tag", "test", "--base-image", BASE,
                  "--wheelhouse", str(wheelhouse), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done()
    assert f"cpu: {IMAGE}" in proc.stdout
    assert not engine.images.list(filters={"dangling": True, "label": "io.kflift.stage=builder"})
    assert "--set images.cpu=kflift-cpu:test" in proc.stdout  # --tag differs from config: say how to use it
    built = engine.images.get(IMAGE)
    labels = built.labels
    assert labels["org.opencontainers.image.version"] == "0.1.0" and labels["org.opencontainers.image.source"]
    assert labels["io.kflift.build-hash"]
    assert built.attrs["Config"]["User"] == "1000:1000" and built.attrs["Config"]["Healthcheck"]["Test"]
    TIMINGS["image size GB"] = round(built.attrs["Size"] / 1e9, 2)
    # No build tools in the runtime image, and its entry point answers.
    out = engine.containers.run(IMAGE, ["sh", "-c", "command -v gcc cc make || echo none; kflift --help"],
                                remove=True, network_mode="host").decode()
    assert out.startswith("none") and "usage: kflift" in out
    # Unchanged inputs: the image is kept, not rebuilt.
    proc = kflift("images", "build", "--flavor", "cpu", "--tag", "test", "--base-image", BASE,
                  "--wheelhouse", str(wheelhouse))
    assert proc.returncode == 0 and "is up to date" in proc.stdout, proc.stderr[-2000:]
    return IMAGE


def stage_records(out):
    """stage -> (status, param keys, metric keys) of the one pipeline run in out's MLflow store, and the client."""
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kflift").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    records = {r.data.tags["kflift.stage"]: (r.info.status, set(r.data.params), set(r.data.metrics))
               for r in children}
    return parent, records, {r.data.tags["kflift.stage"]: r.info.run_id for r in children}, client


def test_whole_dag_in_containers_matches_the_subprocess_run(image, engine, tiny_digits, digits_run, tmp_path):
    args = ["--data", str(tiny_digits), *IMAGES, *FAST, *DIGITS_SOURCE]
    done = timed("docker DAG run")
    proc = kflift("run", "--runner", "docker", "--output", str(tmp_path / "docker"), *args, timeout=1800)
    done()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "docker runner: user" in proc.stdout and "host network" in proc.stdout
    run_log = next((tmp_path / "docker" / "runs").glob("*/run.log")).read_text()  # kfp.local's lines land there
    assert len(re.findall(rf"Found image '{IMAGE}'", run_log)) == 10  # every stage ran in the image
    assert not engine.containers.list(all=True, filters={"ancestor": IMAGE})  # each removed after its stage

    ref, ref_out = digits_run  # the same data and settings in subprocesses (shared with test_e2e)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    parent, records, run_ids, client = stage_records(tmp_path / "docker")
    ref_parent, ref_records, _, _ = stage_records(ref_out)
    assert parent.info.status == ref_parent.info.status == "FINISHED"
    assert records == ref_records  # same stages, all FINISHED, same param and metric keys
    assert {status for status, _, _ in records.values()} == {"FINISHED"}
    version = client.get_model_version_by_alias("kflift-classifier", "champion")
    assert version.run_id == run_ids["evaluate"]
    # The containers wrote the host's files as the host user.
    summary = next((tmp_path / "docker" / "runs").glob("*/summary.json"))
    assert summary.stat().st_uid == os.getuid()


def test_missing_image_is_refused_before_anything_is_written(image, tmp_path):
    proc = kflift("run", "--runner", "docker", "--output", str(tmp_path / "out"),
                  "--set", f"images.cpu={IMAGE}", "--set", "images.gpu=kflift-nowhere:0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "image kflift-nowhere:0 is not in the Docker engine" in proc.stderr
    assert "kflift images build" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_failing_build_names_the_step(engine, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "bogus-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    proc = kflift("images", "build", "--flavor", "cpu", "--tag", "broken", "--base-image", BASE,
                  "--wheelhouse", str(wheels), timeout=900)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert re.match(r"kflift: building kflift-cpu:broken failed at Step \d+/\d+ : RUN .*: exit code \d", line)
    assert not engine.images.list(name="kflift-cpu:broken")


def test_push_to_an_unreachable_registry_fails_clearly(image, tmp_path):
    proc = kflift("images", "build", "--flavor", "cpu", "--tag", "test", "--base-image", BASE,
                  "--wheelhouse", str(REPO / ".venv" / "wheelhouse"), "--push", "127.0.0.1:9")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("kflift: pushing 127.0.0.1:9/kflift-cpu:test failed:")
