"""A local Beam worker process (Beam's own SDK harness) that skips the interpreter's teardown once its
work is done: with TensorFlow loaded that teardown takes ~1.4 s, and Beam's local engine stops its
workers one after another, waiting for each process to end."""
from __future__ import annotations

import os
import sys

from apache_beam.runners.worker import sdk_worker_main

if __name__ == "__main__":
    try:
        sdk_worker_main.main(sys.argv)
    except BaseException:  # the harness has logged it; the engine sees the exit status
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
