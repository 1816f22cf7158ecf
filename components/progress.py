"""progress: the one-line protocol by which a running stage tells the console what it is doing.

A stage prints, among its ordinary output, lines of the form

    kflift-progress {"stage": "train-baseline", "epoch": 2, "epochs": 10, ...}

that is the MARKER, a space and one JSON object. kfp.local streams each stage's output into the
`kflift run` process, which writes every line to run.log and hands these to the console
(pipeline/console.py); anything else may print what it likes. `stage` is the running stage's
name: `run_stage` sets it for the whole stage (in the environment, so Beam's worker processes see
it too); a stage function run on its own reports under the name it passes (`kind`).

What the fields mean (every field but `stage` is optional):

- state changes, from `runner.run_stage`:
  `{"state": "running", "since": t}` when the stage starts its work (a step-cache miss), `t` the
  epoch second its process started;
  `{"state": "cached" | "done", "seconds": s, "metrics": {...}}` when it ends, `s` seconds after its
  process started, with its flat scalar metrics (the console picks the stage's key figure from
  them) and `"champion": name` when the stage registered that candidate as the champion;
  `{"state": "failed", "error": "Type: first line"}` when it raises.
- images (augment): `{"worker": w, "checked": n, "images": total}` and `{"worker": w, "written": m}`:
  counts so far of one copy `w` of the counting function (Beam runs copies in its workers and
  bundles; the reader adds up the latest count of each copy).
- epochs (train, finetune): `{"epoch": i, "epochs": n, "phase": "frozen", "metrics": {...}}` after
  epoch i of n (1-based) of a fit; `phase` names finetune's two fits; `metrics` are Keras' logs
  (loss, accuracy, val_loss, val_accuracy, learning_rate).
- `{"note": text}`: a one-line remark worth showing, e.g. that training resumes from a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

MARKER = "kflift-progress"
STAGE_ENV = "KFLIFT_STAGE"  # the running stage's name, set by runner.run_stage


def progress(kind: str, **fields) -> None:
    """Print one protocol line about the running stage (else the stage `kind`)."""
    stage = os.environ.get(STAGE_ENV) or kind
    line = json.dumps({"stage": stage, **fields}, default=float, separators=(", ", ": "))
    print(f"{MARKER} {line}", file=sys.stdout, flush=True)


def parse(line: str) -> dict | None:
    """The event a line carries, or None for any other line. The marker may follow other text
    (kfp.local indents a stage's output, and parallel tasks can interleave their indents)."""
    at = line.find(MARKER + " {")
    if at < 0:
        return None
    try:
        event, _ = json.JSONDecoder().raw_decode(line, at + len(MARKER) + 1)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("stage"), str) else None


@contextlib.contextmanager
def reporting(stage: str):
    """Around a stage's run: the progress lines printed inside (by this process and its children)
    name `stage`, and a `failed` line follows an exception."""
    before = os.environ.get(STAGE_ENV)
    os.environ[STAGE_ENV] = stage
    try:
        yield
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        progress(stage, state="failed", error=f"{type(exc).__name__}: {text[0] if text else ''}")
        raise
    finally:
        if before is None:
            os.environ.pop(STAGE_ENV, None)
        else:
            os.environ[STAGE_ENV] = before


def process_start() -> float:
    """When this process started (Linux /proc), so the interpreter and imports count too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
