"""What a new user following the README meets: relative paths run from another directory, which model the
captioning commands use (and record), the flags' --help, the flags' errors, Ctrl-C in the web demo, and the
offline "own data" path (the demo's data set exported as CSV / JSON lines / parquet)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
import pre_inference
import web_demo
from conftest import ROOT, wait_for_web_demo
from utils.core.errors import ConfError, UsageError
from utils.demo.export import COLUMNS, export_demo_data

OWN_DATA_DEMO = ROOT / 'conf_examples' / 'own_data_demo.json'


def help_of(parser) -> str:
    return ' '.join(parser.format_help().split())  # argparse wraps lines


def subcommand(name):
    return finetune.build_parser()._subparsers._group_actions[0].choices[name]


# ---------------------------------------------------------------- relative paths

@pytest.mark.unit
def test_eval_from_another_directory_says_where_it_looked_and_builds_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert finetune.main(['eval', '--conf', str(ROOT / 'conf_examples' / 'demo.json')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0
    assert f'no trained model at {tmp_path / "work_dirs" / "demo" / "output"}' in err
    assert f'relative paths are read from the current directory, {tmp_path}' in err
    assert not (tmp_path / 'work_dirs').exists()  # no second demo built for an eval that cannot run


@pytest.mark.unit
def test_no_trained_model_at_an_absolute_work_dir_has_no_hint(tmp_path, capsys):
    conf = json.loads((ROOT / 'conf_examples' / 'demo.json').read_text())
    conf['work_dir'] = str(tmp_path / 'nowhere')
    path = tmp_path / 'c.json'
    path.write_text(json.dumps(conf))
    assert finetune.main(['eval', '--conf', str(path)]) == 2
    err = capsys.readouterr().err
    assert f'no trained model at {tmp_path / "nowhere" / "output"}: train first' in err and 'relative' not in err


@pytest.mark.unit
def test_the_demo_build_log_names_the_absolute_folders(tmp_path, monkeypatch, caplog):
    from utils.demo import data, tiny_model
    built = []
    monkeypatch.setattr(data, 'build_demo_data', lambda *a, **k: built.append('data'))
    monkeypatch.setattr(tiny_model, 'build_tiny_ofa', lambda *a, **k: built.append('model'))
    monkeypatch.chdir(tmp_path)
    caplog.set_level('INFO')
    data.ensure_demo_assets('work_dirs/demo_assets/tiny_ofa', 'work_dirs/demo_assets/data', 'work_dirs/demo_assets/images')
    assert built == ['data', 'model']
    text = caplog.text
    for folder in ('tiny_ofa', 'data', 'images'):
        assert str(tmp_path / 'work_dirs' / 'demo_assets' / folder) in text
    assert f'relative paths are read from the current directory, {tmp_path}' in text


# ---------------------------------------------------------------- --help

@pytest.mark.unit
def test_command_flags_show_their_defaults():
    caption = help_of(pre_inference.build_parser())
    assert 'caption N test samples (default: all)' in caption
    assert 'where inference_{time}.json goes (default: work_dir)' in caption
    assert "the model that captions: a model dir or hub id (default: {work_dir}/output)" in caption
    demo = help_of(web_demo.build_parser())
    for text in ('(default: 127.0.0.1)', 'port to listen on (default: 7860)', 'in MB (default: 10)'):
        assert text in demo
    evaluate = help_of(subcommand('eval'))
    assert 'score only the first N test rows (default: all)' in evaluate
    for text in (caption, demo, evaluate, help_of(subcommand('train'))):
        assert 'default: None' not in text and 'default: False' not in text


@pytest.mark.unit
def test_train_and_eval_have_their_own_checkpoint_help():
    train = help_of(subcommand('train'))
    evaluate = help_of(subcommand('eval'))
    assert 'resume from this CheckpointHook checkpoint' in train and 'score this' not in train
    assert "score this CheckpointHook checkpoint's weights" in evaluate and 'resume' not in evaluate


@pytest.mark.unit
def test_model_name_is_the_base_model_for_the_captioning_commands():
    for parser in (pre_inference.build_parser(), web_demo.build_parser(), subcommand('eval')):
        text = help_of(parser)
        assert 'the base model (hub id or local dir) the captioning model was trained from' in text
        assert '-m picks the model that captions' in text
    assert 'the captioning model was trained from' not in help_of(subcommand('train'))  # train: what it fine-tunes


# ---------------------------------------------------------------- flag errors

FLAG_CASES = [
    (pre_inference, ['-n', '0'], '-n must be at least 1'),
    (pre_inference, ['-o', '__FILE__'], 'exists and is not a folder'),
    (web_demo, ['--port', '70000'], '--port must be 0..65535'),
    (web_demo, ['--max_upload_mb', '0'], '--max_upload_mb must be positive'),
    (finetune, ['eval', '-n', '0'], '-n must be at least 1'),
]


@pytest.mark.unit
@pytest.mark.parametrize('module, argv, message', FLAG_CASES)
def test_a_bad_command_flag_is_a_usage_error_not_a_conf_error(module, argv, message, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('')
    argv = [str(tmp_path / 'a_file') if a == '__FILE__' else a for a in argv]
    conf = ['--conf', str(tmp_path / 'never_read.json')]  # the command's own flags are checked first
    full = argv[:1] + conf + argv[1:] if module is finetune else conf + argv
    with pytest.raises(UsageError, match=message) as e:
        module.main(full + ['--debug'])
    assert not isinstance(e.value, ConfError)
    assert module.main(full) == 2  # without --debug: one line, exit code 2, as before
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err


# ---------------------------------------------------------------- own data, offline

def own_data_conf(dataset_path, img_addr, fmt, **changes):
    """conf_examples/own_data_demo.json on an export in fmt (paths moved to the test's folders)."""
    conf = json.loads(OWN_DATA_DEMO.read_text())
    conf.update(dataset_path=str(dataset_path), img_addr=str(img_addr),
                **{f'{s}_json': f'{s}.{fmt}' for s in ('train', 'val', 'test')}, **changes)
    return conf


@pytest.mark.unit
def test_the_shipped_own_data_conf_reads_the_csv_export():
    conf = json.loads(OWN_DATA_DEMO.read_text())
    assert conf['columns'] == COLUMNS and conf['dataset_path'] == 'work_dirs/demo_csv'
    assert [conf[f'{s}_json'] for s in ('train', 'val', 'test')] == ['train.csv', 'val.csv', 'test.csv']
    demo = json.loads((ROOT / 'conf_examples' / 'demo.json').read_text())
    assert conf['model_name'] == demo['model_name'] and conf['img_addr'] == demo['img_addr']
    assert not conf.get('demo')  # its dataset_path is the export: the demo's builder must not write there


@pytest.mark.unit
@pytest.mark.parametrize('fmt', ['csv', 'jsonl', 'parquet'])
def test_exported_splits_read_back_as_the_demo_rows(fmt, pcap, tmp_path):
    from utils.core.conf import conf_from_dict
    from utils.data.rows import load_split, read_split
    out = tmp_path / fmt
    written = export_demo_data(pcap[0], str(out), fmt)
    assert sorted(p.name for p in written) == sorted(f'{s}.{fmt}' for s in ('train', 'val', 'test'))
    assert (out / 'personalities.txt').read_text() == Path(pcap[0], 'personalities.txt').read_text()
    conf = conf_from_dict(own_data_conf(out, pcap[1], fmt))
    for split in ('train', 'val', 'test'):
        exported, stats = load_split(conf, split)
        original, _ = read_split(Path(pcap[0], f'{split}.json'), pcap[1], '.jpg', split)
        assert stats.kept == stats.rows == len(original)
        fields = ('style', 'text', 'image', 'references')
        assert [[r[k] for k in fields] for r in exported] == [[r[k] for k in fields] for r in original]


@pytest.mark.unit
def test_export_command_writes_where_it_is_told(pcap, tmp_path, capsys):
    from utils.demo import export
    conf = tmp_path / 'pcap.json'  # a conf of a PCap data set (not the demo's: nothing to build)
    conf.write_text(json.dumps({'model_name': 'owner/model', 'tokenize_style': True, 'img_addr': pcap[1],
                                'dataset_path': pcap[0], 'file_attr': '.jpg', 'train_json': 'train.json',
                                'val_json': 'val.json', 'test_json': 'test.json', 'work_dir': str(tmp_path / 'w')}))
    assert export.main([str(tmp_path / 'out'), '--format', 'jsonl', '--conf', str(conf)]) == 0
    first = json.loads((tmp_path / 'out' / 'val.jsonl').read_text().splitlines()[0])
    assert set(first) == set(COLUMNS.values()) and first['file'].endswith('.jpg')
    (tmp_path / 'a_file').write_text('')
    assert export.main([str(tmp_path / 'a_file'), '--conf', str(conf)]) == 2
    assert 'exists and is not a folder' in capsys.readouterr().err


@pytest.mark.integration
def test_training_on_the_csv_export_and_what_the_inference_file_records(pcap, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / 'demo_csv'
    export_demo_data(pcap[0], str(out), 'csv')
    conf = own_data_conf(out, pcap[1], 'csv', model_name=tiny_model, work_dir=str(tmp_path / 'work'),
                         max_epochs=1, max_train_samples=8, batch_size=4, patch_image_size=32, max_image_size=32,
                         checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 1},
                         eval_interval=None, eval_every_epoch=False, max_len=4)
    path = tmp_path / 'own_data_demo.json'
    path.write_text(json.dumps(conf))
    assert finetune.main(['train', '--conf', str(path)]) == 0
    summary = json.loads(next((tmp_path / 'work').glob('train_*.json')).read_text())
    assert summary['data']['train']['kept'] == 8

    # -m (relative, read from the current directory) captions; model_name stays the base model, recorded
    monkeypatch.chdir(tmp_path)
    assert pre_inference.main(['--conf', str(path), '-m', 'work/output', '-n', '2', '-o', 'inf']) == 0
    result = json.loads(next((tmp_path / 'inf').glob('inference_*.json')).read_text())
    assert result['model_name'] == tiny_model and result['model_revision'] is None
    assert result['model'] == str(tmp_path / 'work' / 'output') and os.path.isabs(result['model'])
    assert result['n_eval_sample'] == 2 and result['data']['test']['kept'] == 8


# ---------------------------------------------------------------- Ctrl-C in the web demo

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_ctrl_c_stops_the_web_demo_with_exit_code_130(trained, tmp_path):
    port = free_port()
    log = tmp_path / 'web_demo.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, 'web_demo.py', '--conf', trained[0], '--port', str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_web_demo(proc, f'http://127.0.0.1:{port}', log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 'error: interrupted' in log.read_text()
    with socket.socket() as s:  # the server is closed
        assert s.connect_ex(('127.0.0.1', port)) != 0
