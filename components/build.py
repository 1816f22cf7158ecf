"""build: the Keras 3 model — the seed's small CNN and configurable variants.

The last layer before the classifier head is named `features`, so a trained model can serve
as a backbone for transfer learning (see finetune).
"""
from __future__ import annotations

from pathlib import Path

import keras
from keras import layers, regularizers

from .results import StageResult

APPLICATIONS = {
    "mobilenetv2": "MobileNetV2",
    "resnet50": "ResNet50",
    "vgg16": "VGG16",
    "efficientnetb0": "EfficientNetB0",
}


def classifier_head(x, num_classes: int, name: str = "output"):
    """Binary tasks get one sigmoid unit, multi-class tasks a softmax."""
    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", name=name)(x)
    return layers.Dense(num_classes, activation="softmax", name=name)(x)


def application_backbone(architecture: str, image_size: int, weights: str | None,
                         pooling: str | None = "avg") -> keras.Model:
    """A Keras Applications backbone without its top: pooled to a feature vector, or (pooling
    None) its last feature map, for a transfer head to flatten or pool."""
    cls = getattr(keras.applications, APPLICATIONS[architecture])
    return cls(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling=pooling)


def augmentation_layers(ops: dict) -> keras.Sequential:
    """The augment stage's ops as Keras preprocessing layers: active in training only."""
    steps = []
    if ops.get("crop_fraction", 0) > 0:
        f = ops["crop_fraction"]
        steps.append(layers.RandomTranslation(f, f, fill_mode="reflect"))
    if ops.get("rotation_degrees", 0) > 0:
        steps.append(layers.RandomRotation(ops["rotation_degrees"] / 360.0, fill_mode="reflect"))
    modes = [m for m in ("horizontal", "vertical") if ops.get(f"flip_{m}")]
    if modes:
        steps.append(layers.RandomFlip("_and_".join(modes)))
    if ops.get("contrast", 0) > 0:
        # Inputs are standardized by tf.Transform, so only the range-free jitter applies.
        steps.append(layers.RandomContrast(ops["contrast"], value_range=(-3, 3)))
    return keras.Sequential(steps, name="online_augmentation")


def build_model(image_size: int, num_classes: int, *, architecture: str, width: float, depth: int, batch_norm: bool,
                global_pool: bool, dropout: float, l1: float, l2: float, seed: int, online_ops: dict) -> keras.Model:
    """The seed's CNN (Conv32-pool-Conv64-pool-Flatten-Dense64-output), a small residual net, or an
    Applications model.

    CNN variants: `width` scales filters and units, `depth` sets the conv blocks (filters double
    each block), `batch_norm` adds BatchNormalization after each conv, `global_pool` replaces
    Flatten with global average pooling. `resnet`: see `residual_features`.
    """
    keras.utils.set_random_seed(seed)
    reg = regularizers.L1L2(l1=l1, l2=l2) if (l1 > 0 or l2 > 0) else None
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = augmentation_layers(online_ops)(inputs) if online_ops else inputs
    if architecture == "cnn":
        for i in range(1, depth + 1):
            filters = max(1, round(32 * 2 ** (i - 1) * width))
            if batch_norm:  # conv -> BN -> ReLU; the BN shift makes the conv bias redundant
                x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                                  name=f"conv{i}")(x)
                x = layers.Activation("relu", name=f"relu{i}")(layers.BatchNormalization(name=f"bn{i}")(x))
            else:
                x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_regularizer=reg,
                                  name=f"conv{i}")(x)
            if x.shape[1] > 1:
                x = layers.MaxPooling2D(name=f"pool{i}")(x)
        x = (layers.GlobalAveragePooling2D(name="gap") if global_pool else layers.Flatten(name="flatten"))(x)
        x = layers.Dense(max(1, round(64 * width)), activation="relu", kernel_regularizer=reg,
                         name="features")(x)
    elif architecture == "resnet":
        x = residual_features(x, width=width, depth=depth, reg=reg)
    else:
        backbone = application_backbone(architecture, image_size, weights=None)
        x = layers.Identity(name="features")(backbone(x))
    if dropout > 0:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name=f"{architecture}")


def residual_features(x, *, width: float, depth: int, reg):
    """The residual net of the CIFAR-10 speed records (ResNet-9 style), made small: a conv-BN-ReLU
    stem, then `depth` stages of conv-BN-ReLU, 2x2 max-pool and a residual block (two conv-BN-ReLU
    added back); filters 32·2^stage·width; global average pooling (`gap`) to the features."""
    def conv_bn_relu(x, filters: int, name: str):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_conv")(x)
        # Momentum 0.9 (PyTorch's 0.1, as in the speed records): with Keras' 0.99 the moving statistics
        # of a small dataset's few hundred steps stay near their start, and inference falls to chance.
        bn = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")
        return layers.ReLU(name=f"{name}_relu")(bn(x))

    x = conv_bn_relu(x, max(8, round(32 * width)), "stem")
    for i in range(1, depth + 1):
        filters = max(8, round(32 * 2 ** i * width))
        x = conv_bn_relu(x, filters, f"stage{i}")
        if x.shape[1] > 1:
            x = layers.MaxPooling2D(name=f"stage{i}_pool")(x)
        block = conv_bn_relu(conv_bn_relu(x, filters, f"stage{i}_res1"), filters, f"stage{i}_res2")
        x = layers.Add(name=f"stage{i}_add")([x, block])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return layers.Identity(name="features")(x)


def build(dataset_dir: str, output_path: str, *, architecture: str, width: float, depth: int, batch_norm: bool,
          global_pool: bool, dropout: float, l1: float, l2: float, seed: int, online_ops: dict) -> StageResult:
    """Build the model for a dataset (size and classes from augment's meta) and save it.
    Model settings from config (`ModelConfig.stage_kwargs`); `online_ops` {} = no augmentation layers."""
    from .records import read_meta
    from .files import save_model, write_json

    meta = read_meta(dataset_dir)
    model = build_model(meta["image_size"], meta["num_classes"], architecture=architecture, width=width, depth=depth,
                        batch_norm=batch_norm, global_pool=global_pool, dropout=dropout, l1=l1, l2=l2, seed=seed,
                        online_ops=online_ops)
    save_model(model, Path(output_path))
    params = {"architecture": architecture, "width": width, "depth": depth, "batch_norm": batch_norm,
              "global_pool": global_pool, "dropout": dropout, "l1": l1, "l2": l2,
              "online_augmentation": bool(online_ops)}
    write_json(Path(output_path) / "params.json", params)
    return {"params": {**params, "num_classes": meta["num_classes"], "image_size": meta["image_size"]},
            "metrics": {"parameters": model.count_params()},
            "artifacts": []}
