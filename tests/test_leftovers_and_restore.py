"""Issue 22, items 3 and 7: a restore confines every path to its target (the manifest's model_dir and conf
included) and checks sizes; temporaries of an interrupted write are swept at the next start (training's under the
work_dir lock, backups' and restores' when their writer is gone or they are an hour old); the web demo cleans up
on SIGTERM and logs a malformed request as one line."""
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for_web_demo

from utils import backup_model

ROOT = Path(__file__).resolve().parents[1]
TOP = 'tiny_20260101_000000'
FILES = {'model/configuration.json': b'{}', 'model/pytorch_model.bin': b'weights', 'conf.json': b'{"a": 1}'}


def crafted_archive(path, **manifest_fields):
    """A backup-shaped archive whose manifest has correct hashes and the given fields."""
    files = {}
    for rel, data in FILES.items():
        files[rel] = {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data)}
    manifest = {'format': 'ofa-stylish-ic-backup', 'format_version': 1, 'model_dir': 'model', 'conf': 'conf.json',
                'files': files}
    manifest.update(manifest_fields)
    if 'sizes' in manifest:
        for entry in files.values():
            entry['size'] = manifest['sizes']
        del manifest['sizes']
    with tarfile.open(path, 'w:gz') as tar:
        for rel, data in list(FILES.items()) + [('manifest.json', json.dumps(manifest).encode())]:
            ti = tarfile.TarInfo(f'{TOP}/{rel}')
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob('*'))


# ---------------------------------------------------------------- 3. restore confines, verify checks sizes

@pytest.mark.unit
def test_a_sound_crafted_archive_restores(tmp_path, capsys):
    archive = crafted_archive(tmp_path / 'ok.tar.gz')
    assert backup_model.main(['--verify', str(archive)]) == 0
    assert backup_model.main(['--restore', str(archive), str(tmp_path / 'dest')]) == 0
    out = capsys.readouterr().out
    assert f'model dir: {tmp_path / "dest" / TOP / "model"}' in out
    assert f'conf: {tmp_path / "dest" / TOP / "conf.json"}' in out


@pytest.mark.parametrize('fields', [
    {'model_dir': '/etc'}, {'model_dir': '../../..'}, {'model_dir': 'model/../../..'}, {'model_dir': '.'},
    {'model_dir': 'nothing_here'}, {'model_dir': 5}, {'conf': '/etc/passwd'}, {'conf': '../../../etc/passwd'},
    {'conf': 'model'},
], ids=lambda f: '-'.join(f'{k}={v}' for k, v in f.items()))
@pytest.mark.unit
def test_manifest_paths_outside_the_target_are_refused(tmp_path, capsys, fields):
    archive = crafted_archive(tmp_path / 'evil.tar.gz', **fields)
    dest = tmp_path / 'dest'
    capsys.readouterr()
    assert backup_model.main(['--restore', str(archive), str(dest)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith('error: ') and err.count('\n') == 1 and 'refusing' in err, err
    assert 'model dir:' not in out and '/etc' not in out and 'conf:' not in out, out
    assert not dest.exists() or listing(dest) == []
    assert backup_model.main(['--verify', str(archive)]) == 1  # verify lists the field as unsafe
    assert 'unsafe: ' in capsys.readouterr().out


@pytest.mark.unit
def test_verify_checks_sizes(tmp_path, capsys):
    archive = crafted_archive(tmp_path / 'sizes.tar.gz', sizes=999999)
    assert backup_model.main(['--verify', str(archive)]) == 1
    out = capsys.readouterr().out
    assert out.count('changed: ') == len(FILES) and '999999' in out and 'ok:' not in out
    assert backup_model.main(['--restore', str(archive), str(tmp_path / 'dest')]) == 1
    assert 'model dir:' not in capsys.readouterr().out
    assert not (tmp_path / 'dest' / TOP).exists()


# ---------------------------------------------------------------- 7. temporaries swept at the next start

def host_tag() -> str:
    """The writer tag's host part, as utils.core.io.writer_tag writes it (spelled out: the old code has none)."""
    import re
    return '@' + (re.sub(r'[^A-Za-z0-9_]+', '_', socket.gethostname()) or 'host')


def dead_pid() -> int:
    return int(Path('/proc/sys/kernel/pid_max').read_text()) + 1  # beyond the kernel's pids: never running


@pytest.mark.unit
def test_stale_backup_temporaries_are_swept_a_live_ones_kept(tmp_path):
    from utils.backup.archive import write_archive
    tag = host_tag()
    old = tmp_path / 'm_1.tar.gz.abcd1234.tmp'                        # untagged, unmodified for 2 hours
    dead = tmp_path / f'm_2.tar.gz.{tag}-{dead_pid()}.abcd1234.tmp'    # its writer is gone
    live = tmp_path / f'm_3.tar.gz.{tag}-{os.getpid()}.abcd1234.tmp'   # its writer runs
    fresh = tmp_path / 'm_4.tar.gz.qwer5678.tmp'                      # untagged, just written
    other = tmp_path / 'notes.tmp'
    for p in (old, dead, live, fresh, other):
        p.write_bytes(b'x')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    final = write_archive(str(tmp_path), 'm_5', [], {'model_dir': 'model'})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, fresh.name, other.name,
                                                                  os.path.basename(final)])


@pytest.mark.unit
def test_a_killed_restores_staging_folder_is_swept(tmp_path):
    tag = host_tag()
    dest = tmp_path / 'dest'
    stale = dest / f'.{TOP}.{tag}-{dead_pid()}.xyz.partial'
    (stale / TOP).mkdir(parents=True)
    archive = crafted_archive(tmp_path / 'ok.tar.gz')
    assert backup_model.main(['--restore', str(archive), str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [TOP]


LEFTOVERS = ['iter_3.pth.tmp', 'iter_3_trainer_state.pth.tmp', 'iter_9.sha256.tmp', 'train_20260101_000000.json.tmp',
             'output.partial/configuration.json', 'output_best.tmp/pytorch_model.bin', 'output/pytorch_model.bin.tmp',
             'output/weights.sha256.tmp']
NOT_TRAININGS = ['eval_20260101_000000.json.tmp', 'notes.tmp']  # an eval (no lock) may be writing these


def make_leftovers(work_dir):
    for rel in LEFTOVERS + NOT_TRAININGS:
        p = Path(work_dir, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b'half')


@pytest.mark.unit
def test_sweep_needs_the_lock_and_another_runs_temporaries_stay(tmp_path):
    from utils.core.errors import WorkDirInUse
    from utils.core.workdir import WorkDirLock
    make_leftovers(tmp_path)
    with pytest.raises(RuntimeError):
        WorkDirLock(str(tmp_path)).sweep()
    with WorkDirLock(str(tmp_path)):  # a running training holds the work_dir: a second start sweeps nothing
        with pytest.raises(WorkDirInUse):
            with WorkDirLock(str(tmp_path)) as second:
                second.sweep()
        assert all(Path(tmp_path, rel).exists() for rel in LEFTOVERS)
    with WorkDirLock(str(tmp_path)) as lock:
        removed = lock.sweep()
    assert sorted(removed) == sorted({rel.split('/')[0] if rel.split('/')[0] != 'output' else rel
                                      for rel in LEFTOVERS})
    assert all(Path(tmp_path, rel).exists() for rel in NOT_TRAININGS)


@pytest.mark.integration
def test_a_killed_trainings_temporaries_are_swept_at_the_next_start(trained_copy, caplog):
    import logging

    import finetune
    conf_path, work = trained_copy
    make_leftovers(work)
    caplog.set_level(logging.INFO)
    assert finetune.main(['train', '--conf', conf_path, '-p', 'latest']) == 0
    left = [rel for rel in LEFTOVERS if Path(work, rel).exists() or Path(work, rel.split('/')[0]).name in
            ('output.partial', 'output_best.tmp') and Path(work, rel.split('/')[0]).exists()]
    assert left == []
    assert all(Path(work, rel).exists() for rel in NOT_TRAININGS)
    assert (work / 'output' / 'pytorch_model.bin').is_file()
    lines = [r.getMessage() for r in caplog.records if 'temporaries of an interrupted run' in r.getMessage()]
    assert len(lines) == 1 and 'iter_3.pth.tmp' in lines[0] and 'output.partial' in lines[0], lines


# ---------------------------------------------------------------- 7. the web demo: SIGTERM, malformed requests

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def post(url, body: bytes, content_type='application/json'):
    req = urllib.request.Request(url, data=body, headers={'Content-Type': content_type}, method='POST')
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.e2e
def test_web_demo_sigterm_removes_its_folder_and_bad_requests_are_one_line(trained, tmp_path):
    port = free_port()
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    log = tmp_path / 'web_demo.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, 'web_demo.py', '--conf', trained[0], '--port', str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(tmp)))
    url = f'http://127.0.0.1:{port}'
    try:
        wait_for_web_demo(proc, url, log)
        folders = list(tmp.glob('web_demo_*'))
        assert len(folders) == 1 and list(folders[0].rglob('sample*')), listing(tmp)
        before = log.read_text().count('\n')
        # malformed client requests: an event that does not exist, a session that does not exist
        assert post(f'{url}/gradio_api/queue/join', json.dumps({'data': [], 'fn_index': 99,
                                                                 'session_hash': 'x'}).encode()) == 500
        try:  # the server fails mid-stream: the client sees a broken chunked body
            with urllib.request.urlopen(f'{url}/gradio_api/queue/data?session_hash=nobody', timeout=10) as r:
                r.read()
        except (OSError, ValueError, http.client.HTTPException):
            pass
        time.sleep(2)
        # (the server's start-up line may land after `before` was taken, under load: it is not a request's)
        new = [line for line in log.read_text().splitlines()[before:] if 'INFO web_demo: web demo on' not in line]
        assert 'Traceback' not in '\n'.join(new)
        assert len([line for line in new if 'malformed request' in line]) == 2, new
        assert len(new) == 2, new
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(tmp.glob('web_demo_*')) == [], listing(tmp)  # the uploads and samples are gone
    assert 'Traceback' not in log.read_text()
