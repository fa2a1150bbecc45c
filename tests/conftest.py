"""Shared fixtures: a tiny random OFA model dir and a small PCap-format data set, built offline; the test tiers
(every test is exactly one of the markers `unit`, `integration`, `e2e`, see pyproject.toml); one METEOR process
for the session; the session's trained run kept read-only."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption  # noqa: E402

SIZES = {'train': 24, 'val': 4, 'test': 8}
TIERS = ('unit', 'integration', 'e2e')
# fixtures that train a model: a unit test must not pull one in, even indirectly
TRAINING_FIXTURES = {'trained', 'trained_copy', 'random_output', 'styled', 'model_256'}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an untiered test fails every run, whatever the -m
def pytest_collection_modifyitems(config, items):
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            problems.append(f'{item.nodeid}: {"no tier" if not tiers else "several tiers: " + ", ".join(tiers)}')
        elif tiers == ['unit'] and TRAINING_FIXTURES & set(item.fixturenames):
            problems.append(f'{item.nodeid}: a unit test uses a fixture that trains '
                            f'({", ".join(sorted(TRAINING_FIXTURES & set(item.fixturenames)))})')
    if problems:
        raise pytest.UsageError('every test needs exactly one tier marker (' + ', '.join(TIERS) + '; module '
                                '`pytestmark = pytest.mark.X` or a per-test mark), and unit tests train nothing:\n  '
                                + '\n  '.join(problems))


_meteor_starts = []  # one entry per pycocoevalcap Meteor() (a Java process) started in this process


@pytest.fixture(scope='session', autouse=True)
def one_meteor_process():
    """Every score() of the session (evals, validations during training, the metrics tests) uses one METEOR
    process, started on first use (utils.evaluation.scoring.shared_meteor). Counted for the summary line."""
    from pycocoevalcap.meteor.meteor import Meteor

    from utils.evaluation import scoring
    init = Meteor.__init__

    def counted(self, *args, **kwargs):
        _meteor_starts.append(1)
        init(self, *args, **kwargs)
    mp = pytest.MonkeyPatch()
    mp.setattr(Meteor, '__init__', counted)
    with scoring.shared_meteor():
        yield
    mp.undo()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f'pycocoevalcap METEOR processes started in this process: {len(_meteor_starts)}')


@pytest.fixture(scope='session')
def meteor(one_meteor_process):
    """The session's METEOR scorer (pycocoevalcap's Meteor), for computing expected figures directly."""
    from utils.evaluation import scoring
    return scoring.start_meteor()


def coco_scores(predictions, references, meteor):
    """The figures pycocoevalcap itself gives (COCOEvalCap.evaluate's flow, without SPICE), computed here
    without the toolkit: PTBTokenizer, then Bleu(4), Meteor, Rouge, Cider on the tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{'caption': r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{'caption': p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = dict(zip(('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4'), bleu))
    out['METEOR'], _ = meteor.compute_score(gts, res)
    out['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    out['CIDEr'], _ = Cider().compute_score(gts, res)
    return out


def tree_snapshot(*paths):
    """{path: (is_dir, size, mtime_ns)} of every file and folder under (and including) paths."""
    snap = {}
    for root in map(Path, paths):
        for p in [root, *root.rglob('*')] if root.is_dir() else [root]:
            st = p.lstat()
            snap[str(p)] = (p.is_dir(), st.st_size if not p.is_dir() else None, st.st_mtime_ns)
    return snap


def snapshot_diff(before, after):
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return ([f'added {k}' for k in sorted(after.keys() - before.keys())]
            + [f'removed {k}' for k in sorted(before.keys() - after.keys())] + [f'changed {k}' for k in changed])


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory):
    from utils.demo.tiny_model import build_tiny_ofa
    texts = [caption(st, c, s, alt) for st in STYLES for c in COLOURS for s in SHAPES for alt in (False, True)]
    return build_tiny_ofa(str(tmp_path_factory.mktemp('tiny_ofa')), texts, image_size=32)


@pytest.fixture(scope='session')
def pcap(tmp_path_factory):
    """(dataset_path, img_addr) of a small demo-style data set: 48 train rows, 4 styles."""
    root = tmp_path_factory.mktemp('pcap')
    build_demo_data(str(root / 'data'), str(root / 'images'), sizes=SIZES)
    return str(root / 'data'), str(root / 'images')


@pytest.fixture
def make_conf(tmp_path, tiny_model, pcap):
    """Write a conf JSON (valid unless overridden) and return its path."""
    def _make(**overrides):
        conf = {
            'model_name': tiny_model, 'model_revision': None, 'tokenize_style': True,
            'img_addr': pcap[1], 'dataset_path': pcap[0], 'file_attr': '.jpg',
            'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'test.json',
            'work_dir': str(tmp_path / 'work'), 'prompt': '',
            'batch_size': 8, 'max_epochs': 1, 'lr': 1e-3, 'log_interval': 1,
            'patch_image_size': 32, 'max_image_size': 32, 'beam_size': 2, 'max_len': 12,
            'checkpoint': {'by_epoch': False, 'interval': 3, 'max_checkpoint_num': 5},
            'eval_interval': None, 'eval_every_epoch': False,  # no validation unless a test asks for it
        }
        conf.update(overrides)
        conf = {k: v for k, v in conf.items() if v != '__drop__'}
        path = tmp_path / f'conf_{len(list(tmp_path.glob("conf_*.json")))}.json'
        path.write_text(json.dumps(conf))
        return str(path)
    return _make


def read_log_json(work_dir, run=-1):
    """ModelScope's TextLoggerHook lines of one run in work_dir (default: the newest; 0: the first)."""
    logs = sorted(Path(work_dir).glob('*.log.json'), key=os.path.getmtime)
    return [json.loads(line) for line in logs[run].read_text().splitlines() if line.strip()]


@pytest.fixture(scope='session')
def trained(tmp_path_factory, tiny_model, pcap):
    """(conf path, work_dir) of a finished run: two epochs of 6 iterations, a checkpoint every 3.

    Read-only: shared by the whole session, so a test that writes into its work_dir (eval results, curves,
    a resumed run, a lock) takes `trained_copy`. Checked: at the end of the session the conf and every file
    and folder of work_dir (names, sizes, mtimes) must be as training left them."""
    import finetune
    tmp = tmp_path_factory.mktemp('train')
    conf = {
        'model_name': tiny_model, 'tokenize_style': True, 'img_addr': pcap[1], 'dataset_path': pcap[0],
        'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'test.json',
        'work_dir': str(tmp / 'work'), 'prompt': None, 'batch_size': 8, 'max_epochs': 2, 'lr': 2e-3,
        'warmup': 0.0, 'log_interval': 1, 'patch_image_size': 32, 'max_image_size': 32,
        'checkpoint': {'by_epoch': False, 'interval': 3, 'max_checkpoint_num': 5},
    }
    path = tmp / 'conf.json'
    path.write_text(json.dumps(conf))
    assert finetune.main(['train', '--conf', str(path)]) == 0
    work = Path(conf['work_dir'])
    before = tree_snapshot(path, work)
    yield str(path), work
    changes = snapshot_diff(before, tree_snapshot(path, work))
    if changes:
        pytest.fail('the session-wide `trained` run was written to by a test (use `trained_copy`):\n  '
                    + '\n  '.join(changes[:20]), pytrace=False)


def copy_trained(trained, dest):
    """(conf path, work_dir) of a copy of the `trained` run in dest (its conf names the copy's work_dir).
    copytree keeps the mtimes, so "the newest log/checkpoint" means the same files as in the original."""
    conf = json.loads(Path(trained[0]).read_text())
    work = Path(dest) / 'trained_work'
    shutil.copytree(trained[1], work)
    conf['work_dir'] = str(work)
    path = Path(dest) / 'trained_conf.json'
    path.write_text(json.dumps(conf))
    return str(path), work


@pytest.fixture
def trained_copy(trained, tmp_path):
    """(conf path, work_dir) of a private copy of the `trained` run, for a test that writes into work_dir."""
    return copy_trained(trained, tmp_path)


@pytest.fixture(scope='session')
def random_output(trained, tiny_model, tmp_path_factory):
    """The `trained` run's output/ with the untrained tiny model's random weights. The trained tiny model says
    much the same whatever the image or style; these weights do not, so equal captions mean something."""
    model_dir = tmp_path_factory.mktemp('random_output') / 'output'
    shutil.copytree(Path(trained[1], 'output'), model_dir)
    shutil.copy(Path(tiny_model, 'pytorch_model.bin'), model_dir / 'pytorch_model.bin')
    from utils.core.checksums import write_weights_checksum
    write_weights_checksum(str(model_dir))  # the checksum of the weights it now holds
    return str(model_dir)


def wait_for_web_demo(proc, url: str, log, timeout: float = 240) -> None:
    """Wait until the web_demo.py process ``proc`` answers at url (its output in the file ``log``)."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f'web_demo.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}'
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline, f'web_demo.py did not answer in time:\n{log.read_text()[-3000:]}'
        time.sleep(1)
