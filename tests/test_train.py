"""Training levers observable on small data: early stopping, schedules, L1, resume after kill -9."""
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from kflift.components import build, train
from kflift.components.files import load_model
from kflift.components.records import split_size
from conftest import settings

pytestmark = pytest.mark.slow  # every test trains on the augment stage's output (cifar_dataset)


def test_early_stopping_stops_before_the_epoch_budget(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    # a learning rate far too high: validation loss stops improving at once
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=30, learning_rate=0.5, patience=2))
    assert result["metrics"]["epochs_run"] < 30
    assert result["metrics"]["epochs_run"] >= 3


def test_early_stopping_on_val_accuracy_restores_the_most_accurate_epoch(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=30, learning_rate=0.5, patience=2, monitor="val_accuracy"))
    history = result["history"]
    assert 3 <= len(history) < 30
    assert result["params"]["early_stopping_monitor"] == "val_accuracy"
    assert result["metrics"]["best_val_accuracy"] == max(e["val_accuracy"] for e in history)
    # the result is the best epoch's checkpoint by two more names: linked, not serialized again
    best_epoch = 1 + max(range(len(history)), key=lambda i: history[i]["val_accuracy"])
    best = tmp_path / "m.checkpoints" / f"epoch-{best_epoch:03d}.keras"
    assert (tmp_path / "m.checkpoints" / "epoch-final.keras").samefile(best)
    assert (tmp_path / "m" / "model.keras").samefile(best)

    # killed one epoch before it stopped: the resumed run's early stopping remembers the best epoch and
    # how long it has waited, so it stops at the same epoch and restores the same weights
    killed = tmp_path / "killed.checkpoints"
    shutil.copytree(tmp_path / "m.checkpoints", killed)
    (killed / "epoch-final.keras").unlink()
    (killed / f"epoch-{len(history):03d}.keras").unlink()
    def resumed_ends_as_uninterrupted(name):
        resumed = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / name),
                              **settings("train", epochs=30, learning_rate=0.5, patience=2, monitor="val_accuracy",
                                         checkpoint_dir=str(killed), resume=True))
        assert resumed["history"] == history
        assert_same_weights(tmp_path / name, tmp_path / "m")

    resumed_ends_as_uninterrupted("m2")
    # killed after it stopped but before it saved its result: nothing more is trained, the best restored
    (killed / "epoch-final.keras").unlink()
    resumed_ends_as_uninterrupted("m3")


def assert_same_weights(model_dir, other_dir):
    for a, b in zip(load_model(model_dir).get_weights(), load_model(other_dir).get_weights()):
        np.testing.assert_array_equal(a, b)

def test_mixed_precision_under_a_mirrored_strategy_trains_and_hands_on_float32(cifar_dataset, tmp_path):
    """The GPU levers' code path, forced on the CPU: float16 compute with loss scaling, the output
    layer in float32, a MirroredStrategy (one replica here); the saved model is float32 again."""
    import keras

    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=2, mixed_precision="on", distribute="mirrored"))
    assert np.isfinite(result["metrics"]["final_loss"])
    with train.global_policy("mixed_float16"):  # as a resumed run loads it
        checkpoint = keras.models.load_model(train.last_checkpoint(tmp_path / "m.checkpoints")[0])
    assert checkpoint.get_layer("conv1").compute_dtype == "float16"
    assert checkpoint.get_layer("conv1").variable_dtype == "float32"
    assert checkpoint.get_layer("output").compute_dtype == "float32"
    assert isinstance(checkpoint.optimizer, keras.optimizers.LossScaleOptimizer)
    trained = load_model(tmp_path / "m")
    assert {layer.compute_dtype for layer in trained.layers if layer.weights} == {"float32"}
    untrained = load_model(tmp_path / "u")
    assert not np.allclose(trained.get_layer("conv1").get_weights()[0], untrained.get_layer("conv1").get_weights()[0])
    # killed after epoch 1: the resumed run loads the loss-scaling optimizer's state and ends where
    # the uninterrupted one did
    ckpt = tmp_path / "m.checkpoints"
    for name in ("epoch-002.keras", "epoch-final.keras"):
        (ckpt / name).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m2"),
                              **settings("train", epochs=2, mixed_precision="on", distribute="mirrored",
                                         checkpoint_dir=str(ckpt), resume=True))
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert resumed["history"] == result["history"]
    assert_same_weights(tmp_path / "m2", tmp_path / "m")
    strategy, policy = train.accelerators()  # auto, on this machine
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        assert policy == "float32" and strategy.num_replicas_in_sync == 1


def test_bfloat16_on_the_cpu_trains_without_loss_scaling_and_hands_on_float32(cifar_dataset, tmp_path):
    import keras

    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=1, mixed_precision="bfloat16"))
    assert np.isfinite(result["metrics"]["final_loss"])
    with train.global_policy("mixed_bfloat16"):
        checkpoint = keras.models.load_model(train.last_checkpoint(tmp_path / "m.checkpoints")[0])
    assert checkpoint.get_layer("conv1").compute_dtype == "bfloat16"
    assert checkpoint.get_layer("output").compute_dtype == "float32"
    assert not isinstance(checkpoint.optimizer, keras.optimizers.LossScaleOptimizer)  # bfloat16 needs none
    assert {layer.compute_dtype for layer in load_model(tmp_path / "m").layers if layer.weights} == {"float32"}


def test_cosine_schedule_lowers_the_learning_rate(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=4, learning_rate=0.01, schedule="cosine"))
    rates = [e["learning_rate"] for e in result["history"]]
    assert rates[0] == np.float32(0.01) and rates == sorted(rates, reverse=True) and rates[-1] < 0.005


def test_l1_and_l2_add_weight_penalties(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "l1"), **settings("build", l1=1e-3))
    model = load_model(tmp_path / "l1")
    model(np.ones((1, 32, 32, 3), "float32"))
    kernels = [model.get_layer(n).kernel.numpy() for n in ("conv1", "conv2", "features")]
    expected = sum(1e-3 * np.abs(k).sum() for k in kernels)
    assert np.isclose(float(sum(model.losses)), expected, rtol=1e-4)


def test_every_split_pipeline_reads_without_the_autotuner(cifar_dataset):
    """Keras drops the validation iterator each epoch; an autotuned one made each drop wait for the
    tuner's thread (about 10 s at the end of most epochs on 2 cores). The data is the same either way."""
    from kflift.components.records import load_split

    train_ds = load_split(cifar_dataset, "train", 16, shuffle=True, seed=3, epochs=(0, 2))
    val_ds = load_split(cifar_dataset, "val", 16)
    for ds in (train_ds, val_ds, train.one_hot(val_ds, 2)):  # the options carry through later maps
        assert ds.options().autotune.enabled is False
    assert sum(len(y) for _, y in train_ds) == 2 * split_size(cifar_dataset, "train")
    assert sum(len(y) for _, y in val_ds) == split_size(cifar_dataset, "val")


def test_a_split_without_shards_is_an_error_naming_its_folder(cifar_dataset, tmp_path):
    """Every reader (training, evaluate's per-image keys) takes a split's shards from one place."""
    from kflift.components.evaluate import split_keys
    from kflift.components.records import DataError, load_split, split_files

    assert split_files(cifar_dataset, "test") == sorted(split_files(cifar_dataset, "test"))
    assert len(split_keys(cifar_dataset, "test")) == split_size(cifar_dataset, "test")
    empty = tmp_path / "dataset"
    shutil.copytree(cifar_dataset, empty)
    for shard in (empty / "test").iterdir():
        shard.unlink()
    for read in (lambda: load_split(empty, "test", 16), lambda: split_keys(str(empty), "test")):
        with pytest.raises(DataError, match=f"{empty}/test: no TFRecord shards"):
            read()


def test_baseline_without_augmented_copies_sees_only_originals(cifar_dataset, tmp_path, monkeypatch):
    import tensorflow as tf

    originals = split_size(cifar_dataset, "train", augmented=False)
    assert originals * 2 == split_size(cifar_dataset, "train")
    seen, load_split = [], train.load_split  # seen: the size of each training batch fit read

    def counted(dataset_dir, split, *args, **kwargs):
        ds = load_split(dataset_dir, split, *args, **kwargs)
        if split != "train":
            return ds

        def count(images, labels):
            n = tf.numpy_function(lambda y: seen.append(len(y)) or np.int64(len(y)), [labels], tf.int64)
            with tf.control_dependencies([n]):
                return tf.identity(images), tf.identity(labels)

        return ds.map(count)

    monkeypatch.setattr(train, "load_split", counted)
    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "u"), str(tmp_path / "m"),
                         **settings("train", epochs=2, augmented=False))
    assert result["params"]["augmented_data"] is False
    assert sum(seen) == 2 * originals  # two epochs of the originals; with the copies it would be twice that


def test_resume_after_kill_9_continues_from_the_last_checkpoint(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "u"), **settings("build"))
    code = ("import sys; from kflift.components.train import train; "
            f"train({str(cifar_dataset)!r}, {str(tmp_path / 'u')!r}, {str(tmp_path / 'm')!r}, "
            f"**{settings('train', epochs=6)!r}, resume='--resume' in sys.argv)")
    ckpt = tmp_path / "m.checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ckpt / "epoch-002.keras").exists():  # wait for two finished epochs, then kill -9
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in ckpt.glob("epoch-[0-9]*.keras"))
    assert 2 <= len(done) < 6 and not (tmp_path / "m").exists()  # no output published by the killed run

    resumed = subprocess.run([sys.executable, "-c", code, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming epoch from {ckpt / done[-1]} (epoch {len(done)} of 6)" in resumed.stdout
    history = load_history(tmp_path / "m")
    assert len(history) == 6  # the killed run's epochs and the resumed ones, once each
    assert sorted(p.name for p in ckpt.glob("epoch-[0-9]*.keras"))[-1] == "epoch-006.keras"
    assert (ckpt / "epoch-final.keras").exists()  # the finished result: a later resume trains nothing


def load_history(model_dir):
    import json

    return json.loads((model_dir / "history.json").read_text())
