"""evaluate: held-out metrics of every candidate, side by side, a quality gate, and the winner."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from . import plots
from .files import load_model, publish_dir, staging_dir, write_json
from .records import load_split, read_meta, split_files
from .serve import export_serving, save_mlflow_model
from .results import StageResult


def predict(model_dir: str, dataset_dir: str, split: str = "test", batch_size: int = 256, tta: bool = False):
    """Class probabilities (n, classes) and true labels of a split; with `tta` each image's
    probabilities are the mean over it and its mirror image."""
    import tensorflow as tf

    model = load_model(model_dir)
    probs, labels = [], []
    for images, y in load_split(dataset_dir, split, batch_size):
        p = model.predict_on_batch(images)
        probs.append((p + model.predict_on_batch(tf.image.flip_left_right(images))) / 2 if tta else p)
        labels.append(y.numpy())
    p = np.concatenate(probs)
    if p.shape[1] == 1:  # one sigmoid unit: P(class 1)
        p = np.concatenate([1 - p, p], axis=1)
    return p, np.concatenate(labels)


SCORERS = {"accuracy": skm.accuracy_score, "precision": skm.precision_score, "recall": skm.recall_score,
           "f1": skm.f1_score}


def score(metric: str, labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """One metric of predicted classes: binary for two classes, macro-averaged for more."""
    options = {} if metric == "accuracy" else {"average": "binary" if num_classes == 2 else "macro",
                                               "zero_division": 0}
    return float(SCORERS[metric](labels, pred, **options))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    pred = probs.argmax(axis=1)
    out = {metric: score(metric, labels, pred, probs.shape[1]) for metric in SCORERS}
    if probs.shape[1] == 2 and len(set(labels)) == 2:
        out["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
    return {k: float(v) for k, v in out.items()}


def evaluate(dataset_dir: str, candidates: dict[str, str], output_dir: str, *, metric: str, min_metric: float,
             registry_name: str, tta: bool, baseline: str = "baseline", export: bool = True) -> StageResult:
    """Score each candidate model on the test split; the best that passes the gate wins.
    Settings from config (`EvaluateConfig.stage_kwargs`); lifts are measured against `baseline`.
    `tta`: every candidate, and the champion's serving model, predict on each image and its mirror."""
    meta = read_meta(dataset_dir)
    labels = meta["labels"]
    work = staging_dir(output_dir)
    scores, matrices, per_class, binary_probs, preds, probs_of = {}, {}, {}, {}, {}, {}
    for name, model_dir in candidates.items():
        probs, y = probs_of[name] = predict(model_dir, dataset_dir, tta=tta)
        pred = preds[name] = probs.argmax(axis=1)
        scores[name] = classification_metrics(probs, y)
        by_class = skm.classification_report(y, pred, labels=range(len(labels)), output_dict=True, zero_division=0)
        per_class[name] = {labels[int(k)]: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                           for k, v in by_class.items() if k.isdigit()}
        if len(labels) == 2:
            binary_probs[name] = (y, probs[:, 1])
        matrices[name] = skm.confusion_matrix(y, pred, labels=range(len(labels)))
        plots.confusion_matrix(matrices[name], labels, work / f"confusion_{name}.png", f"{name}: test split")
    base_score = scores.get(baseline, {}).get(metric)
    gate = {}
    for name, s in scores.items():
        reasons = []
        if s[metric] < min_metric:
            reasons.append(f"{metric} {s[metric]:.3f} < minimum {min_metric:.3f}")
        if name != baseline and base_score is not None and s[metric] <= base_score:
            reasons.append(f"does not beat the baseline ({s[metric]:.3f} <= {base_score:.3f})")
        gate[name] = {"passed": not reasons, "reasons": reasons}
    passing = [n for n in scores if gate[n]["passed"]]
    winner = max(passing, key=lambda n: scores[n][metric]) if passing else None
    if winner:
        shutil.copytree(candidates[winner], work / "champion")
        if export:  # raw image bytes in, probabilities out: the transform graph travels with the model
            export_serving(str(work / "champion"), str(Path(dataset_dir) / "transform_fn"), str(work / "serving"),
                           labels, tta)
            # ... and as an MLflow pyfunc model around it: what the registry's champion is
            save_mlflow_model(work / "serving", work / "mlflow_model", labels)
    if binary_probs:
        plots.roc_curves(binary_probs, work / "roc.png", positive=labels[1])
    intervals = {name: lift_interval(metric, y, preds[name], preds[baseline], len(labels))
                 for name in scores if baseline in scores and name != baseline}
    if intervals:
        plots.lift_chart({n: (scores[n][metric] - base_score, *intervals[n]) for n in intervals}, metric,
                         work / "comparison.png", baseline, base_score)
    if winner:
        error_gallery(dataset_dir, preds[winner], probs_of[winner][0], labels, work / "errors.png")
    table = comparison_table(scores, gate, metric, baseline, winner, intervals)
    (work / "comparison.md").write_text(table)
    report = {"candidates": scores, "per_class": per_class, "gate": gate, "winner": winner, "metric": metric,
              "labels": labels, "lift_interval_95": intervals,
              "confusion_matrices": {n: m.tolist() for n, m in matrices.items()},
              "test_images": int(sum(matrices[next(iter(matrices))].sum(axis=1))),
              # Per image, by content key: runs (other seeds) can be compared image by image.
              "test_predictions": {"keys": split_keys(dataset_dir, "test"), "labels": y.tolist(),
                                   "predicted": {n: p.tolist() for n, p in preds.items()}}}
    write_json(work / "report.json", report)
    publish_dir(work, Path(output_dir))
    out = Path(output_dir)
    return {
        "params": {"metric": metric, "min_metric": min_metric, "baseline": baseline, "tta": tta,
                   "candidates": list(candidates), "winner": winner or "none"},
        "metrics": {f"{n}.{k}": v for n, s in scores.items() for k, v in s.items()},
        "artifacts": [("evaluation", out)],
        # The tracking layer registers this MLflow model in the Model Registry with alias `champion`.
        "register": {"name": registry_name, "artifact_path": "evaluation/mlflow_model",
                     "candidate": winner} if winner and export else None,
        "report": report,
    }


def split_keys(dataset_dir: str, split: str) -> list[str]:
    """The records' keys (content hash, -augN for copies) in the order `load_split` reads them."""
    import tensorflow as tf

    files = split_files(dataset_dir, split)
    key = {"key": tf.io.FixedLenFeature([], tf.string)}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").map(lambda r: tf.io.parse_single_example(r, key))
    return [k["key"].decode() for k in ds.as_numpy_iterator()]


def error_gallery(dataset_dir: str, pred: np.ndarray, probs: np.ndarray, labels: list[str], path: Path,
                  most: int = 24) -> list[str]:
    """A PNG of the first `most` test images a model gets wrong; returns their captions,
    true -> predicted (probability)."""
    shown, titles, start = [], [], 0
    for batch, y in load_split(dataset_dir, "test", 256):  # keeps only the images it shows
        for i in np.flatnonzero(pred[start:start + len(y)] != y.numpy())[:most - len(shown)]:
            truth, guess = int(y[i]), int(pred[start + i])
            shown.append(_displayable(batch[i].numpy()))
            titles.append(f"{labels[truth]} -> {labels[guess]} ({probs[start + i, guess]:.2f})")
        start += len(y)
    plots.error_gallery(shown, titles, path)
    return titles


def _displayable(image: np.ndarray) -> np.ndarray:
    """A normalized image (tf.Transform's per-channel z-scores) stretched back to [0, 1] to look at."""
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def lift_interval(metric: str, labels: np.ndarray, pred: np.ndarray, base_pred: np.ndarray, num_classes: int,
                  resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% paired bootstrap interval of metric(candidate) - metric(baseline) over resamples of the
    test images: a lift whose interval holds 0 is within what this test split can tell apart."""
    rng = np.random.default_rng(seed)
    diffs = [score(metric, labels[i], pred[i], num_classes) - score(metric, labels[i], base_pred[i], num_classes)
             for i in rng.integers(0, len(labels), (resamples, len(labels)))]
    return [float(v) for v in np.percentile(diffs, [2.5, 97.5])]


def comparison_table(scores: dict, gate: dict, metric: str, baseline: str, winner: str | None,
                     intervals: dict) -> str:
    keys = sorted({k for s in scores.values() for k in s}, key=["accuracy", "precision", "recall", "f1",
                                                                  "roc_auc"].index)
    base = scores.get(baseline, {}).get(metric)
    lines = [f"| candidate | {' | '.join(keys)} | lift vs {baseline} ({metric}) | 95% interval | gate |",
             "|---" * (len(keys) + 4) + "|"]
    for name, s in scores.items():
        lift = "" if base is None or name == baseline else f"{s[metric] - base:+.3f}"
        interval = "[{:+.3f}, {:+.3f}]".format(*intervals[name]) if name in intervals else ""
        mark = "**winner**" if name == winner else ("passed" if gate[name]["passed"] else
                                                    "failed: " + "; ".join(gate[name]["reasons"]))
        lines.append(f"| {name} | {' | '.join(f'{s[k]:.3f}' for k in keys)} | {lift} | {interval} | {mark} |")
    return "\n".join(lines) + "\n"
