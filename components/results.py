"""What a stage function returns: its own module, so that a stage's step-cache fingerprint (its
module and everything that module imports) does not take in the stage table, which imports every
stage: an edit to evaluate.py no longer invalidated augment's cache, and the reverse."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict


class Registration(TypedDict):
    """A logged MLflow model to register, and point the `champion` alias at."""
    name: str
    artifact_path: str
    candidate: str


class StageResult(TypedDict, total=False):
    """What a stage function returns; the runner logs it into the stage's MLflow run."""
    params: dict[str, Any]  # MLflow params (nested dicts become dotted keys)
    metrics: dict[str, Any]  # scalar metrics (nested dicts become dotted keys)
    history: list[dict[str, float]]  # one dict of metrics per epoch, logged as steps
    artifacts: list[tuple[str | None, Path]]  # (MLflow folder, or None for the root; local path)
    register: Registration | None  # evaluate: the champion
    meta: dict  # augment: its meta.json (image size, labels, counts)
    best: dict  # select_best: the model chosen and its score
    report: dict  # evaluate: report.json (scores, gate, winner, confusion matrices)
