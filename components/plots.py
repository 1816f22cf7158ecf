"""Plots people would rather look at than read: learning curves, confusion matrices, lifts."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display in containers or CI
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(history: list[dict], path: str | Path, title: str) -> Path:
    keys = sorted({k for epoch in history for k in epoch})
    pairs = [k for k in ("loss", "accuracy") if k in keys]
    fig, axes = plt.subplots(1, len(pairs) or 1, figsize=(5 * max(1, len(pairs)), 3.5), squeeze=False)
    for ax, key in zip(axes[0], pairs):
        for name in (key, f"val_{key}"):
            if name in keys:
                ax.plot(range(1, len(history) + 1), [e.get(name) for e in history], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix(matrix, labels: list[str], path: str | Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(1, int(matrix.max()))
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > top / 2 else "black")
    ax.set_title(title)
    return _save(fig, path)


def roc_curves(curves: dict, path: str | Path, positive: str) -> Path:
    """ROC curve of each candidate on a binary task: {name: (true labels, P(positive))}."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive})")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("ROC, test split")
    return _save(fig, path)


def lift_chart(lifts: dict[str, tuple[float, float, float]], metric: str, path: str | Path, baseline: str,
               baseline_score: float) -> Path:
    """Each candidate's lift over the baseline with its 95% interval: a difference of 0.016 between
    0.979 and 0.995 shows, where absolute bars from 0 look alike. Green: the interval is above 0."""
    names = list(lifts)
    lift = np.array([lifts[n][0] for n in names])
    low, high = lift - np.array([lifts[n][1] for n in names]), np.array([lifts[n][2] for n in names]) - lift
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.55 * len(names)))
    colors = ["#2a9d55" if lifts[n][1] > 0 else "#d1495b" if lifts[n][2] < 0 else "#8d99ae" for n in names]
    ax.barh(names, lift, color=colors, xerr=[low, high], capsize=4, ecolor="#333333")
    ax.axvline(0, color="#333333", linewidth=1)
    for y, (name, value) in enumerate(zip(names, lift)):
        ax.annotate(f"{value:+.3f} [{lifts[name][1]:+.3f}, {lifts[name][2]:+.3f}]", (lifts[name][2], y),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.45)
    ax.set_xlabel(f"lift in test {metric} over {baseline} ({baseline_score:.3f}), 95% interval")
    ax.set_title(f"what each candidate adds to {baseline}")
    return _save(fig, path)


def error_gallery(images: list, titles: list[str], path: str | Path, columns: int = 6) -> Path:
    """Images with a caption each (e.g. the test images the champion gets wrong)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
    if not images:
        axes[0][0].text(0, 0.5, "no errors on the test split", fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def image_grid(rows: list[list], path: str | Path, columns: list[str], row_labels: list[str]) -> Path:
    """Images (PIL or arrays) in a labelled grid, e.g. originals beside augmented copies."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns), 1.6 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    return _save(fig, path)
