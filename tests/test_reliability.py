"""Kills, locks, damaged checkpoints: the toolkit keeps working and loses nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetune
import pre_inference
from conftest import ROOT, read_log_json
from utils.core.workdir import WorkDirLock
from utils.training.resume import checkpoints_in, resolve_checkpoint
from utils.core.errors import CheckpointError, WorkDirInUse


@pytest.mark.unit
def test_second_training_run_on_a_work_dir_in_use_is_refused(make_conf, capsys):
    path = make_conf()
    work_dir = json.loads(Path(path).read_text())['work_dir']
    with WorkDirLock(work_dir):
        before = sorted(os.listdir(work_dir))
        assert finetune.main(['train', '--conf', path]) == 2
        assert sorted(os.listdir(work_dir)) == before  # nothing written
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'is in use by another training run' in errors[0] and str(os.getpid()) in errors[0]
    with WorkDirLock(work_dir):  # released: free again
        pass


@pytest.mark.e2e
def test_lock_of_a_killed_process_is_not_stuck(tmp_path):
    code = f'import sys; sys.path.insert(0, {str(ROOT)!r}); from utils.core.workdir import WorkDirLock; ' \
           f'l = WorkDirLock({str(tmp_path)!r}).__enter__(); print("locked", flush=True); import time; time.sleep(60)'
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'locked'
    with pytest.raises(WorkDirInUse, match='in use'):
        WorkDirLock(str(tmp_path)).__enter__()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with WorkDirLock(str(tmp_path)):
        pass


@pytest.mark.integration
def test_latest_skips_an_unreadable_newest_checkpoint(trained, tmp_path, caplog):
    for n in (9, 12):
        for suffix in ('.pth', '_trainer_state.pth'):
            shutil.copy(trained[1] / f'iter_{n}{suffix}', tmp_path / f'iter_{n}{suffix}')
    damaged = tmp_path / 'iter_12.pth'
    damaged.write_bytes(damaged.read_bytes()[:1000])
    os.utime(damaged)  # newest
    assert [n for n, _ in checkpoints_in(str(tmp_path))][0] == 12
    assert resolve_checkpoint('latest', str(tmp_path)) == str(tmp_path / 'iter_9')
    assert 'skipping unreadable checkpoint' in caplog.text and 'iter_12' in caplog.text
    with pytest.raises(CheckpointError, match='cannot be loaded'):
        resolve_checkpoint(str(damaged), '')


def start_training(conf_path, cwd, *extra):
    """`python3 finetune.py train` in a process of its own, to be killed."""
    return subprocess.Popen([sys.executable, str(ROOT / 'finetune.py'), 'train', '--conf', conf_path, *extra],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc, condition, poll=0.02, timeout=240):
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.mark.e2e
def test_kill_9_during_training_then_resume_latest_finishes(make_conf, tmp_path):
    path = make_conf(max_epochs=4, checkpoint={'by_epoch': False, 'interval': 3, 'max_checkpoint_num': 2})
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    proc = start_training(path, tmp_path)
    assert kill_when(proc, lambda: (work / 'iter_9.pth').exists()), 'training ended before it could be killed'
    killed_at = max(n for n, _ in checkpoints_in(str(work)))
    assert 9 <= killed_at < 24
    assert (work / 'output' / 'pytorch_model.bin').is_file() and not (work / 'output.partial').exists()
    assert finetune.main(['train', '--conf', path, '-p', 'latest']) == 0
    resumed = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert resumed and len(resumed) == 24 - killed_at  # picks up right after the checkpoint
    summary = json.loads(sorted(work.glob('train_*.json'), key=os.path.getmtime)[-1].read_text())
    assert summary['iterations'] == 24
    from modelscope.models import Model
    Model.from_pretrained(str(work / 'output'))  # complete and loadable


@pytest.mark.e2e
def test_output_dir_never_exists_without_weights(make_conf, tmp_path):
    """A fresh run killed during its first checkpoint, after the output model dir was prepared and before
    the weights went in (the process dies at that point, deterministically): no output/, only
    output.partial, and no complete checkpoint yet."""
    path = make_conf(max_epochs=1, checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 1})
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    die_before_weights = (
        'import os, sys; sys.argv = ["finetune.py"] + sys.argv[1:]; import utils.patches.checkpoints as a\n'
        'def link(self, *args): os._exit(137)\n'
        'a.AtomicCheckpointProcessor.link = link\n'
        'import finetune; sys.exit(finetune.main())\n')
    proc = subprocess.run([sys.executable, '-c', die_before_weights, 'train', '--conf', path], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 137  # it died where it was meant to, not before
    assert (work / 'output.partial').is_dir() and (work / 'output.partial' / 'configuration.json').is_file()
    assert not (work / 'output').exists()
    assert not (work / 'output.partial' / 'pytorch_model.bin').exists()
    assert checkpoints_in(str(work)) == [(2, str(work / 'iter_2'))]  # its first checkpoint, written just before


@pytest.mark.unit
def test_latest_check_does_not_read_the_weights(tmp_path):
    """`-p latest` checks candidates without reading their tensors: here 160 MB of weights and optimizer
    state, of which the check may read a small fraction (bytes read through the process's own I/O counter)."""
    import torch
    weights = {'w': torch.randn(20_000_000)}
    torch.save(weights, tmp_path / 'iter_4.pth')
    torch.save({'optimizer': {'state': {0: {'exp_avg': torch.randn(20_000_000)}}}, 'iter': 4},
               tmp_path / 'iter_4_trainer_state.pth')

    def bytes_read():
        return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])
    if not os.path.exists('/proc/self/io'):
        pytest.skip('no /proc/self/io on this system')
    before = bytes_read()
    assert resolve_checkpoint('latest', str(tmp_path)) == str(tmp_path / 'iter_4')
    assert bytes_read() - before < 16_000_000


@pytest.mark.integration
def test_unexpected_error_is_one_line_exit_1_and_debug_shows_it(trained, tmp_path, capsys):
    broken = tmp_path / 'broken'
    shutil.copytree(trained[1] / 'output', broken)
    (broken / 'pytorch_model.bin').write_bytes(b'not torch')
    (broken / 'weights.sha256').unlink()  # unverified: ModelScope's own loader meets the bad file
    assert pre_inference.main(['--conf', trained[0], '-m', str(broken), '-n', '1']) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'OSError' in errors[0] and '--debug' in errors[0]
    assert 'Traceback' not in err
    with pytest.raises(OSError):
        pre_inference.main(['--conf', trained[0], '-m', str(broken), '-n', '1', '--debug'])


@pytest.mark.unit
def test_a_crash_while_writing_a_checkpoint_leaves_no_file_under_its_name(tmp_path, monkeypatch):
    import torch
    from modelscope.utils.checkpoint import save_checkpoint

    from utils.patches.checkpoints import AtomicCheckpointProcessor
    ms_checkpoint = sys.modules[save_checkpoint.__module__]

    def dying_write(data, filename):
        with open(filename, 'wb') as f:
            f.write(data[: len(data) // 2])
        raise OSError('killed mid-write')

    monkeypatch.setattr(ms_checkpoint.File, 'write', staticmethod(dying_write))
    target = tmp_path / 'iter_3.pth'
    with pytest.raises(OSError):
        AtomicCheckpointProcessor().save_model_state(torch.nn.Linear(4, 4), str(target))
    assert not target.exists() and (tmp_path / 'iter_3.pth.tmp').exists()
    assert checkpoints_in(str(tmp_path)) == []


@pytest.mark.e2e
def test_repeated_kills_at_random_moments_lose_nothing(make_conf, tmp_path):
    """Kill -9 three times at random moments (seeded), resume each time with -p latest, then finish:
    every iteration is trained, each resume starts right after a complete checkpoint."""
    import random
    rng = random.Random(7)
    path = make_conf(max_epochs=6, checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 2})
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    per_epoch, total = 6, 36  # 48 rows / batch 8 x 6 epochs
    kills = 0
    for _attempt in range(3):
        def newest():
            return max([n for n, _ in checkpoints_in(str(work))], default=0)
        before = newest()
        proc = start_training(path, tmp_path, *(['-p', 'latest'] if before else []))
        delay = rng.uniform(0.0, 0.5)  # somewhere after a checkpoint, maybe during the next one
        seen = []

        def after_a_new_checkpoint():
            if not seen and newest() > before:
                seen.append(time.time())
            return bool(seen) and time.time() - seen[0] >= delay
        kills += kill_when(proc, after_a_new_checkpoint)
        # this run's log: its first iteration is the one right after the checkpoint it resumed from
        log = read_log_json(work)
        trained_iters = [(e['epoch'] - 1) * per_epoch + e['iter'] for e in log if e.get('mode') == 'train']
        assert trained_iters[:1] == [before + 1], (before, trained_iters[:3])
        assert trained_iters == list(range(before + 1, before + 1 + len(trained_iters)))
        for _, prefix in checkpoints_in(str(work)):
            assert resolve_checkpoint(prefix, '') == prefix  # every complete-looking checkpoint loads
    assert kills >= 2
    assert finetune.main(['train', '--conf', path, '-p', 'latest']) == 0
    summary = json.loads(sorted(work.glob('train_*.json'), key=os.path.getmtime)[-1].read_text())
    assert summary['iterations'] == total
    from modelscope.models import Model
    Model.from_pretrained(str(work / 'output'))
