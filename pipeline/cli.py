"""kflift command line: run | stage | predict | serve | compile | submit | ui | server | images | runs | show."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config


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
                     help="subprocess: every stage in this environment (default); docker: every stage in "
                          "its image (config images.cpu/images.gpu, made by `kflift images build`)")
    run.add_argument("--no-cache", action="store_true",
                     help="run every stage afresh instead of taking unchanged ones from <output>/cache")
    run.add_argument("--resume", metavar="RUN_ID", help="continue that run (after a crash or kill) in its "
                     "folder, with its saved config and MLflow run: finished stages come from the cache, "
                     "training from its last checkpoint")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also stream every stage's output (kfp.local's executor logs, TensorFlow, Beam) to the "
                          "console; by default it goes to runs/<run id>/run.log only")
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

    pred = sub.add_parser("predict", help="classify image files with a serving model", description=(
        "Print one line per image, in order: path<TAB>label<TAB>probability, or path<TAB>error<TAB>reason for a "
        "file that cannot be classified (missing, a directory, not an image, corrupt or truncated); the others "
        "are still classified, and the exit code is 1 if any failed. Files are read and scored in batches, so "
        "any number of paths takes the same memory."))
    pred.add_argument("--model", required=True, metavar="DIR",
                      help="a serving SavedModel, e.g. kflift-output/runs/<run id>/serving")
    pred.add_argument("images", nargs="+", metavar="IMAGE",
                      help="image files (JPEG, PNG, GIF, BMP, WebP; other formats Pillow reads are converted as "
                           "in training); - reads more paths from stdin, one per line")
    pred.add_argument("--output", choices=["text", "json"], default="text",
                      help="text: tab-separated lines (default); json: JSON Lines, one object per image, "
                           '{"path", "label", "probability", "probabilities": {class: p}} or {"path", "error"}')
    pred.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per batch (default 256)")

    serve = sub.add_parser("serve", help="serve the champion model over HTTP on loopback (MLflow scoring server)",
                           description=(
        "Run `mlflow models serve --env-manager local` for a registered model on 127.0.0.1: POST /invocations "
        'with {"dataframe_split": {"columns": ["image"], "data": [["<base64 image>"], ...]}} answers one '
        "prediction per image (label, probability, probability_<class>, error); GET /ping is its health check."))
    serve.add_argument("--model", metavar="URI", help="MLflow model URI (default: the champion, "
                       "models:/kflift-classifier@champion)")
    serve.add_argument("--output", metavar="DIR", default="kflift-output", help="the run output folder")
    serve.add_argument("--tracking-uri", metavar="URI", help="store holding the model registry "
                       "(default: the output's SQLite store)")
    serve.add_argument("--port", type=int, default=5001, help="port on 127.0.0.1 (default 5001; kflift ui "
                       "takes 5000)")

    comp = sub.add_parser("compile", help="write the KFP pipeline YAML for a cluster",
                          description="Compile the pipeline to KFP IR YAML (images and GPU requests from config).")
    comp.add_argument("-o", "--output", default="pipeline.yaml", metavar="FILE", help="YAML path")
    _config_args(comp)

    sm = sub.add_parser("submit", help="compile and submit to a Kubeflow Pipelines backend",
                        description="Compile with the config and create a run with kfp.Client; prints its URL.")
    sm.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint, e.g. http://localhost:8080")
    sm.add_argument("--data-dir", required=True, metavar="PATH",
                    help="the image folder as the pods see it: under cluster.data_mount (default /data), "
                         "where the claim cluster.data_pvc is mounted")
    sm.add_argument("--source-dir", default="", metavar="PATH", help="transfer source folder (default: --data-dir)")
    sm.add_argument("--experiment", default="kflift", help="KFP experiment name (default kflift)")
    sm.add_argument("--namespace", help="Kubernetes namespace (multi-user deployments)")
    sm.add_argument("--token", help="bearer token for the KFP API")
    sm.add_argument("--tracking-uri", default="", metavar="URI",
                    help="MLflow server reachable from the pods (http/https; default: config "
                         "cluster.tracking_uri, the in-cluster http://kflift-mlflow.kflift:5000)")
    _config_args(sm)

    ui = sub.add_parser("ui", help="start the MLflow UI on the run store (loopback)",
                        description="Serve the MLflow UI for the local store and print its URL.")
    ui.add_argument("--output", metavar="DIR", default="kflift-output", help="the run output folder")
    ui.add_argument("--tracking-uri", metavar="URI", help="store to show (default: the output's SQLite store)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")

    for name, text in (("runs", "list the pipeline runs in the store: id, start, status, winner, its score"),
                       ("show", "one run's comparison table, stages and artifact locations")):
        store = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "show":
            store.add_argument("run_id", metavar="RUN_ID", help="kflift run id (or the KFP run id of a cluster run)")
        else:
            store.add_argument("--limit", type=int, default=20, help="newest N runs (default 20)")
        store.add_argument("--output", metavar="DIR", default="kflift-output", help="the run output folder")
        store.add_argument("--tracking-uri", metavar="URI", help="store to read (default: the output's SQLite store)")
        store.add_argument("--experiment", default="kflift", help="MLflow experiment (default kflift)")

    srv = sub.add_parser("server", help="start the MLflow tracking server with a PostgreSQL store (loopback)",
                         description="Serve MLflow (runs in PostgreSQL, artifacts proxied by the server) and "
                                     "print the URI for `kflift run --tracking-uri`. Without --backend-store-uri "
                                     "a local PostgreSQL cluster under the output folder is created once, started "
                                     "with the server and stopped with it (Ctrl-C or SIGTERM).")
    srv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    srv.add_argument("--backend-store-uri", metavar="URI",
                     help="an existing PostgreSQL database, postgresql://USER[:PASSWORD]@HOST:PORT/DB "
                          "(default: the local cluster in OUTPUT/postgres)")
    srv.add_argument("--artifacts-destination", metavar="DIR",
                     help="where the server stores artifacts (default: OUTPUT/mlartifacts)")
    srv.add_argument("--output", metavar="DIR", default="kflift-output",
                     help="folder for the local cluster and artifacts (default ./kflift-output)")
    srv.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")

    images = sub.add_parser("images", help="build and push the stage images with a Docker engine",
                            description="The stage images, named by config images.cpu / images.gpu.")
    isub = images.add_subparsers(dest="images_command", required=True)
    ib = isub.add_parser("build", help="build the images (and push them)", description=(
        "Build containers/Dockerfile with the Docker engine (DOCKER_HOST or the local socket) and tag each "
        "image twice: as config images.cpu / images.gpu name it (default kflift-cpu:0.1.0) and by its content "
        "hash (kflift-cpu:<hash>). compile, submit and run --runner docker use the last build's content tags "
        "unless config names the images. An image whose sources, wheels and build arguments are unchanged is kept."))
    ib.add_argument("--flavor", choices=["cpu", "gpu", "all"], default="all",
                    help="cpu: augment/build/evaluate; gpu: train/finetune (default: all)")
    ib.add_argument("--tag", metavar="T", help="replace the tag part of the configured names, e.g. --tag dev "
                    "gives kflift-cpu:dev (then run/compile with --set images.cpu=kflift-cpu:dev ...); "
                    "for another repository set the whole name: --set images.cpu=NAME:TAG")
    ib.add_argument("--base-image", metavar="IMG", help="base image (default: python:3.11-slim for cpu, "
                    "tensorflow/tensorflow:2.21.0-gpu for gpu); it must hold Python 3.11")
    ib.add_argument("--wheelhouse", metavar="DIR", help="install from these wheels only, no network in the "
                    "build (make it with `kflift images wheelhouse DIR`)")
    ib.add_argument("--push", metavar="REGISTRY", help="also tag as REGISTRY/NAME:TAG and push there")
    ib.add_argument("--context", metavar="DIR", help="the kflift source checkout (default: the one this "
                    "kflift runs from, else the current folder)")
    ib.add_argument("--force", action="store_true", help="rebuild even when the image is up to date")
    _config_args(ib)
    it = isub.add_parser("tags", help="print the last build's content-tagged images, one per line",
                         description="The images `kflift images build` made last (under --set output=DIR), "
                                     "by content tag: what to load into a kind cluster or push.")
    _config_args(it)
    iw = isub.add_parser("wheelhouse", help="download/build wheels for an offline image build",
                         description="pip wheel kflift and every pinned dependency into DIR.")
    iw.add_argument("dir", metavar="DIR", help="where the wheels go (reused wheels stay)")
    iw.add_argument("--context", metavar="DIR", help="the kflift source checkout")
    iw.add_argument("--force", action="store_true", help="remake it even when constraints.txt and "
                    "pyproject.toml are unchanged since it was made")
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
    from ..components.sources import DataError
    from ..components.tracking import TrackingError
    from .console import RunConsole
    from .images import ImageError
    from .local_run import StageFailed, run_local

    overrides = list(args.overrides)
    if args.resume and (args.config or overrides or args.data or args.tracking_uri or args.beam_options
                        or args.no_cache):
        raise ConfigError("--resume runs the saved config of that run: give only --output with it")
    for key, value in (("data", args.data), ("output", args.output), ("tracking_uri", args.tracking_uri)):
        if value:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    cfg.augment.beam_options += args.beam_options
    console = RunConsole(verbose=args.verbose)
    try:
        summary = run_local(cfg, runner=args.runner, cache=not args.no_cache, resume=args.resume, console=console)
    except (DataError, TrackingError, StageFailed, ImageError) as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    console.report(summary, Path(cfg.output))
    return 0


def _stage(args) -> int:
    import json

    from ..components.augment import augment
    from ..components.sources import DataError

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
    import json

    from ..components.serve import predict_files
    from .config import AugmentConfig

    if not Path(args.model, "saved_model.pb").is_file():
        print(f"kflift: {args.model} is not a serving model (no saved_model.pb)", file=sys.stderr)
        return 1
    if args.batch_size < 1:
        print("kflift: --batch-size must be at least 1", file=sys.stderr)
        return 2

    def paths():  # lazily: argv, and stdin in place of each "-"
        for arg in args.images:
            if arg == "-":
                yield from (line.rstrip("\n") for line in sys.stdin if line.strip())
            else:
                yield arg

    results = predict_files(args.model, paths(), batch_size=args.batch_size,
                            max_pixels=AugmentConfig().max_pixels)  # the limit training applied
    total = failed = 0
    for path, s in results:
        total += 1
        failed += bool(s.error)
        if args.output == "json":
            record = {"path": path, "error": s.error} if s.error else {
                "path": path, "label": s.label, "probability": s.probability,
                "probabilities": dict(zip(s.classes, s.probabilities)) if s.classes else list(s.probabilities)}
            print(json.dumps(record))
        elif s.error:
            print(f"{path}\terror\t{' '.join(s.error.split())}")
        else:
            print(f"{path}\t{s.label}\t{s.probability:.4f}")
    if failed:
        print(f"kflift: {failed} of {total} image(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


def _serve(args) -> int:
    import os

    from ..components.tracking import TrackingError, default_tracking_uri, resolve_model
    from .config import EvaluateConfig

    uri = args.tracking_uri or default_tracking_uri(args.output)
    model = args.model or f"models:/{EvaluateConfig().registry_name}@champion"
    try:
        what = resolve_model(uri, model)
    except TrackingError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    print(f"Scoring server: http://127.0.0.1:{args.port}/invocations  ({what}, store {uri}; Ctrl-C to stop)",
          flush=True)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "--model-uri", model, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(args.port)]
    # MLflow starts `uvicorn` by name: this environment's bin/ goes first on PATH, even when kflift
    # was called by its path without the environment activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # Become the scoring server, so Ctrl-C or a stop signal reaches it directly (no orphan left).
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path})


def _submit(args) -> int:
    from .submit import SubmitError, submit

    # --data-dir is the user's own data: the demo's digits source does not apply (config.NO_SOURCE_NOTE).
    cfg = load_config(args.config, [f"data={args.data_dir}", *args.overrides])
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

    from .pipeline import make_pipeline

    cfg = load_config(args.config, args.overrides)
    compiler.Compiler().compile(make_pipeline(cfg), args.output)
    print(f"pipeline written: {args.output}")
    return 0


def _ui(args) -> int:
    import os

    from ..components.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.output)
    print(f"MLflow UI: http://127.0.0.1:{args.port}  (store {uri}; Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    # Become the MLflow server, so Ctrl-C or a stop signal reaches it directly (no orphan left).
    os.execv(sys.executable, cmd)


def _server(args) -> int:
    from .server import ServerError, serve

    try:
        return serve(args.output, args.host, args.port, args.backend_store_uri, args.artifacts_destination,
                     args.workers)
    except ServerError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1


def _images(args) -> int:
    from . import images

    try:
        if args.images_command == "wheelhouse":
            images.make_wheelhouse(args.dir, args.context, args.force)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.images_command == "tags":
            print("\n".join(images.last_build(cfg).values()))
            return 0
        flavors = ["cpu", "gpu"] if args.flavor == "all" else [args.flavor]
        built = images.build(cfg, flavors, tag=args.tag, base_image=args.base_image, wheelhouse=args.wheelhouse,
                             push=args.push, context=args.context, force=args.force)
    except images.ImageError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    for flavor, names in built.items():
        print(f"{flavor}: {names['name']}\n{flavor}: {names['content']}  (by content)")
    if any(getattr(cfg.images, f) for f in built):
        print("config images.* names the images: compile, run and submit use those names")
    else:
        sets = " ".join(f"--set images.{f}={n['name']}" for f, n in built.items())
        print(f"compile, run and submit now use the content tags; to pin the names instead: {sets}")
    return 0


def _store(args) -> str:
    from ..components.tracking import default_tracking_uri

    return args.tracking_uri or default_tracking_uri(args.output)


def _runs(args) -> int:
    from ..components.tracking import pipeline_runs

    rows = pipeline_runs(_store(args), args.experiment, args.limit)
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment} of {_store(args)}")
        return 0
    print(f"{'run id':<24} {'started':<16} {'status':<9} {'winner':<15} score")
    for r in rows:
        score = f"{r['metric']} {r['score']:.3f}" if r["score"] is not None else ""
        print(f"{r['run_id']:<24} {r['started']:<16} {r['status']:<9} {r['winner'] or '-':<15} {score}")
    return 0


def _show(args) -> int:
    from ..components.tracking import TrackingError, find_pipeline_run

    try:
        run = find_pipeline_run(_store(args), args.experiment, args.run_id)
    except TrackingError as exc:
        print(f"kflift: {exc}", file=sys.stderr)
        return 1
    print(f"run {run['run_id']}  started {run['started']}  {run['status']}  (MLflow run {run['mlflow_run_id']})")
    print("stages: " + ", ".join(f"{name} {stage['status'].lower()}" for name, stage in run["stages"].items()))
    print(f"\n{run['comparison'] or '(no evaluation yet)'}")
    for name, uri in run["artifacts"].items():
        print(f"{name + ':':<15} {uri}")
    summary = Path(args.output) / "runs" / run["run_id"] / "summary.json"
    if summary.is_file():
        print(f"{'summary:':<15} {summary}")
    return 0


COMMANDS = {"run": _run, "stage": _stage, "predict": _predict, "compile": _compile, "submit": _submit,
            "ui": _ui, "server": _server, "serve": _serve, "images": _images, "runs": _runs, "show": _show}

if __name__ == "__main__":
    sys.exit(main())
