"""A new user's own image folder: two classes, no transfer source named."""
import json

import pytest

from conftest import FAST, copy_subset, kflift

from kflift.pipeline.config import NO_SOURCE_NOTE

pytestmark = pytest.mark.slow  # a whole pipeline run


def test_own_data_without_a_source_runs_to_the_end_without_transfer(tmp_path, cifar_dir):
    data = copy_subset(cifar_dir, tmp_path / "photos", ["automobile", "truck"], 16)
    out = tmp_path / "out"
    proc = kflift("run", "--data", str(data), "--output", str(out), *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(NO_SOURCE_NOTE) == 1  # said once, with how to add a source
    summary = json.loads(next((out / "runs").glob("*/summary.json")).read_text())
    assert set(summary["candidates"]) == {"baseline", "regularized"}
    assert not any(s.startswith(("finetune", "augment-source", "train-backbone")) for s in summary["stages"])
