"""`kflift submit` — a contract test: no KFP backend can run here (offline), so a local HTTP server
speaks the KFP v2beta1 REST calls that kfp.Client makes (healthz, experiments, runs) and records them.
What the backend then does with the request is checked by tests/test_kfp_backend.py."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import kflift


class FakeKfp(BaseHTTPRequestHandler):
    calls: list = []
    status = 200

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, body, status=None):
        data = json.dumps(body).encode()
        self.send_response(status or self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.calls.append(("GET", self.path, None, self.headers.get("Authorization")))
        if self.status != 200:
            return self._reply({"error": "denied"})
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, body, self.headers.get("Authorization")))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-42", "display_name": body.get("display_name", ""),
                                "experiment_id": body.get("experiment_id")})
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def fake_kfp():
    FakeKfp.calls, FakeKfp.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    # a short poll: shutdown() waits for serve_forever's next look (0.5 s by default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


PVC = ["--set", "cluster.data_pvc=kflift-data"]


def test_contract_submit_creates_experiment_and_run(fake_kfp):
    proc = kflift("submit", "--host", fake_kfp, "--data-dir", "/data/vehicles", "--experiment", "lift",
                  "--token", "t0k", "--set", "transfer.source_classes=airplane,ship", *PVC,
                  "--tracking-uri", "http://mlflow.example:5000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run: {fake_kfp}/#/runs/details/run-42" in proc.stdout
    posts = {path: body for method, path, body, _ in FakeKfp.calls if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "lift"
    run = posts["/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-1"
    spec = run["pipeline_spec"]  # the compiled IR and its Kubernetes platform spec (GPU node selection)
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "kflift"
    assert "nodeSelector" in json.dumps(spec["platform_spec"])
    params = run["runtime_config"]["parameters"]
    assert params["data_dir"] == "/data/vehicles" and params["source_dir"] == "/data/vehicles"
    assert params["tracking_uri"] == "http://mlflow.example:5000"
    assert not params.get("run_id") and not params.get("parent_run_id")  # keyed by the KFP run id instead
    assert all(auth == "Bearer t0k" for *_, auth in FakeKfp.calls)
    # The data reaches the pods: both augment executors mount the claim at /data.
    executors = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    augments = [n for n in spec["pipeline_spec"]["deploymentSpec"]["executors"] if "augment" in n]
    assert len(augments) == 2
    for name in augments:
        assert [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"])
                for m in executors[name]["pvcMount"]] == [("kflift-data", "/data")]


def test_contract_submit_tracks_into_the_in_cluster_mlflow_by_default(fake_kfp):
    proc = kflift("submit", "--host", fake_kfp, "--data-dir", "/data/digits", *PVC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(body for method, path, body, _ in FakeKfp.calls if method == "POST" and path.endswith("/runs"))
    assert run["runtime_config"]["parameters"]["tracking_uri"] == "http://kflift-mlflow.kflift:5000"


def test_contract_data_in_an_object_store_needs_no_data_volume(fake_kfp):
    proc = kflift("submit", "--host", fake_kfp, "--data-dir", "s3://kflift-data/vehicles",
                  "--set", "transfer.source_classes=airplane,ship")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(body for method, path, body, _ in FakeKfp.calls if method == "POST" and path.endswith("/runs"))
    assert run["runtime_config"]["parameters"]["data_dir"] == "s3://kflift-data/vehicles"
    assert "pvcMount" not in json.dumps(run["pipeline_spec"]["platform_spec"])  # no claim to mount


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/data/x", *PVC, "--tracking-uri", "sqlite:///mlflow.db"],
     "--tracking-uri sqlite:///mlflow.db: a cluster run needs an MLflow server"),
    (["--data-dir", "/home/me/images", *PVC], "--data-dir /home/me/images is not under /data"),
    (["--data-dir", "/data/../etc", *PVC], "--data-dir /data/../etc is not under /data"),
    (["--data-dir", "/datasets/x", *PVC], "--data-dir /datasets/x is not under /data"),
    (["--data-dir", "/data/x", "--source-dir", "/src", *PVC], "--source-dir /src is not under /data"),
    (["--data-dir", "/data/x"], "--data-dir /data/x: no data volume is set"),
])
def test_submit_refuses_what_cannot_work_on_a_cluster(fake_kfp, args, message):
    proc = kflift("submit", "--host", fake_kfp, *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"kflift: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not FakeKfp.calls  # refused before anything reached the host


def test_contract_unauthorized_host_gives_one_line(fake_kfp):
    FakeKfp.status = 401
    proc = kflift("submit", "--host", fake_kfp, "--data-dir", "/data/d", "--token", "bad", *PVC)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused the request (401" in proc.stderr
    assert not [c for c in FakeKfp.calls if c[0] == "POST"]


def test_unreachable_host_gives_one_line():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    proc = kflift("submit", "--host", f"http://127.0.0.1:{port}", "--data-dir", "/data/d", *PVC)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"KFP host http://127.0.0.1:{port} is unreachable" in proc.stderr
