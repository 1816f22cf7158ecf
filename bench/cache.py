"""Step-cache benchmark: a first run, the same run again (every stage cached), and a run with one
train parameter changed (augment and build cached, train onward rerun), on one output folder.

    python bench/cache.py [--output DIR] [--param train.learning_rate=0.002] [-- extra kflift run arguments]

Prints each run's wall seconds (the whole `kflift run` command), its cached stages and the ratios
to the first run.
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


def run(output: Path, args: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "kflift.pipeline.cli", "run", "--output", str(output), *args]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"kflift run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_id = re.search(r"^run id: (\S+)$", proc.stdout, re.M).group(1)
    return wall, json.loads((output / "runs" / run_id / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="output folder (default: a fresh temporary one)")
    parser.add_argument("--param", default="train.learning_rate=0.002", help="the one changed setting")
    parser.add_argument("extra", nargs="*", help="more `kflift run` arguments")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="kflift-bench-cache-"))
    rows = [("first run", *run(output, args.extra)),
            ("cached rerun", *run(output, args.extra)),
            (f"changed {args.param.split('=')[0]}", *run(output, [*args.extra, "--set", args.param]))]
    first = rows[0][1]
    print(f"{'run':<32}{'wall s':>8}{'ratio':>8}  cached stages")
    for name, wall, summary in rows:
        cached = summary["cached"]
        print(f"{name:<32}{wall:>8.1f}{wall / first:>8.2f}  {len(cached)}/{len(summary['stages'])}: "
              f"{', '.join(cached) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
