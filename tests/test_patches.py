"""utils/patches: the installed ModelScope is checked against what the patches rely on."""
import logging

import pytest

from utils import patches


def test_the_pinned_modelscope_passes_the_check():
    assert patches.check_modelscope(force=True) == []


def test_another_version_is_named_in_a_warning(monkeypatch, caplog):
    import modelscope
    monkeypatch.setattr(modelscope, '__version__', '9.9.9')
    with caplog.at_level(logging.WARNING):
        problems = patches.check_modelscope(force=True)
    assert problems and 'ModelScope 9.9.9 is installed' in problems[0] and patches.MODELSCOPE_VERSION in problems[0]
    assert 'ModelScope 9.9.9' in caplog.text


def test_a_missing_hook_point_names_the_patch(monkeypatch):
    from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor
    monkeypatch.delattr(CheckpointProcessor, 'link')
    problems = patches.check_modelscope(force=True)
    assert any('utils/patches/checkpoints.py relies on' in p and 'link' in p for p in problems), problems


@pytest.fixture(autouse=True)
def _recheck_after():
    yield
    patches._found = None
