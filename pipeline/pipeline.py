"""The kflift DAG: image folder -> augment -> (build -> train) x candidates -> finetune -> evaluate.

`make_pipeline(cfg)` returns the KFP pipeline with every setting of the config bound in; only
where the data is and where tracking goes stay pipeline parameters. Each task also carries what a
cluster needs (see `on_cluster`); kfp.local ignores that.
"""
from kfp import dsl, kubernetes

from ..components.sweep import grid_points
from .config import NO_TRANSFER, Config
from .images import stage_images
from .kfp_components import make_components

UNREGULARIZED = {"dropout": 0.0, "l1": 0.0, "l2": 0.0}


def make_pipeline(cfg: Config):
    images = stage_images(cfg)
    ops = make_components(images["cpu"], images["gpu"])
    aug, reg, tr, tx = cfg.augment, cfg.regularization, cfg.train, cfg.transfer
    online_ops = aug.ops.image_ops() if aug.online else {}
    regularized = {"regularization": reg.build_kwargs(), "patience": reg.patience}
    has_source = tx.weights == "pipeline"

    def augmentation(on: bool) -> dict:
        """The augmentation lever of a training task: the offline copies and the batch mixing."""
        return {"augmented": on, "batch_mixing": aug.ops.batch_mixing() if on else {}}

    @dsl.pipeline(name="kflift", description="Lift an image classifier: augment, train, transfer, evaluate.")
    def kflift(data_dir: str, source_dir: str, tracking_uri: str = "", parent_run_id: str = "",
               experiment: str = cfg.experiment, run_id: str = "", cache_dir: str = "",
               cache_mode: str = "") -> dsl.Artifact:
        # Without a run id (a cluster run), stages group their MLflow runs under the KFP job id.
        # Without a cache_dir (a cluster run) kflift's step cache is off: KFP caches there.
        # Each a whole parameter of every task: the backend resolves nothing nested in a dict (#12204).
        context = dict(tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id, run_id=run_id,
                       job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, cache_dir=cache_dir, cache_mode=cache_mode)
        target = on_cluster(ops.augment(**context, stage="augment", data_dir=data_dir, include_classes=[],
                                        exclude_classes=tx.source_classes, settings=aug.stage_kwargs()), "augment", cfg)

        def build_and_train(name, dataset, augmented=True, regularization=UNREGULARIZED, patience=0,
                            model=cfg.model.stage_kwargs(), epochs=tr.epochs, sweep_point=None):
            """One candidate: build the model, train it (patience 0: no early stopping)."""
            point = {} if sweep_point is None else {"sweep_point": sweep_point}
            built = on_cluster(ops.build(**context, stage=f"build-{name}", dataset=dataset.outputs["dataset"],
                                         settings={**model, **regularization, "seed": tr.seed,
                                                   "online_ops": online_ops}, **point), "build", cfg)
            return on_cluster(ops.train(**context, stage=f"train-{name}", dataset=dataset.outputs["dataset"],
                                        untrained=built.outputs["model"],
                                        settings={**tr.stage_kwargs(), "epochs": epochs, "patience": patience,
                                                  "monitor": reg.monitor, **augmentation(augmented)}, **point),
                              "train", cfg)

        # Each candidate pulls some levers: offline augmentation (the augmented copies), regularization
        # (L1/L2, dropout, early stopping), transfer. The baseline pulls none.
        candidates = {"baseline": build_and_train("baseline", target, augmented=False)}
        if cfg.evaluate.ablation:  # each lever alone, then all together
            candidates["augmentation"] = build_and_train("augmentation", target)
            candidates["regularization"] = build_and_train("regularization", target, augmented=False, **regularized)
        else:
            candidates["regularized"] = build_and_train("regularized", target, **regularized)

        if tr.sweep:  # a grid of the regularized candidate, in parallel; the best goes on
            points = grid_points(tr.sweep, {"learning_rate": tr.learning_rate, **reg.build_kwargs()})
            with dsl.ParallelFor(points) as point:
                trained = build_and_train("sweep", target, sweep_point=point, **regularized)
            candidates["sweep-best"] = on_cluster(ops.select_best(
                **context, metric="val_accuracy", models=dsl.Collected(trained.outputs["model"])), "build", cfg)

        pretrained = {}
        if has_source:
            # After the target's augment: on a cluster the first stage creates the MLflow parent run.
            source = on_cluster(ops.augment(**context, stage="augment-source", data_dir=source_dir,
                                            include_classes=[] if tx.source_dir else tx.source_classes,
                                            exclude_classes=[], settings=aug.stage_kwargs()).after(target),
                                "augment", cfg)
            backbone = build_and_train("backbone", source, epochs=tx.pretrain_epochs,
                                       regularization={**UNREGULARIZED, "l2": reg.l2},
                                       model={**cfg.model.stage_kwargs(), "architecture": tx.backbone,
                                              "depth": tx.pretrain_depth})
            pretrained = {"pretrained": backbone.outputs["model"]}

        def finetune(name, augmented):
            return on_cluster(ops.finetune(
                **context, stage=f"finetune-{name}" if cfg.evaluate.ablation else "finetune",
                dataset=target.outputs["dataset"], settings={**tx.stage_kwargs(), **tr.fit_kwargs(),
                                                             "patience": reg.patience, "monitor": reg.monitor,
                                                             **augmentation(augmented)}, **pretrained), "train", cfg)

        if tx.weights == NO_TRANSFER:  # all the levers but transfer
            if cfg.evaluate.ablation:
                candidates["all"] = build_and_train("all", target, **regularized)
        elif cfg.evaluate.ablation:
            candidates["transfer"] = finetune("transfer", augmented=False)
            candidates["all"] = finetune("all", augmented=True)
        else:
            candidates["transfer"] = finetune("transfer", augmented=True)

        models = {f"model_{i}": task.outputs["model" if "model" in task.outputs else "best"]
                  for i, task in enumerate(candidates.values(), start=1)}
        return on_cluster(ops.evaluate(**context, dataset=target.outputs["dataset"], names=list(candidates),
                                       settings=cfg.evaluate.stage_kwargs(), **models),
                          "evaluate", cfg).outputs["evaluation"]

    return kflift


def on_cluster(task, kind: str, cfg: Config):
    """What a Kubernetes cluster needs of a task of this kind (augment, build, train, evaluate):
    requests and limits, pull secrets; the data volume for augment; a GPU node and retries for train."""
    res, cluster = cfg.resources, cfg.cluster
    limits = getattr(res, kind)
    task.set_cpu_request(limits.cpu_request).set_cpu_limit(limits.cpu_limit)
    task.set_memory_request(limits.memory_request).set_memory_limit(limits.memory_limit)
    if cfg.images.pull_secrets:
        kubernetes.set_image_pull_secrets(task, cfg.images.pull_secrets)
    if kind == "augment":
        # KFP would key augment's cache on the data *path*: changed files under it must not hit.
        task.set_caching_options(False)
        if cluster.data_pvc:  # KFP 2.17's PvcMount has no read-only flag: the PV is ReadOnlyMany
            kubernetes.mount_pvc(task, pvc_name=cluster.data_pvc, mount_path=cluster.data_mount)
        if cluster.object_store_secret:  # s3:// data and staging: keys from a Secret, never a parameter
            kubernetes.use_secret_as_env(task, secret_name=cluster.object_store_secret, secret_key_to_env={
                "access-key-id": "AWS_ACCESS_KEY_ID", "secret-access-key": "AWS_SECRET_ACCESS_KEY"})
        if cluster.object_store_endpoint:
            task.set_env_variable("AWS_ENDPOINT_URL", cluster.object_store_endpoint)
        if cluster.transform_pvc:  # tf.Transform's graph, shared with a remote runner's workers
            kubernetes.mount_pvc(task, pvc_name=cluster.transform_pvc, mount_path=cfg.augment.transform_temp)
    if kind == "train":
        task.set_retry(num_retries=res.retries, backoff_duration="30s", backoff_factor=2)
        if res.gpu_limit:  # else a CPU-only cluster (kind): no GPU request, selector or toleration
            task.set_accelerator_type(res.gpu_accelerator).set_accelerator_limit(res.gpu_limit)
            kubernetes.add_node_selector(task, label_key=res.gpu_node_label, label_value=res.gpu_node_value)
            kubernetes.add_toleration(task, key=res.gpu_accelerator, operator="Exists", effect="NoSchedule")
    return task
