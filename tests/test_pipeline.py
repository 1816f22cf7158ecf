"""The compiled KFP pipeline: the DAG's tasks, their images and the GPU request."""
import json
import re

import yaml

from conftest import kflift


def compiled(tmp_path, *sets):
    out = tmp_path / "pipeline.yaml"
    args = ["compile", "-o", str(out)]
    for s in sets:
        args += ["--set", s]
    proc = kflift(*args)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


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
        if "augmented" in params:
            flags[params["stage"]["runtimeValue"]["constant"]] = params["augmented"]["runtimeValue"]["constant"]
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
