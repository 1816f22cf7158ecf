"""train: fit a built model on the augmented TFRecords, with regularization and checkpoints.

L1/L2 and dropout live in the built model; early stopping, the learning rate and checkpoints
are set here. `fit` is shared with finetune, which trains in two phases.
"""
from __future__ import annotations

import time
from pathlib import Path

import keras

from kflift.components import plots
from kflift.components.data import (load_model, load_split, publish_dir, read_meta, save_model,
                                    split_size, staging_dir, write_json)


def compile_model(model: keras.Model, num_classes: int, learning_rate: float) -> None:
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])


def fit(model: keras.Model, dataset_dir: str, work: Path, *, epochs: int, batch_size: int,
        learning_rate: float, patience: int = 0, seed: int = 42, phase: str = "") -> list[dict]:
    """Compile and fit; a checkpoint each epoch; early stopping when `patience` > 0.

    Returns the per-epoch history (keys prefixed by `phase` when given).
    """
    meta = read_meta(dataset_dir)
    keras.utils.set_random_seed(seed)
    compile_model(model, meta["num_classes"], learning_rate)
    train_ds = load_split(dataset_dir, "train", batch_size, shuffle=True, seed=seed)
    has_val = split_size(dataset_dir, "val") > 0
    val_ds = load_split(dataset_dir, "val", batch_size) if has_val else None
    monitor = "val_loss" if has_val else "loss"
    ckpt_dir = work / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [keras.callbacks.ModelCheckpoint(
        str(ckpt_dir / f"{phase or 'epoch'}-{{epoch:03d}}.keras"), save_weights_only=False)]
    if patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                                       restore_best_weights=True))
    hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=2)
    keys = list(hist.history)
    return [{f"{phase + '_' if phase else ''}{k}": float(hist.history[k][i]) for k in keys}
            for i in range(len(hist.epoch))]


def train(dataset_dir: str, model_dir: str, output_dir: str, epochs: int = 10, batch_size: int = 64,
          learning_rate: float = 1e-3, patience: int = 0, seed: int = 42, name: str = "model") -> dict:
    """Train the model in `model_dir` and write the trained one (plus curves) to `output_dir`."""
    start = time.time()
    model = load_model(model_dir)
    work = staging_dir(output_dir)
    history = fit(model, dataset_dir, work, epochs=epochs, batch_size=batch_size,
                  learning_rate=learning_rate, patience=patience, seed=seed)
    seconds = time.time() - start
    save_model(model, work)
    curve = plots.learning_curve(history, work / "learning_curve.png", f"{name}: learning curve")
    write_json(work / "history.json", history)
    publish_dir(work, Path(output_dir))
    out = Path(output_dir)
    n_train = split_size(dataset_dir, "train")
    best = _best(history)
    return {
        "params": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                   "early_stopping_patience": patience, "seed": seed},
        "metrics": {"epochs_run": len(history), "train_images_per_second": n_train * len(history) / seconds,
                    **best, **{f"final_{k}": v for k, v in history[-1].items()}},
        "history": history,
        "artifacts": [("plots", out / curve.name), ("model", out / "model.keras"), (None, out / "history.json")],
    }


def _best(history: list[dict]) -> dict:
    """The epoch the restored weights come from: lowest validation loss (or training loss)."""
    key = next((k for k in ("val_loss", "loss") if history and k in history[0]), None)
    if key is None:
        return {}
    best = min(history, key=lambda e: e[key])
    return {f"best_{k}": v for k, v in best.items()}
