"""sweep: pick the best of a hyper-parameter grid's trained models by a validation metric."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

from .files import publish_dir, staging_dir
from .results import StageResult

SWEEPABLE = ("learning_rate", "l1", "l2", "dropout")


def grid_points(grid: dict[str, list], defaults: dict[str, float]) -> list[dict]:
    """Every combination of the grid's values; each point is complete (defaults fill the rest)
    and carries its own stage names, so every point is its own nested MLflow run."""
    unknown = sorted(set(grid) - set(SWEEPABLE))
    if unknown:
        raise ValueError(f"train.sweep: cannot sweep {unknown} (choose from {list(SWEEPABLE)})")
    keys = sorted(grid)
    points = []
    for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        point = {**defaults, **dict(zip(keys, values))}
        points.append({**point, "build_stage": f"build-sweep-{i}", "train_stage": f"train-sweep-{i}"})
    return points


def select_best(model_dirs: list[str], output_dir: str, *, metric: str) -> StageResult:
    """Copy the model whose best epoch scores highest on `metric` (higher is better; a loss is
    negated) to `output_dir`."""
    sign = -1.0 if "loss" in metric else 1.0
    scores = []
    for model_dir in model_dirs:
        history = json.loads((Path(model_dir) / "history.json").read_text())
        params = json.loads((Path(model_dir) / "params.json").read_text())
        values = [e[metric] for e in history if metric in e]
        if not values:
            raise ValueError(f"{model_dir}: no '{metric}' in its history (is there a validation split?)")
        scores.append((sign * max(sign * v for v in values), params, model_dir))
    best = max(scores, key=lambda s: sign * s[0])
    work = staging_dir(output_dir)
    shutil.rmtree(work)
    shutil.copytree(best[2], work)
    publish_dir(work, Path(output_dir))
    return {"params": {"metric": metric, "points": len(scores), **{f"best.{k}": v for k, v in best[1].items()}},
            "metrics": {f"best_{metric}": best[0],
                        **{f"point_{i}.{metric}": s[0] for i, s in enumerate(scores)}},
            "best": best[1]}


def with_point(settings: dict, point: dict) -> dict:
    """A stage's settings with a grid point's values for the keys it has (the rest of the point,
    such as the other stage's name and settings, is not this stage's)."""
    return {**settings, **{k: v for k, v in point.items() if k in settings}}
