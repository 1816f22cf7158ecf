"""What the Kubeflow Pipelines *backend* hands each stage of our compiled IR — offline: no API server,
driver or launcher can run here, and kfp.local resolves more than the backend does (#12204).

The backend's Go code could not be imported here: the Go module proxy refuses
github.com/kubeflow/pipelines at every version and commit ("This module version is not available"),
and its code may not be vendored. So this file ports, rule for rule, the parts that decide the values
a stage receives, from kubeflow/pipelines tag 2.17.0 (commit 4a3592cb2dd0a91a4652ab93893ec8beda1f3158,
the backend that scripts/cluster-up.sh installs):

- argo.go        backend/src/v2/compiler/argocompiler/argo.go L96-106: root parameters not in the run's
                 runtime config take their default (or null when optional).
- resolve.go     backend/src/v2/driver/resolve.go L375-470 (resolveInputParameter): a component input
                 parameter comes from the parent DAG; a runtime constant is replaced only when the *whole
                 string* is one of the job/task placeholders (or holds {{$.workspace_path}}); any other
                 constant — a dict or list included — passes through untouched. L268-299 and dag.go
                 L181-192: an iteration gets its item of the parameter iterator's raw items. L202-216:
                 a STRING input given another type becomes its JSON text.
- launcher       backend/src/v2/component/launcher_v2.go L425 + L1310-1330 (addDefaultParams: a component
                 default fills a missing input), L1051-1074 (compileCmdAndArgs) and L1077-1170
                 (getPlaceholders): in each argument {{$}} becomes the executor input's JSON
                 (protojson: a whole number is written without a fraction), then each
                 {{$.inputs.parameters['name']}} is replaced textually by the parameter's value; the
                 Python executor reads its inputs from that JSON.
- k8s.go         backend/src/v2/driver/k8s.go L1111-1166 (makeVolumeMountPatch): a PvcMount's claim name
                 is resolved like an input parameter; a claim and mount path are required; the pod gets a
                 persistentVolumeClaim volume and a mount (KFP 2.17 has no read-only flag for it).

Checked once against the real Go code (not in CI, which cannot fetch it): the 2.17.0 sources built
from a mirror, with test files calling resolveInputParameter/resolveInputs, addDefaultParams,
compileCmdAndArgs and makeVolumeMountPatch on our IR (default, PVC, sweep, and the IR before the fix)
gave the same values and mounts as this port for every task.
"""
import json
from decimal import Decimal

import pytest
import yaml

from conftest import compiled

RUN_UUID = "7d1f3a52-3f0e-4e7c-9f38-5c2a1b0e9d11"  # what the backend's opts.RunID holds
RUN_NAME, RUN_DISPLAY_NAME = "kflift-run-abc12", "kflift run"
SUBMITTED = {"data_dir": "/data/vehicles", "source_dir": "/data/vehicles", "experiment": "kflift",
             "tracking_uri": "http://kflift-mlflow.kflift:5000"}  # what `kflift submit` sends (test_submit)
# resolve.go L437-452: the placeholders the driver substitutes, only as a constant's whole string.
WHOLE_STRING_PLACEHOLDERS = {"{{$.pipeline_job_name}}": RUN_DISPLAY_NAME, "{{$.pipeline_job_resource_name}}": RUN_NAME,
                             "{{$.pipeline_job_uuid}}": RUN_UUID, "{{$.pipeline_task_name}}": None,
                             "{{$.pipeline_task_uuid}}": "42", "{{$.pipeline_job_create_time_utc}}": "2026-11-27T00:00:00Z",
                             "{{$.pipeline_job_schedule_time_utc}}": ""}
WORKSPACE_MOUNT = "/kfp-workspace"  # component.WorkspaceMountPath


class BackendError(AssertionError):
    """Where the backend itself would fail the task (driver or launcher error)."""


# ----------------------------------------------------------------------------- the ported rules

def root_parameters(spec: dict, runtime: dict) -> dict:
    """argo.go L96-106."""
    values = dict(runtime)
    for name, param in spec["root"].get("inputDefinitions", {}).get("parameters", {}).items():
        if name not in values:
            if "defaultValue" in param:
                values[name] = param["defaultValue"]
            elif param.get("isOptional"):
                values[name] = None
    return values


def resolve_parameter(param_spec: dict, parent: dict, task_name: str):
    """resolve.go L375-470 (resolveInputParameter)."""
    if "componentInputParameter" in param_spec:
        name = param_spec["componentInputParameter"]
        if name not in parent:
            raise BackendError(f"parent DAG does not have input parameter {name}")
        return parent[name]
    if "runtimeValue" in param_spec:
        value = param_spec["runtimeValue"]["constant"]
        if isinstance(value, str):
            if "{{$.workspace_path}}" in value:
                return value.replace("{{$.workspace_path}}", WORKSPACE_MOUNT)
            if value in WHOLE_STRING_PLACEHOLDERS:
                return WHOLE_STRING_PLACEHOLDERS[value] or task_name
        return value  # a struct or list constant is passed on as it is, placeholders and all
    raise BackendError(f"{task_name}: input kind {sorted(param_spec)} needs an upstream task's outputs")


def task_inputs(task: dict, component: dict, parent: dict, task_name: str) -> dict:
    """resolve.go L317-... over a task's parameters, then the checks and STRING conversion of L174-216
    (an iterator's item input is given to its iterations only, L176-181)."""
    values = {name: resolve_parameter(p, parent, task_name)
              for name, p in task.get("inputs", {}).get("parameters", {}).items()}
    item = task.get("parameterIterator", {}).get("itemInput")
    for name, spec in component.get("inputDefinitions", {}).get("parameters", {}).items():
        if name == item:
            continue
        if name not in values and not spec.get("isOptional") and "defaultValue" not in spec:
            raise BackendError(f"{task_name}: neither value nor default value provided for non-optional "
                               f"parameter {name!r}")
        if spec["parameterType"] == "STRING" and name in values and not isinstance(values[name], str):
            values[name] = json.dumps(values[name])
    return values


def launcher_parameters(executor: dict, component: dict, inputs: dict) -> dict:
    """launcher_v2.go: the parameter values the Python executor parses from --executor_input."""
    defaults = {name: spec["defaultValue"] for name, spec in component.get("inputDefinitions", {})
                .get("parameters", {}).items() if "defaultValue" in spec}
    inputs = _protojson({**defaults, **inputs})
    executor_input = json.dumps({"inputs": {"parameterValues": inputs}})
    placeholders = {f"{{{{$.inputs.parameters['{name}']}}}}": _placeholder_text(value)
                    for name, value in inputs.items()}
    args = []
    for arg in executor["container"]["args"]:
        arg = arg.replace("{{$}}", executor_input)
        for placeholder, replacement in placeholders.items():
            arg = arg.replace(placeholder, replacement)
        args.append(arg)
    text = args[args.index("--executor_input") + 1]
    try:
        return json.loads(text)["inputs"]["parameterValues"]
    except json.JSONDecodeError as exc:
        raise BackendError(f"the launcher's substitution broke the executor input JSON: {exc}") from None


def _protojson(value):
    """protojson writes a whole-valued double as an integer (64, not 64.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _protojson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_protojson(v) for v in value]
    return value


def _placeholder_text(value) -> str:
    """getPlaceholders' text of a parameter value (launcher_v2.go L1140-1161)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):  # Go's FormatFloat(v, 'f', -1, 64): shortest, never an exponent
        text = format(Decimal(repr(float(value))), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return json.dumps(value, separators=(",", ":"))


def pvc_mounts(k8s_executor: dict, parent: dict, task_name: str) -> list[tuple[str, str]]:
    """k8s.go L1111-1166 (makeVolumeMountPatch): (claim, mount path) per PvcMount."""
    mounts = []
    for mount in k8s_executor.get("pvcMount", []):
        if "pvcNameParameter" in mount:
            name_spec = mount["pvcNameParameter"]
        elif mount.get("constant"):
            name_spec = {"runtimeValue": {"constant": mount["constant"]}}
        elif mount.get("componentInputParameter"):
            name_spec = {"componentInputParameter": mount["componentInputParameter"]}
        else:
            raise BackendError(f"{task_name}: volume mount: volume name not provided")
        claim = resolve_parameter(name_spec, parent, task_name)
        if not claim or not mount.get("mountPath"):
            raise BackendError(f"{task_name}: failed to mount volume, missing mountpath or pvc name")
        mounts.append((claim, mount["mountPath"]))
    return mounts


def backend_view(spec: dict, platform: dict, runtime: dict) -> dict:
    """task path -> {"parameters": what its Python function receives, "mounts": its PVC mounts}."""
    k8s = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    executors = spec["deploymentSpec"]["executors"]
    seen = {}

    def walk(component: dict, parent: dict, path: str):
        for name, task in component["dag"]["tasks"].items():
            child = spec["components"][task["componentRef"]["name"]]
            inputs = task_inputs(task, child, parent, name)
            if "dag" in child:  # a nested DAG; a ParallelFor fans out over its raw items
                iterator = task.get("parameterIterator")
                if iterator:
                    for i, item in enumerate(json.loads(iterator["items"]["raw"])):
                        walk(child, {**inputs, iterator["itemInput"]: item}, f"{path}{name}[{i}]/")
                else:
                    walk(child, inputs, f"{path}{name}/")
                continue
            label = child["executorLabel"]
            seen[f"{path}{name}"] = {"parameters": launcher_parameters(executors[label], child, inputs),
                                     "mounts": pvc_mounts(k8s.get(label, {}), parent, name), "executor": label}

    walk(spec["root"], root_parameters(spec, runtime), "")
    return seen


def unresolved(value, where: str = "") -> list[str]:
    """Every string inside a value that still holds a placeholder."""
    if isinstance(value, str):
        return [f"{where}: {value}"] if "{{$" in value else []
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in unresolved(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in unresolved(v, f"{where}[{i}]")]
    return []


def problems(view: dict) -> list[str]:
    """What would go wrong on a cluster: placeholder text a stage receives, a wrong tracking URI or job id."""
    found = []
    for task, got in view.items():
        params = got["parameters"]
        found += [f"{task} {u}" for name, v in params.items() for u in unresolved(v, name)]
        if params.get("tracking_uri") != SUBMITTED["tracking_uri"]:
            found.append(f"{task}: tracking_uri is {params.get('tracking_uri')!r}")
        if params.get("job_id") != RUN_UUID:
            found.append(f"{task}: job_id is {params.get('job_id')!r}, not the KFP run id")
    return found


# ----------------------------------------------------------------------------- our IR, every variant

VARIANTS = {
    "default": [],
    "ablation": ["evaluate.ablation=true"],
    "sweep": ["train.sweep={learning_rate: [0.001, 0.003], l2: [0, 0.0001]}"],
    "cpu": ["resources.gpu_limit=0"],
    "pvc": ["cluster.data_pvc=kflift-data"],
    "imagenet": ["transfer.weights=imagenet", "transfer.backbone=mobilenetv2"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_offline_backend_resolves_every_runtime_value_of_our_ir(tmp_path, variant):
    spec, platform = compiled(tmp_path, *VARIANTS[variant])
    view = backend_view(spec, platform, SUBMITTED)
    assert problems(view) == []
    stages = {got["parameters"]["stage"] for got in view.values() if "stage" in got["parameters"]}
    assert {"augment", "build-baseline", "train-baseline"} <= stages
    if variant == "sweep":  # each grid point's tasks are reached through the iteration, stage names intact
        sweep = {got["parameters"]["sweep_point"]["train_stage"] for t, got in view.items()
                 if "for-loop" in t and "sweep_point" in got["parameters"] and "train" in got["executor"]}
        assert sweep == {f"train-sweep-{i}" for i in range(4)}
    evaluate = next(got for t, got in view.items() if t.startswith("evaluate"))
    assert evaluate["parameters"]["run_id"] == "" and evaluate["parameters"]["cache_dir"] == ""


def test_offline_backend_mounts_the_data_claim_into_each_augment_task(tmp_path):
    spec, platform = compiled(tmp_path, *VARIANTS["pvc"])
    view = backend_view(spec, platform, SUBMITTED)
    augments = {t: got for t, got in view.items() if "augment" in got["executor"]}
    assert len(augments) == 2
    for got in augments.values():
        assert got["mounts"] == [("kflift-data", "/data")]
        assert got["parameters"]["data_dir"].startswith("/data/")  # submit refuses a path off the mount
    assert all(not got["mounts"] for t, got in view.items() if t not in augments)


def test_offline_backend_check_catches_placeholders_nested_in_a_dict(tmp_path):
    """The check fails on the IR kflift compiled before: MLflow coordinates as one dict constant."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def stage(tracking: dict) -> str:
        return tracking["uri"]

    @dsl.pipeline(name="nested")
    def nested(tracking_uri: str = ""):
        stage(tracking={"uri": tracking_uri, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}).set_caching_options(False)

    package = tmp_path / "nested.yaml"
    compiler.Compiler().compile(nested, str(package))
    spec = yaml.safe_load(package.read_text())
    view = backend_view(spec, {}, {"tracking_uri": SUBMITTED["tracking_uri"]})
    tracking = view["stage"]["parameters"]["tracking"]
    # The driver passes the dict on untouched; the launcher's textual pass fills the input parameter
    # (its value is plain text here) but nothing fills the job placeholder: every run would share it.
    assert tracking == {"uri": SUBMITTED["tracking_uri"], "job_id": "{{$.pipeline_job_uuid}}"}
    assert any("job_id: {{$.pipeline_job_uuid}}" in p for p in problems(
        {"stage": {"parameters": {**tracking, "tracking_uri": tracking["uri"]}}}))
    # A URI with a quote breaks the executor input outright once substituted into its JSON.
    with pytest.raises(BackendError, match="broke the executor input JSON"):
        backend_view(spec, {}, {"tracking_uri": 'http://mlflow"x'})


def test_offline_backend_rules_match_the_kfp_local_blind_spot():
    """resolve.go substitutes a job placeholder only as the whole constant, never inside one."""
    assert resolve_parameter({"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}, {}, "t") == RUN_UUID
    inside = resolve_parameter({"runtimeValue": {"constant": "run-{{$.pipeline_job_uuid}}"}}, {}, "t")
    assert inside == "run-{{$.pipeline_job_uuid}}"
    with pytest.raises(BackendError, match="parent DAG does not have input parameter x"):
        resolve_parameter({"componentInputParameter": "x"}, {}, "t")
    assert [_placeholder_text(v) for v in (0.5, 3.0, 1e-05, True, [1, 2])] == ["0.5", "3", "0.00001", "true", "[1,2]"]
