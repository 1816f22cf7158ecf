"""Augment-stage throughput and memory against a plain single-process Pillow + NumPy loop.

    python bench/augment.py [--sizes 10000 100000] [--workers auto]

For each size, tiles the shared CIFAR-10 vehicles into that many distinct images (one pixel
changed per tile, so none is a duplicate), then runs in fresh processes (1) a plain loop doing
the same decode, checks, augmentation (same ops, same copies) and GZIP TFRecord write, and
(2) the augment stage (Beam + tf.Transform; `--workers` local workers, auto as the stage picks).
Prints images/s of both, their ratio, and each one's peak RSS.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/datasets/cifar10-vehicles"

PLAIN = r'''
import io, sys, hashlib, numpy as np, tensorflow as tf
from pathlib import Path
from PIL import Image
from kflift.components.augment import decode_image, expand_training_record, split_of
from kflift.components.sources import list_images
from kflift.pipeline.config import AugmentOps
src, out, copies = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
writers = {s: tf.io.TFRecordWriter(str(out / f"{s}.tfrecord.gz"), "GZIP") for s in ("train", "val", "test")}
def feature(img_bytes, label):
    arr = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB").resize((32, 32)), np.float32) / 255.0
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(float_list=tf.train.FloatList(value=arr.ravel())),
        "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()]))})).SerializeToString()
for label, files in list_images(src).items():
    for f in files:
        rec = decode_image(str(f), label, 50_000_000)
        if "reason" in rec: continue
        split = split_of(rec["sha256"], 0.15, 0.2)
        examples = expand_training_record(rec, copies, 42, AugmentOps().model_dump()) if split == "train" else [rec]
        for e in examples:
            writers[split].write(feature(e["image"], label))
for w in writers.values(): w.close()
'''

STAGE = r'''
import sys
from kflift.components.augment import augment
from kflift.pipeline.config import AugmentConfig
if __name__ == "__main__":
    workers = sys.argv[4] if sys.argv[4] == "auto" else int(sys.argv[4])
    settings = AugmentConfig(copies=int(sys.argv[3]), num_workers=workers).stage_kwargs()
    augment(sys.argv[1], sys.argv[2], **settings)
'''


def tile(n: int, target: Path) -> Path:
    """n distinct JPEGs from the shared images: each tile gets one pixel set by its index."""
    import numpy as np
    from PIL import Image

    sources = sorted(SHARED.glob("*/*.jpg"))
    for i in range(n):
        src = sources[i % len(sources)]
        (target / src.parent.name).mkdir(parents=True, exist_ok=True)
        arr = np.asarray(Image.open(src).convert("RGB")).copy()
        arr[0, 0] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")  # lossless: the marker pixel survives
        (target / src.parent.name / f"{i:07d}.png").write_bytes(buf.getvalue())
    return target


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command run in a fresh process tree."""
    code = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(json.dumps([time.perf_counter() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
    return tuple(json.loads(out.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", default="auto", help="local Beam workers, or auto (augment.num_workers)")
    parser.add_argument("--copies", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"kflift-bench-aug-{n}-") as tmp:  # 1.2 GB at 100,000 images
            work = Path(tmp)
            data = tile(n, work / "data")
            plain_s, plain_rss = timed([sys.executable, "-c", PLAIN, str(data), str(work / "plain"), str(args.copies)])
            stage_s, stage_rss = timed([sys.executable, "-c", STAGE, str(data), str(work / "stage"),
                                        str(args.copies), str(args.workers)])
        rows.append((n, n / plain_s, n / stage_s, plain_rss, stage_rss))
        print(f"{n:>8} images: plain {n / plain_s:7.1f} img/s ({plain_rss:6.0f} MiB peak)   "
              f"stage {n / stage_s:7.1f} img/s ({stage_rss:6.0f} MiB peak)   ratio {plain_s / stage_s:.2f}x",
              flush=True)
    if len(rows) > 1:
        print(f"stage peak RSS at {rows[-1][0]} vs {rows[0][0]} images: {rows[-1][4] / rows[0][4]:.2f}x "
              "(goal <= 1.2x); goal ratio >= 1.5x on 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
