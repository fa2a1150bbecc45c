"""Reading the data beside the start-up's imports (utils/core/beside.py): the child's value or its exception reaches
the parent unchanged; a child that dies is named; without a fork the same value comes from this process; and a
real `finetune.py train` (a fresh process, where the fork is taken) reports a bad data file as before."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from utils.core.beside import Beside, ChildDied, can_fork
from utils.core.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _pid_and(value):
    return os.getpid(), value


def _fail(message):
    raise DataError(message)


class _BadRow(DataError):
    def __init__(self, row, reason):  # bad input that pickle cannot re-create
        super().__init__(f'row {row}: {reason}')


def _fail_bad_row():
    raise _BadRow(3, 'image missing')


def _sleep_then(value):
    import time
    time.sleep(60)
    return value


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickle re-creates it with one argument: it cannot travel as it is
        super().__init__(f'{a} and {b}')


def _fail_unpicklable():
    raise _Unpicklable('one', 'two')


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.unit
def test_the_value_is_computed_in_a_child_and_handed_back():
    job = Beside(_pid_and, {'rows': list(range(100_000))}, fork=True)
    pid, value = job.result()
    assert job.pid is not None and pid == job.pid != os.getpid()
    assert value == {'rows': list(range(100_000))}  # more than a pipe's buffer: read while the child writes
    assert job.seconds >= 0 and job.waited >= 0


@pytest.mark.unit
def test_without_a_fork_the_same_value_comes_from_this_process(monkeypatch):
    monkeypatch.setenv('OFASTYLEIC_NO_FORK', '1')
    assert not can_fork()
    job = Beside(_pid_and, 'x')
    assert job.pid is None and job.result() == (os.getpid(), 'x')


@pytest.mark.unit
def test_torch_imported_means_no_fork():
    import torch  # noqa: F401 - its thread pools do not survive a fork; and nothing would be left to overlap
    assert not can_fork()


@pytest.mark.unit
@pytest.mark.parametrize('fork', [True, False])
def test_the_childs_exception_is_raised_here_with_its_type_and_message(fork):
    job = Beside(_fail, 'train file t.json, row 3: row without "comment"', fork=fork)
    with pytest.raises(DataError) as e:
        job.result()
    assert str(e.value) == 'train file t.json, row 3: row without "comment"'  # what the one-line error shows
    if fork:  # --debug shows where it was raised
        assert any(f'child process {job.pid}' in note for note in e.value.__notes__)


@pytest.mark.unit
def test_an_exception_that_cannot_travel_arrives_as_its_type_and_message():
    with pytest.raises(RuntimeError, match='_Unpicklable: one and two'):
        Beside(_fail_unpicklable, fork=True).result()


@pytest.mark.unit
def test_a_child_that_dies_is_named_with_its_signal():
    job = Beside(_die, fork=True)
    with pytest.raises(ChildDied, match=rf'pid {job.pid}.*signal {int(signal.SIGKILL)}'):
        job.result()


@pytest.mark.e2e
def test_finetune_reads_the_data_in_a_child_and_reports_a_bad_file_as_before(tmp_path, tiny_model, pcap):
    """A fresh `python3 finetune.py train` forks (torch is not imported yet): a malformed train file is still one
    line and exit 2, nothing is written to work_dir; with --debug the traceback names the child that read it."""
    data = tmp_path / 'data'
    data.mkdir()
    for split in ('val', 'test'):
        (data / f'{split}.json').write_text(Path(pcap[0], f'{split}.json').read_text())
    (data / 'train.json').write_text('{"not": "a list"}')
    conf = {'model_name': tiny_model, 'tokenize_style': True, 'img_addr': pcap[1], 'dataset_path': str(data),
            'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'test.json',
            'work_dir': str(tmp_path / 'work'), 'patch_image_size': 32, 'max_image_size': 32}
    path = tmp_path / 'conf.json'
    path.write_text(json.dumps(conf))
    env = {k: v for k, v in os.environ.items() if k != 'OFASTYLEIC_NO_FORK'}
    for debug in ([], ['--debug']):
        p = subprocess.run([sys.executable, 'finetune.py', 'train', '--conf', str(path), *debug], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == (1 if debug else 2), p.stderr[-2000:]
        if debug:
            assert 'DataError' in p.stderr and '(raised in the child process' in p.stderr
        else:
            errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
            assert errors == [f'error: train file {data / "train.json"} must hold a JSON list of rows, got dict']
    assert not (tmp_path / 'work').exists()


@pytest.mark.unit
def test_ended_tells_a_finished_child_without_waiting_for_it():
    import time
    job = Beside(_fail, 'bad row', fork=True)
    deadline = time.time() + 30
    while not job.ended():
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(DataError, match='bad row'):
        job.result()
    assert not Beside(_pid_and, 1, fork=False).ended()  # no child: nothing ends early


@pytest.mark.unit
def test_bad_input_that_cannot_travel_is_still_bad_input():
    from utils.core.errors import BadInput
    with pytest.raises(BadInput) as e:  # exit 2, as in the parent
        Beside(_fail_bad_row, fork=True).result()
    assert str(e.value) == 'row 3: image missing'


@pytest.mark.unit
def test_leaving_the_block_without_the_result_ends_the_child():
    """The parent failed (or was interrupted) while the child read: the child does not outlive it."""
    with pytest.raises(KeyError):
        with Beside(_sleep_then, 'x' * 1_000_000, fork=True) as job:
            raise KeyError('the parent failed')
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(job.pid, os.WNOHANG)
    assert job.ended()
