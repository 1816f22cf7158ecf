"""Plots people would rather look at than read: learning curves, confusion matrices, lifts."""
from __future__ import annotations

from pathlib import Path

import matplotlib

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


def comparison_bars(scores: dict[str, float], metric: str, path: str | Path, baseline: str) -> Path:
    names = list(scores)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(names), 3.5))
    bars = ax.bar(names, [scores[n] for n in names],
                  color=["#999999" if n == baseline else "#2b7bb9" for n in names])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"test {metric} by candidate (grey: baseline)")
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
