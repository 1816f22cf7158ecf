"""Where images come from: an image folder (one sub-folder per class), a CSV manifest, the digits demo."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the path and the problem."""


def list_images(
    source: str | Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, list[Path]]:
    """Map each class to its files, sorted, after include/exclude filters.

    `source` is an image folder (one sub-folder per class) or a CSV manifest of `path,label`
    rows (paths relative to the CSV). Every entry is listed, unreadable ones too: the augment
    stage quarantines them with their reason rather than dropping them.
    """
    root = Path(source)
    if root.is_file() and root.suffix.lower() == ".csv":
        found = _read_manifest(root)
    elif root.is_dir():
        found = {p.name: sorted(f for f in p.iterdir() if not f.is_dir() and not f.name.startswith("."))
                 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    else:
        raise DataError(f"data folder not found: {root}")
    classes = sorted(found)
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder per class)")
    for name, wanted in (("include", include), ("exclude", exclude)):
        missing = sorted(set(wanted or []) - set(classes))
        if missing:
            raise DataError(f"{root}: {name}d classes {missing} are not sub-folders (found {classes})")
    keep = [c for c in classes if (not include or c in include) and c not in set(exclude or [])]
    folder = {c: found[c] for c in keep}
    empty = [c for c, files in folder.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) {empty} hold no files")
    if len(folder) < 2:
        raise DataError(f"{root}: needs at least 2 classes, found {len(folder)} ({keep})")
    return folder


def _read_manifest(path: Path) -> dict[str, list[Path]]:
    import csv

    found: dict[str, list[Path]] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (line == 1 and [c.strip() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{line}: expected 'path,label', got {row}")
            file = Path(row[0].strip())
            found.setdefault(row[1].strip(), []).append(file if file.is_absolute() else path.parent / file)
    return {label: sorted(files) for label, files in found.items()}


def write_digits_folder(target: str | Path) -> Path:
    """scikit-learn's 8x8 digits as a real PNG image folder, written once (atomically)."""
    target = Path(target)
    if (target / ".complete").exists():
        return target
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".digits-"))
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        (tmp / str(label)).mkdir(exist_ok=True)
        img = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(tmp / str(label) / f"{i:04d}.png")
    (tmp / ".complete").write_text("")
    import shutil

    try:
        os.rename(tmp, target)
    except OSError:  # a concurrent run published it first: keep theirs (a reader may be using it)
        shutil.rmtree(tmp)
        if not (target / ".complete").exists():
            raise
    return target
