"""The kflift DAG: image folder -> augment -> (build -> train) x candidates -> finetune -> evaluate.

`make_pipeline(cfg)` returns the KFP pipeline with every setting of the config bound in; only
where the data is and where tracking goes stay pipeline parameters.
"""
from kfp import dsl, kubernetes

from kflift.components.sweep import grid_points
from kflift.pipeline.config import Config
from kflift.pipeline.steps import make_components


def make_pipeline(cfg: Config):
    ops = make_components(cfg.images.cpu, cfg.images.gpu)
    aug, reg, tr, tx = cfg.augment, cfg.regularization, cfg.train, cfg.transfer
    augment_args = aug.stage_kwargs()
    fit_args = dict(batch_size=tr.batch_size, learning_rate=tr.learning_rate, optimizer=tr.optimizer, seed=tr.seed,
                    monitor=reg.monitor, mixed_precision=tr.mixed_precision, distribute=tr.distribute)
    has_source = tx.weights == "pipeline"

    @dsl.pipeline(name="kflift", description="Lift an image classifier: augment, train, transfer, evaluate.")
    def kflift(data_dir: str, source_dir: str, tracking_uri: str = "", parent_run_id: str = "",
               experiment: str = cfg.experiment, run_id: str = "", cache_dir: str = "",
               cache_mode: str = "") -> dsl.Artifact:
        # Without a run id (a cluster run), stages group their MLflow runs under the KFP job id.
        # Without a cache_dir (a cluster run) kflift's step cache is off: KFP caches there.
        tracking = {"uri": tracking_uri, "experiment": experiment, "parent_run_id": parent_run_id,
                    "run_id": run_id, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "cache_dir": cache_dir,
                    "cache_mode": cache_mode}
        target = ops.augment(tracking=tracking, stage="augment", data_dir=data_dir, include_classes=[],
                             exclude_classes=tx.source_classes, **augment_args)

        def build_and_train(name, dataset, epochs, augmented=True, dropout=0.0, l1=0.0, l2=0.0, patience=0,
                            variant=cfg.model.model_dump()):
            built = ops.build(tracking=tracking, stage=f"build-{name}", dataset=dataset.outputs["dataset"],
                              variant=variant, dropout=dropout, l1=l1, l2=l2, seed=tr.seed,
                              online_ops=aug.ops.model_dump() if aug.online else {})
            return on_gpu(ops.train(tracking=tracking, stage=f"train-{name}", dataset=dataset.outputs["dataset"],
                                    untrained=built.outputs["model"], epochs=epochs, patience=patience,
                                    schedule=tr.schedule, augmented=augmented, **fit_args), cfg)

        # Each candidate pulls some levers: offline augmentation (the augmented copies), regularization
        # (L1/L2, dropout, early stopping), transfer. The baseline pulls none.
        candidates = {"baseline": build_and_train("baseline", target, epochs=tr.epochs, augmented=False)}
        regularize = dict(dropout=reg.dropout, l1=reg.l1, l2=reg.l2, patience=reg.patience)
        if cfg.evaluate.ablation:  # each lever alone, then all together
            candidates["augmentation"] = build_and_train("augmentation", target, epochs=tr.epochs)
            candidates["regularization"] = build_and_train("regularization", target, epochs=tr.epochs,
                                                           augmented=False, **regularize)
        else:
            candidates["regularized"] = build_and_train("regularized", target, epochs=tr.epochs, **regularize)

        if tr.sweep:  # a grid of the regularized candidate, in parallel; the best goes on
            points = grid_points(tr.sweep, {"learning_rate": tr.learning_rate, "dropout": reg.dropout,
                                            "l1": reg.l1, "l2": reg.l2})
            with dsl.ParallelFor(points) as point:
                built = ops.build(tracking=tracking, stage="build-sweep", dataset=target.outputs["dataset"],
                                  variant=cfg.model.model_dump(), sweep_point=point,
                                  dropout=reg.dropout, l1=reg.l1, l2=reg.l2, seed=tr.seed,
                                  online_ops=aug.ops.model_dump() if aug.online else {})
                trained = on_gpu(ops.train(
                    tracking=tracking, stage="train-sweep", dataset=target.outputs["dataset"],
                    untrained=built.outputs["model"], epochs=tr.epochs, patience=reg.patience,
                    schedule=tr.schedule, augmented=True, sweep_point=point, **fit_args), cfg)
            candidates["sweep-best"] = ops.select_best(tracking=tracking, metric="val_accuracy",
                                                       models=dsl.Collected(trained.outputs["model"]))

        pretrained = {}
        if has_source:
            # After the target's augment: on a cluster the first stage creates the MLflow parent run.
            source = ops.augment(tracking=tracking, stage="augment-source", data_dir=source_dir,
                                 include_classes=[] if tx.source_dir else tx.source_classes,
                                 exclude_classes=[], **augment_args).after(target)
            backbone = build_and_train("backbone", source, epochs=tx.pretrain_epochs, l2=reg.l2,
                                       variant={**cfg.model.model_dump(), "architecture": tx.backbone,
                                                "depth": tx.pretrain_depth})
            pretrained = {"pretrained": backbone.outputs["model"]}
        def finetune(name, augmented):
            return on_gpu(ops.finetune(
                tracking=tracking, stage=f"finetune-{name}" if cfg.evaluate.ablation else "finetune",
                dataset=target.outputs["dataset"], weights=tx.weights, backbone=tx.backbone,
                frozen_epochs=tx.frozen_epochs, finetune_epochs=tx.finetune_epochs, unfreeze=tx.unfreeze_top,
                lr_factor=tx.finetune_lr_factor, head=tx.head, head_units=tx.head_units, patience=reg.patience, augmented=augmented, **fit_args,
                **pretrained), cfg)

        if cfg.evaluate.ablation:
            candidates["transfer"] = finetune("transfer", augmented=False)
            candidates["all"] = finetune("all", augmented=True)
        else:
            candidates["transfer"] = finetune("transfer", augmented=True)

        models = {f"model_{i}": task.outputs["model" if "model" in task.outputs else "best"]
                  for i, task in enumerate(candidates.values(), start=1)}
        return ops.evaluate(tracking=tracking, dataset=target.outputs["dataset"], names=list(candidates),
                            metric=cfg.evaluate.metric, min_metric=cfg.evaluate.min_metric,
                            registry_name=cfg.evaluate.registry_name, **models).outputs["evaluation"]

    return kflift


def on_gpu(task, cfg: Config):
    """Ask Kubernetes for a GPU node; kfp.local ignores this and runs on the CPU."""
    res = cfg.resources
    task.set_accelerator_type(res.gpu_accelerator).set_accelerator_limit(res.gpu_limit)
    task.set_cpu_limit(res.train_cpu).set_memory_limit(res.train_memory)
    kubernetes.add_node_selector(task, label_key=res.gpu_node_label, label_value=res.gpu_node_value)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task
