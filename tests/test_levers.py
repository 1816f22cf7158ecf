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
