"""A function in a fresh child process: tf.Transform stays out of the caller, and a teardown crash stays there."""
from __future__ import annotations

import multiprocessing
import os
import sys


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
