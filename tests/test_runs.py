"""`kflift runs` and `kflift show`: a finished run at a glance, read back from the MLflow store."""
import json

import pytest

from conftest import kflift

# Reads the shared digits run (tests/conftest.py): in its xdist group, so no worker makes a second one.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("digits-run")]  # a whole pipeline run


def test_runs_lists_the_run_with_its_winner_and_show_prints_its_table(digits_run):
    proc, out = digits_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((out / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    listed = kflift("runs", "--output", str(out))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(summary["run_id"]))
    winner = summary["winner"]  # the default gate always has one
    assert row.split()[3:5] == ["FINISHED", winner]
    assert f"accuracy {summary['candidates'][winner]['accuracy']:.3f}" in row

    shown = kflift("show", summary["run_id"], "--output", str(out))
    assert shown.returncode == 0, shown.stderr
    for name, scores in summary["candidates"].items():
        assert f"| {name} | {scores['accuracy']:.3f} |" in shown.stdout
    assert "evaluate finished" in shown.stdout and "lift chart:" in shown.stdout
    assert str(run_dir / "summary.json") in shown.stdout

    missing = kflift("show", "no-such-run", "--output", str(out))
    assert missing.returncode == 1 and missing.stderr.startswith("kflift: no pipeline run no-such-run")
