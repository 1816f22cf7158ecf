import pytest

from kflift.pipeline.config import Config, ConfigError, load_config
from conftest import REPO


def test_defaults_are_the_digits_demo():
    cfg = load_config()
    assert cfg.transfer.source_classes == ["0", "1", "2", "3", "4"]
    assert cfg.transfer.weights == "pipeline"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\naugment:\n  copies: 4\n")
    cfg = load_config(path, ["train.epochs=5", "transfer.source_classes=airplane,ship"])
    assert (cfg.train.epochs, cfg.augment.copies) == (5, 4)
    assert cfg.transfer.source_classes == ["airplane", "ship"]


def test_other_source_folder_replaces_the_held_out_default(tmp_path):
    cfg = load_config(None, [f"transfer.source_dir={tmp_path}"])
    assert cfg.transfer.source_classes == [] and cfg.transfer.source_dir == str(tmp_path)


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=-0.1", "train.learning_rate"),
    ("regularization.dropout=-0.2", "regularization.dropout"),
    ("augment.ops.flip_probability=-0.5", "augment.ops.flip_probability"),
    ("augment.copies=-1", "augment.copies"),
    ("augment.num_workers=0", "augment.num_workers"),
    ("augment.image_size=0", "augment.image_size"),
    ("transfer.backbone=alexnet", "transfer.backbone"),
    ("model.architecture=alexnet", "model.architecture"),
    ("transfer.unfreeze_top=-1", "transfer.unfreeze_top"),
    ("transfer.unfreeze_top=most", "transfer.unfreeze_top"),
    ("transfer.layer_lr_decay=0", "transfer.layer_lr_decay"),
    ("augment.ops.mixup_alpha=0", "augment.ops.mixup_alpha"),
    ("regularization.monitor=val_f1", "regularization.monitor"),
    ("train.mixed_precision=sometimes", "train.mixed_precision"),
    ("train.epochz=3", "train.epochz"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"  {key}:" in str(err.value)


def test_a_batch_is_mixed_one_way_at_most_and_mixing_stays_out_of_augment():
    with pytest.raises(ConfigError, match="mixup_probability \\+ cutmix_probability"):
        load_config(None, ["augment.ops.mixup_probability=0.6", "augment.ops.cutmix_probability=0.5"])
    cfg = load_config(None, ["augment.ops.cutmix_probability=0.5", "transfer.unfreeze_top=all"])
    assert cfg.transfer.unfreeze_top == "all"
    # augment's settings (and so its cache key) leave the online mixing out: changing it re-runs no augment
    assert "cutmix_probability" not in cfg.augment.stage_kwargs()["ops"]
    assert cfg.augment.ops.batch_mixing()["cutmix_probability"] == 0.5


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)


@pytest.mark.parametrize("sets, weights, source", [
    (["data=/my/images"], "none", []),  # their own data, no source named: no transfer candidate
    (["data=/my/images", "transfer.source_classes=cats,dogs"], "pipeline", ["cats", "dogs"]),
    (["data=/my/images", "transfer.source_classes=cats"], "pipeline", ["cats"]),
    (["data=/my/images", "transfer.weights=imagenet", "transfer.backbone=mobilenetv2"], "imagenet", []),
    (["data=/my/images", "transfer.source_dir=/src"], "pipeline", []),
    ([], "pipeline", ["0", "1", "2", "3", "4"]),  # the digits demo keeps its held-out source
])
def test_the_digits_source_belongs_to_the_demo(sets, weights, source):
    cfg = load_config(None, sets)
    assert (cfg.transfer.weights, cfg.transfer.source_classes) == (weights, source)


def test_own_data_in_a_config_file_drops_the_digits_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: /my/images\n")
    assert load_config(path).transfer.weights == "none"


def test_the_defaults_are_the_residual_recipe_and_the_seed_cnn_config_brings_the_old_ones_back():
    cfg = Config()
    assert (cfg.model.architecture, cfg.transfer.backbone, cfg.train.schedule) == ("resnet", "resnet", "warmup_cosine")
    assert cfg.augment.ops.cutout_probability == 0.5 and cfg.evaluate.tta
    assert (cfg.transfer.unfreeze_top, cfg.transfer.train_batchnorm) == ("all", True)
    seed = load_config(REPO / "configs" / "seed-cnn.yaml")
    assert (seed.model.architecture, seed.model.depth, seed.transfer.backbone) == ("cnn", 2, "cnn")
    assert (seed.train.optimizer, seed.train.schedule, seed.evaluate.tta) == ("adam", "constant", False)
    assert (seed.transfer.unfreeze_top, seed.transfer.head) == (3, "flatten")
    assert seed.augment.ops.flip_probability == cfg.augment.ops.flip_probability  # merged key by key
