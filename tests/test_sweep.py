"""The sweep's grid and its pick of the best point."""
import json

import pytest

from kflift.components.files import write_json
from kflift.components.sweep import grid_points, select_best


def test_grid_points_are_complete_and_named():
    points = grid_points({"learning_rate": [0.1, 0.01], "dropout": [0.0, 0.5]}, {"learning_rate": 1, "l2": 0.3})
    assert len(points) == 4 and all(p["l2"] == 0.3 for p in points)
    assert [p["train_stage"] for p in points] == [f"train-sweep-{i}" for i in range(4)]
    with pytest.raises(ValueError, match="cannot sweep \\['epochs'\\]"):
        grid_points({"epochs": [1, 2]}, {})


def test_select_best_copies_the_model_with_the_best_validation_epoch(tmp_path):
    dirs = []
    for i, accs in enumerate([[0.5, 0.7], [0.6, 0.9, 0.8], [0.65]]):
        d = tmp_path / f"m{i}"
        write_json(d / "history.json", [{"val_accuracy": a} for a in accs])
        write_json(d / "params.json", {"learning_rate": 10 ** -i})
        (d / "model.keras").write_text(f"model {i}")
        dirs.append(str(d))
    result = select_best(dirs, str(tmp_path / "best"), metric="val_accuracy")
    assert (tmp_path / "best" / "model.keras").read_text() == "model 1"
    assert result["best"] == {"learning_rate": 0.1} and result["metrics"]["best_val_accuracy"] == 0.9
    assert json.loads((tmp_path / "best" / "params.json").read_text())["learning_rate"] == 0.1
