"""Run one stage: the step cache (look up under its lock, restore or store), the call, its nested
MLflow run (tracking.py), the champion's registration, its metrics for KFP, its progress lines."""
from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from typing import Callable

from . import cache, progress, tracking
from .results import StageResult
from .stages import Stage


@dataclass(frozen=True)
class StageContext:
    """Where a stage tracks and caches, as a KFP component receives it: each a whole string
    parameter, because the KFP backend resolves nothing nested in a dict (kubeflow/pipelines#12204)."""
    tracking_uri: str
    experiment: str = "kflift"
    parent_run_id: str = ""  # the pipeline run's MLflow run; "" on a cluster: found or made by run_id/job_id
    run_id: str = ""  # kflift's pipeline run id (local runs)
    job_id: str = ""  # the KFP run (a cluster run's id)
    cache_dir: str = ""  # the local step cache; "" on a cluster, where KFP caches
    cache_mode: str = ""  # "use", "refresh" (--no-cache: run afresh, still store) or "" (off)


def run_stage(name: str, stage: Stage | Callable[..., StageResult], ctx: StageContext, /, *,
              artifacts: dict | None = None, kfp_metrics=None, **kwargs) -> StageResult:
    """Run `stage` (a table entry, or any stage-like function: never cached) as the MLflow run `name`
    (positional: a stage may take a `name` of its own, as train does).

    `artifacts` maps the stage's path arguments to KFP artifacts (or lists or dicts of them): the
    function gets their paths, the cache their fingerprints. `kfp_metrics` (a KFP Metrics artifact)
    receives the scalar metrics too. On a cache hit the run gets the stored params and metrics and
    a tag naming the run that produced the outputs.
    """
    artifacts = artifacts or {}
    kwargs = {**kwargs, **{arg: _paths(a) for arg, a in artifacts.items()}}
    if isinstance(stage, Stage):
        spec = cache.Spec(inputs=[artifacts.get(a) for a in stage.reads],
                          outputs=[artifacts.get(a) for a in stage.writes],
                          data=[kwargs.get(a) for a in stage.data], checkpoints=stage.checkpoints)
        identity = f"{stage.module}:{stage.name}"
    else:
        spec, identity = None, f"{stage.__module__}:{stage.__qualname__}"
    store = cache.StageCache(ctx.cache_dir, ctx.cache_mode, identity, kwargs, spec)
    with progress.reporting(name), store.locked(name), \
            tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, name, ctx.experiment, ctx.run_id or ctx.job_id,
                               spec.input_paths() if spec else None) as run:
        hit = store.lookup()
        if hit:
            print(f"{name}: cached (fingerprint {store.key[:12]}, produced by MLflow run {hit['producer']})",
                  flush=True)
            store.restore()
            result = hit["result"]
            run.client.set_tag(run.run_id, tracking.CACHED_FROM_TAG, hit["producer"])
            run.log({k: result.get(k, {}) for k in ("params", "metrics", "history")})
            if result.get("register"):  # the winner is champion again, as after an uncached run
                run.register(**result["register"], source_run=hit["producer"])
        else:
            if store.on:
                print(f"{name}: running (fingerprint {store.key[:12]})", flush=True)
            progress.progress(name, state="running", since=progress.process_start())
            fn = stage.function if isinstance(stage, Stage) else stage
            result = fn(**_typed(fn, store.prepare(kwargs)))
            run.log(result)
            if result.get("register"):
                run.register(**result["register"])
            store.store(name, result, run.run_id)
    metrics = tracking.scalar_metrics(result.get("metrics", {}))
    champion = (result.get("register") or {}).get("candidate")
    seconds = round(time.time() - progress.process_start(), 3)
    progress.progress(name, state="cached" if hit else "done", seconds=seconds, metrics=metrics,
                      **({"champion": champion} if champion else {}))
    store.mark()
    if kfp_metrics is not None:
        for key, value in metrics.items():
            kfp_metrics.log_metric(key, value)
    return result


def _paths(artifact):
    """A KFP artifact's path; lists and dicts of artifacts keep their shape; None stays None."""
    if isinstance(artifact, dict):
        return {k: _paths(a) for k, a in artifact.items()}
    if isinstance(artifact, (list, tuple)):
        return [_paths(a) for a in artifact]
    return None if artifact is None else artifact.path


def _typed(fn, kwargs: dict) -> dict:
    """A KFP struct parameter (the settings dicts) brings every number as a float: an `int`
    parameter of the stage function (or `int | str`, say) gets its int back."""
    hints = typing.get_type_hints(fn)
    takes_int = lambda hint: hint is int or int in typing.get_args(hint)
    return {k: int(v) if takes_int(hints.get(k)) and isinstance(v, float) and v.is_integer() else v
            for k, v in kwargs.items()}
