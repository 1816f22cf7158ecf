"""Local step cache: each stage's outputs keyed by a fingerprint of everything that decides them.

The fingerprint is sha256 over the stage function, its arguments (input artifact paths replaced
by those artifacts' fingerprints, data folders by their content listing, output paths dropped),
and the code version (kflift's version + the source of the component modules the stage imports).
Each output artifact carries its fingerprint in its KFP metadata, so downstream keys chain without
rehashing TFRecords.

Layout of the cache folder (no MLflow here; runner.run_stage logs the hit or the new run):
  <fp>/           a finished entry: entry.json (result, producer MLflow run) + outputs/<artifact name>,
                  published with one rename, so a killed stage never leaves something that looks done
  <fp>.partial/   a training stage's per-epoch checkpoints: a rerun or resume continues from them
  <fp>.lock       flock held while a run computes the key: a concurrent run waits, then hits
Data folders are fingerprinted by (relative path, size, mtime_ns) of every listed file, like make
and rsync: it costs a stat per file on any dataset size, where content hashes would read it all.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .files import file_lock, publish_dir, write_json
from .sources import files_under, is_uri, list_images

FINGERPRINT = "kflift.fingerprint"  # key in an output artifact's KFP metadata
ENTRY_FILE = "entry.json"
PACKAGE = "kflift.components"


@dataclass
class Spec:
    """What a thin component tells the cache: its artifacts and data folders.

    `inputs` and `outputs` are KFP artifacts (or lists of them); `data` are folder arguments whose
    content decides the result; `checkpoints`: the stage takes `checkpoint_dir` and `resume`.
    """
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    data: list = field(default_factory=list)
    checkpoints: bool = False

    def input_paths(self) -> list[str]:
        return [a.path for a in _flat(self.inputs)] + [str(d) for d in self.data if d]


def _flat(artifacts) -> list:
    """The artifacts in a list of artifacts, lists and dicts of them (evaluate's candidates), Nones dropped."""
    out = []
    for a in artifacts:
        a = list(a.values()) if isinstance(a, dict) else a
        out += _flat(a) if isinstance(a, (list, tuple)) else [a] if a is not None else []
    return out


def data_fingerprint(source: str | Path) -> str:
    """The listing of an image folder or CSV manifest: relative path, size and mtime of each file."""
    if is_uri(source):  # an object store: one listing of everything under it, with sizes and update times
        listed = files_under(str(source))
        return hashlib.sha256("".join(sorted(f"{m.path}\0{m.size_in_bytes}:{m.last_updated_in_seconds}\n"
                                             for m in listed)).encode()).hexdigest()
    root = Path(source)
    base = root.parent if root.is_file() else root
    h = hashlib.sha256()
    files = [root] if root.is_file() else []
    files += [f for cls, fs in sorted(list_images(root).items()) for f in fs]
    for f in files:
        try:
            st = f.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"  # augment quarantines it; the key still changes when it appears
        h.update(f"{os.path.relpath(f, base)}\0{stamp}\n".encode())
    return h.hexdigest()


def code_version(module: str) -> str:
    """kflift's version + the source of `module` and of every kflift component module it imports."""
    from importlib.metadata import version

    h = hashlib.sha256(version("kflift").encode())
    for name, source in code_modules(module).items():
        h.update(name.encode() + b"\0" + source)
    return h.hexdigest()


def code_modules(module: str) -> dict[str, bytes]:
    """`module` and every kflift component module it imports, at any depth (lazy imports in a
    function too), with their source, in the order found."""
    found, todo = {}, [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        source = found[name] = Path(importlib.util.find_spec(name).origin).read_bytes()
        for node in ast.walk(ast.parse(source)):  # found without importing (no TensorFlow on a hit)
            if not isinstance(node, ast.ImportFrom):
                continue
            module = f"{PACKAGE}.{node.module}" if node.level == 1 and node.module else \
                PACKAGE if node.level == 1 else node.module or ""
            if module == PACKAGE:  # from . import a, b
                todo += [f"{PACKAGE}.{a.name}" for a in node.names]
            elif module.startswith(PACKAGE + "."):
                todo.append(module)
    return found


def content_fingerprint(path: str | Path) -> str:
    """An artifact without a recorded fingerprint (made outside the cache): hash its bytes."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f.relative_to(path) if f != path else "").encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def fingerprint(fn_name: str, kwargs: dict, spec: Spec) -> str:
    inputs = {a.path: a.metadata.get(FINGERPRINT) or content_fingerprint(a.path) for a in _flat(spec.inputs)}
    outputs = {a.path for a in _flat(spec.outputs)}
    data = {str(d): data_fingerprint(d) for d in spec.data if d}

    def norm(v):
        if isinstance(v, str):
            return {"input": inputs[v]} if v in inputs else "<output>" if v in outputs else \
                {"data": data[v]} if v in data else v
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    key = {"fn": fn_name, "args": norm(kwargs), "code": code_version(fn_name.split(":")[0])}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """One stage's view of the cache. `mode`: "use" (look up, store, resume checkpoints),
    "refresh" (`--no-cache`: run afresh, still store) or "" (off: a cluster run, where KFP caches)."""

    def __init__(self, cache_dir: str, mode: str, fn_name: str, kwargs: dict, spec: Spec | None):
        self.on = bool(cache_dir and mode and spec is not None)
        self.mode, self.spec = mode, spec
        if self.on:
            self.root = Path(cache_dir)
            self.root.mkdir(parents=True, exist_ok=True)
            self.key = fingerprint(fn_name, kwargs, spec)
            self.entry = self.root / self.key
            self.partial = self.root / f"{self.key}.partial"

    @contextlib.contextmanager
    def locked(self, stage: str):
        """Hold the key's lock: one run computes a key at a time (released by the OS on kill -9)."""
        if not self.on:
            yield
            return
        with file_lock(self.root / f"{self.key}.lock",
                       waiting=f"{stage}: another run is computing fingerprint {self.key[:12]}; waiting for it"):
            yield

    def lookup(self) -> dict | None:
        """The stored entry ({result, producer, stage}) when this key is done and reads are on."""
        if not self.on or self.mode != "use" or not (self.entry / ENTRY_FILE).is_file():
            return None
        return json.loads((self.entry / ENTRY_FILE).read_text())

    def restore(self) -> None:
        """Put the entry's outputs at this run's KFP output paths (hard links: no copy of the bytes)."""
        for a in _flat(self.spec.outputs):
            _link_into(self.entry / "outputs" / a.name, Path(a.path))

    def prepare(self, kwargs: dict) -> dict:
        """A training stage's checkpoints live with the key, so a rerun continues from them."""
        if not (self.on and self.spec.checkpoints):
            return kwargs
        if self.mode != "use":
            shutil.rmtree(self.partial, ignore_errors=True)
        resume = self.partial.is_dir() and any(self.partial.glob("*.keras"))
        return {**kwargs, "checkpoint_dir": str(self.partial), "resume": resume}

    def store(self, stage: str, result: dict, producer: str) -> None:
        """Publish the outputs and result under the key, in one rename."""
        if not self.on:
            return
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.key}-"))
        try:
            for a in _flat(self.spec.outputs):
                _link_into(Path(a.path), work / "outputs" / a.name)
            write_json(work / ENTRY_FILE, {"stage": stage, "producer": producer, "result": result})
            if self.mode != "use":
                shutil.rmtree(self.entry, ignore_errors=True)
            os.rename(work, self.entry)
        except OSError:
            if not (self.entry / ENTRY_FILE).is_file():
                raise
            shutil.rmtree(work, ignore_errors=True)  # another run published the same key first
        shutil.rmtree(self.partial, ignore_errors=True)

    def mark(self) -> None:
        """Record the fingerprint on the output artifacts, for the downstream keys."""
        if self.on:
            for a in _flat(self.spec.outputs):
                a.metadata[FINGERPRINT] = self.key


def _link_into(src: Path, dst: Path) -> None:
    """Copy a file or folder to `dst` atomically, hard-linking files (outputs are never edited in place)."""
    if not src.exists():
        return  # an output the stage did not write (e.g. a Markdown one filled after the stage)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-partial-"))
    target = work / src.name
    if src.is_dir():
        shutil.copytree(src, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, target)
    publish_dir(target, dst)
    work.rmdir()


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
