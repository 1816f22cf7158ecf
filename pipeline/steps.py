"""Thin KFP components: each turns KFP artifacts into paths and calls one stage function.

KFP ships a lightweight component's source alone into its container, so each body imports what it
needs. Every component takes the MLflow coordinates (tracking_uri, experiment, parent_run_id,
run_id, job_id) and the local step cache (cache_dir, cache_mode; empty on a cluster) as top-level
string parameters: the KFP backend's driver resolves a runtime value (a pipeline parameter, the job
id placeholder) only as a whole parameter, never nested in a dict or list constant (#12204).
Each stage function is named as "module:function", so a cache hit does not import TensorFlow;
`cache.Spec` lists its artifacts.
The images come from config: `make_components` binds them.
"""
from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def augment_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
                 cache_mode: str, stage: str, data_dir: str, image_size: int, include_classes: list,
                 exclude_classes: list, val_fraction: float, test_fraction: float, copies: int, ops: dict,
                 shards: int, num_workers: int, max_pixels: int, seed: int, beam_options: list,
                 dataset: Output[Dataset], stats: Output[Metrics]):
    from kflift.components import cache, tracking as mlf

    mlf.run_stage(stage, "kflift.components.augment:augment",
                  mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                  stats,
                  cache.Spec(outputs=[dataset], data=[data_dir]), data_dir=data_dir, output_dir=dataset.path,
                  image_size=image_size, include_classes=include_classes, exclude_classes=exclude_classes,
                  val_fraction=val_fraction, test_fraction=test_fraction, copies=copies, ops=ops, shards=shards,
                  num_workers=num_workers, max_pixels=max_pixels, seed=seed, beam_options=beam_options)


def build_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
               cache_mode: str, stage: str, dataset: Input[Dataset], variant: dict, dropout: float, l1: float,
               l2: float, seed: int, online_ops: dict, model: Output[Model], sweep_point: dict = {}):
    """`sweep_point` (a grid point of a ParallelFor) overrides the regularization and stage name."""
    from kflift.components import cache, tracking as mlf

    stage, dropout, l1, l2 = (sweep_point.get(k, v) for k, v in
                              (("build_stage", stage), ("dropout", dropout), ("l1", l1), ("l2", l2)))
    mlf.run_stage(stage, "kflift.components.build:build",
                  mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                  None,
                  cache.Spec(inputs=[dataset], outputs=[model]), dataset_dir=dataset.path, output_path=model.path,
                  dropout=dropout, l1=l1, l2=l2, seed=seed, online_ops=online_ops, **variant)


def train_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
               cache_mode: str, stage: str, dataset: Input[Dataset], untrained: Input[Model], epochs: int,
               batch_size: int, learning_rate: float, optimizer: str, schedule: str, patience: int, monitor: str,
               mixed_precision: str, distribute: str, seed: int, augmented: bool, model: Output[Model],
               metrics: Output[Metrics], sweep_point: dict = {}):
    """`sweep_point` (a grid point of a ParallelFor) overrides the learning rate and stage name."""
    from kflift.components import cache, tracking as mlf

    stage = sweep_point.get("train_stage", stage)
    learning_rate = sweep_point.get("learning_rate", learning_rate)

    mlf.run_stage(stage, "kflift.components.train:train",
                  mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                  metrics,
                  cache.Spec(inputs=[dataset, untrained], outputs=[model], checkpoints=True),
                  dataset_dir=dataset.path, model_dir=untrained.path,
                  output_dir=model.path, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                  optimizer=optimizer, schedule=schedule, patience=patience, monitor=monitor,
                  mixed_precision=mixed_precision, distribute=distribute, seed=seed, name=stage, augmented=augmented)


def finetune_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
                  cache_mode: str, stage: str, dataset: Input[Dataset], weights: str, backbone: str,
                  frozen_epochs: int, finetune_epochs: int, unfreeze: int, learning_rate: float, optimizer: str,
                  lr_factor: float, head: str, head_units: int, batch_size: int, patience: int, monitor: str,
                  mixed_precision: str, distribute: str, seed: int, augmented: bool, model: Output[Model],
                  metrics: Output[Metrics], pretrained: Input[Model] = None):
    from kflift.components import cache, tracking as mlf

    mlf.run_stage(stage, "kflift.components.finetune:finetune",
                  mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                  metrics,
                  cache.Spec(inputs=[dataset, pretrained], outputs=[model], checkpoints=True),
                  dataset_dir=dataset.path,
                  output_dir=model.path,
                  pretrained_dir=pretrained.path if pretrained else None, weights=weights, backbone=backbone,
                  frozen_epochs=frozen_epochs, finetune_epochs=finetune_epochs, unfreeze=unfreeze,
                  learning_rate=learning_rate, optimizer=optimizer, lr_factor=lr_factor, head=head,
                  head_units=head_units, batch_size=batch_size, patience=patience, monitor=monitor,
                  mixed_precision=mixed_precision, distribute=distribute, seed=seed, augmented=augmented)


def select_best_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
                     cache_mode: str, models: Input[List[Model]], metric: str, best: Output[Model]):
    from kflift.components import cache, tracking as mlf

    mlf.run_stage("sweep-select", "kflift.components.sweep:select_best",
                  mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                  None,
                  cache.Spec(inputs=list(models), outputs=[best]), model_dirs=[m.path for m in models],
                  output_dir=best.path, metric=metric)


def evaluate_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str, cache_dir: str,
                  cache_mode: str, dataset: Input[Dataset], names: list, metric: str, min_metric: float,
                  registry_name: str, evaluation: Output[Artifact], metrics: Output[Metrics],
                  winner_metrics: Output[ClassificationMetrics], comparison: Output[Markdown],
                  model_1: Input[Model], model_2: Input[Model] = None, model_3: Input[Model] = None,
                  model_4: Input[Model] = None, model_5: Input[Model] = None, model_6: Input[Model] = None):
    """Candidates arrive as model_1.. in the order of `names` (KFP needs a fixed signature)."""
    import shutil

    from kflift.components import cache, tracking as mlf

    models = [model_1, model_2, model_3, model_4, model_5, model_6]
    candidates = {name: model.path for name, model in zip(names, models)}
    coordinates = mlf.coordinates(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode)
    result = mlf.run_stage("evaluate", "kflift.components.evaluate:evaluate", coordinates,
                           metrics, cache.Spec(inputs=[dataset, *models], outputs=[evaluation]),
                           dataset_dir=dataset.path,
                           candidates=candidates, output_dir=evaluation.path, metric=metric,
                           min_metric=min_metric, baseline="baseline", registry_name=registry_name)
    out = result["report"]
    if out["winner"]:
        winner_metrics.log_confusion_matrix(out["labels"], out["confusion_matrices"][out["winner"]])
    shutil.copy(f"{evaluation.path}/comparison.md", comparison.path)


def make_components(cpu_image: str, gpu_image: str) -> SimpleNamespace:
    """The KFP components, each bound to its stage's container image."""
    def component(fn, image):
        # kflift is installed in the image (and in the local environment): nothing to pip install.
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    return SimpleNamespace(
        augment=component(augment_step, cpu_image),
        build=component(build_step, cpu_image),
        train=component(train_step, gpu_image),
        finetune=component(finetune_step, gpu_image),
        select_best=component(select_best_step, cpu_image),
        evaluate=component(evaluate_step, cpu_image),
    )
