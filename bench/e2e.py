"""End-to-end benchmark: run the default job once and break its wall time down by stage.

    python bench/e2e.py [--output DIR] [-- extra kflift run arguments]

Prints the command's wall time, each stage's time (its whole process: interpreter, imports,
work) and own work, and the orchestration overhead: total minus the sum of stage processes,
as a share of the total. kfp.local runs the stages one after another, so the sum is comparable.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="output folder (default: a fresh temporary one)")
    parser.add_argument("extra", nargs="*", help="more `kflift run` arguments")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="kflift-bench-"))
    cmd = [sys.executable, "-m", "kflift.pipeline.cli", "run", "--output", str(output), *args.extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return proc.returncode
    run_id = re.search(r"^run id: (\S+)$", proc.stdout, re.M).group(1)
    summary = json.loads((output / "runs" / run_id / "summary.json").read_text())
    stages, work = summary["stages"], summary["stage_work_seconds"]
    print(f"{'stage':<20}{'process s':>10}{'work s':>10}{'start-up s':>12}")
    for name in sorted(stages, key=lambda n: -stages[n]):
        print(f"{name:<20}{stages[name]:>10.1f}{work[name]:>10.1f}{stages[name] - work[name]:>12.1f}")
    stage_sum = sum(stages.values())
    print(f"\ncommand wall:        {wall:8.1f} s  (CLI start-up, data, MLflow set-up and the DAG)")
    print(f"DAG wall:            {summary['wall_seconds']:8.1f} s")
    print(f"sum of stages:       {stage_sum:8.1f} s  (of which start-up/imports "
          f"{stage_sum - sum(work.values()):.1f} s)")
    print(f"orchestration overhead: {(wall - stage_sum) / wall:6.1%} of command wall, "
          f"{(summary['wall_seconds'] - stage_sum) / summary['wall_seconds']:6.1%} of DAG wall")
    print(f"winner: {summary['winner']}  " + json.dumps(summary["candidates"].get(summary["winner"] or "", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
