"""The quality levers on their own, without data: the residual net, the schedules, label smoothing,
decoupled weight decay."""
import numpy as np
import pytest

from conftest import settings


def test_resnet_has_residual_stages_and_pooled_features_a_backbone_can_cut_at():
    from kflift.components.build import build_model

    model = build_model(32, 2, **settings("build", architecture="resnet", width=0.25, depth=3))
    names = [layer.name for layer in model.layers]
    assert [n for n in names if n.endswith("_add")] == ["stage1_add", "stage2_add", "stage3_add"]
    assert [model.get_layer(f"stage{i}_conv").filters for i in (1, 2, 3)] == [16, 32, 64]
    assert model.get_layer("gap").output.shape[-1] == 64 and "features" in names
    assert model.get_layer("stage3_pool").output.shape[1:3] == (4, 4)  # 32 -> 16 -> 8 -> 4
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 1)


def test_resnet_batchnorm_statistics_catch_up_within_a_small_dataset_s_steps():
    """30 training steps (a small dataset's few epochs): the moving mean that inference uses must be
    near the data's, or a net that fits its training images predicts at chance (Keras' 0.99 got 26%)."""
    import keras

    from kflift.components.build import build_model

    model = build_model(32, 2, **settings("build", architecture="resnet", width=0.25, depth=1))
    images = np.random.default_rng(0).normal(3.0, 1.0, (16, 32, 32, 3)).astype("float32")
    for _ in range(30):
        model(images, training=True)  # updates the moving statistics, as fit's steps do
    stem = keras.Model(model.inputs, model.get_layer("stem_conv").output)
    batch_mean = stem(images).numpy().mean(axis=(0, 1, 2))
    moving = model.get_layer("stem_bn").moving_mean.numpy()
    assert np.allclose(moving, batch_mean, rtol=0.1, atol=0.05)


def test_warmup_cosine_rises_then_falls_to_near_zero():
    from kflift.components.train import schedule_callback

    rate = schedule_callback("warmup_cosine", 0.1, epochs=10, monitor="val_loss", patience=0).schedule
    rates = [rate(e) for e in range(10)]
    assert rates[:2] == pytest.approx([0.05, 0.1])  # two warmup epochs (a fifth of ten)
    assert rates[1:] == sorted(rates[1:], reverse=True) and rates[-1] < 0.01


@pytest.mark.parametrize("num_classes", [2, 3])
def test_label_smoothing_leaves_a_loss_on_a_perfect_prediction(num_classes):
    import keras

    from kflift.components.train import compile_model, one_hot
    import tensorflow as tf

    losses = {}
    for smoothing in (0.0, 0.1):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1 if num_classes == 2 else num_classes,
                                                                       activation="sigmoid" if num_classes == 2
                                                                       else "softmax")])
        compile_model(model, num_classes, learning_rate=0.1, optimizer="adam", label_smoothing=smoothing,
                      weight_decay=0.0)
        [[x, y]] = list(one_hot(tf.data.Dataset.from_tensors((np.zeros((1, 1), "float32"), np.array([1]))),
                                num_classes).as_numpy_iterator())
        perfect = y.reshape(1, -1).astype("float32") * 0.999 + 0.0005
        losses[smoothing] = float(model.loss(y.reshape(perfect.shape), perfect))
    assert losses[0.0] < 0.01 < losses[0.1]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_decoupled_weight_decay_shrinks_weights_without_a_gradient(optimizer):
    import keras

    from kflift.components.train import OPTIMIZERS

    weight = keras.Variable(np.ones(3, "float32"))
    opt = OPTIMIZERS[optimizer](0.1, 0.5)
    opt.apply_gradients([(np.zeros(3, "float32"), weight)])
    assert np.all(weight.numpy() < 1.0)  # decayed by lr * wd though the gradient was zero
    plain = keras.Variable(np.ones(3, "float32"))
    OPTIMIZERS[optimizer](0.1, 0.0).apply_gradients([(np.zeros(3, "float32"), plain)])
    assert np.all(plain.numpy() == 1.0)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_batch_mixing_blends_images_and_labels_in_the_same_proportion(mode):
    import tensorflow as tf

    from kflift.components.train import mix_batches

    # Two classes: all-zero images labelled 0, all-one images labelled 1, in one batch.
    images = np.concatenate([np.zeros((8, 8, 8, 3), "float32"), np.ones((8, 8, 8, 3), "float32")])
    labels = np.array([0] * 8 + [1] * 8)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(4)
    mixed = list(mix_batches(ds, 2, seed=7, **{f"{mode}_probability": 1.0}).as_numpy_iterator())
    blended = 0
    for x, y in mixed:
        assert y.shape == (16, 1)
        # An image's mean pixel is the share of the 1-image in it: the label says the same share.
        np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), y[:, 0], atol=0.02)
        blended += int(((y > 0.01) & (y < 0.99)).sum())
    assert blended > 16  # most images were mixed with one of the other class
    x, y = next(mix_batches(ds, 2, seed=7, mixup_probability=0.0).as_numpy_iterator())
    assert np.array_equal(x, images) and np.array_equal(y, labels)  # off: the batches pass as they are


def test_layer_rates_fall_from_the_top_conv_down_and_bn_follows_its_conv():
    from kflift.components.build import build_model
    from kflift.components.finetune import layer_rates, unfreeze_top_layers
    import keras

    model = build_model(32, 2, **settings("build", architecture="resnet", width=0.25, depth=1))
    backbone = keras.Model(model.inputs, model.get_layer("gap").input)
    assert "stem_bn" not in unfreeze_top_layers(backbone, "all")  # BatchNorm stays frozen by default
    unfrozen = unfreeze_top_layers(backbone, "all", train_batchnorm=True)
    assert unfrozen[0] == "stem_conv" and "stem_bn" in unfrozen and backbone.get_layer("stem_bn").trainable
    rates = layer_rates(backbone, 0.5)
    # Convs bottom to top: stem, stage1, stage1_res1, stage1_res2.
    convs = [rates[backbone.get_layer(f"{n}_conv").kernel.path] for n in ("stem", "stage1", "stage1_res1",
                                                                            "stage1_res2")]
    assert convs == [0.125, 0.25, 0.5, 1.0]
    assert rates[backbone.get_layer("stage1_bn").gamma.path] == 0.25


def test_layer_rates_scale_each_variables_step():
    import keras

    from kflift.components.train import OPTIMIZERS, with_layer_rates

    slow, fast = (keras.Variable(np.zeros(2, "float32"), name=name) for name in ("slow", "fast"))
    opt = with_layer_rates(OPTIMIZERS["adamw"](0.1, 0.0), {slow.path: 0.1})
    opt.apply_gradients([(np.ones(2, "float32"), slow), (np.ones(2, "float32"), fast)])
    # Adam's first step is -lr * sign(gradient), whatever the gradient's size: a tenth of the rate, a tenth the step.
    np.testing.assert_allclose(fast.numpy(), [-0.1, -0.1], rtol=1e-3)
    np.testing.assert_allclose(slow.numpy(), [-0.01, -0.01], rtol=1e-3)
