"""python3 -m utils.backup_model: backup, --verify and --restore of the tiny trained model.

Archives go to tmp_path (-o). A backup holds work_dir's lock (its file is written), so this module backs up
its own copy of the session's `trained` run (the `trained` fixture below), which stays read-only.
"""
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import pre_inference
from utils import __version__
from utils import backup_model
from utils.backup import archive as backup_archive
from utils.backup import create as backup_create
from utils.core.conf import read_conf
from conftest import copy_trained

ROOT = Path(__file__).resolve().parents[1]
PATH_KEYS = ('img_addr', 'dataset_path', 'work_dir')


# ---------------------------------------------------------------- helpers

def run(*argv):
    return backup_model.main([str(a) for a in argv])


def make_backup(conf_path, out_dir, *extra):
    out_dir = Path(out_dir)
    before = set(out_dir.glob('*.tar.gz')) if out_dir.is_dir() else set()
    assert run('--conf', conf_path, '-o', out_dir, *extra) == 0
    new = set(out_dir.glob('*.tar.gz')) - before
    assert len(new) == 1, new
    return new.pop()


def members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def member(archive, suffix):
    found = {n: d for n, d in members(archive).items() if n.endswith(suffix)}
    assert len(found) == 1, (suffix, list(found))
    return next(iter(found.values()))


def repack(src, dst, change=None, drop=(), add=None):
    """Copy archive src to dst, with change(name, data) -> data applied to files, `drop` left out
    and `add` ({name: bytes}) added, keeping the original manifest."""
    with tarfile.open(src) as tin, tarfile.open(dst, 'w:gz') as tout:
        for m in tin.getmembers():
            if m.name in drop:
                continue
            if m.isfile():
                data = tin.extractfile(m).read()
                data = change(m.name, data) if change else data
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m)
        for name, data in (add or {}).items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tout.addfile(ti, io.BytesIO(data))
    return dst


def write_tar(path, entries):
    """A tar.gz of raw entries: (TarInfo, bytes or None)."""
    with tarfile.open(path, 'w:gz') as tar:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name, data=b''):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob('*'))


def model_dir_from(out):
    lines = [line for line in out.splitlines() if line.startswith('model dir: ')]
    assert len(lines) == 1, out
    return lines[0][len('model dir: '):]


def captions(conf_path, out_dir, *model):
    assert pre_inference.main(['--conf', conf_path, *model, '-o', str(out_dir), '-n', '4']) == 0
    (path,) = Path(out_dir).glob('inference_*.json')
    return [(r['style'], r['image'], r['caption']) for r in json.loads(path.read_text())['results']]


@pytest.fixture(scope='module')
def trained(trained, tmp_path_factory):
    """This module's copy of the session's trained run: (conf path, work_dir), as `trained` gives them."""
    return copy_trained(trained, tmp_path_factory.mktemp('backup_trained'))


@pytest.fixture(scope='module')
def archive(trained, tmp_path_factory):
    """A full backup of the trained model, made once for the read-only tests."""
    return make_backup(trained[0], tmp_path_factory.mktemp('backups'))


# ---------------------------------------------------------------- backup + restore

@pytest.mark.integration
@pytest.mark.parametrize('mode', [[], ['-e']], ids=['full', 'shareable'])
def test_round_trip_gives_the_same_captions(trained, tmp_path, capsys, mode):
    conf_path, work = trained
    path = make_backup(conf_path, tmp_path / 'out', *mode)
    conf = read_conf(conf_path)
    top = path.name[:-len('.tar.gz')]
    assert top.startswith(backup_create.short_model_name(conf.model.model_name) + '_')
    names = set(members(path))
    assert all(n == top or n.startswith(top + '/') for n in names)  # a single top folder
    assert {f'{top}/conf.json', f'{top}/manifest.json', f'{top}/model/pytorch_model.bin',
            f'{top}/model/style_map.json', f'{top}/model/configuration.json'} <= names

    manifest = json.loads(member(path, '/manifest.json'))
    assert manifest['toolkit_version'] == __version__
    assert manifest['style_map'] == json.loads((work / 'output' / 'style_map.json').read_text())
    assert manifest['model_name'] == conf.model.model_name and manifest['model_revision'] == conf.model.model_revision
    assert manifest['checkpoint'] is None and manifest['created']
    stored = {n[len(top) + 1:] for n, d in members(path).items() if d is not None} - {'manifest.json'}
    assert set(manifest['files']) == stored
    if not mode:  # the model files are stored as they are
        for name in ('pytorch_model.bin', 'configuration.json', 'vocab.json'):
            assert member(path, f'/model/{name}') == (work / 'output' / name).read_bytes()
        assert json.loads(member(path, '/conf.json')) == conf.to_dict()

    capsys.readouterr()
    assert run('--verify', path) == 0
    assert 'ok:' in capsys.readouterr().out
    assert run('--restore', path, tmp_path / 'restored') == 0
    model_dir = model_dir_from(capsys.readouterr().out)
    assert Path(model_dir) == tmp_path / 'restored' / top / 'model'
    assert listing(model_dir) == listing(work / 'output')

    original = captions(conf_path, tmp_path / 'before')
    restored = captions(conf_path, tmp_path / 'after', '-m', model_dir)
    assert len(original) == 4 and restored == original


@pytest.mark.integration
def test_checkpoint_archive_holds_that_checkpoints_weights(trained, tmp_path, capsys):
    from modelscope.models import Model
    conf_path, work = trained
    final = torch.load(work / 'output' / 'pytorch_model.bin', weights_only=True)
    for arg in (work / 'iter_6', work / 'iter_6.pth', 'iter_6'):  # bare name: found in work_dir
        path = make_backup(conf_path, tmp_path / 'out', '--checkpoint', arg)
        assert json.loads(member(path, '/manifest.json'))['checkpoint'] == 'iter_6'
        assert member(path, '/model/pytorch_model.bin') == (work / 'iter_6.pth').read_bytes()
    names = {n.partition('/')[2] for n in members(path)}
    assert names == {n.partition('/')[2] for n in members(make_backup(conf_path, tmp_path / 'o2'))}

    capsys.readouterr()
    assert run('--restore', path, tmp_path / 'restored') == 0
    model_dir = model_dir_from(capsys.readouterr().out)
    model = Model.from_pretrained(model_dir)
    ckpt = torch.load(work / 'iter_6.pth', weights_only=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded.get(k, loaded.get('model.' + k)), v) for k, v in ckpt.items())
    assert any(not torch.equal(v, final[k]) for k, v in ckpt.items())  # not the output's weights


@pytest.mark.integration
def test_wrapped_or_foreign_checkpoint(trained, make_conf, tmp_path, capsys):
    """A {"state_dict": ...} checkpoint is unwrapped; one of another model is refused, naming it."""
    from modelscope.models import Model
    work = tmp_path / 'work'
    shutil.copytree(trained[1] / 'output', work / 'output')
    weights = torch.load(trained[1] / 'iter_3.pth', weights_only=True)
    torch.save({'meta': {'iter': 3}, 'state_dict': weights}, work / 'iter_3.pth')
    torch.save({k: v for k, v in list(weights.items())[1:]}, work / 'iter_4.pth')
    for n in (3, 4):
        shutil.copyfile(trained[1] / 'iter_3_trainer_state.pth', work / f'iter_{n}_trainer_state.pth')
    conf_path = make_conf(work_dir=str(work))

    path = make_backup(conf_path, tmp_path / 'out', '-p', work / 'iter_3')
    capsys.readouterr()
    assert run('--restore', path, tmp_path / 'restored') == 0
    loaded = Model.from_pretrained(model_dir_from(capsys.readouterr().out)).state_dict()
    assert all(torch.equal(loaded.get(k, loaded.get('model.' + k)), v) for k, v in weights.items())

    assert run('--conf', conf_path, '-o', tmp_path / 'bad', '-p', work / 'iter_4') == 2
    lines = capsys.readouterr().err.strip().splitlines()  # log lines (an unverified checkpoint), then one error
    err = lines[-1]
    assert err.startswith('error: ') and 'iter_4.pth' in err and 'missing keys' in err
    assert not [line for line in lines[:-1] if 'error' in line]
    assert not (tmp_path / 'bad').exists() or listing(tmp_path / 'bad') == []


@pytest.mark.integration
def test_shareable_archive_has_no_local_paths(trained, tmp_path):
    conf_path, _ = trained
    raw = json.loads(Path(conf_path).read_text())
    path = make_backup(conf_path, tmp_path, '-e')
    conf = json.loads(member(path, '/conf.json'))
    assert all(conf[k] is None for k in PATH_KEYS)
    full = read_conf(conf_path).to_dict()
    for key in PATH_KEYS:
        del conf[key], full[key]
    assert conf == full
    texts = {n: d.decode('utf-8') for n, d in members(path).items()
             if d is not None and n.endswith(('.json', '.txt'))}
    assert any(n.endswith('/manifest.json') for n in texts) and any(n.endswith('/conf.json') for n in texts)
    for key in PATH_KEYS:
        for name, text in texts.items():  # conf.json, manifest.json, and the model's own JSON files
            assert raw[key].rstrip('/') not in text, (key, name)
    assert json.loads(member(path, '/manifest.json'))['conf_mode'] == 'shareable'


@pytest.mark.integration
def test_no_conf_and_conflicting_flags(trained, tmp_path, capsys):
    conf_path, _ = trained
    path = make_backup(conf_path, tmp_path / 'out', '-n')
    assert not any(n.endswith('/conf.json') for n in members(path))
    manifest = json.loads(member(path, '/manifest.json'))
    assert manifest['conf'] is None and 'conf.json' not in manifest['files']
    assert run('--verify', path) == 0

    capsys.readouterr()
    assert run('--conf', conf_path, '-o', tmp_path / 'both', '-e', '-n') == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and '-e' in err and '-n' in err
    assert not (tmp_path / 'both').exists()


@pytest.mark.parametrize('argv, culprit', [
    (['--conf', 'nowhere.json'], 'nowhere.json'),
    ([], '--conf'),
    (['--verify', 'a.tar.gz', '--restore', 'a.tar.gz', 'd'], 'exclude'),
    (['--verify', 'a.tar.gz', '-e'], '-e'),
    (['--conf', 'c.json', '--bogus'], '--bogus'),
])
@pytest.mark.unit
def test_bad_command_lines_are_one_line_errors(argv, culprit, capsys):
    assert backup_model.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and culprit in err


@pytest.mark.integration
def test_bad_conf_and_untrained_work_dir(make_conf, trained, tmp_path, capsys):
    assert run('--conf', make_conf(batch_size=0), '-o', tmp_path / 'a') == 2
    assert 'batch_size' in capsys.readouterr().err
    conf_path = make_conf()  # valid, but its work_dir was never trained
    assert run('--conf', conf_path, '-o', tmp_path / 'a') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'output' in err and 'train first' in err
    assert run('--conf', trained[0], '-o', tmp_path / 'a', '-p', 'iter_99') == 2
    assert 'iter_99' in capsys.readouterr().err
    assert not (tmp_path / 'a').exists() or listing(tmp_path / 'a') == []


# ---------------------------------------------------------------- never overwrite, atomic

@pytest.mark.integration
def test_existing_archive_is_never_overwritten(trained, tmp_path, monkeypatch):
    conf_path, _ = trained
    monkeypatch.setattr(backup_create, 'timestamp', lambda: '20990101_000000')
    name = backup_create.short_model_name(read_conf(conf_path).model.model_name) + '_20990101_000000'
    taken = tmp_path / f'{name}.tar.gz'
    taken.write_bytes(b'an older archive')
    first = make_backup(conf_path, tmp_path)
    second = make_backup(conf_path, tmp_path)
    assert taken.read_bytes() == b'an older archive'
    assert first.name == f'{name}_1.tar.gz' and second.name == f'{name}_2.tar.gz'
    assert run('--verify', first) == 0 and run('--verify', second) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([taken.name, first.name, second.name])


@pytest.mark.integration
@pytest.mark.parametrize('exc, code', [(RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_interrupted_backup_leaves_nothing(trained, tmp_path, monkeypatch, capsys, exc, code):
    conf_path, _ = trained
    out = tmp_path / 'out'
    out.mkdir()
    original, calls = backup_archive._add_file, []

    def add_then_fail(tar, arcname, source):
        calls.append(arcname)
        if len(calls) == 3:  # mid-write: some files are in the temporary archive already
            assert [p.name for p in out.iterdir() if p.name.endswith('.tmp')]
            raise exc('interrupted')
        return original(tar, arcname, source)

    monkeypatch.setattr(backup_archive, '_add_file', add_then_fail)
    capsys.readouterr()
    assert run('--conf', conf_path, '-o', out) == code  # the harness: a crash exits 1, Ctrl-C 130
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'interrupted' in err
    assert len(calls) == 3
    assert list(out.iterdir()) == []  # no archive under the final name, no temporary file


@pytest.mark.integration
def test_write_error_is_one_line_and_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    conf_path, _ = trained
    out = tmp_path / 'out'

    def disk_full(*a, **k):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(backup_archive, '_publish', disk_full)
    assert run('--conf', conf_path, '-o', out) == 1  # a full disk is a failure (exit 1), not bad input (2)
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'No space left' in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- verify

@pytest.mark.integration
def test_verify_names_changed_missing_and_extra_files(archive, tmp_path, capsys):
    top = archive.name[:-len('.tar.gz')]

    def flip(name, data):
        if name.endswith('/model/config.json'):
            data = bytearray(data)
            data[10] ^= 1
            return bytes(data)
        return data

    changed = repack(archive, tmp_path / 'changed.tar.gz', change=flip)
    capsys.readouterr()
    assert run('--verify', changed) == 1
    out, err = capsys.readouterr()
    assert f'changed: {top}/model/config.json' in out.splitlines()
    assert err.startswith('error: ') and err.count('\n') == 1 and 'model/config.json' in err

    other = repack(archive, tmp_path / 'other.tar.gz', drop={f'{top}/model/vocab.json'},
                   add={f'{top}/model/extra.txt': b'x', 'stray.txt': b'y'})
    assert run('--verify', other) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f'missing: {top}/model/vocab.json' in lines and f'extra: {top}/model/extra.txt' in lines
    assert any(line.startswith('extra: stray.txt') for line in lines)

    assert run('--restore', changed, tmp_path / 'restored') == 1  # refused before anything is written
    assert not (tmp_path / 'restored').exists()


@pytest.mark.integration
def test_unreadable_archives_exit_2(archive, tmp_path, capsys):
    data = archive.read_bytes()
    truncated = tmp_path / 'truncated.tar.gz'
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / 'garbage.tar.gz'
    garbage.write_bytes(bytes(range(256)) * 64)
    no_manifest = write_tar(tmp_path / 'plain.tar.gz', [file_info('x/model/a.txt', b'a')])
    bad_manifest = write_tar(tmp_path / 'badman.tar.gz', [file_info('x/manifest.json', b'{not json')])
    for path in (truncated, garbage, no_manifest, bad_manifest, tmp_path / 'missing.tar.gz'):
        capsys.readouterr()
        assert run('--verify', path) == 2, path
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and str(path) in err
        assert run('--restore', path, tmp_path / 'restored') == 2
        assert not (tmp_path / 'restored').exists()


@pytest.mark.e2e
def test_verify_does_not_import_torch(archive):
    code = ('import sys; from utils import backup_model; rc = backup_model.main(["--verify", sys.argv[1]]); '
            'assert "torch" not in sys.modules and "modelscope" not in sys.modules; sys.exit(rc)')
    proc = subprocess.run([sys.executable, '-c', code, str(archive)], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- unsafe archives

def _evil_archives(tmp_path):
    manifest = file_info('x/manifest.json', json.dumps({'files': {}}).encode())
    link = tarfile.TarInfo('x/model/link')
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / 'outside.txt')
    rel_link = tarfile.TarInfo('x/model/up')
    rel_link.type, rel_link.linkname = tarfile.SYMTYPE, '../../../outside.txt'
    hard = tarfile.TarInfo('x/model/hard')
    hard.type, hard.linkname = tarfile.LNKTYPE, 'x/manifest.json'
    dev = tarfile.TarInfo('x/model/dev')
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    return {
        'dotdot': [manifest, file_info('../evil', b'evil')],
        'dotdot_inside': [manifest, file_info('x/../../evil', b'evil')],
        'absolute': [manifest, file_info(str(tmp_path / 'abs_evil'), b'evil')],
        'symlink': [manifest, (link, None)],
        'relative_symlink': [manifest, (rel_link, None)],
        'hardlink': [manifest, (hard, None)],
        'device': [manifest, (dev, None)],
        'evil_first': [file_info('../evil', b'evil'), manifest],
    }


@pytest.mark.parametrize('kind', ['dotdot', 'dotdot_inside', 'absolute', 'symlink', 'relative_symlink',
                                  'hardlink', 'device', 'evil_first'])
@pytest.mark.unit
def test_unsafe_archive_is_refused_and_nothing_written(tmp_path, capsys, kind):
    sandbox = tmp_path / 'sandbox'
    sandbox.mkdir()
    path = write_tar(tmp_path / f'{kind}.tar.gz', _evil_archives(tmp_path)[kind])
    before = listing(tmp_path)
    for dest in (sandbox / 'new', sandbox / 'existing'):
        if dest.name == 'existing':
            dest.mkdir()
        capsys.readouterr()
        assert run('--restore', path, dest) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and 'refusing' in err
        assert dest.name == 'existing' or not dest.exists()
        assert not dest.exists() or listing(dest) == []
    assert listing(tmp_path) == sorted(before + ['sandbox/existing'])
    assert not (tmp_path / 'evil').exists() and not (tmp_path.parent / 'evil').exists()
    assert run('--verify', path) == 1  # verify lists the entry as unsafe
    assert 'unsafe: ' in capsys.readouterr().out


@pytest.mark.integration
def test_restore_refuses_an_existing_target(archive, tmp_path, capsys):
    assert run('--restore', archive, tmp_path) == 0
    top = tmp_path / archive.name[:-len('.tar.gz')]
    (top / 'model' / 'config.json').write_text('mine')
    capsys.readouterr()
    assert run('--restore', archive, tmp_path) == 2
    assert 'already exists' in capsys.readouterr().err
    assert (top / 'model' / 'config.json').read_text() == 'mine'
    assert [p.name for p in tmp_path.iterdir()] == [top.name]  # no staging folder left behind


@pytest.mark.integration
def test_backup_refused_while_training_holds_the_work_dir(trained_copy, tmp_path, capsys):
    from utils.core.workdir import WorkDirLock
    with WorkDirLock(str(trained_copy[1])):  # the lock file is written: a copy of the session's run
        assert backup_model.main(['--conf', trained_copy[0], '-o', str(tmp_path / 'b')]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'in use by another training run' in errors[0]
    assert not (tmp_path / 'b').exists() or not list((tmp_path / 'b').iterdir())
