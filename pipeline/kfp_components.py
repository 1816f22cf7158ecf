"""The KFP components: each turns KFP artifacts into paths and runs one stage of the table
(components/stages.py) through components/runner.py.

KFP ships a lightweight component's source alone into its container, so each body imports what it
needs. Every component takes where it tracks and caches (tracking_uri, experiment, parent_run_id,
run_id, job_id, cache_dir, cache_mode: a runner.StageContext) as top-level string parameters: the KFP
backend's driver resolves a runtime value (a pipeline parameter, the job id placeholder) only as a
whole parameter, never nested in a dict or list constant (#12204). `settings` is the stage
function's keyword arguments from config (pipeline.py), a constant with no placeholder in it.
`make_components` binds each to its container image.
"""
from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def augment_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                      cache_dir: str, cache_mode: str, stage: str, data_dir: str, include_classes: list,
                      exclude_classes: list, settings: dict, dataset: Output[Dataset], stats: Output[Metrics]):
    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES

    run_stage(stage, STAGES["augment"],
              StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
              artifacts={"output_dir": dataset}, kfp_metrics=stats, data_dir=data_dir,
              include_classes=include_classes, exclude_classes=exclude_classes,
              # On a cluster the artifact's URI is in KFP's object store (staging_uri "artifact" writes there);
              # a local run's is a path: none is passed, so the step cache's key stays the same.
              artifact_uri=dataset.uri if "://" in dataset.uri else "", **settings)


def build_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                    cache_dir: str, cache_mode: str, stage: str, dataset: Input[Dataset], settings: dict,
                    model: Output[Model], sweep_point: dict = {}):
    """`sweep_point` (a grid point of a ParallelFor) overrides the regularization and the stage name."""
    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES
    from kflift.components.sweep import with_point

    run_stage(sweep_point.get("build_stage", stage), STAGES["build"],
              StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
              artifacts={"dataset_dir": dataset, "output_path": model}, **with_point(settings, sweep_point))


def train_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                    cache_dir: str, cache_mode: str, stage: str, dataset: Input[Dataset], untrained: Input[Model],
                    settings: dict, model: Output[Model], metrics: Output[Metrics], sweep_point: dict = {}):
    """`sweep_point` (a grid point of a ParallelFor) overrides the learning rate and the stage name."""
    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES
    from kflift.components.sweep import with_point

    stage = sweep_point.get("train_stage", stage)
    run_stage(stage, STAGES["train"],
              StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
              artifacts={"dataset_dir": dataset, "model_dir": untrained, "output_dir": model}, kfp_metrics=metrics,
              name=stage, **with_point(settings, sweep_point))


def finetune_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                       cache_dir: str, cache_mode: str, stage: str, dataset: Input[Dataset], settings: dict,
                       model: Output[Model], metrics: Output[Metrics], pretrained: Input[Model] = None):
    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES

    run_stage(stage, STAGES["finetune"],
              StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
              artifacts={"dataset_dir": dataset, "pretrained_dir": pretrained, "output_dir": model},
              kfp_metrics=metrics, **settings)


def select_best_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                          cache_dir: str, cache_mode: str, models: Input[List[Model]], metric: str,
                          best: Output[Model]):
    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES

    run_stage("sweep-select", STAGES["select_best"],
              StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
              artifacts={"model_dirs": list(models), "output_dir": best}, metric=metric)


def evaluate_step(tracking_uri: str, experiment: str, parent_run_id: str, run_id: str, job_id: str,
                       cache_dir: str, cache_mode: str, dataset: Input[Dataset], names: list, settings: dict,
                       evaluation: Output[Artifact], metrics: Output[Metrics],
                       winner_metrics: Output[ClassificationMetrics], comparison: Output[Markdown],
                       model_1: Input[Model], model_2: Input[Model] = None, model_3: Input[Model] = None,
                       model_4: Input[Model] = None, model_5: Input[Model] = None, model_6: Input[Model] = None):
    """Candidates arrive as model_1.. in the order of `names` (KFP needs a fixed signature)."""
    import shutil

    from kflift.components.runner import StageContext, run_stage
    from kflift.components.stages import STAGES

    candidates = dict(zip(names, [model_1, model_2, model_3, model_4, model_5, model_6]))
    result = run_stage("evaluate", STAGES["evaluate"],
                       StageContext(tracking_uri, experiment, parent_run_id, run_id, job_id, cache_dir, cache_mode),
                       artifacts={"dataset_dir": dataset, "candidates": candidates, "output_dir": evaluation},
                       kfp_metrics=metrics, **settings)
    report = result["report"]
    if report["winner"]:
        winner_metrics.log_confusion_matrix(report["labels"], report["confusion_matrices"][report["winner"]])
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
