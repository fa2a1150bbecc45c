"""What a person sees on the console while training: the toolkit's lines and progress, not ModelScope's
config dump and hook table (those stay in work_dir's log file; `--verbose` shows them)."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.e2e
def test_training_console_shows_progress_not_modelscopes_dump(make_conf, tmp_path):
    conf = make_conf(max_train_samples=16, batch_size=8, log_interval=1)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    proc = subprocess.run([sys.executable, str(ROOT / 'finetune.py'), 'train', '--conf', conf], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stderr
    assert 'epoch 1/1, iteration 1/2: loss ' in console and 'epoch 1/1, iteration 2/2: loss ' in console
    assert 'epoch eta' in console and 'lr ' in console
    assert 'Training Config Start' not in console and 'Stage: before_run' not in console  # config dump, hook table
    assert 'tensorboardX' not in console
    modelscope_log = next(p for p in work.glob('*.log') if not p.name.startswith('train_')).read_text()
    assert 'Training Config Start' in modelscope_log and 'Stage: before_run' in modelscope_log  # kept in the file


@pytest.mark.unit
def test_verbose_shows_modelscopes_console_output():
    from modelscope.utils.logger import get_logger

    from utils.patches.console import modelscope_console
    console = [h for h in get_logger().handlers if type(h) is logging.StreamHandler]
    assert console
    modelscope_console(verbose=False)
    assert all(h.level == logging.WARNING for h in console)
    modelscope_console(verbose=True)
    assert all(h.level == logging.INFO for h in console)
    modelscope_console(verbose=False)


@pytest.mark.integration
def test_progress_bar_on_a_terminal(make_conf, monkeypatch, capsys):
    """On a terminal the same figures go into a tqdm bar per epoch instead of log lines."""
    import finetune
    from utils.training import progress
    monkeypatch.setattr(progress.sys.stderr, 'isatty', lambda: True, raising=False)
    conf = make_conf(max_train_samples=16, batch_size=8, log_interval=1)
    assert finetune.main(['train', '--conf', conf]) == 0
    err = capsys.readouterr().err
    assert 'epoch 1/1: 100%' in err and 'loss=' in err and 'lr=' in err
    assert 'iteration 1/2' not in err
