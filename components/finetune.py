"""finetune: transfer learning — a pretrained backbone, frozen under a new head, then its top
layers unfrozen at a lower learning rate.

The backbone comes from a model this pipeline pretrained on a source task (`weights="pipeline"`),
from Keras Applications with ImageNet weights (the real download path), or from a local
weights file.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import keras
from keras import layers

from . import plots
from .build import APPLICATIONS, application_backbone, classifier_head
from .sources import DataError
from .files import load_model, publish_dir, save_model, staging_dir, write_json
from .records import read_meta, split_size
from .results import StageResult
from .train import fit


def load_backbone(weights: str, backbone: str, image_size: int, pretrained_dir: str | None) -> keras.Model:
    """The convolutional base (as the seed's VGG16 without its top): a CNN this run pretrained up
    to its last feature map (its dense layers learned the source task's classes, so they stay
    behind), or a Keras Applications model without its top."""
    if weights == "pipeline":
        if not pretrained_dir:
            raise DataError("finetune: weights=pipeline needs the pretrained model of this run")
        model = load_model(pretrained_dir)
        top = next((layer for layer in model.layers if layer.name in ("flatten", "gap")), None)
        cut = top.input if top is not None else model.get_layer("features").output  # Applications: pooled
        return keras.Model(model.inputs, cut, name="backbone")
    if backbone not in APPLICATIONS:  # this pipeline's own nets: pretrained by a run, not downloaded
        raise DataError(f"finetune: the '{backbone}' backbone has no ImageNet weights; use transfer.weights=pipeline "
                        f"or a Keras Applications backbone ({', '.join(APPLICATIONS)})")
    try:
        return application_backbone(backbone, image_size, weights=weights, pooling=None)
    except Exception as exc:  # noqa: BLE001 - download errors come in many types
        if weights == "imagenet":
            raise DataError(
                f"finetune: could not download ImageNet weights for {backbone} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Set transfer.source_classes or "
                "transfer.source_dir (weights=pipeline), or transfer.weights=/path/to/weights.h5") from None
        raise DataError(f"finetune: cannot load weights file {weights} into {backbone}: {exc}") from None


def unfreeze_top_layers(backbone: keras.Model, n: int | str, train_batchnorm: bool = False) -> list[str]:
    """Make the top `n` weighted layers trainable ("all": every one). BatchNorm stays frozen, in
    inference mode with the source's statistics, unless `train_batchnorm`."""
    backbone.trainable = True
    weighted = [l for l in backbone.layers if l.weights]
    top = weighted if n == "all" else weighted[-n:] if n > 0 else []
    for layer in backbone.layers:
        layer.trainable = layer in top and (train_batchnorm or not isinstance(layer, layers.BatchNormalization))
    return [l.name for l in top if l.trainable]


def gradual_steps(top_layers: int, epochs: int, steps: int) -> list[tuple[int, int]]:
    """Gradual unfreezing (ULMFiT): (top weighted layers unfrozen, epochs) for each step of phase 2.
    Each step unfreezes a further equal share from the top; the epochs are split as evenly as they
    go, the later steps, which train the most layers, taking the remainder."""
    steps = max(1, min(steps, epochs, top_layers))
    return [(math.ceil(top_layers * (k + 1) / steps), epochs // steps + (k >= steps - epochs % steps))
            for k in range(steps)]


def layer_rates(backbone: keras.Model, decay: float) -> dict[str, float]:
    """Discriminative fine-tuning: the top conv (or dense) layer learns at the full rate, each one
    below it at `decay` times the rate above; a layer without a kernel (BatchNorm) shares the rate
    of the conv it follows. {variable path: factor}, trainable variables only."""
    rates, factor = {}, decay ** sum(hasattr(l, "kernel") for l in backbone.layers if l.trainable and l.weights)
    for layer in backbone.layers:
        if not (layer.trainable and layer.weights):
            continue
        factor = factor / decay if hasattr(layer, "kernel") else factor
        rates.update({v.path: min(1.0, factor) for v in layer.trainable_weights})
    return rates


def finetune(dataset_dir: str, output_dir: str, pretrained_dir: str | None = None, *, weights: str, backbone: str,
             frozen_epochs: int, finetune_epochs: int, unfreeze_top: int | str, unfreeze_steps: int,
             finetune_lr_factor: float,
             layer_lr_decay: float, train_batchnorm: bool, head: str, head_units: int, head_dropout: float,
             batch_size: int,
             learning_rate: float, optimizer: str, schedule: str, label_smoothing: float,
             weight_decay: float, mixed_precision: str, distribute: str, seed: int, patience: int, monitor: str,
             augmented: bool, batch_mixing: dict, checkpoint_dir: str | None = None,
             resume: bool = False) -> StageResult:
    """Transfer: a new head on the backbone, trained frozen (`frozen_epochs`), then the top
    `unfreeze_top` layers too at `learning_rate * finetune_lr_factor` (`finetune_epochs`), lower
    for earlier layers by `layer_lr_decay`, BatchNorm adapting to the target if `train_batchnorm`;
    with `unfreeze_steps` > 1, those layers are unfrozen from the top in that many steps.
    Settings from config (`TransferConfig.stage_kwargs`, `TrainConfig.fit_kwargs`). `head`: "flatten" (the
    seed's Flatten-Dense-Dropout head) or "pool" (global average pooling, far fewer weights on a large
    feature map), then a hidden Dense layer of `head_units` with `head_dropout` (none with 0 units).
    Each phase checkpoints every epoch to `checkpoint_dir` (default: beside the output); `resume`
    continues from the newest one."""
    if head not in ("flatten", "pool"):
        raise ValueError(f"finetune: head must be 'flatten' or 'pool', not {head!r}")
    start = time.time()
    meta = read_meta(dataset_dir)
    keras.utils.set_random_seed(seed)
    base = load_backbone(weights, backbone, meta["image_size"], pretrained_dir)
    base.trainable = False
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = base(inputs)  # a frozen BatchNorm layer runs in inference mode (Keras 3): see unfreeze_top_layers
    if len(x.shape) > 2:
        x = (layers.GlobalAveragePooling2D(name="pool_head") if head == "pool" else layers.Flatten(name="flatten_head"))(x)
    if head_units:  # else the pooled (or flattened) features go straight to the classifier
        x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(head_dropout, name="head_dropout")(x)
    model = keras.Model(inputs, classifier_head(x, meta["num_classes"]), name=f"transfer_{backbone}")

    ckpt = Path(checkpoint_dir or f"{output_dir}.checkpoints")
    frozen_before = [w.numpy().copy() for w in base.weights]
    fit_args = dict(batch_size=batch_size, optimizer=optimizer, schedule=schedule, label_smoothing=label_smoothing,
                    weight_decay=weight_decay, patience=patience, seed=seed, augmented=augmented,
                    batch_mixing=batch_mixing, monitor=monitor, mixed_precision=mixed_precision,
                    distribute=distribute, resume=resume)
    model, history = fit(model, dataset_dir, ckpt, epochs=frozen_epochs, learning_rate=learning_rate,
                         phase="frozen", **fit_args)
    base = _backbone(model)  # fit may return a copy (mixed precision, a distribution strategy)
    frozen_changed = any((a != w.numpy()).any() for a, w in zip(frozen_before, base.weights))
    weighted = sum(1 for layer in base.layers if layer.weights)
    top = weighted if unfreeze_top == "all" else min(unfreeze_top, weighted)
    for step, (layers_unfrozen, epochs) in enumerate(gradual_steps(top, finetune_epochs, unfreeze_steps), 1):
        unfrozen = unfreeze_top_layers(base, layers_unfrozen, train_batchnorm)
        if not (epochs and unfrozen):
            break
        # Each step compiles anew (trainable variables are fixed at compile) and has its own checkpoints.
        model, more = fit(model, dataset_dir, ckpt, epochs=epochs, learning_rate=learning_rate * finetune_lr_factor,
                          layer_rates=layer_rates(base, layer_lr_decay) if layer_lr_decay < 1 else None,
                          phase="finetune" if unfreeze_steps == 1 else f"finetune{step}", **fit_args)
        base = _backbone(model)
        history += more
    seconds = time.time() - start
    work = staging_dir(output_dir)
    save_model(model, work)
    curve = plots.learning_curve(_merged_phases(history), work / "learning_curve.png",
                                 f"transfer ({backbone}): frozen then fine-tuned")
    write_json(work / "history.json", history)
    publish_dir(work, Path(output_dir))
    out = Path(output_dir)
    return {
        "params": {"weights": weights, "backbone": backbone, "head": head, "head_units": head_units,
                   "head_dropout": head_dropout,
                   "early_stopping_monitor": monitor, "mixed_precision": mixed_precision, "distribute": distribute,
                   "frozen_epochs": frozen_epochs, "finetune_epochs": finetune_epochs, "unfreeze_steps": unfreeze_steps,
                   "unfrozen_layers": unfrozen, "learning_rate": learning_rate, "schedule": schedule,
                   "layer_lr_decay": layer_lr_decay, "train_batchnorm": train_batchnorm,
                   "finetune_learning_rate": learning_rate * finetune_lr_factor, "augmented_data": augmented,
                   **{f"batch_{k}": v for k, v in batch_mixing.items()}},
        "metrics": {"epochs_run": len(history), "frozen_weights_changed_in_phase1": int(frozen_changed),
                    "train_images_per_second": split_size(dataset_dir, "train", augmented) * len(history) / seconds,
                    **{f"final_{k}": v for k, v in _merged_phases(history)[-1].items()}},
        "history": history,
        "artifacts": [("plots", out / curve.name), ("model", out / "model.keras"), (None, out / "history.json")],
    }


def _backbone(model: keras.Model) -> keras.Model:
    """The transfer model's backbone: its one nested model."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _merged_phases(history: list[dict]) -> list[dict]:
    """Drop the phase prefix so both phases plot as one continuous curve."""
    return [{k.split("_", 1)[1]: v for k, v in e.items()} for e in history]
