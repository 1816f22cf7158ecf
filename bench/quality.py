"""Quality benchmark: the shared benchmark end to end, scored on photos the run never saw.

    python bench/quality.py [--seeds 42 43 44] [--ablation] [-- extra kflift run arguments]
    python bench/quality.py --results A/quality.json B/quality.json   # seeds run apart, summarized as one

Trains on ../shared/datasets/cifar10-vehicles-train (automobile vs truck, 10,000 photos; airplane
and ship as the transfer source), then scores the champion's serving model with `kflift predict` on
the 2,000 photos of ../shared/datasets/cifar10-vehicles (the CIFAR-10 test split). Prints, per seed,
the held-out accuracy and the wall time, then each candidate's accuracy on the run's own test
split (its lift over the baseline with the 95% interval), and the mean and spread over the seeds:
over several seeds, each candidate's mean lift with one interval for all of them (the photos
resampled once for every seed), and with --ablation `all` against the best single lever.
Settings are chosen on validation; the held-out photos are only ever scored, once per setting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TRAIN, HELD_OUT = SHARED / "cifar10-vehicles-train", SHARED / "cifar10-vehicles"
TARGET, SOURCE = ("automobile", "truck"), ("airplane", "ship")


def kflift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kflift.pipeline.cli", *args], capture_output=True, text=True)


def held_out_accuracy(serving: str) -> float:
    """The champion's accuracy on the held-out photos, through `kflift predict` as a user scores."""
    files = [str(f) for c in TARGET for f in sorted((HELD_OUT / c).iterdir())]
    proc = kflift("predict", "--model", serving, "--output", "json", *files)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != 2000:
        raise SystemExit(f"kflift predict failed ({proc.returncode}, {len(rows)} rows): {proc.stderr[-2000:]}")
    return sum(Path(r["path"]).parent.name == r["label"] for r in rows) / len(rows)


def run_once(seed: int, ablation: bool, extra: list[str], output: Path) -> dict:
    args = ["run", "--data", str(TRAIN), "--output", str(output), "--set", f"transfer.source_classes={','.join(SOURCE)}",
            "--set", f"train.seed={seed}", "--set", f"augment.seed={seed}",
            *(["--set", "evaluate.ablation=true"] if ablation else []), *extra]
    start = time.time()
    proc = kflift(*args)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"kflift run failed: {proc.stderr[-3000:]}")
    summary = json.loads(next(output.glob("runs/*/summary.json")).read_text())
    report = json.loads((Path(summary["champion_model"]).parent / "report.json").read_text())
    return {"seed": seed, "wall_seconds": wall, "winner": summary["winner"],
            "held_out": held_out_accuracy(summary["serving"]),
            "test_split": {n: s["accuracy"] for n, s in report["candidates"].items()},
            "lift_interval_95": report["lift_interval_95"], "test_predictions": report["test_predictions"]}


def hits_by_key(run: dict, name: str) -> dict[str, bool]:
    """Whether a candidate of one run got each test image right, by the image's content key."""
    per_image = run["test_predictions"]
    return {k: p == y for k, p, y in zip(per_image["keys"], per_image["predicted"][name], per_image["labels"])}


def mean_difference(runs: list[dict], name: str, reference: str, resamples: int = 2000) -> tuple[float, float, float]:
    """Accuracy of `name` minus `reference`, averaged over the runs (seeds), with its 95% paired
    bootstrap interval: every run scores the same test photos (the split follows the content hash),
    so one resample of the photos is applied to all runs at once."""
    keys = sorted(hits_by_key(runs[0], reference))
    diff = np.zeros(len(keys))
    for r in runs:  # each run's hits looked up once, then read in the common key order
        hits, ref = hits_by_key(r, name), hits_by_key(r, reference)
        diff += [hits[k] - ref[k] for k in keys]
    diff /= len(runs)
    rng = np.random.default_rng(0)
    boots = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), *(float(v) for v in np.percentile(boots, [2.5, 97.5]))


def print_run(r: dict) -> None:
    print(f"seed {r['seed']}: champion {r['winner']}, held-out accuracy {r['held_out']:.4f} "
          f"(2,000 photos), wall {r['wall_seconds']:.0f} s", flush=True)
    for name, acc in r["test_split"].items():
        lo_hi = r["lift_interval_95"].get(name)
        lift = f"  lift {lo_hi[0] * 100:+.1f} .. {lo_hi[1] * 100:+.1f} pts" if lo_hi else ""
        print(f"    {name:<16} test split {acc:.4f}{lift}", flush=True)


def print_summary(results: list[dict]) -> None:
    if len(results) > 1:  # the levers over all seeds at once: a tighter interval than any one run's
        names = list(results[0]["test_split"])
        print(f"mean over the {len(results)} seeds, test split (lift: 95% interval, the photos resampled):")
        for name in names:
            acc = statistics.mean(r["test_split"][name] for r in results)
            lift = "" if name == "baseline" else "  lift {:+.1f} [{:+.1f}, {:+.1f}] pts".format(
                *(100 * v for v in mean_difference(results, name, "baseline")))
            print(f"    {name:<16} {acc:.4f}{lift}", flush=True)
        levers = [n for n in ("augmentation", "regularization", "transfer") if n in names]
        if "all" in names and levers:
            best = max(levers, key=lambda n: statistics.mean(r["test_split"][n] for r in results))
            print("    all - {} (the best single lever): {:+.1f} [{:+.1f}, {:+.1f}] pts".format(
                best, *(100 * v for v in mean_difference(results, "all", best))), flush=True)
    held = [r["held_out"] for r in results]
    walls = [r["wall_seconds"] for r in results]
    spread = f" ± {statistics.stdev(held):.4f}" if len(held) > 1 else ""
    print(f"held-out accuracy: mean {statistics.mean(held):.4f}{spread} over {len(held)} seed(s); "
          f"wall mean {statistics.mean(walls):.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--ablation", action="store_true", help="each lever alone, then all together")
    parser.add_argument("--output", help="folder for the runs (default: a fresh temporary one)")
    parser.add_argument("--results", nargs="+", metavar="JSON",
                        help="no run: summarize the quality.json of earlier runs (seeds run apart) as one")
    parser.add_argument("extra", nargs="*", help="more `kflift run` arguments, e.g. --set model.architecture=resnet")
    args = parser.parse_args()
    if args.results:
        results = [r for path in args.results for r in json.loads(Path(path).read_text())]
        for r in results:
            print_run(r)
        print_summary(results)
        return 0
    root = Path(args.output or tempfile.mkdtemp(prefix="kflift-quality-"))
    results = []
    for seed in args.seeds:
        results.append(run_once(seed, args.ablation, args.extra, root / f"seed-{seed}"))
        print_run(results[-1])
    print_summary(results)
    (root / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"results: {root / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
