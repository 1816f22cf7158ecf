"""`kflift server`: the MLflow tracking server on loopback, backed by PostgreSQL, serving artifacts.

Without a backend URI it keeps its own PostgreSQL cluster under the output folder: initialized once,
started with the server and stopped with it (Ctrl-C or SIGTERM), so nothing is left running.
PostgreSQL refuses to run as root; as root the cluster belongs to the system user `postgres`.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PG_USER = "postgres"  # the cluster's owner when kflift runs as root (Debian's name for it)
DB_USER = "kflift"
DB_NAME = "mlflow"


class ServerError(RuntimeError):
    """The server cannot start; the message names what is wrong and how to fix it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        # As the server binds (SO_REUSEADDR), so a port in TIME_WAIT is not taken for busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServerError(f"port {port} on {host} is already in use ({exc.strerror}); "
                              "pick another with --port") from None


def check_backend_uri(uri: str, timeout: int = 5) -> None:
    """A PostgreSQL URI that parses and accepts a connection, checked before the server starts."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        url = make_url(uri)
    except ArgumentError:
        raise ServerError(f"bad --backend-store-uri '{uri}': expected postgresql://USER[:PASSWORD]@HOST:PORT/DB") \
            from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() != "postgresql" or not url.database:
        raise ServerError(f"bad --backend-store-uri '{shown}': expected postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    engine = create_engine(url, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ServerError(f"cannot connect to the backend store {shown}: {detail[0] if detail else exc}") from None
    finally:
        engine.dispose()


def pg_bin_dir() -> Path:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    raise ServerError("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                      "/usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: apt-get install postgresql) "
                      "or pass --backend-store-uri")


@dataclass
class Cluster:
    """A PostgreSQL cluster in `root` (data/ and postgres.log), run by this user or, as root, by PG_USER."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def _cmd(self, *args: str) -> list[str]:
        """`args` run as the cluster's owner: postgres refuses root."""
        if os.geteuid() != 0:
            return list(args)
        user = pwd.getpwnam(PG_USER)
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *args]

    def _run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)

    def init(self) -> bool:
        """initdb once; returns True when it created the cluster."""
        if (self.data / "PG_VERSION").is_file():
            return False
        bin_dir = pg_bin_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _ensure_system_user(PG_USER)
            user = pwd.getpwnam(PG_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            if self._run("test", "-w", str(self.root)).returncode != 0:
                raise ServerError(f"user {PG_USER} cannot reach {self.root} (PostgreSQL refuses to run as root): "
                                  "use an --output folder that others may traverse, e.g. under /srv or /tmp")
        if self.data.exists():  # a half-made cluster from an interrupted initdb: start over
            shutil.rmtree(self.data)
        proc = self._run(str(bin_dir / "initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=trust",
                         "--encoding=UTF8", "--locale=C")
        if proc.returncode != 0:
            raise ServerError(f"initdb failed in {self.data}: {_last_line(proc)}")
        return True

    def running_port(self) -> int | None:
        """The port of a postmaster already running on this cluster, if any."""
        if self._run(str(pg_bin_dir() / "pg_ctl"), "status", "-D", str(self.data)).returncode != 0:
            return None
        return int((self.data / "postmaster.pid").read_text().splitlines()[3])

    def start(self, port: int) -> None:
        """Start on 127.0.0.1:`port`, TCP only, and wait until it accepts connections."""
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        proc = self._run(str(pg_bin_dir() / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
                         "-l", str(self.log), "-o", opts)
        if proc.returncode != 0:
            raise ServerError(f"PostgreSQL did not start on port {port}: {_last_line(proc)} (log: {self.log})")

    def stop(self) -> None:
        if self.running_port() is None:  # it never started
            return
        proc = self._run(str(pg_bin_dir() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data))
        if proc.returncode != 0:
            print(f"kflift: PostgreSQL in {self.data} did not stop: {_last_line(proc)}", file=sys.stderr)

    def stop_command(self) -> str:
        return " ".join(self._cmd(str(pg_bin_dir() / "pg_ctl"), "stop", "-D", str(self.data)))


def create_database(port: int, name: str = DB_NAME) -> str:
    """The database MLflow uses (created when missing); returns its URI."""
    import psycopg

    try:  # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", connect_timeout=10,
                             autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise ServerError(f"cannot create database {name} on the local PostgreSQL (port {port}): "
                          f"{str(exc).strip().splitlines()[0]}") from None
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/{name}"


def mlflow_command(backend_uri: str, artifacts: Path, host: str, port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--serve-artifacts", "--artifacts-destination", str(artifacts),
            "--host", host, "--port", str(port), "--workers", str(workers)]


def serve(output: str | Path, host: str = "127.0.0.1", port: int = 5000, backend_uri: str | None = None,
          artifacts: str | Path | None = None, workers: int = 2) -> int:
    """Run the MLflow server until it stops or this process is told to stop; returns its exit code."""
    output = Path(output).resolve()
    artifacts = Path(artifacts).resolve() if artifacts else output / "mlartifacts"
    check_port_free(host, port)
    # A stop signal while PostgreSQL starts unwinds through the `finally` below, which stops it again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = None
    if backend_uri:
        check_backend_uri(backend_uri)
    else:
        cluster = Cluster(output / "postgres")
        if cluster.init():
            print(f"PostgreSQL cluster created: {cluster.data}", flush=True)
        if cluster.running_port() is not None:
            raise ServerError(f"PostgreSQL in {cluster.data} is already running (another kflift server?); "
                              f"stop that server, or stop it with: {cluster.stop_command()}")
    try:
        if cluster:
            pg_port = free_port()
            cluster.start(pg_port)
            backend_uri = create_database(pg_port)
            print(f"PostgreSQL: {backend_uri} (stops with this server)", flush=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        print(f"MLflow server: http://{host}:{port}  (UI and API; artifacts in {artifacts}; Ctrl-C to stop)\n"
              f"use it with: kflift run --tracking-uri http://{host}:{port}", flush=True)
        return _supervise(mlflow_command(backend_uri, artifacts, host, port, workers))
    finally:
        if cluster:
            cluster.stop()


def _supervise(cmd: list[str]) -> int:
    """Run `cmd` as a child that dies with us, pass stop signals on, and wait for it to exit.

    The child stays in our process group, so a terminal's Ctrl-C reaches it directly; `mlflow server`
    passes SIGINT/SIGTERM on to its uvicorn workers.
    """
    # MLflow's job runner (GenAI jobs, unused here) adds a dozen huey processes that outlive a stop signal.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    return proc.wait()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if kflift itself is killed, so the server is never orphaned (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServerError(f"cannot create system user {name} for PostgreSQL: {_last_line(proc)}") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"
