"""The one config schema: defaults, YAML loading and `--set key=value` overrides.

Every knob of the pipeline lives here; stages receive plain values taken from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


NO_TRANSFER = "none"
# The one list of model architectures (components/build.py builds each; a test holds them equal).
Architecture = Literal["cnn", "resnet", "mobilenetv2", "resnet50", "vgg16", "efficientnetb0"]
NO_SOURCE_NOTE = ("no transfer source named, so no transfer candidate: add one with "
                  "--set transfer.source_classes=A,B (classes of --data held out), transfer.source_dir=DIR "
                  "or transfer.weights=imagenet|FILE")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


BATCH_MIXING = {"mixup_probability", "mixup_alpha", "cutmix_probability", "cutmix_alpha"}


class AugmentOps(_Section):
    """The augmentations: the seed's four (crop, rotation, flip, colour jitter) and cutout, each with its
    parameters and probability."""
    crop_probability: float = Field(1.0, ge=0.0, le=1.0)
    crop_mode: Literal["pad", "resized"] = Field("pad", description="pad-and-crop shift or resized crop")
    crop_fraction: float = Field(0.1, ge=0.0, le=0.5, description="shift (pad) or area loss (resized)")
    rotation_probability: float = Field(0.5, ge=0.0, le=1.0)
    rotation_degrees: float = Field(10.0, ge=0.0, le=180.0)
    flip_probability: float = Field(0.5, ge=0.0, le=1.0)
    flip_horizontal: bool = True
    flip_vertical: bool = False
    jitter_probability: float = Field(0.8, ge=0.0, le=1.0)
    brightness: float = Field(0.15, ge=0.0, lt=1.0)
    contrast: float = Field(0.15, ge=0.0, lt=1.0)
    saturation: float = Field(0.15, ge=0.0, lt=1.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)
    cutout_probability: float = Field(0.5, ge=0.0, le=1.0, description="erase a square (offline copies only)")
    cutout_fraction: float = Field(0.25, gt=0.0, le=0.75, description="the erased square's side / the image's")
    mixup_probability: float = Field(0.0, ge=0.0, le=1.0, description="share of the training batches mixed by "
                                     "MixUp (online, in tf.data, for the candidates with augmentation)")
    mixup_alpha: float = Field(0.2, gt=0.0, le=10.0, description="MixUp's weight ~ Beta(alpha, alpha)")
    cutmix_probability: float = Field(0.0, ge=0.0, le=1.0, description="share of the training batches mixed by "
                                      "CutMix (a box of another image pasted in; online, as MixUp)")
    cutmix_alpha: float = Field(1.0, gt=0.0, le=10.0, description="CutMix's box area ~ Beta(alpha, alpha)")

    def image_ops(self) -> dict:
        """What augment applies to each image (offline)."""
        return self.model_dump(exclude=BATCH_MIXING)

    def batch_mixing(self) -> dict:
        """What training applies to whole batches (online): see train.mix_batches."""
        return self.model_dump(include=BATCH_MIXING)

    @model_validator(mode="after")
    def _one_mix_per_batch(self):
        if self.mixup_probability + self.cutmix_probability > 1:
            raise ValueError("augment.ops: mixup_probability + cutmix_probability must be at most 1 "
                             "(a batch is mixed one way or not at all)")
        return self


class AugmentConfig(_Section):
    image_size: int = Field(32, ge=8, le=512, description="images are resized to this square size")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    copies: int = Field(2, ge=0, le=50, description="offline: augmented copies of each training image")
    online: bool = Field(False, description="also augment inside the model (Keras preprocessing layers)")
    ops: AugmentOps = Field(default_factory=AugmentOps)
    shards: int = Field(0, ge=0, le=1024, description=(
        "TFRecord files per split: 0 = one per worker bundle (streams; memory stays flat), "
        "N = exactly N (the local runner then holds each split in memory to deal it out)"))
    num_workers: int | Literal["auto"] = Field("auto", description=(
        "local Beam worker processes; auto: one per usable core from parallel_from images on, else the "
        "runner's own in-process worker (a worker process starts in ~6 s: TensorFlow and tf.Transform imports)"))
    parallel_from: int = Field(6000, ge=1, description="with num_workers auto: the input size (images) from "
                               "which worker processes pay off (2 cores: 4k images ran 2.3 s faster in-process, "
                               "10k 4 s faster on 2 workers)")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are quarantined")
    batch_size: int = Field(256, ge=1, le=8192, description=(
        "images per batch through tf.Transform's graph (analysis and transform). Fixed, so a worker's memory "
        "does not grow with the input: unset, Beam tunes the batch up to 1,000 over a long run"))
    seed: int = 42
    beam_options: list[str] = Field(default_factory=list, description="passed through to Beam")
    staging_uri: str = Field("", description="where the Beam workers write the records, quarantine and counts "
                             "(s3://, gs://, hdfs://: a remote runner's workers reach it, a local folder they may "
                             "not); fetched into the stage's output after the run. \"artifact\": on a cluster, "
                             "the KFP Dataset artifact's own URI, where the records stay (KFP passes them on). "
                             "Empty: the output folder itself")
    transform_temp: str = Field("", description="where tf.Transform's workers write its temporary files and the "
                                "transform graph: a path every Beam worker and the augment process see (a shared "
                                "volume) or gs:// (TensorFlow 2.21 writes no s3://). Empty: the stage's own folder "
                                "(the local runner)")

    @field_validator("num_workers")
    @classmethod
    def _workers_in_range(cls, value):
        if value != "auto" and not 1 <= value <= 64:
            raise ValueError("from 1 to 64 local workers, or auto")
        return value

    def stage_kwargs(self) -> dict:
        """The augment stage function's arguments (all but data, output and class filters)."""
        return {"image_size": self.image_size, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "copies": self.copies, "ops": self.ops.image_ops(),
                "shards": self.shards, "num_workers": self.num_workers, "parallel_from": self.parallel_from,
                "max_pixels": self.max_pixels, "batch_size": self.batch_size,
                "seed": self.seed, "beam_options": list(self.beam_options), "staging_uri": self.staging_uri,
                "transform_temp": self.transform_temp}


class ModelConfig(_Section):
    architecture: Architecture = Field("resnet", description="resnet: a small residual net (the default, measured "
                                       "on the shared benchmark); cnn: the seed's small CNN (configs/seed-cnn.yaml)")
    width: float = Field(0.5, gt=0.0, le=8.0, description="filter/unit multiplier of resnet and cnn")
    depth: int = Field(3, ge=1, le=6, description="stages of resnet, conv blocks of cnn (filters double per step)")
    batch_norm: bool = Field(False, description="cnn: BatchNorm after each conv (resnet always has it)")
    global_pool: bool = Field(False, description="cnn: global average pooling instead of Flatten (resnet pools)")

    def stage_kwargs(self) -> dict:
        """The build stage's model arguments."""
        return self.model_dump()


class TrainConfig(_Section):
    epochs: int = Field(6, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=8192)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adamw"
    schedule: Literal["constant", "cosine", "warmup_cosine", "step", "plateau"] = "warmup_cosine"
    label_smoothing: float = Field(0.1, ge=0.0, lt=0.5, description="targets 1-s and s/classes instead of 1 and 0")
    weight_decay: float = Field(0.05, ge=0.0, le=0.1, description="decoupled weight decay of adamw and sgd")
    mixed_precision: Literal["auto", "on", "off", "bfloat16"] = Field(
        "auto", description="float16 (on) or bfloat16 compute with float32 weights: auto = float16 when a GPU is "
        "present; bfloat16 for a CPU with bfloat16 instructions (AVX512-BF16, AMX)")
    distribute: Literal["auto", "none", "mirrored"] = Field(
        "auto", description="tf.distribute strategy: auto = MirroredStrategy when several GPUs are present")
    sweep: dict[Literal["learning_rate", "l1", "l2", "dropout"], list[float]] = Field(
        default_factory=dict, description="grid, e.g. {learning_rate: [1e-3, 3e-3], l2: [0, 1e-4]}; "
        "each point trains in parallel (augmented data + regularization) and the best goes on")
    seed: int = 42

    def fit_kwargs(self) -> dict:
        """What every training stage (train, finetune) takes from this section."""
        return self.model_dump(include={"batch_size", "learning_rate", "optimizer", "schedule", "label_smoothing",
                                        "weight_decay", "mixed_precision", "distribute", "seed"})

    def stage_kwargs(self) -> dict:
        """The train stage's arguments from this section."""
        return {**self.fit_kwargs(), "epochs": self.epochs}


class RegularizationConfig(_Section):
    l1: float = Field(0.0, ge=0.0, le=1.0)
    l2: float = Field(1e-4, ge=0.0, le=1.0)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    # Longer than the default schedules' phases: warmup + cosine lifts validation most in its last,
    # low-rate epochs, and patience 3 stopped seed 44's fine-tuning at epoch 4 of 7 (validation
    # 0.896; run out, 0.913). The best epoch is restored either way.
    patience: int = Field(10, ge=1, description="early-stopping patience in epochs")
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss", description="what early stopping (and the plateau schedule) watches; best weights restored")

    def build_kwargs(self) -> dict:
        """A regularized candidate's build arguments."""
        return self.model_dump(include={"dropout", "l1", "l2"})


class TransferConfig(_Section):
    source_classes: list[str] = Field(
        default_factory=list,
        description="classes of --data held out of the target task and used to pretrain the backbone",
    )
    source_dir: str | None = Field(None, description="another image folder to pretrain the backbone on")
    weights: str = Field(
        "pipeline", description="'pipeline' (pretrained by this run), 'imagenet', a weights file, or 'none' "
        "(no transfer candidate: the default for your own --data until you name a source)")
    backbone: Architecture = "resnet"
    pretrain_epochs: int = Field(5, ge=1)
    pretrain_depth: int = Field(
        3, ge=1, le=6, description="stages (resnet) or conv blocks (cnn) of the backbone this run pretrains "
        "(the rest of model.* applies too)")
    frozen_epochs: int = Field(2, ge=1, description="phase 1: the new head on the frozen backbone")
    finetune_epochs: int = Field(7, ge=0, description="phase 2: the top layers unfrozen")
    unfreeze_top: int | Literal["all"] = Field(
        "all", description="weighted layers of the backbone unfrozen in phase 2, from the top; 'all': every one "
        "(a residual backbone needs all, BatchNorm adapting: the top 3 alone lost 12-16 points)")
    unfreeze_steps: int = Field(
        1, ge=1, le=20, description="phase 2 in this many steps (gradual unfreezing): each unfreezes a further "
        "share of the unfreeze_top layers from the top and trains its share of finetune_epochs; 1 = all at once")
    finetune_lr_factor: float = Field(
        1.0, gt=0.0, le=1.0, description="phase 2 learning rate / train.learning_rate (the residual net fine-tunes "
        "best at the full rate: 3 seeds, validation; the seed CNN at 0.5)")
    layer_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="phase 2: each conv layer learns at this times the rate of the one above "
        "it (discriminative rates: earlier layers, more general features, change less); 1 = one rate")
    train_batchnorm: bool = Field(
        True, description="phase 2: unfrozen BatchNorm layers learn the target's statistics (else they keep "
        "the source's, in inference mode)")
    head: Literal["flatten", "pool"] = Field(
        "pool", description="new head on the backbone: the seed's Flatten-Dense-Dropout, or global pooling")
    head_units: int = Field(512, ge=0, le=8192, description="units of the head's hidden Dense layer; 0: none, "
                            "the backbone's features go straight to the classifier")
    head_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout after the head's hidden layer")

    def stage_kwargs(self) -> dict:
        """The finetune stage's arguments from this section (the source and pretraining are the DAG's)."""
        return self.model_dump(include={"weights", "backbone", "frozen_epochs", "finetune_epochs", "unfreeze_top",
                                        "unfreeze_steps", "finetune_lr_factor", "layer_lr_decay", "train_batchnorm", "head",
                                        "head_units", "head_dropout"})

    @field_validator("unfreeze_top", mode="plain")
    @classmethod
    def _count_or_all(cls, value):
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ValueError(f"must be a whole number >= 0 or 'all', not {value!r}")

    @model_validator(mode="after")
    def _one_source(self):
        if self.source_dir and self.source_classes:
            raise ValueError("set transfer.source_dir or transfer.source_classes, not both")
        if self.weights == "pipeline" and not (self.source_dir or self.source_classes):
            raise ValueError(
                "transfer.weights=pipeline needs transfer.source_classes or transfer.source_dir "
                "(or set transfer.weights=imagenet or a weights file)"
            )
        return self


class EvaluateConfig(_Section):
    metric: Literal["accuracy", "f1", "precision", "recall"] = "accuracy"
    min_metric: float = Field(0.0, ge=0.0, le=1.0, description="quality gate")
    ablation: bool = Field(False, description="train each lever alone and all together, side by side")
    registry_name: str = Field("kflift-classifier", min_length=1, description="MLflow registered model")
    tta: bool = Field(True, description="test-time augmentation: candidates and the serving model predict "
                      "on each image and its mirror image, and average")

    def stage_kwargs(self) -> dict:
        """The evaluate stage's arguments from this section."""
        return self.model_dump(include={"metric", "min_metric", "registry_name", "tta"})


class ImagesConfig(_Section):
    cpu: str | None = Field(None, description="augment, build, evaluate (and train/finetune without a GPU); "
                            "default: the last `kflift images build` (its content-hash tag), else kflift-cpu:0.1.0")
    gpu: str | None = Field(None, description="train, finetune on a GPU node; default as for cpu")
    pull_secrets: list[str] = Field(default_factory=list, description="image pull secrets of a private registry")


class TaskResources(_Section):
    """Kubernetes requests and limits of one kind of task (KFP quantity strings: "500m", "2", "4G")."""
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


class ResourcesConfig(_Section):
    """What each task asks of a cluster; kfp.local ignores all of it."""
    augment: TaskResources = TaskResources(cpu_request="1", cpu_limit="2", memory_request="2G", memory_limit="4G")
    build: TaskResources = TaskResources(cpu_request="250m", cpu_limit="1", memory_request="1G", memory_limit="2G")
    train: TaskResources = TaskResources(cpu_request="2", cpu_limit="4", memory_request="4G", memory_limit="16G")
    evaluate: TaskResources = TaskResources(cpu_request="1", cpu_limit="2", memory_request="2G",
                                            memory_limit="4G")
    gpu_accelerator: str = "nvidia.com/gpu"
    gpu_limit: int = Field(1, ge=0, description="GPUs per train/finetune task; 0 = CPU-only cluster (no GPU "
                           "request, node selector or toleration; train/finetune run on images.cpu)")
    gpu_node_label: str = "nvidia.com/gpu.present"
    gpu_node_value: str = "true"
    retries: int = Field(2, ge=0, le=10, description="KFP retries of a failed train/finetune task (e.g. evicted)")


class ClusterConfig(_Section):
    """Where a cluster run finds its data and its tracking server."""
    data_pvc: str = Field("", description="PersistentVolumeClaim with the image folders, mounted read-only "
                          "into the augment tasks (kind/minikube: kflift-data)")
    data_mount: str = Field("/data", pattern=r"^/", description="where the claim is mounted in the pods")
    tracking_uri: str = Field("http://kflift-mlflow.kflift:5000", pattern=r"^https?://",
                              description="MLflow server the pods track into (default: the in-cluster one)")
    object_store_secret: str = Field("", description="Secret (keys access-key-id, secret-access-key) that the "
                                     "augment tasks get as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, for s3:// "
                                     "data and augment.staging_uri (k8s/storage/kind: kflift-minio)")
    object_store_endpoint: str = Field("", description="AWS_ENDPOINT_URL of the augment tasks: an S3-compatible "
                                       "store such as MinIO (empty: AWS itself)")
    transform_pvc: str = Field("", description="ReadWriteMany claim mounted into the augment tasks at "
                               "augment.transform_temp, the folder tf.Transform's graph goes through when a "
                               "remote Beam runner's workers mount it too (k8s/storage/kind: kflift-transform)")


class Config(_Section):
    data: str | None = Field(None, description="image folder (sub-folder = class); default: digits")
    output: str = "kflift-output"
    experiment: str = "kflift"
    tracking_uri: str | None = Field(None, description="default: SQLite store under the output")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    transfer: TransferConfig = Field(
        default_factory=lambda: TransferConfig(source_classes=["0", "1", "2", "3", "4"])
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _transform_volume_has_a_path(self):
        if self.cluster.transform_pvc and not self.augment.transform_temp.startswith("/"):
            raise ValueError(f"cluster.transform_pvc {self.cluster.transform_pvc}: set augment.transform_temp to "
                             "the absolute path it is mounted at, the same as in the Beam workers (k8s/beam: "
                             "/kflift-transform)")
        return self


def _set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _explain(err: ValidationError, origin: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return ConfigError(f"invalid config ({origin}):\n" + "\n".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML)."""
    tree: dict = Config().model_dump(mode="json")
    origin = "defaults"
    given: set[str] = set()  # dotted keys the user set, to resolve the transfer default below
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = _merge(tree, loaded)
        given |= {f"{k}.{sub}" for k, v in loaded.items() if isinstance(v, dict) for sub in v}
        origin = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        if isinstance(value, str) and key.endswith(("classes", "options")):  # one name is a list of one
            value = [v.strip() for v in value.split(",") if v.strip()]
        if key.endswith("classes") and isinstance(value, (list, int)):
            value = [str(v) for v in (value if isinstance(value, list) else [value])]
        _set_dotted(tree, key.strip(), value)
        given.add(key.strip())
        origin += f" + --set {key}"
    # The held-out digits are the demo's transfer source: they stand only while the user names no other
    # source and brings no data of their own; their own data without a source has no transfer candidate.
    names_source = given & {"transfer.source_dir", "transfer.weights", "transfer.source_classes"}
    if "transfer.source_classes" not in given and (names_source or tree.get("data")):
        tree["transfer"]["source_classes"] = []
        if not names_source:
            tree["transfer"]["weights"] = NO_TRANSFER
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, origin) from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # A section given in YAML replaces the default's values key by key.
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
