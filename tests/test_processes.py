"""components/processes.py: the child process that runs tf.Transform (augment) and the serving export."""
import os

import pytest

from kflift.components.processes import CHILD_ENV, in_child_process


def _environ(name):
    return os.environ.get(name)


def _raise(message):
    raise ValueError(message)


def test_the_child_and_what_it_starts_get_the_lean_malloc_settings_and_this_process_keeps_its_own(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    # os.environ in the child is what its own start-up saw, and what Beam's worker processes inherit.
    assert in_child_process(_environ, "MALLOC_ARENA_MAX") == CHILD_ENV["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_ARENA_MAX" not in os.environ


def test_a_value_the_user_set_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert in_child_process(_environ, "MALLOC_ARENA_MAX") == "4"
    assert os.environ["MALLOC_ARENA_MAX"] == "4"


def test_an_error_in_the_child_is_raised_here_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    with pytest.raises(ValueError, match="bad input"):
        in_child_process(_raise, "bad input")
    assert "MALLOC_ARENA_MAX" not in os.environ
