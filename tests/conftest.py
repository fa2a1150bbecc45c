"""Shared fixtures: a tiny random OFA model dir and a small PCap-format data set, built offline."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption  # noqa: E402

SIZES = {'train': 24, 'val': 4, 'test': 8}


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
    """(conf path, work_dir) of a finished run: two epochs of 6 iterations, a checkpoint every 3."""
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
    return str(path), Path(conf['work_dir'])


@pytest.fixture(scope='session')
def random_output(trained, tiny_model, tmp_path_factory):
    """The `trained` run's output/ with the untrained tiny model's random weights. The trained tiny model says
    much the same whatever the image or style; these weights do not, so equal captions mean something."""
    import shutil
    model_dir = tmp_path_factory.mktemp('random_output') / 'output'
    shutil.copytree(Path(trained[1], 'output'), model_dir)
    shutil.copy(Path(tiny_model, 'pytorch_model.bin'), model_dir / 'pytorch_model.bin')
    return str(model_dir)
