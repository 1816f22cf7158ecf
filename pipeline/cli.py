"""kflift command line: run | stage | predict | compile | submit | ui."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kflift.pipeline.config import ConfigError, load_config


def _beam_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-option", dest="beam_options", action="append", default=[], metavar="OPT",
                   help="a Beam pipeline option for the augment stage, e.g. --beam-option=--runner=FlinkRunner "
                        "(repeatable; default: the local DirectRunner with augment.num_workers workers)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (sections as in pipeline/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kflift", description=(
        "Lift an image classifier's quality with a Kubeflow pipeline: augment (Beam + tf.Transform), "
        "build, train with regularization, fine-tune a pretrained backbone, evaluate; tracked in MLflow."))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline on this machine (kfp.local)",
                         description="Run the whole DAG locally and print the winner and summary path.")
    run.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class "
                     "(default: scikit-learn's digits written as PNGs under the output folder)")
    run.add_argument("--output", metavar="DIR", help="where runs, data and the MLflow store go "
                     "(default: ./kflift-output)")
    run.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                     "(default: a SQLite store under the output folder)")
    run.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                     help="subprocess: every stage in this environment (default); docker: in its image")
    run.add_argument("--no-cache", action="store_true",
                     help="run every stage afresh instead of taking unchanged ones from <output>/cache")
    run.add_argument("--resume", metavar="RUN_ID", help="continue that run (after a crash or kill) in its "
                     "folder, with its saved config and MLflow run: finished stages come from the cache, "
                     "training from its last checkpoint")
    _beam_args(run)
    _config_args(run)

    stage = sub.add_parser("stage", help="run one stage alone, without KFP",
                           description="Run one stage's plain function on this machine.")
    stage.add_argument("name", choices=["augment"], help="the stage to run")
    stage.add_argument("--data", metavar="PATH", required=True,
                       help="image folder (sub-folder = class) or CSV manifest of path,label rows")
    stage.add_argument("--output", metavar="DIR", required=True, help="where the stage writes its outputs")
    stage.add_argument("--include-classes", metavar="A,B", help="only these classes")
    stage.add_argument("--exclude-classes", metavar="A,B", help="leave these classes out")
    _beam_args(stage)
    _config_args(stage)

    pred = sub.add_parser("predict", help="classify image files with a serving model",
                          description="Print one line per image: path<TAB>label<TAB>probability.")
    pred.add_argument("--model", required=True, metavar="DIR",
                      help="a serving SavedModel, e.g. kflift-output/runs/<run id>/serving")
    pred.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, BMP, GIF)")

    comp = sub.add_parser("compile", help="write the KFP pipeline YAML for a cluster",
                          description="Compile the pipeline to KFP IR YAML (images and GPU requests from config).")
    comp.add_argument("-o", "--output", default="pipeline.yaml", metavar="FILE", help="YAML path")
    _config_args(comp)

    sm = sub.add_parser("submit", help="compile and submit to a Kubeflow Pipelines backend",
                        description="Compile with the config and create a run with kfp.Client; prints its URL.")
    sm.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint, e.g. http://localhost:8080")
    sm.add_argument("--data-dir", required=True, metavar="PATH",
                    help="the image folder as the cluster's pods see it (PVC mount or object store path)")
    sm.add_argument("--source-dir", default="", metavar="PATH", help="transfer source folder (default: --data-dir)")
    sm.add_argument("--experiment", default="kflift", help="KFP experiment name (default kflift)")
    sm.add_argument("--namespace", help="Kubernetes namespace (multi-user deployments)")
    sm.add_argument("--token", help="bearer token for the KFP API")
    sm.add_argument("--tracking-uri", default="", metavar="URI",
                    help="MLflow tracking URI reachable from the pods, e.g. http://kflift-mlflow.kflift:5000")
    _config_args(sm)

    ui = sub.add_parser("ui", help="start the MLflow UI on the run store (loopback)",
                        description="Serve the MLflow UI for the local store and print its URL.")
    ui.add_argument("--output", metavar="DIR", default="kflift-output", help="the run output folder")
    ui.add_argument("--tracking-uri", metavar="URI", help="store to show (default: the output's SQLite store)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kflift: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from kflift.components.data import DataError
    from kflift.components.tracking import TrackingError
    from kflift.pipeline.local_run import StageFailed, run_local

    overrides = list(args.overrides)
    if args.resume and (args.config or overrides or args.data or args.tracking_uri or args.beam_options
                        or args.no_cache):
        raise ConfigError("--resume runs the saved config of that run: give only --output with it")
    for key, value in (("data", args.data), ("output", args.output), ("tracking_uri", args.tracking_uri)):
        if value:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    cfg.augment.beam_options += args.beam_options
    try:
        summary = run_local(cfg, runner=args.runner, cache=not args.no_cache, resume=args.resume)
    except (DataError, TrackingError, StageFailed, NotImplementedError) as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    best = summary["candidates"].get(summary["winner"] or "", {})
    print(f"\nwinner: {summary['winner']} ({', '.join(f'{k}={v:.3f}' for k, v in best.items())})")
    if summary["cached"]:
        print(f"cached stages: {', '.join(summary['cached'])}")
    print(f"summary: {summary['path']}")
    if summary["serving"]:
        print(f"serving model: {summary['serving']}  (kflift predict --model {summary['serving']} IMAGE...)")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"MLflow: kflift ui --output {Path(cfg.output)}  (or `make ui`), then open http://127.0.0.1:5000")
    else:
        print(f"MLflow: {summary['tracking_uri']}")
    return 0


def _stage(args) -> int:
    import json

    from kflift.components.augment import augment
    from kflift.components.data import DataError

    cfg = load_config(args.config, args.overrides)
    cfg.augment.beam_options += args.beam_options

    def classes(text):
        return [c.strip() for c in text.split(",") if c.strip()] if text else None

    try:
        result = augment(args.data, args.output, include_classes=classes(args.include_classes),
                         exclude_classes=classes(args.exclude_classes), **cfg.augment.stage_kwargs())
    except DataError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    stats = result["meta"]["stats"]
    print(json.dumps({k: stats[k] for k in ("read", "quarantined", "duplicates", "converted")}
                     | {"written": stats["written"]["by_split"], "images_per_second": stats["images_per_second"]}))
    print(f"augment output: {args.output} (stats.json, quarantine.jsonl, preview.png, TFRecords, transform_fn)")
    return 0


def _predict(args) -> int:
    from kflift.components.serve import predict_files

    if not Path(args.model, "saved_model.pb").is_file():
        print(f"kflift: {args.model} is not a serving model (no saved_model.pb)", file=sys.stderr)
        return 1
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"kflift: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    for path, label, prob in predict_files(args.model, args.images):
        print(f"{path}\t{label}\t{prob:.4f}")
    return 0


def _submit(args) -> int:
    from kflift.pipeline.submit import SubmitError, submit

    cfg = load_config(args.config, args.overrides)
    try:
        run_id, url = submit(cfg, args.host, args.data_dir, args.source_dir, args.experiment, args.namespace,
                             args.token, args.tracking_uri)
    except SubmitError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    print(f"run id: {run_id}\nrun: {url}")
    return 0


def _compile(args) -> int:
    from kfp import compiler

    from kflift.pipeline.pipeline import make_pipeline

    cfg = load_config(args.config, args.overrides)
    compiler.Compiler().compile(make_pipeline(cfg), args.output)
    print(f"pipeline written: {args.output}")
    return 0


def _ui(args) -> int:
    import os

    from kflift.components.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.output)
    print(f"MLflow UI: http://127.0.0.1:{args.port}  (store {uri}; Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    # Become the MLflow server, so Ctrl-C or a stop signal reaches it directly (no orphan left).
    os.execv(sys.executable, cmd)


COMMANDS = {"run": _run, "stage": _stage, "predict": _predict, "compile": _compile, "submit": _submit,
            "ui": _ui}

if __name__ == "__main__":
    sys.exit(main())
