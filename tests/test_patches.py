"""utils/patches: the installed ModelScope is checked against what the patches rely on."""
import logging

import pytest

from utils import patches

pytestmark = pytest.mark.unit


# every hook point RELIES_ON names: (module, object in it or None for the module itself, attribute, patch)
HOOK_POINTS = [
    ('modelscope.trainers.trainer', None, 'check_local_model_is_latest', 'hub_check'),
    ('modelscope.models.multi_modal.ofa.generate.ngram_repeat_block', 'NGramRepeatBlock', '_no_repeat_ngram',
     'generation'),
    ('modelscope.models.multi_modal.ofa.generate.sequence_generator', 'SequenceGenerator', '_generate', 'generation'),
    ('modelscope.models.multi_modal.ofa.generate.sequence_generator', 'SequenceGenerator', 'finalize_hypos',
     'generation'),
    ('modelscope.models.multi_modal.ofa.generate.search', None, 'BeamSearch', 'generation'),
    *[('modelscope.trainers.hooks.checkpoint.checkpoint_processor', 'CheckpointProcessor', attr, 'checkpoints')
      for attr in ('prepare_output', 'save_model_state', 'save_trainer_state', 'link')],
    *[('modelscope.trainers.hooks.optimizer.base', 'OptimizerProcessor', attr, 'train_step')
      for attr in ('backward', 'initialize_optimizer')],
    ('modelscope.trainers.multi_modal.ofa.ofa_trainer', 'OFATrainer', 'train_step', 'train_step'),
    ('modelscope.trainers.hooks.distributed.ddp_hook', 'DDPHook', 'wrap_module', 'train_step'),
    ('modelscope.trainers.hooks.checkpoint.checkpoint_hook', 'CheckpointHook', '_create_training_state', 'train_step'),
]


def warnings_of(caplog, force=True):
    """(returned problems, the WARNING lines the check logged)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='utils.patches'):
        problems = patches.check_modelscope(force=force)
    return problems, [r.getMessage() for r in caplog.records if r.name == 'utils.patches' and r.levelno == logging.WARNING]


@pytest.fixture
def pinned(monkeypatch):
    """The installed ModelScope reports the pinned version: only hook points can be warned about."""
    import modelscope
    monkeypatch.setattr(modelscope, '__version__', patches.MODELSCOPE_VERSION)


@pytest.mark.parametrize('module, owner, attr, patch', HOOK_POINTS,
                         ids=[f'{o or m.rpartition(".")[2]}.{a}' for m, o, a, _ in
                              (getattr(h, 'values', h) for h in HOOK_POINTS)])
def test_a_missing_hook_point_is_one_warning_naming_the_patch_and_the_attribute(
        pinned, monkeypatch, caplog, module, owner, attr, patch):
    import importlib
    target = importlib.import_module(module)
    target = getattr(target, owner) if owner else target
    monkeypatch.delattr(target, attr)
    problems, logged = warnings_of(caplog)
    assert logged == problems and len(problems) == 1, problems
    assert problems[0].startswith(f'utils/patches/{patch}.py relies on ') and attr in problems[0]
    assert 'install the version in requirements.txt' in problems[0]


def test_the_console_patch_warns_when_modelscope_has_no_console_handler(pinned, monkeypatch, caplog):
    import logging as stdlib_logging
    logger = stdlib_logging.getLogger('modelscope')
    monkeypatch.setattr(logger, 'handlers', [h for h in logger.handlers if isinstance(h, stdlib_logging.FileHandler)])
    problems, logged = warnings_of(caplog)
    assert logged == problems and len(problems) == 1, problems
    assert problems[0].startswith('utils/patches/console.py relies on ') and 'StreamHandler' in problems[0]


def test_checks_that_hold_are_silent_and_one_that_cannot_import_is_a_warning(pinned, monkeypatch, caplog):
    monkeypatch.setattr(patches, 'RELIES_ON', {'fine': {'something present': lambda: True}})
    assert warnings_of(caplog) == ([], [])
    monkeypatch.setattr(patches, 'RELIES_ON', {'fine': {'something present': lambda: True},
                                               'gone': {'no_such_module_xyz.Thing.attr':
                                                        patches._has('no_such_module_xyz.Thing', 'attr')}})
    problems, logged = warnings_of(caplog)
    assert logged == problems and len(problems) == 1
    assert problems[0].startswith('utils/patches/gone.py relies on no_such_module_xyz.Thing.attr, which this ModelScope')


def test_the_start_up_check_runs_once_per_process(pinned, monkeypatch, caplog):
    from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor
    monkeypatch.delattr(CheckpointProcessor, 'link')
    patches._found = None  # as at import
    first, logged = warnings_of(caplog, force=False)
    assert len(first) == 1 and logged == first
    again, logged = warnings_of(caplog, force=False)
    assert again is first and logged == []  # the cached answer: not checked, not warned again


def test_another_version_is_named_in_a_warning(monkeypatch, caplog):
    import modelscope
    monkeypatch.setattr(modelscope, '__version__', '9.9.9')
    with caplog.at_level(logging.WARNING):
        problems = patches.check_modelscope(force=True)
    assert problems and 'ModelScope 9.9.9 is installed' in problems[0] and patches.MODELSCOPE_VERSION in problems[0]
    assert 'ModelScope 9.9.9' in caplog.text


@pytest.fixture(autouse=True)
def _recheck_after():
    yield
    patches._found = None


@pytest.mark.parametrize('n', [50265, 9192, 64 * 40, 300])  # OFA's text rows, the test model's, whole blocks, short
def test_row_top_takes_the_values_topk_takes(n):
    """beam_search.row_top against torch.topk on rows shaped like the search's: the values are top-k's, in its
    order, and each index points at its value (once), for plain rows, a row whose best entries sit in the short tail
    block, a row with a NaN, a row of ties, and a row that is -inf but for one entry (the last step)."""
    import math

    import torch

    from utils.patches.beam_search import row_top
    torch.manual_seed(n)
    k = 10
    x = torch.log_softmax(torch.randn(8, n) * 3, -1)
    x[1, -3:] = 5.0 + torch.arange(3.0)  # the best three in the tail (n is not a whole number of blocks but once)
    x[2, n // 2] = math.nan
    x[3, :] = -1.0
    x[3, 7] = 0.0
    x[4, :] = -math.inf
    x[4, 2] = 0.0
    x[5, ::97] = x[5].max() + 1.0  # many ties for the best
    want_v, want_i = torch.topk(x, k)
    got_v, got_i = row_top(x, k)
    nan = torch.isnan(want_v)
    assert torch.equal(torch.isnan(got_v), nan)
    assert torch.equal(got_v[~nan], want_v[~nan])
    for row in range(x.size(0)):
        assert len(set(got_i[row].tolist())) == k  # no index twice
        picked = x[row, got_i[row]]
        assert torch.equal(torch.isnan(picked), nan[row]) and torch.equal(picked[~nan[row]], got_v[row][~nan[row]])
    assert torch.equal(got_i[4], want_i[4])  # -inf at the k-th: top-k's own indices
    if n >= 4 * k * 64:
        assert got_i[1, 0] == n - 1  # found in the tail block
