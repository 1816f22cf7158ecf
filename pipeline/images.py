"""Stage images: build them with a Docker engine (docker SDK), push them, make an offline wheelhouse.

Each image is tagged twice: with its name (config `images.cpu`/`images.gpu`, default kflift-cpu:0.1.0;
`--tag T` replaces the tag part) and with its content hash (kflift-cpu:<hash>). The hash names of the
last build are recorded in OUTPUT/images.json, and compile, submit and `run --runner docker` use them
unless config names the images: a node with `IfNotPresent` can never run stale code under an old tag.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kflift import __version__
from .config import Config

DOCKERFILE = "containers/Dockerfile"
SOURCE = "https://github.com/kflift/kflift"
GPU_BASE_IMAGE = "tensorflow/tensorflow:2.21.0-gpu"  # the CPU default is the Dockerfile's ARG default
BUILDER_LABEL = "io.kflift.stage=builder"
HASH_LABEL = "io.kflift.build-hash"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the classic builder colours a step's stderr
BUILD_TIMEOUT = 3600  # seconds the engine may stay silent (a long pip install step)
FLAVORS = ("cpu", "gpu")
DEFAULT_NAMES = {flavor: f"kflift-{flavor}:0.1.0" for flavor in FLAVORS}
LAST_BUILD = "images.json"  # under the output folder: flavour -> content-hash name of the last build


class ImageError(RuntimeError):
    """An engine, build or push problem; the message is one line naming the image or step."""


def engine(timeout: int = 120):
    """A docker SDK client whose engine answers, or ImageError saying how to get one."""
    import docker

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"no Docker engine answers at {where} ({reason}); start one, e.g. "
                         f"scripts/docker-engine.sh, or set DOCKER_HOST") from None
    return client


def repo_root() -> Path:
    """The source checkout that holds this code (editable install) or the current folder."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / DOCKERFILE).is_file():
            return root
    raise ImageError(f"{DOCKERFILE} not found: run from a kflift source checkout (or use --context)")


def image_names(cfg: Config, flavors: list[str], tag: str | None = None) -> dict[str, str]:
    """flavour -> the name a build gives the image: config's (or the default), `tag` replacing its tag."""
    names = {}
    for flavor in flavors:
        repo, current = split_name(getattr(cfg.images, flavor) or DEFAULT_NAMES[flavor])
        names[flavor] = f"{repo}:{tag or current or 'latest'}"
    return names


def split_name(image: str) -> tuple[str, str | None]:
    """'registry:5000/kflift-cpu:1' -> ('registry:5000/kflift-cpu', '1') (a port is not a tag)."""
    repo, _, tag = image.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (image, None)


def last_build(cfg: Config) -> dict[str, str]:
    """flavour -> content-hash name from the last `kflift images build` under this output (or {})."""
    import json

    path = Path(cfg.output) / LAST_BUILD
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_images(cfg: Config) -> dict[str, str]:
    """flavour -> the image its stages run in: config's name, else the last build's content tag, else the
    default. Without GPUs (resources.gpu_limit=0) train and finetune run in the cpu image."""
    built = last_build(cfg)
    names = {flavor: getattr(cfg.images, flavor) or built.get(flavor) or DEFAULT_NAMES[flavor] for flavor in FLAVORS}
    return names if cfg.resources.gpu_limit else {**names, "gpu": names["cpu"]}


def _record_build(cfg: Config, built: dict[str, str]) -> None:
    from ..components.files import write_json

    write_json(Path(cfg.output) / LAST_BUILD, {**last_build(cfg), **built})


def _context_files(root: Path, wheelhouse: Path | None) -> list[tuple[Path, str]]:
    """(file on disk, name in the build context): the checkout minus .dockerignore, plus the wheelhouse."""
    from docker.utils.build import exclude_paths

    ignore = root / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")] if ignore.is_file() else []
    if wheelhouse is not None:  # the given wheelhouse replaces any ./wheelhouse of the checkout
        patterns.append("wheelhouse")
    files = [(root / p, p) for p in sorted(exclude_paths(str(root), patterns, dockerfile=DOCKERFILE))]
    if wheelhouse is not None:
        files.append((wheelhouse, "wheelhouse"))
        files += [(w, f"wheelhouse/{w.name}") for w in sorted(wheelhouse.iterdir()) if w.is_file()]
    return files


def _content_hash(files: list[tuple[Path, str]], buildargs: dict) -> str:
    """What the image is made of: sources by content, wheels by name and size, build arguments."""
    digest = hashlib.sha256(repr(sorted(buildargs.items())).encode())
    for path, name in files:
        if not path.is_file():
            continue
        digest.update(name.encode() + b"\0")
        if name.startswith("wheelhouse/") and name.endswith(".whl"):  # versioned names; skip reading 1 GB
            digest.update(str(path.stat().st_size).encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _write_context(files: list[tuple[Path, str]], fileobj) -> None:
    with tarfile.open(mode="w", fileobj=fileobj) as tar:
        for path, name in files:
            tar.add(str(path), arcname=name, recursive=False)
    fileobj.seek(0)


def _stream(lines, image: str, action: str) -> dict:
    """Print the engine's progress; raise ImageError naming the failing step and its last output."""
    step, said, last = "", "", {}
    for record in lines:
        if "error" in record:
            message = " ".join(((record.get("errorDetail") or {}).get("message") or record["error"]).split())
            code = re.search(r"returned a non-zero code: (\d+)$", message)
            if code:  # the engine repeats the whole command; the step and its last words say more
                message = f"exit code {code.group(1)}" + (f" ({said})" if said else "")
            raise ImageError(f"{action} {image} failed" + (f" at {_short(step)}" if step else "") + f": {message}")
        for line in record.get("stream", "").splitlines():
            line = ANSI.sub("", line).rstrip()
            if line.startswith("Step "):
                step, said = line, ""
            elif line.strip() and not line.startswith((" ---> ", "Removing intermediate")):
                said = line.strip()
            if line.strip():
                print(line, flush=True)
        if "status" in record:  # push: one line per layer state change, not per progress tick
            line = " ".join(str(record[k]) for k in ("id", "status") if record.get(k))
            if record.get("status") != "Pushing" and line:
                print(line, flush=True)
        last = record.get("aux") or last
    return last


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def build(cfg: Config, flavors: list[str], tag: str | None = None, base_image: str | None = None,
          wheelhouse: str | None = None, push: str | None = None, context: str | None = None,
          force: bool = False) -> dict[str, dict[str, str]]:
    """Build (and push) the stage images; returns flavour -> {"name": ..., "content": ...}: the image's
    name and its content-hash name (the pushed names with --push). The content names are recorded."""
    import docker

    root = Path(context).resolve() if context else repo_root()
    if not (root / DOCKERFILE).is_file():
        raise ImageError(f"{root} is not a kflift source checkout (no {DOCKERFILE})")
    wheels = Path(wheelhouse).resolve() if wheelhouse else None
    if wheels is not None and not any(wheels.glob("*.whl")):
        raise ImageError(f"wheelhouse {wheels} holds no wheels; make one with `kflift images wheelhouse {wheels}`")
    client = engine(timeout=BUILD_TIMEOUT)
    files = _context_files(root, wheels)
    built = {}
    for flavor, image in image_names(cfg, flavors, tag).items():
        args = {"FLAVOR": flavor, "VERSION": __version__, "SOURCE": SOURCE}
        base = base_image or (GPU_BASE_IMAGE if flavor == "gpu" else None)
        if base:
            args["BASE_IMAGE"] = base
        if wheels is not None:
            args["WHEELHOUSE"] = "require"  # no silent fallback to the network
        content = _content_hash(files, args)
        try:
            current = client.images.get(image).labels.get(HASH_LABEL)
        except docker.errors.ImageNotFound:
            current = None
        if current == content and not force:
            print(f"==> {image} is up to date (content {content}); --force rebuilds it", flush=True)
        else:
            print(f"==> building {image} (flavour {flavor}, base {base or 'Dockerfile default'}"
                  f"{', wheelhouse ' + str(wheels) if wheels else ''})", flush=True)
            with tempfile.TemporaryFile() as ctx:
                _write_context(files, ctx)
                try:
                    out = client.api.build(fileobj=ctx, custom_context=True, dockerfile=DOCKERFILE, tag=image,
                                           buildargs=args, labels={HASH_LABEL: content}, rm=True, forcerm=True,
                                           decode=True, timeout=BUILD_TIMEOUT)
                    _stream(out, image, "building")
                except docker.errors.APIError as exc:
                    raise ImageError(f"building {image} failed: {exc.explanation or exc}") from None
                finally:  # the builder stage is left untagged: only its disk space remains
                    client.images.prune(filters={"dangling": True, "label": BUILDER_LABEL})
            print(f"==> built {image} ({client.images.get(image).attrs['Size'] / 1e9:.2f} GB)", flush=True)
        repo, _ = split_name(image)
        by_content = f"{repo}:{content[:12]}"
        client.api.tag(image, repo, content[:12])
        names = {"name": image, "content": by_content}
        built[flavor] = {k: _push(client, v, push) for k, v in names.items()} if push else names
    _record_build(cfg, {flavor: names["content"] for flavor, names in built.items()})
    return built


def _push(client, image: str, registry: str) -> str:
    import docker

    repo, tag = split_name(image)
    target = f"{registry.rstrip('/')}/{repo.split('/')[-1]}"
    print(f"==> pushing {target}:{tag}", flush=True)
    try:
        client.api.tag(image, target, tag)
        _stream(client.api.push(target, tag, stream=True, decode=True), f"{target}:{tag}", "pushing")
    except docker.errors.APIError as exc:
        raise ImageError(f"pushing {target}:{tag} failed: {exc.explanation or exc}") from None
    return f"{target}:{tag}"


def missing_images(client, images: set[str]) -> list[str]:
    """The images of `images` the engine does not hold (KFP's local runner would try to pull them)."""
    import docker

    missing = []
    for image in sorted(images):
        try:
            client.images.get(image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest")
        except docker.errors.ImageNotFound:
            missing.append(image)
    return missing


def make_wheelhouse(dest: str, context: str | None = None, force: bool = False) -> Path:
    """Wheels of kflift and every pinned dependency in `dest`, for an offline image build.

    Kept as is while constraints.txt and pyproject.toml are unchanged (the image installs kflift
    itself from the sources, so its own wheel may be older)."""
    root = Path(context).resolve() if context else repo_root()
    dest_path = Path(dest).resolve()
    inputs = hashlib.sha256(b"".join((root / f).read_bytes() for f in ("constraints.txt", "pyproject.toml")))
    marker = dest_path / ".kflift-inputs"
    if not force and marker.is_file() and marker.read_text() == inputs.hexdigest():
        print(f"wheelhouse: {dest_path} is up to date with constraints.txt and pyproject.toml", flush=True)
        return dest_path
    partial = dest_path.with_name(dest_path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # Wheels already in dest are reused; setuptools is the build backend the image's pip needs offline.
    cmd = [sys.executable, "-m", "pip", "wheel", "--constraint", str(root / "constraints.txt"),
           "--wheel-dir", str(partial), str(root), "setuptools>=68"]
    if dest_path.is_dir():
        cmd[4:4] = ["--find-links", str(dest_path)]
    print(f"==> {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ImageError(f"making the wheelhouse {dest_path} failed (pip's error is above)")
    (partial / marker.name).write_text(inputs.hexdigest())
    old = dest_path.with_name(dest_path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest_path.exists():
        dest_path.rename(old)
    partial.rename(dest_path)  # whole: a failed run leaves the previous wheelhouse in place
    shutil.rmtree(old, ignore_errors=True)
    print(f"wheelhouse: {dest_path} ({len(list(dest_path.glob('*.whl')))} wheels)", flush=True)
    return dest_path
