"""Checksummed checkpoints and model dirs (iter_N.sha256, weights.sha256), output/ a copy of the newest weights,
and max_checkpoint_num counted on disk across runs and resumes (issue 22, items 2 and 4)."""
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest

import finetune
import pre_inference
from utils import backup_model
from utils.training.resume import checkpoints_in, readable, resolve_checkpoint
from utils.core.errors import CheckpointError, ModelDirError


def flip_middle(path, n=4096):
    """Invert n bytes in the middle of a file: the file still loads, its content is wrong."""
    data = bytearray(Path(path).read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    Path(path).write_bytes(bytes(data))


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- what training writes

@pytest.mark.integration
def test_checkpoints_and_output_carry_checksums_and_output_is_a_copy(trained):
    work = trained[1]
    prefixes = [p for _, p in checkpoints_in(str(work))]
    assert prefixes
    for prefix in prefixes:
        base = os.path.basename(prefix)
        lines = Path(prefix + '.sha256').read_text().splitlines()  # sha256sum's format
        assert sorted(lines) == sorted([f'{sha(prefix + ".pth")}  {base}.pth',
                                        f'{sha(prefix + "_trainer_state.pth")}  {base}_trainer_state.pth'])
    for model_dir in ('output', 'output_best'):
        if (work / model_dir).is_dir():
            assert (work / model_dir / 'weights.sha256').read_text() == \
                f'{sha(work / model_dir / "pytorch_model.bin")}  pytorch_model.bin\n'
    newest = prefixes[0] + '.pth'
    out = work / 'output' / 'pytorch_model.bin'
    assert out.read_bytes() == Path(newest).read_bytes()  # the newest checkpoint's weights ...
    assert not os.path.samefile(out, newest) and os.stat(out).st_nlink == 1  # ... in a file of its own


# ---------------------------------------------------------------- a damaged checkpoint

@pytest.mark.integration
def test_latest_skips_a_damaged_newest_checkpoint_naming_it_and_resumes_from_the_previous(trained_copy, caplog):
    conf_path, work = trained_copy
    (newest, damaged), (previous_n, previous) = checkpoints_in(str(work))[:2]
    flip_middle(damaged + '.pth')
    os.utime(damaged + '.pth')  # still the newest
    assert readable(damaged) is None  # torch.load reads it: only the checksum tells
    assert resolve_checkpoint('latest', str(work)) == previous
    warnings = [r.getMessage() for r in caplog.records if 'skipping damaged checkpoint' in r.getMessage()]
    assert len(warnings) == 1 and damaged in warnings[0] and 'does not match its checksum' in warnings[0]
    with pytest.raises(CheckpointError, match='is damaged.*does not match its checksum'):
        resolve_checkpoint(damaged, '')

    caplog.clear()
    assert finetune.main(['train', '--conf', conf_path, '-p', 'latest']) == 0
    assert f'skipping damaged checkpoint {damaged}: iter_12.pth does not match its checksum' in caplog.text
    logs = sorted(work.glob('*.log.json'), key=os.path.getmtime)
    resumed = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    trained_iters = [(e['epoch'] - 1) * 6 + e['iter'] for e in resumed if e.get('mode') == 'train']
    assert trained_iters[0] == previous_n + 1  # right after the previous checkpoint
    assert resolve_checkpoint(damaged, '') == damaged  # written again, whole


@pytest.mark.integration
def test_damaged_trainer_state_is_skipped_too(trained_copy, caplog):
    work = trained_copy[1]
    (_, damaged), (_, previous) = checkpoints_in(str(work))[:2]
    flip_middle(damaged + '_trainer_state.pth', 64)
    assert resolve_checkpoint('latest', str(work)) == previous
    assert 'skipping damaged checkpoint' in caplog.text and '_trainer_state.pth does not match' in caplog.text


# ---------------------------------------------------------------- a damaged model dir

@pytest.mark.integration
def test_damaged_output_is_refused_by_eval_pre_inference_and_backup(trained_copy, tmp_path, capsys):
    conf_path, work = trained_copy
    flip_middle(work / 'output' / 'pytorch_model.bin')
    before = sorted(os.listdir(work))
    for main, argv in ((finetune.main, ['eval', '--conf', conf_path]),
                       (pre_inference.main, ['--conf', conf_path, '-n', '2']),
                       (backup_model.main, ['--conf', conf_path, '-o', str(tmp_path / 'backups')])):
        capsys.readouterr()
        assert main(argv) == 2, argv
        errors = error_lines(capsys)
        assert len(errors) == 1 and 'is damaged' in errors[0] and str(work / 'output') in errors[0], errors
        assert 'pytorch_model.bin does not match its checksum' in errors[0], errors
    assert sorted(os.listdir(work)) == before  # no result file, no log
    assert not list(tmp_path.glob('backups/*.tar.gz'))
    # the way out the error names: a checkpoint's weights, exported (verified against its own checksum)
    assert backup_model.main(['--conf', conf_path, '-o', str(tmp_path / 'backups'), '--checkpoint', 'latest']) == 0


@pytest.mark.integration
def test_model_dir_without_checksum_is_accepted_unverified(trained, tmp_path, caplog):
    import shutil

    from utils.captioning.captioner import Captioner
    from utils.core.checksums import check_model_dir
    caplog.set_level(logging.INFO, logger='utils.core.checksums')
    mine = tmp_path / 'mine'
    shutil.copytree(trained[1] / 'output', mine)
    (mine / 'weights.sha256').unlink()  # a model dir of one's own, a hub snapshot, an older run
    check_model_dir(str(mine))
    assert f'model dir {mine} has no weights.sha256: its weights are not verified' in caplog.text
    (mine / 'weights.sha256').write_text('not a checksum\n')
    with pytest.raises(ModelDirError, match='is damaged.*not a sha256 list'):
        Captioner(str(mine))  # pipeline() and every other loader go through it


# ---------------------------------------------------------------- output/ is not the checkpoint's file

@pytest.mark.integration
def test_damaging_the_newest_checkpoint_leaves_output_loadable(make_conf, tmp_path, capsys):
    path = make_conf(checkpoint={'by_epoch': False, 'interval': 3, 'max_checkpoint_num': 5})
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', path]) == 0
    newest = checkpoints_in(str(work))[0][1]
    Path(newest + '.pth').write_bytes(Path(newest + '.pth').read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert pre_inference.main(['--conf', path, '-n', '2', '-o', str(tmp_path / 'inf')]) == 0, error_lines(capsys)
    assert len(json.loads(next((tmp_path / 'inf').glob('inference_*.json')).read_text())['results']) == 2
    assert backup_model.main(['--conf', path, '-o', str(tmp_path / 'backups')]) == 0
    assert backup_model.main(['--verify', str(next((tmp_path / 'backups').glob('*.tar.gz')))]) == 0


# ---------------------------------------------------------------- max_checkpoint_num on disk

@pytest.mark.integration
def test_max_checkpoint_num_holds_across_resumes_and_runs(make_conf):
    path = make_conf(checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 2})
    work = Path(json.loads(Path(path).read_text())['work_dir'])

    def on_disk():
        numbers = sorted(n for n, _ in checkpoints_in(str(work)))
        left = [p.name for p in work.glob('iter_*') if int(re.match(r'iter_(\d+)', p.name)[1]) not in numbers]
        assert not left  # nothing of a deleted checkpoint stays: neither of its files, nor its checksum
        return numbers

    assert finetune.main(['train', '--conf', path]) == 0                       # iterations 1-6
    assert on_disk() == [4, 6]
    for epochs, last in ((2, 12), (3, 18)):                                     # two resumes
        assert finetune.main(['train', '--conf', path, '-p', 'latest', '-e', str(epochs)]) == 0
        assert on_disk() == [last - 2, last], epochs
    assert finetune.main(['train', '--conf', path]) == 0  # a fresh run in the same work_dir: the old ones count
    assert on_disk() == [4, 6]
    assert sorted(p.name for p in work.glob('*.sha256')) == ['iter_4.sha256', 'iter_6.sha256']
    assert resolve_checkpoint('latest', str(work)) == str(work / 'iter_6')


# ---------------------------------------------------------------- output/'s weights replaced

@pytest.mark.unit
def test_output_verifies_at_every_moment_of_a_weights_update(tmp_path, monkeypatch):
    """A kill between the rename of output/'s new weights and the rewrite of its checksum file leaves a dir that
    verifies (weights.sha256 lists the old and the new hash meanwhile); so does one before the rename."""
    import torch

    import utils.patches.checkpoints as ckpt
    from utils.core.checksums import model_dir_problem
    out = tmp_path / 'output'
    out.mkdir()
    processor = ckpt.AtomicCheckpointProcessor()
    model = torch.nn.Linear(4, 4)
    processor.save_model_state(model, str(out / 'pytorch_model.bin'))  # a model dir's weights + weights.sha256
    assert model_dir_problem(str(out)) is None
    for step in range(2):
        with torch.no_grad():
            model.weight.add_(1.0)
        src = tmp_path / f'iter_{step + 1}.pth'
        before = (out / 'pytorch_model.bin').read_bytes()
        processor.save_model_state(model, str(src))
        assert (tmp_path / f'iter_{step + 1}.sha256').read_text() == f'{sha(src)}  {src.name}\n'

        real_replace = os.replace

        def dying_replace(a, b, _step=step):
            if _step == 0 and b.endswith('pytorch_model.bin'):
                raise KeyboardInterrupt('killed before the rename')
            real_replace(a, b)
            if _step == 1 and b.endswith('pytorch_model.bin'):
                raise KeyboardInterrupt('killed after the rename')
        monkeypatch.setattr(ckpt.os, 'replace', dying_replace)
        with pytest.raises(KeyboardInterrupt):
            processor.link(model, str(src), str(out))
        monkeypatch.setattr(ckpt.os, 'replace', real_replace)
        assert len((out / 'weights.sha256').read_text().splitlines()) >= 2  # old and new
        assert model_dir_problem(str(out)) is None, step
        assert (out / 'pytorch_model.bin').read_bytes() == (src.read_bytes() if step else before)
    processor.link(model, str(src), str(out))
    assert (out / 'weights.sha256').read_text() == f'{sha(src)}  pytorch_model.bin\n'
    flip_middle(out / 'pytorch_model.bin', 16)
    assert 'does not match its checksum' in model_dir_problem(str(out))


@pytest.mark.unit
def test_backup_and_checkpoints_share_one_sha256():
    from utils.backup import archive
    from utils.core import checksums
    assert archive.hash_file is checksums.hash_file and archive.hash_stream is checksums.hash_stream
