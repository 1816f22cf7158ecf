"""The stage table, the stage functions' signatures and config agree: a drift fails here, in seconds."""
import inspect
import typing

import pytest

from kflift.components.stages import STAGES, Stage
from kflift.pipeline.config import Architecture, Config
from kflift.pipeline.pipeline import UNREGULARIZED

CFG = Config()
# What each stage function takes from config (its sections' *_kwargs, as pipeline.py passes them),
# and what the DAG decides per task (the candidate's levers, the class filters, names).
FROM_CONFIG = {
    "augment": CFG.augment.stage_kwargs(),
    "build": {**CFG.model.stage_kwargs(), **CFG.regularization.build_kwargs()},
    "train": {**CFG.train.stage_kwargs()},
    "finetune": {**CFG.transfer.stage_kwargs(), **CFG.train.fit_kwargs()},
    "select_best": {},
    "evaluate": CFG.evaluate.stage_kwargs(),
}
PER_TASK = {
    "augment": {"include_classes", "exclude_classes", "artifact_uri"},  # artifact_uri: its KFP Dataset's
    "build": {"seed", "online_ops"},
    "train": {"patience", "monitor", "name", "augmented", "batch_mixing"},
    "finetune": {"patience", "monitor", "augmented", "batch_mixing"},
    "select_best": {"metric"},
    "evaluate": {"baseline", "export"},
}
RUNNER = {"checkpoint_dir", "resume"}  # the step cache's, for the stages with checkpoints


def test_every_table_entry_resolves_to_its_function_and_module():
    assert set(STAGES) == set(FROM_CONFIG)
    for name, stage in STAGES.items():
        fn = stage.function
        assert callable(fn) and stage.module == fn.__module__, name
        assert typing.get_type_hints(fn)["return"].__name__ == "StageResult", name


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_takes_its_config_as_required_keywords_named_as_in_config(name):
    stage: Stage = STAGES[name]
    params = inspect.signature(stage.function).parameters
    keywords = {p.name: p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    paths = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    # What the table says it reads and writes are the positional path arguments.
    assert set(stage.reads + stage.writes + stage.data) == set(paths)
    # Every config key is a keyword argument of the same name, with no default to drift from config's.
    for key in FROM_CONFIG[name]:
        assert key in keywords, f"{name}() lacks config's {key}"
        assert keywords[key].default is inspect.Parameter.empty, f"{name}({key}=...) restates a default"
    # And it takes nothing else but what the DAG or the runner decides.
    extra = set(keywords) - set(FROM_CONFIG[name]) - PER_TASK[name] - (RUNNER if stage.checkpoints else set())
    assert not extra, f"{name}() takes {extra}, which neither config nor the DAG gives"


def test_the_checkpointing_stages_are_the_ones_that_take_checkpoints():
    for name, stage in STAGES.items():
        params = inspect.signature(stage.function).parameters
        assert (RUNNER <= set(params)) == stage.checkpoints, name


def test_one_list_of_architectures_and_build_makes_each():
    from kflift.components.build import APPLICATIONS

    assert set(typing.get_args(Architecture)) == {"cnn", "resnet", *APPLICATIONS}
    for section, field in (("model", "architecture"), ("transfer", "backbone")):
        assert Config.model_fields[section].annotation.model_fields[field].annotation is Architecture


def test_the_baseline_pulls_no_regularization_lever():
    assert set(UNREGULARIZED) == set(CFG.regularization.build_kwargs())
    assert not any(UNREGULARIZED.values())


def test_kfp_struct_floats_come_back_as_ints_where_a_stage_takes_an_int():
    from kflift.components.runner import _typed

    # KFP's struct parameters bring every number as a float (3 -> 3.0); a slice by 3.0 fails.
    typed = _typed(STAGES["finetune"].function, {"unfreeze_top": 3.0, "frozen_epochs": 2.0, "learning_rate": 1.0})
    assert typed == {"unfreeze_top": 3, "frozen_epochs": 2, "learning_rate": 1.0}
    assert type(typed["unfreeze_top"]) is int and type(typed["learning_rate"]) is float
    assert _typed(STAGES["finetune"].function, {"unfreeze_top": "all"}) == {"unfreeze_top": "all"}
