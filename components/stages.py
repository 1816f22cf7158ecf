"""Every stage in one table: its name, the function that does the work, and what it reads and writes.

The KFP components (pipeline/kfp_components.py) run a stage through this table and
`runner.run_stage`. Each loader imports its stage function only when the stage really runs, so a
cache hit imports no TensorFlow; `Stage.module` (read from the loader's import statement, nothing
imported) is the code the step cache fingerprints.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable

from .results import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    load: Callable[[], Callable[..., StageResult]]  # imports and returns the stage function
    reads: tuple[str, ...] = ()  # arguments that are input artifacts (a path, or a list or dict of them)
    writes: tuple[str, ...] = ()  # arguments that are output artifacts
    data: tuple[str, ...] = ()  # folder arguments whose content decides the result
    checkpoints: bool = False  # takes checkpoint_dir and resume: a rerun continues from the last epoch

    @property
    def function(self) -> Callable[..., StageResult]:
        return self.load()

    @property
    def module(self) -> str:
        """The module the loader imports the stage function from, read from its source."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(self.load)))
        [node] = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        return f"{__package__}.{node.module}"


def _augment():
    from .augment import augment
    return augment


def _build():
    from .build import build
    return build


def _train():
    from .train import train
    return train


def _finetune():
    from .finetune import finetune
    return finetune


def _select_best():
    from .sweep import select_best
    return select_best


def _evaluate():
    from .evaluate import evaluate
    return evaluate


STAGES: dict[str, Stage] = {stage.name: stage for stage in [
    Stage("augment", _augment, writes=("output_dir",), data=("data_dir",)),
    Stage("build", _build, reads=("dataset_dir",), writes=("output_path",)),
    Stage("train", _train, reads=("dataset_dir", "model_dir"), writes=("output_dir",), checkpoints=True),
    Stage("finetune", _finetune, reads=("dataset_dir", "pretrained_dir"), writes=("output_dir",),
          checkpoints=True),
    Stage("select_best", _select_best, reads=("model_dirs",), writes=("output_dir",)),
    Stage("evaluate", _evaluate, reads=("dataset_dir", "candidates"), writes=("output_dir",)),
]}
