"""The README's first command, `finetune.py train --conf conf_examples/demo.json`, end to end on a short run:
the demo conf with its paths moved to a temporary dir (nothing there yet) and fewer rows and epochs."""
import json
from pathlib import Path

import finetune
from utils.core.conf import load_conf
from conftest import ROOT


def test_demo_conf_builds_its_assets_trains_and_reports(tmp_path, capsys):
    conf = json.loads((ROOT / 'conf_examples' / 'demo.json').read_text())
    assert conf['demo'] is True
    for key in ('model_name', 'img_addr', 'dataset_path', 'work_dir'):
        conf[key] = str(tmp_path / Path(conf[key]).name)
    conf.update(max_epochs=1, max_train_samples=32, val_max_samples=4, max_len=4)  # short: the path, not the skill
    path = tmp_path / 'demo.json'
    path.write_text(json.dumps(conf))

    assert finetune.main(['train', '--conf', str(path)]) == 0
    assert (tmp_path / 'tiny_ofa' / 'pytorch_model.bin').is_file()         # the tiny model was built
    assert len(list((tmp_path / 'images').glob('*.jpg'))) == 320 + 16 + 32  # and the data set
    summary = json.loads(next((tmp_path / 'demo').glob('train_*.json')).read_text())
    report = summary['demo']
    assert report['captions'] == 32 * 4  # every held-out image in every style
    assert 0 <= report['style_followed'] <= 128 and 0 <= report['content_correct'] <= 128
    assert 'held-out captions follow the requested style' in capsys.readouterr().err

    model_bin = tmp_path / 'tiny_ofa' / 'pytorch_model.bin'
    built = model_bin.stat().st_mtime_ns
    load_conf(str(path))  # what every later command does first
    assert model_bin.stat().st_mtime_ns == built  # assets that exist are not built again
