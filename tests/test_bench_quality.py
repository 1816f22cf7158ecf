"""bench/quality.py's summary over seeds: lifts matched image by image through the content keys."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def run(seed: int, labels: np.ndarray, predicted: dict[str, np.ndarray]) -> dict:
    """One seed's result as run_once returns it, its test images in an order of its own (as Beam writes them)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return {"test_predictions": {"keys": [f"img{i}" for i in order], "labels": labels[order].tolist(),
                                 "predicted": {n: p[order].tolist() for n, p in predicted.items()}}}


def test_the_mean_lift_over_seeds_pairs_each_image_across_runs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    base = np.where(rng.random(2000) < 0.9, labels, 1 - labels)  # 90% right
    better = np.where(np.arange(2000) < 600, labels, base)  # right on the first 600 too: about +3 points
    worse = np.where(np.arange(2000) < 600, 1 - labels, base)
    runs = [run(seed, labels, {"baseline": base, "better": better, "worse": worse, "same": base})
            for seed in (42, 43, 44)]
    lift, low, high = quality.mean_difference(runs, "better", "baseline")
    assert lift == pytest.approx(np.mean(better == labels) - np.mean(base == labels)) and 0 < low < lift < high
    lift, low, high = quality.mean_difference(runs, "worse", "baseline")
    assert low < lift < high < 0
    assert quality.mean_difference(runs, "same", "baseline") == (0.0, 0.0, 0.0)
    # The seeds agree image by image here, so matched by key their mean has one seed's interval;
    # matched by position (each run's own order) the interval would shrink as if they were independent.
    assert quality.mean_difference(runs, "better", "baseline") == quality.mean_difference(runs[:1], "better", "baseline")
