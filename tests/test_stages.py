"""Each stage's plain function on small real data (no KFP involved)."""
import json
import shutil

import keras
import numpy as np
import pytest

from kflift.components import build, evaluate, finetune, train
from kflift.components.files import load_model
from kflift.components.records import load_split, read_meta
from conftest import settings


@pytest.mark.slow
def test_augment_writes_transformed_splits_and_accounts_for_every_file(cifar_dataset):
    meta = read_meta(cifar_dataset)
    stats = meta["stats"]
    assert sorted(meta["labels"]) == ["automobile", "truck"] and meta["num_classes"] == 2
    assert stats["read"] == 48
    assert stats["read"] == stats["written"]["originals"] + stats["quarantined_total"] + stats["duplicates"]
    originals = stats["written"]["originals_by_split"]
    # one augmented copy per training image; val and test are never expanded
    assert stats["written"]["by_split"]["train"] == 2 * originals["train"]
    assert stats["written"]["by_split"]["test"] == originals["test"]
    images, labels = next(iter(load_split(cifar_dataset, "train", 1000)))
    assert images.shape[1:] == (32, 32, 3)
    assert set(np.unique(labels.numpy())) <= {0, 1}
    # per-channel mean/std from tf.Transform: the training split is standardized
    pixels = images.numpy().reshape(-1, 3)
    assert np.allclose(pixels.mean(axis=0), 0, atol=0.05) and np.allclose(pixels.std(axis=0), 1, atol=0.05)
    assert (cifar_dataset / "transform_fn" / "transform_fn" / "saved_model.pb").exists()
    assert (cifar_dataset / "transform_fn" / "transformed_metadata" / "schema.pbtxt").exists()
    assert json.loads((cifar_dataset / "stats.json").read_text()) == stats


@pytest.mark.slow
def test_build_baseline_is_the_seed_cnn(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "m"), **settings("build"))
    model = load_model(tmp_path / "m")
    names = [l.name for l in model.layers]
    assert names == ["image", "conv1", "pool1", "conv2", "pool2", "flatten", "features", "output"]
    assert model.get_layer("output").units == 1  # two classes: one sigmoid unit
    assert model.get_layer("conv1").filters == 32 and model.get_layer("features").units == 64


@pytest.mark.slow
def test_regularized_build_carries_dropout_and_l2(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "m"), **settings("build", dropout=0.4, l2=1e-3))
    model = load_model(tmp_path / "m")
    assert model.get_layer("dropout").rate == 0.4
    model(np.zeros((1, 32, 32, 3), "float32"))
    assert len(model.losses) == 3  # conv1, conv2 and features kernels


@pytest.mark.slow
def test_train_checkpoints_each_epoch_and_logs_curves(cifar_dataset, tmp_path):
    build.build(str(cifar_dataset), str(tmp_path / "untrained"), **settings("build"))
    result = train.train(str(cifar_dataset), str(tmp_path / "untrained"), str(tmp_path / "trained"),
                         **settings("train", epochs=3))
    assert result["metrics"]["epochs_run"] == 3 and len(result["history"]) == 3
    assert sorted(p.name for p in (tmp_path / "trained.checkpoints").glob("*.keras")) == [
        "epoch-001.keras", "epoch-002.keras", "epoch-003.keras", "epoch-final.keras"]
    assert (tmp_path / "trained" / "learning_curve.png").stat().st_size > 1000
    before = load_model(tmp_path / "untrained").get_layer("conv1").get_weights()[0]
    after = load_model(tmp_path / "trained").get_layer("conv1").get_weights()[0]
    assert not np.allclose(before, after)


@pytest.mark.slow
def test_finetune_freezes_then_unfreezes_the_pretrained_backbone(cifar_dataset, source_dataset, tmp_path):
    build.build(str(source_dataset), str(tmp_path / "untrained"), **settings("build"))
    train.train(str(source_dataset), str(tmp_path / "untrained"), str(tmp_path / "pretrained"),
                **settings("train", epochs=2))
    result = finetune.finetune(str(cifar_dataset), str(tmp_path / "transfer"), str(tmp_path / "pretrained"),
                               **settings("finetune", frozen_epochs=2, finetune_epochs=2, unfreeze_top=1, patience=0))
    assert result["metrics"]["frozen_weights_changed_in_phase1"] == 0
    assert result["params"]["unfrozen_layers"] == ["conv2"]  # the conv base's top layer
    assert [k for k in result["history"][0]][0].startswith("frozen_")
    assert any(k.startswith("finetune_") for k in result["history"][-1])
    pretrained = load_model(tmp_path / "pretrained")
    tuned = load_model(tmp_path / "transfer")
    backbone = tuned.get_layer("backbone")
    # the source task's dense layers stay behind: the seed's head sits on the last feature map
    assert "features" not in [layer.name for layer in backbone.layers]
    assert tuned.get_layer("flatten_head").input.shape[1:] == pretrained.get_layer("flatten").input.shape[1:]
    # conv1 stayed frozen in both phases; the unfrozen top layer moved in phase 2
    assert np.allclose(pretrained.get_layer("conv1").get_weights()[0], backbone.get_layer("conv1").get_weights()[0])
    assert not np.allclose(pretrained.get_layer("conv2").get_weights()[0],
                           backbone.get_layer("conv2").get_weights()[0])

    # resumable like train: each phase's checkpoints, as a run killed after frozen epoch 1 or after
    # fine-tune epoch 1 left them, continue to the uninterrupted run's model and history exactly
    # (the resumed frozen phase keeps the backbone frozen, with the optimizer state it had)
    checkpoints = tmp_path / "transfer.checkpoints"
    for phase, epoch in (("frozen", 1), ("finetune", 1)):
        killed = tmp_path / f"killed-in-{phase}.checkpoints"
        shutil.copytree(checkpoints, killed)
        later = [f"{phase}-final.keras", f"{phase}-{epoch + 1:03d}.keras"]
        later += [p.name for p in killed.glob("finetune-*.keras")] if phase == "frozen" else []
        for name in later:
            (killed / name).unlink(missing_ok=True)
        resumed = finetune.finetune(str(cifar_dataset), str(tmp_path / f"resumed-{phase}"),
                                    str(tmp_path / "pretrained"),
                                    **settings("finetune", frozen_epochs=2, finetune_epochs=2, unfreeze_top=1,
                                               patience=0, checkpoint_dir=str(killed), resume=True))
        assert resumed["history"] == result["history"]
        assert resumed["metrics"]["frozen_weights_changed_in_phase1"] == 0
        model = load_model(tmp_path / f"resumed-{phase}")
        for a, b in zip(model.get_weights(), tuned.get_weights()):
            np.testing.assert_array_equal(a, b)

    pooled = finetune.finetune(str(cifar_dataset), str(tmp_path / "pooled"), str(tmp_path / "pretrained"),
                               **settings("finetune", frozen_epochs=1, finetune_epochs=0, patience=0, head="pool",
                                          head_units=32))
    pooled_model = load_model(tmp_path / "pooled")
    assert pooled["params"]["head"] == "pool"
    assert pooled_model.get_layer("pool_head").output.shape[1:] == (64,)  # conv2's 64 channels, averaged
    assert pooled_model.count_params() < tuned.count_params()
    # No hidden layer: the pooled features go straight to the classifier
    linear = finetune.finetune(str(cifar_dataset), str(tmp_path / "linear"), str(tmp_path / "pretrained"),
                               **settings("finetune", frozen_epochs=1, finetune_epochs=0, patience=0, head="pool",
                                          head_units=0))
    linear_model = load_model(tmp_path / "linear")
    assert linear["params"]["head_units"] == 0
    assert [l.name for l in linear_model.layers][-2:] == ["pool_head", "output"]
    assert linear_model.get_layer("output").kernel.shape[0] == 64


@pytest.mark.slow
def test_finetune_unfreezes_a_residual_backbone_whole_with_adapting_batchnorm_and_layer_rates(
        cifar_dataset, source_dataset, tmp_path):
    resnet = dict(architecture="resnet", width=0.25, depth=1)
    build.build(str(source_dataset), str(tmp_path / "untrained"), **settings("build", **resnet))
    train.train(str(source_dataset), str(tmp_path / "untrained"), str(tmp_path / "pretrained"),
                **settings("train", epochs=1))
    pretrained = load_model(tmp_path / "pretrained")
    whole = dict(frozen_epochs=1, finetune_epochs=2, unfreeze_top="all", layer_lr_decay=0.5, patience=0,
                 head="pool", head_units=16, schedule="warmup_cosine")
    tuned = {}
    for adapt in (True, False):
        result = finetune.finetune(str(cifar_dataset), str(tmp_path / f"bn-{adapt}"), str(tmp_path / "pretrained"),
                                   **settings("finetune", **whole, train_batchnorm=adapt))
        assert result["metrics"]["frozen_weights_changed_in_phase1"] == 0
        assert ("stem_bn" in result["params"]["unfrozen_layers"]) == adapt
        assert result["params"]["unfrozen_layers"][0] == "stem_conv"  # the whole base, bottom layer too
        tuned[adapt] = load_model(tmp_path / f"bn-{adapt}").get_layer("backbone")
        assert not np.allclose(pretrained.get_layer("stem_conv").get_weights()[0],
                               tuned[adapt].get_layer("stem_conv").get_weights()[0])
    # BatchNorm's moving statistics follow the target when it adapts, and keep the source's when not
    moving_mean = lambda model: model.get_layer("stage1_bn").moving_mean.numpy()
    assert np.array_equal(moving_mean(tuned[False]), moving_mean(pretrained))
    assert not np.allclose(moving_mean(tuned[True]), moving_mean(pretrained))
    # Gradual unfreezing: step 1 trains the top half of the base, the stem stays as pretrained; step 2 the rest
    gradual = finetune.finetune(str(cifar_dataset), str(tmp_path / "gradual"), str(tmp_path / "pretrained"),
                                **settings("finetune", **whole, train_batchnorm=True, unfreeze_steps=2))
    assert [next(iter(row)).split("_")[0] for row in gradual["history"]] == ["frozen", "finetune1", "finetune2"]
    step1 = keras.models.load_model(tmp_path / "gradual.checkpoints" / "finetune1-final.keras",
                                    compile=False).get_layer("backbone")
    step2 = load_model(tmp_path / "gradual").get_layer("backbone")
    stem = lambda model: model.get_layer("stem_conv").get_weights()[0]
    top_conv = [l.name for l in step1.layers if "conv" in l.name][-1]
    top = lambda model: model.get_layer(top_conv).get_weights()[0]
    assert np.array_equal(stem(step1), stem(pretrained)) and not np.allclose(top(step1), top(pretrained))
    assert not np.allclose(stem(step2), stem(step1))


@pytest.mark.slow
def test_evaluate_compares_candidates_and_gates(cifar_dataset, tmp_path):
    for name, epochs in (("baseline", 1), ("better", 4)):
        build.build(str(cifar_dataset), str(tmp_path / f"{name}-untrained"), **settings("build"))
        train.train(str(cifar_dataset), str(tmp_path / f"{name}-untrained"), str(tmp_path / name),
                    **settings("train", epochs=epochs))
    candidates = {"baseline": str(tmp_path / "baseline"), "better": str(tmp_path / "better")}
    result = evaluate.evaluate(str(cifar_dataset), candidates, str(tmp_path / "eval"), **settings("evaluate"))
    report = result["report"]
    assert set(report["candidates"]) == {"baseline", "better"}
    for scores in report["candidates"].values():
        assert set(scores) == {"accuracy", "precision", "recall", "f1", "roc_auc"}
        assert 0.0 <= scores["accuracy"] <= 1.0
    assert report["winner"] in candidates
    # Per-image predictions, keyed by content: each candidate's accuracy is recomputed from them
    per_image = report["test_predictions"]
    assert len(per_image["keys"]) == len(set(per_image["keys"])) == len(per_image["labels"]) == report["test_images"]
    for name, scores in report["candidates"].items():
        hits = np.equal(per_image["predicted"][name], per_image["labels"])
        assert hits.mean() == pytest.approx(scores["accuracy"])
    best = max(report["candidates"], key=lambda n: report["candidates"][n]["accuracy"])
    assert report["winner"] == best or not report["gate"][best]["passed"]
    assert (tmp_path / "eval" / "confusion_better.png").exists()
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000
    per_class = report["per_class"]["better"]
    assert set(per_class) == {"automobile", "truck"}
    assert sum(c["support"] for c in per_class.values()) == report["test_images"]
    assert (tmp_path / "eval" / "champion" / "model.keras").exists()
    assert "| baseline |" in (tmp_path / "eval" / "comparison.md").read_text()
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 1000  # the lifts with their intervals
    assert (tmp_path / "eval" / "errors.png").stat().st_size > 1000  # the champion's mistakes
    # the lift's paired bootstrap interval holds the measured lift; a model against itself lifts nothing
    low, high = report["lift_interval_95"]["better"]
    lift = report["candidates"]["better"]["accuracy"] - report["candidates"]["baseline"]["accuracy"]
    assert low <= lift <= high
    assert "baseline" not in report["lift_interval_95"]
    same = evaluate.evaluate(str(cifar_dataset), {"baseline": candidates["baseline"], "copy": candidates["baseline"]},
                             str(tmp_path / "same"),
                             **settings("evaluate", export=False))
    assert same["report"]["lift_interval_95"]["copy"] == [0.0, 0.0]

    # a minimum above every candidate's score (whatever they scored, 1.0 included): no winner, no champion
    minimum = max(s["accuracy"] for s in report["candidates"].values()) + 0.01
    gated = evaluate.evaluate(str(cifar_dataset), candidates, str(tmp_path / "gated"),
                              **settings("evaluate", min_metric=minimum))
    assert gated["report"]["winner"] is None and gated["register"] is None
    assert set(gated["report"]["gate"]) == set(candidates)
    for gate in gated["report"]["gate"].values():
        assert not gate["passed"] and gate["reasons"][0].endswith(f"< minimum {minimum:.3f}")
    assert not (tmp_path / "gated" / "champion").exists()


@pytest.mark.slow
def test_error_gallery_shows_exactly_the_mistakes(cifar_dataset, tmp_path):
    labels = read_meta(cifar_dataset)["labels"]
    truth = np.concatenate([y.numpy() for _, y in load_split(cifar_dataset, "test", 256)])
    pred = truth.copy()
    pred[[0, 2]] = 1 - truth[[0, 2]]  # two mistakes, the rest right
    probs = np.full((len(truth), 2), 0.5)
    probs[0, pred[0]] = 0.9
    titles = evaluate.error_gallery(str(cifar_dataset), pred, probs, labels, tmp_path / "errors.png")
    assert titles[0] == f"{labels[truth[0]]} -> {labels[pred[0]]} (0.90)" and len(titles) == 2
    assert (tmp_path / "errors.png").stat().st_size > 1000
    everything_wrong = evaluate.error_gallery(str(cifar_dataset), 1 - truth, probs, labels, tmp_path / "all.png",
                                              most=5)
    assert len(everything_wrong) == min(5, len(truth))


def test_lift_interval_separates_a_real_lift_from_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    flip = lambda rate: np.where(rng.random(400) < rate, 1 - labels, labels)  # noqa: E731
    strong, weak, weak_too = flip(0.1), flip(0.3), flip(0.3)
    # 200 resamples, not the default 1000: the same conclusions from a fifth of the sklearn calls
    low, high = evaluate.lift_interval("accuracy", labels, strong, weak, 2, resamples=200)
    assert 0 < low < 0.2 < high < 0.3  # +0.2 lift, clearly above zero
    low, high = evaluate.lift_interval("f1", labels, weak_too, weak, 2, resamples=200)
    assert low < 0 < high  # two equally good models: no lift either way


@pytest.mark.slow
def test_imagenet_weights_offline_fail_with_a_clear_message(cifar_dataset, tmp_path):
    import socket

    import pytest

    from kflift.components.sources import DataError

    for own in ("cnn", "resnet"):  # this pipeline's own nets have no ImageNet weights to download
        with pytest.raises(DataError, match=f"the '{own}' backbone has no ImageNet weights.*mobilenetv2"):
            finetune.load_backbone("imagenet", own, 32, None)
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
        pytest.skip("this machine is online: Keras would really download the ImageNet weights")
    except OSError:
        pass
    with pytest.raises(DataError, match="could not download ImageNet weights for mobilenetv2") as err:
        finetune.finetune(str(cifar_dataset), str(tmp_path / "t"),
                          **settings("finetune", weights="imagenet", backbone="mobilenetv2"))
    assert "transfer.source_classes" in str(err.value)
    assert not (tmp_path / "t").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_serving_model_on_raw_bytes_equals_evaluate(tta, cifar_dataset, tiny_cifar, tmp_path):
    import hashlib

    import tensorflow as tf

    from conftest import kflift

    build.build(str(cifar_dataset), str(tmp_path / "untrained"), **settings("build"))
    train.train(str(cifar_dataset), str(tmp_path / "untrained"), str(tmp_path / "m"), **settings("train", epochs=2))
    result = evaluate.evaluate(str(cifar_dataset), {"baseline": str(tmp_path / "m")}, str(tmp_path / "eval"),
                               **settings("evaluate", tta=tta))
    assert result["report"]["winner"] == "baseline" and result["register"]["candidate"] == "baseline"
    serving_dir = tmp_path / "eval" / "serving"
    probs, _ = evaluate.predict(str(tmp_path / "m"), str(cifar_dataset), tta=tta)
    if tta:  # the mirror images change the probabilities: the serving model must average them the same way
        assert not np.allclose(probs, evaluate.predict(str(tmp_path / "m"), str(cifar_dataset))[0], atol=1e-4)
    files = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in tiny_cifar.rglob("*.jpg")}
    keys = [k.decode() for k in tf.data.TFRecordDataset(sorted(map(str, (cifar_dataset / "test").glob("*.gz"))),
                                                         compression_type="GZIP").map(
        lambda r: tf.io.parse_single_example(r, {"key": tf.io.FixedLenFeature([], tf.string)})["key"]).as_numpy_iterator()]
    serving = tf.saved_model.load(str(serving_dir)).signatures["serving_default"]
    labels = read_meta(cifar_dataset)["labels"]
    for key, expected in zip(keys, probs):
        out = serving(image_bytes=tf.constant([files[key].read_bytes()]))
        np.testing.assert_allclose(out["probabilities"].numpy()[0], expected, atol=1e-5)
        assert out["label"].numpy()[0].decode() == labels[int(expected.argmax())]
    sample = files[keys[0]]
    proc = kflift("predict", "--model", str(serving_dir), str(sample))
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, label, prob = proc.stdout.strip().split("\t")
    assert path == str(sample) and label == labels[int(probs[0].argmax())]
    assert abs(float(prob) - probs[0].max()) < 1e-3


def test_build_variants_depth_batchnorm_global_pool_and_multiclass(tmp_path):
    from kflift.components.build import build_model

    model = build_model(32, 5, **settings("build", width=0.5, depth=3, batch_norm=True, global_pool=True))
    names = [l.name for l in model.layers]
    assert [model.get_layer(f"conv{i}").filters for i in (1, 2, 3)] == [16, 32, 64]
    assert {"bn1", "bn2", "bn3", "gap"} <= set(names) and "flatten" not in names
    assert model.get_layer("output").units == 5 and model.get_layer("output").activation.__name__ == "softmax"
    assert model.get_layer("features").units == 32
