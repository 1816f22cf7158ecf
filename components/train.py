"""train: fit a built model on the augmented TFRecords, with regularization and checkpoints.

L1/L2 and dropout live in the built model; the optimizer, learning-rate schedule, early
stopping and checkpoints are set here. `fit` is shared with finetune, which trains in two phases.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from pathlib import Path

import keras
import tensorflow as tf

from . import plots
from .progress import progress
from .files import (MODEL_FILE, link_atomically, load_model, publish_dir, save_atomically, save_model,
                    staging_dir, write_json)
from .records import load_split, read_meta, split_size
from .results import StageResult


# Weight decay is decoupled (Keras applies it to the weights, apart from the gradient): adamw and sgd
# take it; adam and rmsprop train without it.
OPTIMIZERS = {"adam": lambda lr, wd: keras.optimizers.Adam(lr),
              "adamw": lambda lr, wd: keras.optimizers.AdamW(lr, weight_decay=wd),
              "sgd": lambda lr, wd: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd or None),
              "rmsprop": lambda lr, wd: keras.optimizers.RMSprop(lr)}
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step", "plateau")


def compile_model(model: keras.Model, num_classes: int, *, learning_rate: float, optimizer: str,
                  label_smoothing: float, weight_decay: float, layer_rates: dict[str, float] | None = None) -> None:
    """Binary: one sigmoid unit; multi-class: softmax against one-hot labels (`one_hot`), so both
    can smooth their labels. `layer_rates`: {variable path: factor on the learning rate}."""
    loss = (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing) if num_classes == 2 else
            keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing))
    chosen = OPTIMIZERS[optimizer](learning_rate, weight_decay)
    model.compile(optimizer=with_layer_rates(chosen, layer_rates) if layer_rates else chosen, loss=loss,
                  metrics=["accuracy"])


def with_layer_rates(optimizer: keras.optimizers.Optimizer, rates: dict[str, float]) -> keras.optimizers.Optimizer:
    """The same optimizer, each variable stepping at its factor (`rates[variable.path]`, else 1) times the
    learning rate: Keras has no per-layer rates, and a gradient scale would not do (Adam divides it out)."""
    class LayerRates(type(optimizer)):
        def build(self, variables):
            super().build(variables)
            self._factors = {self._var_key(v): rates.get(v.path, 1.0) for v in variables}

        def update_step(self, gradient, variable, learning_rate):
            factor = self._factors.get(self._var_key(variable), 1.0)
            return super().update_step(gradient, variable, learning_rate * factor)

    LayerRates.__name__ = type(optimizer).__name__  # saved as the optimizer it extends
    return LayerRates.from_config(optimizer.get_config())


def one_hot(ds, num_classes: int):
    """(image, label) batches as the loss of `compile_model` takes them."""
    return ds if num_classes == 2 else ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))


def mix_batches(ds, num_classes: int, seed: int, *, mixup_probability: float = 0.0, mixup_alpha: float = 0.2,
                cutmix_probability: float = 0.0, cutmix_alpha: float = 1.0):
    """MixUp or CutMix (Keras' layers) on a share of the training batches: each batch draws one of
    them by its probability, or passes unmixed; labels mix in the pixels' proportions (binary labels
    become (batch, 1) floats). The mixes follow `seed`, but a resumed run draws others than an
    uninterrupted one would (the layers' random state is not in a checkpoint)."""
    if not (mixup_probability or cutmix_probability):
        return ds
    mixup = keras.layers.MixUp(alpha=mixup_alpha, seed=seed)
    cutmix = keras.layers.CutMix(factor=(cutmix_alpha, cutmix_alpha), seed=seed + 1)  # a range: alpha itself
    draws = tf.random.Generator.from_seed(seed)

    def mix_up(images, soft):
        out = mixup({"images": images, "labels": soft}, training=True)
        return out["images"], out["labels"]

    def cut_mix(images, soft):
        # Keras weighs CutMix's labels by the box's real-valued area, not by the whole pixels it pastes
        # (a few points apart on 32 px images): weigh them by the pasted share of each image.
        box = cutmix.get_random_transformation({"images": images, "labels": soft}, training=True)
        pasted = tf.reduce_mean(tf.cast(box["batch_masks"], tf.float32), axis=[1, 2, 3])[:, None]
        other = tf.gather(soft, box["permutation_order"])
        return cutmix.transform_images(images, box), (1 - pasted) * soft + pasted * other

    def mix(images, labels):
        soft = tf.cast(tf.reshape(labels, (-1, 1)) if num_classes == 2 else labels, tf.float32)
        u = draws.uniform([])
        return tf.cond(u < mixup_probability, lambda: mix_up(images, soft),
                       lambda: tf.cond(u < mixup_probability + cutmix_probability, lambda: cut_mix(images, soft),
                                       lambda: (images, soft)))

    return ds.map(mix)


def schedule_callback(schedule: str, learning_rate: float, epochs: int, monitor: str, patience: int):
    """The learning-rate schedule as a Keras callback (epoch-based), or None for constant."""
    if schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda e: learning_rate * 0.5 * (1 + math.cos(math.pi * e / max(1, epochs))))
    if schedule == "warmup_cosine":  # linear up over the first fifth of the epochs, then cosine down
        warmup = max(1, round(epochs / 5))
        return keras.callbacks.LearningRateScheduler(
            lambda e: learning_rate * (e + 1) / warmup if e < warmup else
            learning_rate * 0.5 * (1 + math.cos(math.pi * (e - warmup) / max(1, epochs - warmup))))
    if schedule == "step":  # halve every third of the run
        return keras.callbacks.LearningRateScheduler(lambda e: learning_rate * 0.5 ** (e // max(1, epochs // 3)))
    if schedule == "plateau":
        return keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=max(1, patience // 2 or 1))
    if schedule != "constant":
        raise ValueError(f"unknown learning-rate schedule '{schedule}' (choose from {SCHEDULES})")
    return None


def accelerators(mixed_precision: str = "auto", distribute: str = "auto"):
    """The tf.distribute strategy and Keras dtype policy for this machine.

    `auto`: mixed float16 when a GPU is present, MirroredStrategy when several are; on a CPU the
    default strategy and float32. `on` (float16), `bfloat16` and `mirrored` force them (on a CPU
    too). bfloat16 on this project's 2-core CPUs (AVX512-BF16): 1.1-1.2x float32's speed, and
    about a point lower accuracy on the shared benchmark (one seed), so auto leaves it off.
    """
    import tensorflow as tf

    if mixed_precision not in ("auto", "on", "off", "bfloat16") or distribute not in ("auto", "none", "mirrored"):
        raise ValueError(f"mixed_precision must be auto|on|off|bfloat16, distribute auto|none|mirrored "
                         f"(got {mixed_precision!r}, {distribute!r})")
    gpus = tf.config.list_physical_devices("GPU")
    if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()  # the default: this one device
    return strategy, precision_policy(mixed_precision)


def precision_policy(mixed_precision: str) -> str:
    """The Keras dtype policy `accelerators` picks for this machine."""
    if mixed_precision == "on" or (mixed_precision == "auto" and tf.config.list_physical_devices("GPU")):
        return "mixed_float16"
    return "mixed_bfloat16" if mixed_precision == "bfloat16" else "float32"


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` (weights too) computing in `policy`; the output layer stays float32,
    so the probabilities and the loss keep full precision. Built in the caller's strategy scope."""
    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name == "output" else policy
        return layer.__class__.from_config(config)

    with global_policy(policy):
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


@contextlib.contextmanager
def global_policy(policy: str):
    """Keras' global dtype policy for the models made (or loaded) inside: a model's own policy is
    not saved, and under mixed_float16 compile wraps the optimizer in loss scaling."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def phase_result(checkpoint_dir: Path, phase: str = "") -> Path:
    """A fit phase's result (best weights restored): once it exists, the phase is done."""
    return checkpoint_dir / f"{phase or 'epoch'}-final.keras"


def last_checkpoint(checkpoint_dir: Path, phase: str = "epoch") -> tuple[Path | None, int]:
    """The newest complete checkpoint of a phase and its epoch number (0 when none)."""
    found = sorted(checkpoint_dir.glob(f"{phase}-[0-9][0-9][0-9].keras"))
    return (found[-1], int(found[-1].stem.rsplit("-", 1)[1])) if found else (None, 0)


class _AtomicCheckpoint(keras.callbacks.Callback):
    """Save the whole model (optimizer state too) each epoch under a temporary name, then rename:
    a process killed mid-save leaves the previous checkpoint intact."""

    def __init__(self, checkpoint_dir: Path, phase: str):
        super().__init__()
        self.dir, self.phase = checkpoint_dir, phase

    def on_epoch_end(self, epoch, logs=None):
        save_atomically(self.model, self.dir / f"{self.phase}-{epoch + 1:03d}.keras")


class _Progress(keras.callbacks.Callback):
    """A progress line (components/progress.py) after each epoch: the console's epoch bar."""

    def __init__(self, epochs: int, phase: str):
        super().__init__()
        self.epochs, self.phase = epochs, phase

    def on_epoch_end(self, epoch, logs=None):
        progress("train", epoch=epoch + 1, epochs=self.epochs, **({"phase": self.phase} if self.phase else {}),
                 metrics={k: float(v) for k, v in (logs or {}).items()})


class _EpochSeed(keras.callbacks.Callback):
    """Reset the random layers' seed state (dropout, online augmentation) from (seed, epoch) at each
    epoch: a resumed run draws the masks an uninterrupted one does (the stream in a checkpoint does not
    carry over exactly)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        states = [v for v in self.model.variables if "seed_generator_state" in v.path]
        for i, state in enumerate(states):
            state.assign(tf.constant([self.seed * 100_003 + epoch * 101 + i, 0], dtype=state.dtype))


def _truncate_log(log_path: Path, epochs: int) -> None:
    """Keep the CSV history of the checkpointed epochs only: a kill can land between the log row
    and the checkpoint of an epoch, which the resumed run then trains again."""
    if log_path.exists():
        lines = log_path.read_text().splitlines(keepends=True)
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text("".join(lines[: 1 + epochs]))
        os.replace(tmp, log_path)


def fit(model: keras.Model, dataset_dir: str, checkpoint_dir: Path, *, epochs: int, batch_size: int,
        learning_rate: float, optimizer: str, schedule: str, label_smoothing: float, weight_decay: float,
        patience: int, seed: int, augmented: bool, monitor: str, mixed_precision: str, distribute: str,
        batch_mixing: dict | None = None, layer_rates: dict[str, float] | None = None, phase: str = "",
        resume: bool = False) -> tuple[keras.Model, list[dict]]:
    """Compile and fit with a checkpoint each epoch; early stopping on `monitor` when `patience` > 0.

    With `resume`, continue from the newest checkpoint of this phase. Mixed precision and the
    distribution strategy follow `accelerators`. Returns the trained model (float32) and the
    per-epoch history (keys prefixed by `phase` when given).
    """
    meta = read_meta(dataset_dir)
    tag = phase or "epoch"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    log_path = checkpoint_dir / f"{tag}-history.csv"
    final = phase_result(checkpoint_dir, phase)
    checkpoint, done = last_checkpoint(checkpoint_dir, tag) if resume else (None, 0)
    if resume and final.exists():
        checkpoint, done = final, epochs
    # Same seed, per-epoch data order, deterministic ops: a resumed run matches an uninterrupted one.
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    strategy, policy = accelerators(mixed_precision, distribute)
    with strategy.scope():  # variables made here are mirrored over the strategy's devices
        if policy != "float32" or strategy is not tf.distribute.get_strategy():
            model = with_policy(model, policy)
        compile_model(model, meta["num_classes"], learning_rate=learning_rate, optimizer=optimizer,
                      label_smoothing=label_smoothing, weight_decay=weight_decay,
                      layer_rates=layer_rates)  # loss scaling under float16
        if checkpoint is not None:
            progress("train", note=f"resuming {tag} from {checkpoint} (epoch {done} of {epochs})")
            # Into the model as the caller made it (which layers are frozen is not in a checkpoint's
            # weights): the optimizer built over its trainable variables takes back its saved state.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(checkpoint)
            _truncate_log(log_path, done)
        else:
            log_path.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
    if policy != "float32" or strategy.num_replicas_in_sync > 1:
        print(f"{tag}: {policy} on {strategy.num_replicas_in_sync} replica(s) ({type(strategy).__name__})",
              flush=True)
    train_ds = one_hot(load_split(dataset_dir, "train", batch_size, shuffle=True, seed=seed, augmented=augmented,
                                  epochs=(done, epochs)), meta["num_classes"])
    train_ds = mix_batches(train_ds, meta["num_classes"], seed, **(batch_mixing or {}))
    steps = math.ceil(split_size(dataset_dir, "train", augmented) / batch_size)
    has_val = split_size(dataset_dir, "val") > 0
    val_ds = one_hot(load_split(dataset_dir, "val", batch_size), meta["num_classes"]) if has_val else None
    monitor = monitor if has_val else monitor.removeprefix("val_")
    callbacks = [c for c in (schedule_callback(schedule, learning_rate, epochs, monitor, patience),) if c]
    callbacks.append(_EpochSeed(seed))
    stopping = _ResumableEarlyStopping(_read_log(log_path) if done else [], checkpoint_dir, tag, monitor=monitor,
                                       mode="max" if "acc" in monitor else "min", patience=patience,
                                       restore_best_weights=True) if patience > 0 else None
    # Last, so they see every metric the others added (the learning rate among them).
    callbacks += [c for c in (stopping, keras.callbacks.CSVLogger(str(log_path), append=True),
                              _AtomicCheckpoint(checkpoint_dir, tag), _Progress(epochs, phase)) if c]
    if done < epochs and not (stopping and stopping.stopped):
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=done, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=2)
    elif stopping and checkpoint != final:  # trained out, killed before its result was saved
        stopping.set_model(model)
        stopping.on_train_begin()
        stopping.on_train_end()  # the best epoch's weights
    if checkpoint != final:  # the epoch checkpoint that holds these weights, by a second name
        link_atomically(_holding_checkpoint(checkpoint_dir, tag, stopping), final)
    # The CSV log holds every epoch, those before a crash included.
    prefix = f"{phase}_" if phase else ""
    if model.dtype_policy.name != "float32":  # later stages (evaluate, serving) run on CPUs
        model = with_policy(model, "float32")
    return model, [{prefix + k: v for k, v in row.items()} for row in _read_log(log_path)]


def _holding_checkpoint(checkpoint_dir: Path, phase: str, stopping) -> Path:
    """The epoch checkpoint whose weights the model ends a fit with: the best epoch's where early
    stopping restored them, else the newest."""
    if stopping is not None and stopping.best_weights is not None:
        return checkpoint_dir / f"{phase}-{stopping.best_epoch + 1:03d}.keras"
    return last_checkpoint(checkpoint_dir, phase)[0]


def _read_log(log_path: Path) -> list[dict]:
    """The per-epoch metrics the CSV logger wrote, as numbers."""
    with log_path.open() as f:
        return [{k: float(v) for k, v in row.items() if k != "epoch"} for row in csv.DictReader(f)]


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping that goes on where a killed run left off: the logged epochs replay through its
    rule (best value, epochs waited) and the best epoch's checkpoint gives back its weights, so a
    resumed run stops, and restores, where an uninterrupted one would."""

    def __init__(self, logged: list[dict], checkpoint_dir: Path, phase: str, **kwargs):
        super().__init__(**kwargs)
        self.logged, self.checkpoint_dir, self.phase = logged, checkpoint_dir, phase
        self._set_monitor_op()  # from the explicit mode: no model needed
        self.replayed = (None, 0, 0)  # best, best epoch, epochs waited since
        for epoch, row in enumerate(logged):
            best, best_epoch, wait = self.replayed
            improved = self._is_improvement(row[self.monitor], best)
            self.replayed = (row[self.monitor], epoch, 0) if improved else (best, best_epoch, wait + 1)

    @property
    def stopped(self) -> bool:
        """The logged epochs had already stopped the run (it was killed before saving its result)."""
        return len(self.logged) > 1 and self.replayed[2] >= self.patience

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.logged:
            self.best, self.best_epoch, self.wait = self.replayed
            best = self.checkpoint_dir / f"{self.phase}-{self.best_epoch + 1:03d}.keras"
            self.best_weights = keras.models.load_model(best, compile=False).get_weights()


def train(dataset_dir: str, model_dir: str, output_dir: str, *, epochs: int, batch_size: int, learning_rate: float,
          optimizer: str, schedule: str, label_smoothing: float, weight_decay: float, mixed_precision: str,
          distribute: str, seed: int, patience: int,
          monitor: str, name: str, augmented: bool, batch_mixing: dict, checkpoint_dir: str | None = None,
          resume: bool = False) -> StageResult:
    """Train the model in `model_dir` and write the trained one (plus curves) to `output_dir`.

    The settings come from config (`TrainConfig.stage_kwargs`; `patience` 0 = no early stopping);
    `augmented=False` trains on the original images only.

    Checkpoints go to `checkpoint_dir` (default: beside the output), which outlives a crash:
    `resume=True` continues from the newest one.
    """
    start = time.time()
    ckpt = Path(checkpoint_dir or f"{output_dir}.checkpoints")
    model, history = fit(load_model(model_dir), dataset_dir, ckpt, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, optimizer=optimizer, schedule=schedule,
                         label_smoothing=label_smoothing, weight_decay=weight_decay, patience=patience,
                         seed=seed, resume=resume, augmented=augmented, batch_mixing=batch_mixing, monitor=monitor,
                         mixed_precision=mixed_precision, distribute=distribute)
    seconds = time.time() - start
    work = staging_dir(output_dir)
    if precision_policy(mixed_precision) == "float32":  # the phase's result on disk is this very model
        link_atomically(phase_result(ckpt), work / MODEL_FILE)
    else:  # trained in mixed precision: hand on the float32 copy fit made
        save_model(model, work)
    curve = plots.learning_curve(history, work / "learning_curve.png", f"{name}: learning curve")
    write_json(work / "history.json", history)
    params = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": optimizer,
              "schedule": schedule, "label_smoothing": label_smoothing, "weight_decay": weight_decay,
              "early_stopping_patience": patience, "early_stopping_monitor": monitor,
              "mixed_precision": mixed_precision, "distribute": distribute, "seed": seed, "resumed": resume,
              "augmented_data": augmented, **{f"batch_{k}": v for k, v in batch_mixing.items()},
              **load_model_params(model_dir)}
    write_json(work / "params.json", params)
    publish_dir(work, Path(output_dir))
    out = Path(output_dir)
    n_train = split_size(dataset_dir, "train", augmented)
    best = _best(history, monitor)
    return {
        "params": params,
        "metrics": {"epochs_run": len(history), "train_images_per_second": n_train * len(history) / seconds,
                    **best, **{f"final_{k}": v for k, v in history[-1].items()}},
        "history": history,
        "artifacts": [("plots", out / curve.name), ("model", out / "model.keras"), (None, out / "history.json")],
    }


def load_model_params(model_dir: str) -> dict:
    """What the build stage recorded about the model (architecture, regularization)."""
    path = Path(model_dir) / "params.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _best(history: list[dict], monitor: str = "val_loss") -> dict:
    """The epoch early stopping restores: best `monitor` (lowest loss, highest accuracy), or its
    training-set counterpart without a validation split."""
    key = next((k for k in (monitor, monitor.removeprefix("val_")) if history and k in history[0]), None)
    if key is None:
        return {}
    pick = max if "acc" in key else min
    best = pick(history, key=lambda e: e[key])
    return {f"best_{k}": v for k, v in best.items()}
