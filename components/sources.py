"""Where images come from: an image folder (one sub-folder per class), a CSV manifest, the digits demo."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the path and the problem."""


def is_uri(path: str | Path) -> bool:
    """A URI of a filesystem Beam knows (s3://, gs://, hdfs://), as opposed to a local path."""
    return "://" in str(path)


def filesystems():
    """Beam's FileSystems, ready outside a pipeline too (its S3 client wants options to exist; with
    none set it takes boto3's defaults: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... from the environment)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    if FileSystems._pipeline_options is None:
        FileSystems.set_options(PipelineOptions([]))
    return FileSystems


def files_under(uri: str) -> list:
    """Every file under a URI, in any sub-folder (Beam's FileMetadata: path, size, update time)."""
    return filesystems().match([uri.rstrip("/") + "/**"])[0].metadata_list


def store_uri(uri: str) -> str:
    """A KFP artifact URI as Beam's filesystems name it: KFP's `minio://bucket/key` is an S3 bucket on
    KFP's MinIO (Beam's S3 client reaches it through AWS_ENDPOINT_URL); s3:// and gs:// stay as they are."""
    return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, from a local path or a URI (through Beam's FileSystems: its S3, GCS or
    HDFS client, credentials from the environment). Raises OSError when it cannot be read."""
    if not is_uri(path):  # open(), not Path: pathlib interns every part of every path it parses, for good
        with open(path, "rb") as f:
            return f.read()
    if str(path).startswith("s3://"):
        with _s3io().open(str(path)) as f:
            return f.read()
    from apache_beam.io.filesystem import CompressionTypes

    with filesystems().open(str(path), compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


@functools.cache
def _s3io():
    """One Beam S3IO (one boto3 client) per process. Beam's S3 filesystem makes a new client for every
    call, tens of milliseconds each: reading 10,000 small images that way ran at 7 images/s."""
    from apache_beam.io.aws.s3io import S3IO

    return S3IO(options=filesystems()._pipeline_options)


def list_uri_folder(root: str) -> dict[str, list[str]]:
    """An image folder at a URI: {class: [file URI, ...]}, one level of class "folders" (prefixes)."""
    base = root.rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    try:
        matched = filesystems().match([base + "*/*"])[0].metadata_list
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own kind
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot list {root}: {type(exc).__name__}: {first_line}") from None
    for meta in matched:
        cls, _, name = meta.path[len(base):].partition("/")
        if name and "/" not in name and not cls.startswith(".") and not name.startswith("."):
            found.setdefault(cls, []).append(meta.path)
    return {c: sorted(files) for c, files in found.items()}


def list_images(
    source: str | Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, list]:
    """Map each class to its files, sorted, after include/exclude filters.

    `source` is an image folder (one sub-folder per class; a local path or a URI such as
    s3://bucket/images, whose files come back as URIs) or a CSV manifest of `path,label` rows
    (paths relative to the CSV). Every entry is listed, unreadable ones too: the augment
    stage quarantines them with their reason rather than dropping them.
    """
    if is_uri(source):
        found, root = list_uri_folder(str(source)), str(source)
        if not found:
            raise DataError(f"data folder not found (or empty): {root}")
        return _filtered(found, root, include, exclude)
    root = Path(source)
    if root.is_file() and root.suffix.lower() == ".csv":
        found = _read_manifest(root)
    elif root.is_dir():
        found = {p.name: sorted(f for f in p.iterdir() if not f.is_dir() and not f.name.startswith("."))
                 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    else:
        raise DataError(f"data folder not found: {root}")
    return _filtered(found, root, include, exclude)


def _filtered(found: dict[str, list], root, include: list[str] | None, exclude: list[str] | None) -> dict[str, list]:
    """The classes kept by the include/exclude filters, each checked for files; at least two."""
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
