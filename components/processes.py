"""A function in a fresh child process: tf.Transform stays out of the caller, and a teardown crash stays there."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys

# glibc gives each allocating thread its own malloc arena (up to 8 per core) and seldom returns
# their freed pages: with Beam's gRPC threads and TensorFlow's, the augment runner and workers grew
# with the input. Two arenas: peak RSS growth from 10k to 100k images 1.29-1.36x -> 1.19-1.26x
# (bench/augment.py), no slower. glibc reads it at start-up, so it is set for the child (and the
# Beam workers it starts), not in this process.
CHILD_ENV = {"MALLOC_ARENA_MAX": "2"}


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


def in_child_process(fn, *args):
    """Run fn in a fresh process: tf.Transform stays out of the caller (it flips tf.keras to
    Keras 2 process-wide) and its teardown crash cannot take the stage down."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_conn, fn, args), name="kflift-worker")
    with _environ(CHILD_ENV):
        proc.start()
    child_conn.close()
    try:
        status, value = parent_conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"worker process died (exit code {proc.exitcode})") from None
    proc.join()
    if status == "error":
        raise value
    return value


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """These environment variables (unless already set) while the block runs."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's
    limit, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus
