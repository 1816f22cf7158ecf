"""The compiled KFP pipeline: the DAG's tasks, their images and the GPU request."""
import json
import re

import pytest

from conftest import compiled
from kflift.pipeline.config import ConfigError, load_config


def test_compiled_dag_has_every_stage_and_candidate(tmp_path):
    spec, _ = compiled(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    kinds = sorted({re.sub(r"-\d+$", "", t["componentRef"]["name"]) for t in tasks.values()})
    assert kinds == ["comp-augment-step", "comp-build-step", "comp-evaluate-step", "comp-finetune-step",
                     "comp-train-step"]
    # target + source augment; baseline, regularized, backbone builds and trainings
    assert len(tasks) == 10
    evaluate = next(t for n, t in tasks.items() if n.startswith("evaluate"))
    assert set(evaluate["inputs"]["artifacts"]) == {"dataset", "model_1", "model_2", "model_3"}
    assert evaluate["inputs"]["parameters"]["names"]["runtimeValue"]["constant"] == [
        "baseline", "regularized", "transfer"]


def test_ablation_trains_each_lever_alone_and_all_together(tmp_path):
    spec, _ = compiled(tmp_path, "evaluate.ablation=true")
    tasks = spec["root"]["dag"]["tasks"]
    evaluate = next(t for n, t in tasks.items() if n.startswith("evaluate"))
    assert evaluate["inputs"]["parameters"]["names"]["runtimeValue"]["constant"] == [
        "baseline", "augmentation", "regularization", "transfer", "all"]
    assert len(evaluate["inputs"]["artifacts"]) == 6  # dataset + five candidates
    flags = {}
    for task in tasks.values():
        params = task["inputs"]["parameters"]
        settings = params.get("settings", {}).get("runtimeValue", {}).get("constant", {})
        if "augmented" in settings:
            flags[params["stage"]["runtimeValue"]["constant"]] = settings["augmented"]
    assert flags == {"train-baseline": False, "train-augmentation": True, "train-regularization": False,
                     "train-backbone": True, "finetune-transfer": False, "finetune-all": True}


def test_train_and_finetune_ask_for_a_gpu_node(tmp_path):
    spec, platform = compiled(tmp_path, "images.gpu=registry.example/kflift-gpu:1",
                              "images.cpu=registry.example/kflift-cpu:1")
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        container = ex["container"]
        if "train" in name or "finetune" in name:
            assert container["image"] == "registry.example/kflift-gpu:1"
            accel = container["resources"]["accelerator"]
            assert accel["resourceType"] == "nvidia.com/gpu" and int(accel["resourceCount"]) == 1
            assert "resourceCpuLimit" in container["resources"]
            assert "resourceMemoryLimit" in container["resources"]
        else:
            assert container["image"] == "registry.example/kflift-cpu:1"
            assert "accelerator" not in container.get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_execs = [n for n in k8s if "train" in n or "finetune" in n]
    assert len(gpu_execs) == len(k8s) == 4  # three trainings and the fine-tune
    for conf in k8s.values():
        assert conf["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert conf["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_no_source_compiles_the_imagenet_path(tmp_path):
    spec, _ = compiled(tmp_path, "transfer.weights=imagenet", "transfer.backbone=mobilenetv2")
    tasks = spec["root"]["dag"]["tasks"]
    assert len(tasks) == 7  # augment, 2 builds, 2 trainings, finetune, evaluate: no source branch


def test_sweep_fans_out_with_parallel_for_and_the_best_goes_on(tmp_path):
    spec, _ = compiled(tmp_path, "train.sweep={learning_rate: [0.001, 0.003], l2: [0, 0.0001]}")
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(t for n, t in tasks.items() if n.startswith("for-loop"))
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert len(items) == 4 and {(p["learning_rate"], p["l2"]) for p in items} == {
        (0.001, 0), (0.001, 0.0001), (0.003, 0), (0.003, 0.0001)}
    assert len({p["train_stage"] for p in items}) == 4  # one nested MLflow run per point
    evaluate = next(t for n, t in tasks.items() if n.startswith("evaluate"))
    assert "sweep-best" in evaluate["inputs"]["parameters"]["names"]["runtimeValue"]["constant"]
    assert any(n.startswith("select-best") for n in tasks)


def test_cpu_mode_drops_every_gpu_request(tmp_path):
    """resources.gpu_limit=0 (kind, CPU-only clusters): no accelerator, GPU node selector or toleration
    anywhere in the IR or the platform spec, and train/finetune run in the cpu image."""
    spec, platform = compiled(tmp_path, "resources.gpu_limit=0", "images.cpu=reg/kflift-cpu:1",
                              "images.gpu=reg/kflift-gpu:1")
    text = json.dumps([spec, platform])
    assert "nvidia.com/gpu" not in text and "accelerator" not in text
    assert "nodeSelector" not in text and "tolerations" not in text
    assert {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()} == {"reg/kflift-cpu:1"}


def test_every_task_is_bounded_and_training_retries(tmp_path):
    spec, _ = compiled(tmp_path, "resources.train.memory_limit=12G", "resources.retries=3")
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        assert {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"} <= set(res), name
        if "train" in name or "finetune" in name:
            assert res["memoryLimit"] == 12.0 and res["cpuLimit"] == 4.0
    for task in spec["root"]["dag"]["tasks"].values():
        kind = task["componentRef"]["name"]
        retry = task.get("retryPolicy")
        if "train" in kind or "finetune" in kind:
            assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "30s", kind
        else:
            assert retry is None, kind
        # KFP keys a cache hit on the data *path*: augment must rerun when the files under it change.
        assert task.get("cachingOptions", {}).get("enableCache", False) == ("augment" not in kind), kind


def test_data_volume_is_mounted_into_each_augment_task_only(tmp_path):
    _, no_pvc = compiled(tmp_path)
    assert "pvcMount" not in json.dumps(no_pvc)
    spec, platform = compiled(tmp_path, "cluster.data_pvc=my-images", "cluster.data_mount=/mnt/images",
                              "images.pull_secrets=[regcred]")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    augments = {n for n in spec["deploymentSpec"]["executors"] if "augment" in n}
    assert len(augments) == 2
    for name, conf in k8s.items():
        mounts = [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"]) for m in conf.get("pvcMount", [])]
        assert mounts == ([("my-images", "/mnt/images")] if name in augments else []), name
        assert [s["secretName"] for s in conf["imagePullSecret"]] == ["regcred"]
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])  # every task gets the pull secret


def test_augment_tasks_get_the_object_store_keys_from_a_secret_and_nothing_else_does(tmp_path):
    spec, platform = compiled(tmp_path, "cluster.object_store_secret=kflift-minio",
                              "cluster.object_store_endpoint=http://minio.kflift-beam:9000")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        secrets = [(s["secretName"], {k["secretKey"]: k["envVar"] for k in s["keyToEnv"]})
                   for s in k8s.get(name, {}).get("secretAsEnv", [])]
        if "augment" in name:
            assert env == {"AWS_ENDPOINT_URL": "http://minio.kflift-beam:9000"}
            assert secrets == [("kflift-minio", {"access-key-id": "AWS_ACCESS_KEY_ID",
                                                 "secret-access-key": "AWS_SECRET_ACCESS_KEY"})]
        else:
            assert not env and not secrets, name


def test_the_transform_volume_is_mounted_into_each_augment_task_at_transform_temp(tmp_path):
    _, platform = compiled(tmp_path, "cluster.transform_pvc=kflift-transform",
                           "augment.transform_temp=/kflift-transform")
    mounts = {name: [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"]) for m in ex.get("pvcMount", [])]
              for name, ex in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}
    assert {n for n, m in mounts.items() if ("kflift-transform", "/kflift-transform") in m} == \
        {n for n in mounts if "augment" in n} != set()
    with pytest.raises(ConfigError, match="set augment.transform_temp to the absolute path"):
        load_config(overrides=["cluster.transform_pvc=kflift-transform"])


def test_images_default_to_the_last_builds_content_tags(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.json").write_text(json.dumps({"cpu": "kflift-cpu:0123456789ab", "gpu": "kflift-gpu:ba9876543210"}))
    spec, _ = compiled(tmp_path, f"output={out}")
    images = {n: ex["container"]["image"] for n, ex in spec["deploymentSpec"]["executors"].items()}
    assert {i for n, i in images.items() if "train" in n or "finetune" in n} == {"kflift-gpu:ba9876543210"}
    assert {i for n, i in images.items() if "augment" in n or "evaluate" in n} == {"kflift-cpu:0123456789ab"}
    spec, _ = compiled(tmp_path, f"output={out}", "images.cpu=mine:1")  # config still wins
    assert spec["deploymentSpec"]["executors"]["exec-evaluate-step"]["container"]["image"] == "mine:1"
    spec, _ = compiled(tmp_path, f"output={tmp_path / 'never-built'}")
    assert spec["deploymentSpec"]["executors"]["exec-evaluate-step"]["container"]["image"] == "kflift-cpu:0.1.0"


def test_own_data_without_a_source_has_no_transfer_candidate(tmp_path):
    spec, _ = compiled(tmp_path, "data=/my/images")
    tasks = spec["root"]["dag"]["tasks"]
    assert not any("finetune" in t["componentRef"]["name"] for t in tasks.values())
    assert len(tasks) == 6  # augment, 2 builds, 2 trainings, evaluate
    evaluate = next(t for n, t in tasks.items() if n.startswith("evaluate"))
    assert evaluate["inputs"]["parameters"]["names"]["runtimeValue"]["constant"] == ["baseline", "regularized"]
    augment = next(t for n, t in tasks.items() if n.startswith("augment"))
    assert augment["inputs"]["parameters"]["exclude_classes"]["runtimeValue"]["constant"] == []
    spec, _ = compiled(tmp_path, "data=/my/images", "evaluate.ablation=true")
    evaluate = next(t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("evaluate"))
    assert evaluate["inputs"]["parameters"]["names"]["runtimeValue"]["constant"] == [
        "baseline", "augmentation", "regularization", "all"]
