"""Train-stage throughput against a bare `model.fit` on the same data and model, in one run.

    python bench/train.py [--data DIR] [--epochs N] [--repeats R] [--config FILE] [--set key=value ...]

Augments automobile vs truck of the shared CIFAR-10 vehicles once, then times (1) a bare
Keras `model.fit` over the same tf.data pipeline and (2) the train stage function (checkpoints
each epoch, CSV log, schedule, learning curve, atomic output), interleaved and repeated, best
of each. Prints images/s and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10-vehicles"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds of both, in alternating order")
    parser.add_argument("--config", help="a config file, e.g. configs/seed-cnn.yaml (default: the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    args = parser.parse_args()

    from kflift.components import build, train
    from kflift.components.augment import augment
    from kflift.components.records import load_split, read_meta, split_size
    from kflift.pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)  # the baseline candidate's settings, as pipeline.py composes them

    work = Path(tempfile.mkdtemp(prefix="kflift-bench-train-"))
    augment(args.data, str(work / "data"), include_classes=["automobile", "truck"],
            **{**cfg.augment.stage_kwargs(), "copies": 1})
    dataset = str(work / "data")
    build.build(dataset, str(work / "untrained"), **cfg.model.stage_kwargs(), dropout=0.0, l1=0.0, l2=0.0,
                seed=cfg.train.seed, online_ops={})
    n = split_size(dataset, "train")

    # The stage's precision (train.mixed_precision), set the plain Keras way for the bare fit: the
    # global policy, then the model.
    _, policy = train.accelerators(cfg.train.mixed_precision, "none")
    meta = read_meta(dataset)

    def bare_fit() -> float:
        """The same model and tf.data pipeline, plain compile + fit, nothing else."""
        with train.global_policy(policy):
            model = build.build_model(meta["image_size"], meta["num_classes"], **cfg.model.stage_kwargs(),
                                      dropout=0.0, l1=0.0, l2=0.0, seed=cfg.train.seed, online_ops={})
        train.compile_model(model, meta["num_classes"], learning_rate=cfg.train.learning_rate,
                            optimizer=cfg.train.optimizer, label_smoothing=cfg.train.label_smoothing,
                            weight_decay=cfg.train.weight_decay)
        data = load_split(dataset, "train", args.batch_size, shuffle=True)
        val = load_split(dataset, "val", args.batch_size)
        start = time.perf_counter()
        model.fit(data, validation_data=val, epochs=args.epochs, verbose=0)
        return n * args.epochs / (time.perf_counter() - start)

    def stage_fit(i: int) -> float:
        start = time.perf_counter()
        train.train(dataset, str(work / "untrained"), str(work / f"trained-{i}"),
                    **{**cfg.train.stage_kwargs(), "epochs": args.epochs, "batch_size": args.batch_size},
                    patience=0, monitor=cfg.regularization.monitor, name="bench", augmented=True,
                    batch_mixing=cfg.augment.ops.batch_mixing())
        return n * args.epochs / (time.perf_counter() - start)

    # Interleaved and repeated: the first fit of a process pays one-time costs (tracing, the file
    # cache), and a shared machine drifts by 10-25% within minutes. Each round runs the pair in
    # alternating order (bare first, then stage first), so a drift does not always fall on the same
    # one; the ratio is the best of each, and the median of the rounds' own ratios beside it.
    bares, stages = [], []
    for i in range(args.repeats):
        if i % 2:
            stages.append(stage_fit(i))
            bares.append(bare_fit())
        else:
            bares.append(bare_fit())
            stages.append(stage_fit(i))
    bare, stage = max(bares), max(stages)
    print("runs (images/s): bare " + ", ".join(f"{b:.0f}" for b in bares) +
          "; stage " + ", ".join(f"{s:.0f}" for s in stages))

    print(f"training images: {n}, epochs: {args.epochs}, batch size: {args.batch_size}, precision: {policy}")
    print(f"bare model.fit:  {bare:8.0f} images/s")
    print(f"train stage:     {stage:8.0f} images/s  (load, checkpoints, CSV log, curve, atomic save)")
    print(f"ratio stage/bare: {stage / bare:.3f} best of each, "
          f"{statistics.median(s / b for s, b in zip(stages, bares)):.3f} median of the rounds  (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
