"""The augment stage on a Spark standalone cluster against the local runner, on the same images in MinIO.

    python bench/engines.py [--images 10000] [--spark-workers 2]

Tiles N distinct images (as bench/augment.py does) into a MinIO server on loopback, then runs the
augment stage on them (1) on Beam's local runner (augment.num_workers auto) and (2) on a Spark
standalone cluster (a master and --spark-workers workers of one core each, each its own JVM) through
Beam's Spark job server, its records staged in MinIO and tf.Transform's graph in a shared folder.
Prints the wall seconds and images/s of each and their ratio. The engines come from
scripts/engines.sh (make engines).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from augment import tile  # bench/augment.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from loopback import minio_server, spark_cluster  # noqa: E402 - engines/loopback.py

BUCKET = "kflift-bench"


def timed_augment(data: str, out: Path, **overrides) -> float:
    from kflift.components.augment import augment
    from kflift.pipeline.config import AugmentConfig

    start = time.perf_counter()
    augment(data, str(out), **{**AugmentConfig().stage_kwargs(), **overrides})
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--spark-workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kflift-bench-engines-") as tmp:  # 660 MB at 10,000 images
        work = Path(tmp)
        images = tile(args.images, work / "images")
        with minio_server(work / "minio", BUCKET) as client:
            files = [f for f in sorted(images.rglob("*")) if f.is_file()]
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda f: client.upload_file(str(f), BUCKET, f"images/{f.relative_to(images)}"), files))
            data = f"s3://{BUCKET}/images"
            local_s = timed_augment(data, work / "local")
            with spark_cluster(work / "spark", workers=args.spark_workers) as spark:
                spark_s = timed_augment(data, work / "spark-out", staging_uri=f"s3://{BUCKET}/staging",
                                        transform_temp=str(spark["shared"]), beam_options=spark["options"])
        same = [json.loads((work / d / "stats.json").read_text())["written"] for d in ("local", "spark-out")]
    n = args.images
    print(f"{n} images from MinIO: local runner {local_s:6.1f} s ({n / local_s:6.1f} img/s)   "
          f"Spark ({args.spark_workers} workers) {spark_s:6.1f} s ({n / spark_s:6.1f} img/s)   "
          f"Spark/local {local_s / spark_s:.2f}x   same records written: {same[0] == same[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
