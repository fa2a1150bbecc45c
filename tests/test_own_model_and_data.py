"""Bring your own model and data: model dirs shaped like the ones users arrive with, a second run that starts
from a toolkit-trained output/, and data sets in CSV, JSON lines and parquet through a `columns` map.

The model dirs are the tiny random OFA model (tests/conftest.py) with a configuration.json rewritten to the
shape of a real one; each variant says where its shape comes from.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest

import finetune
import pre_inference
from utils import backup_model
from utils.core.errors import DataError
from utils.data.rows import read_split, write_rows

# ModelScope's own OFA captioning fine-tuning recipe: the `finetune_cfg` that ModelScope's
# tests/trainers/test_ofa_trainer.py writes as the model's configuration.json before training
# damo/ofa_image-caption_coco_large_en; CheckpointHook copies it into every output/ it writes, so a dir
# fine-tuned with ModelScope carries it. The column_map is what crashed `finetune.py train` (KeyError 'label').
MODELSCOPE_RECIPE = {
    'framework': 'pytorch',
    'task': 'image-captioning',
    'model': {'type': 'ofa',
              'beam_search': {'beam_size': 5, 'max_len_b': 16, 'min_len': 1, 'no_repeat_ngram_size': 0},
              'seed': 7, 'max_src_length': 256, 'language': 'en', 'gen_type': 'generation',
              'patch_image_size': 480, 'max_image_size': 480, 'imagenet_default_mean_and_std': False},
    'pipeline': {'type': 'image-captioning'},
    'dataset': {'column_map': {'text': 'caption'}},
    'train': {'work_dir': 'work/ckpts/caption', 'max_epochs': 1, 'use_fp16': True,
              'dataloader': {'batch_size_per_gpu': 1, 'workers_per_gpu': 0},
              'lr_scheduler': {'name': 'polynomial_decay', 'warmup_proportion': 0.01, 'lr_endo': 1e-07},
              'lr_scheduler_hook': {'type': 'LrSchedulerHook', 'by_epoch': False},
              'optimizer': {'type': 'AdamW', 'lr': 5e-05, 'weight_decay': 0.01},
              'optimizer_hook': {'type': 'TorchAMPOptimizerHook', 'cumulative_iters': 1,
                                 'grad_clip': {'max_norm': 1.0, 'norm_type': 2}, 'loss_keys': 'loss'},
              'criterion': {'name': 'AdjustLabelSmoothedCrossEntropyCriterion', 'constraint_range': None,
                            'drop_worst_after': 0, 'drop_worst_ratio': 0.0, 'ignore_eos': False,
                            'ignore_prefix_size': 0, 'label_smoothing': 0.1, 'reg_alpha': 1.0,
                            'report_accuracy': False, 'sample_patch_num': 196, 'sentence_avg': False,
                            'use_rdrop': False},
              'hooks': [{'type': 'BestCkptSaverHook', 'metric_key': 'bleu-4', 'interval': 100},
                        {'type': 'TextLoggerHook', 'interval': 1}, {'type': 'IterTimerHook'},
                        {'type': 'EvaluationHook', 'by_epoch': True, 'interval': 1}]},
    'evaluation': {'dataloader': {'batch_size_per_gpu': 4, 'workers_per_gpu': 0},
                   'metrics': [{'type': 'bleu', 'eval_tokenized_bleu': False, 'ref_name': 'labels',
                                'hyp_name': 'caption'}]},
    'preprocessor': [],
}


def _variant(**changes):
    cfg = copy.deepcopy(MODELSCOPE_RECIPE)
    for path, value in changes.items():
        *parents, leaf = path.split('.')
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


VARIANTS = {
    'modelscope_recipe': MODELSCOPE_RECIPE,
    # A hub captioning model as ModelScope's OfaImageCaptioningPreprocessor and OfaBasePreprocessor read it
    # (modelscope/preprocessors/ofa/{base,image_captioning}.py): `model.prompt` (the stock preprocessor's
    # caption prompt), ImageNet mean/std normalisation, patch size 384 (the large captioning model's).
    'hub_caption_prompt_imagenet_384': _variant(**{
        'model.prompt': ' what does the image describe?', 'model.imagenet_default_mean_and_std': True,
        'model.patch_image_size': 384, 'model.max_image_size': 384, 'dataset': None, 'train': None,
        'evaluation': None}),
    # A pretrain checkpoint (damo/ofa_pretrain_*_en) is not a captioning model: another task, and a
    # `preprocessor` section in the shape EpochBasedTrainer.build_preprocessor reads (train/val entries).
    'pretrain_other_task_preprocessor_section': _variant(**{
        'task': 'visual-question-answering', 'pipeline': {'type': 'visual-question-answering'},
        'preprocessor': {'train': {'type': 'ofa-preprocessor'}, 'val': {'type': 'ofa-preprocessor'}},
        'model.patch_image_size': 256, 'model.max_image_size': 256, 'train': None, 'evaluation': None}),
}


def make_model_dir(src: str, dest: Path, configuration: dict) -> str:
    shutil.copytree(src, dest)
    (dest / 'configuration.json').write_text(json.dumps(configuration, indent=2))
    return str(dest)


@pytest.mark.integration
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_model_dirs_users_bring_train_eval_caption_and_back_up(variant, tiny_model, make_conf, tmp_path):
    """Each variant trains a few iterations, evaluates, captions and backs up. Image size: the conf's
    (the tiny model's position buckets cover 32 px); the model dir's own size is tested below."""
    model = make_model_dir(tiny_model, tmp_path / variant, VARIANTS[variant])
    conf = make_conf(model_name=model, max_train_samples=8, batch_size=4,
                     checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 1})
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    assert (work / 'output' / 'pytorch_model.bin').is_file()
    saved = json.loads((work / 'output' / 'configuration.json').read_text())
    assert saved['task'] == 'image-captioning'
    assert finetune.main(['eval', '--conf', conf, '-n', '4']) == 0
    assert len(json.loads(next(work.glob('eval_*.json')).read_text())['results']) == 4
    assert pre_inference.main(['--conf', conf, '-n', '3']) == 0
    assert len(json.loads(next(work.glob('inference_*.json')).read_text())['results']) == 3
    assert backup_model.main(['--conf', conf, '-o', str(tmp_path / 'backup')]) == 0
    archive = next((tmp_path / 'backup').glob('*.tar.gz'))
    assert backup_model.main(['--verify', str(archive)]) == 0


@pytest.mark.unit
def test_column_map_of_the_model_does_not_rename_the_toolkits_columns(tiny_model, tmp_path):
    from preprocessors import OfaPreprocessorForStylishIC
    from utils.data.styles import StyleMap
    from conftest import STYLES
    model = make_model_dir(tiny_model, tmp_path / 'm', MODELSCOPE_RECIPE)
    sm = StyleMap.build(list(STYLES), True, ' what does the image describe? write a {} reply.')
    pre = OfaPreprocessorForStylishIC(model, mode='train', style_map=sm, no_collate=True,
                                      model_cfg={'patch_image_size': 32, 'max_image_size': 32})
    from PIL import Image
    Image.new('RGB', (40, 40), 'red').save(tmp_path / 'x.jpg')
    sample = pre({'style': 'Happy', 'text': 'what a lovely red circle', 'image': str(tmp_path / 'x.jpg')})
    assert pre.tokenizer.decode(sample['target']).strip().startswith('what a lovely red circle')


@pytest.fixture(scope='module')
def model_256(tmp_path_factory):
    """The tiny model with position buckets for 256 px images, in the recipe's configuration shape."""
    from utils.demo.tiny_model import build_tiny_ofa
    from conftest import COLOURS, SHAPES, STYLES, caption
    texts = [caption(st, c, s, alt) for st in STYLES for c in COLOURS for s in SHAPES for alt in (False, True)]
    model = build_tiny_ofa(str(tmp_path_factory.mktemp('tiny_256')), texts, image_size=256)
    cfg = _variant(**{'model.patch_image_size': 256, 'model.max_image_size': 256})
    Path(model, 'configuration.json').write_text(json.dumps(cfg))
    return model


@pytest.mark.integration
def test_the_model_dirs_own_image_size_is_used(model_256, make_conf):
    conf = make_conf(model_name=model_256, patch_image_size=None, max_image_size=None, max_train_samples=4,
                     batch_size=4, checkpoint={'by_epoch': False, 'interval': 1, 'max_checkpoint_num': 1})
    assert finetune.main(['train', '--conf', conf]) == 0
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    from preprocessors import OfaPreprocessorForStylishIC
    assert OfaPreprocessorForStylishIC(str(work / 'output')).preprocess.patch_image_size == 256
    assert pre_inference.main(['--conf', conf, '-n', '2']) == 0


# ---------------------------------------------------------------- a second run from a toolkit-trained model

def _data_with_new_style(pcap, tmp_path, new_style='Whimsical'):
    data = tmp_path / 'data2'
    shutil.copytree(pcap[0], data)
    rows = json.loads((data / 'train.json').read_text())
    extra = [dict(r, personality=new_style, comment='whimsy ' + r['comment']) for r in rows[:8]]
    (data / 'train.json').write_text(json.dumps(extra + rows[:8]))
    (data / 'personalities.txt').unlink(missing_ok=True)
    return str(data)


@pytest.mark.integration
def test_second_run_from_a_trained_output_keeps_every_styles_token(trained, pcap, make_conf, tmp_path):
    first = json.loads((trained[1] / 'output' / 'style_map.json').read_text())
    data = _data_with_new_style(pcap, tmp_path)
    conf = make_conf(model_name=str(trained[1] / 'output'), dataset_path=data, batch_size=8,
                     checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 1})
    assert finetune.main(['train', '--conf', conf]) == 0
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    second = json.loads((work / 'output' / 'style_map.json').read_text())
    for style, token in first['tokens'].items():
        assert second['tokens'][style] == token, style
    assert second['tokens']['Whimsical'] == f'<code_{len(first["tokens"])}>'
    assert second['prompt'] == first['prompt']
    # the restored backup's model/ is a model dir of the same kind: a third run starts from it
    assert backup_model.main(['--conf', conf, '-o', str(tmp_path / 'bk')]) == 0
    archive = next((tmp_path / 'bk').glob('*.tar.gz'))
    assert backup_model.main(['--restore', str(archive), str(tmp_path / 'restored')]) == 0
    restored = next((tmp_path / 'restored').glob('*/model'))
    third = make_conf(model_name=str(restored), dataset_path=data, work_dir=str(tmp_path / 'w3'), max_epochs=1,
                      max_train_samples=8)
    assert finetune.main(['train', '--conf', third]) == 0
    assert json.loads((tmp_path / 'w3' / 'output' / 'style_map.json').read_text())['tokens'] == second['tokens']


@pytest.mark.integration
def test_second_run_with_another_tokenize_style_is_refused(trained, make_conf, capsys, tmp_path):
    conf = make_conf(model_name=str(trained[1] / 'output'), tokenize_style=False)
    assert finetune.main(['train', '--conf', conf]) == 2
    err = capsys.readouterr().err
    assert 'conf key "tokenize_style"' in err and 'style_map.json' in err
    assert not (tmp_path / 'work').exists()


# ---------------------------------------------------------------- own data: CSV, JSON lines, parquet

COLUMNS = {'style': 'tone', 'text': 'caption', 'image': 'file', 'references': 'more'}


def _own_rows(images):
    """Rows in a user's own column names; rows 3-6 are bad (one reason each)."""
    good = sorted(Path(images).glob('*.jpg'))[:3]
    rows = [
        {'tone': 'Happy', 'caption': 'what a lovely red circle', 'file': good[0].stem, 'more': ['a red circle']},
        {'tone': 'Sarcastic', 'caption': 'oh great', 'file': good[1].name, 'more': []},   # name with suffix
        {'tone': 'Romantic', 'caption': 'my love', 'file': str(good[2]), 'more': None},   # absolute path
        {'tone': 'Happy', 'caption': 'no such image', 'file': 'missing_image', 'more': None},
        {'tone': '', 'caption': 'empty style', 'file': good[0].stem, 'more': None},
        {'tone': 'Happy', 'caption': None, 'file': good[0].stem, 'more': None},
        {'tone': 'Happy', 'caption': 'what a lovely red circle', 'file': good[0].stem, 'more': None},  # duplicate
    ]
    return rows, good


def _write(fmt, rows, path):
    assert path.suffix == '.' + fmt
    return write_rows(path, rows)


@pytest.mark.unit
@pytest.mark.parametrize('fmt', ['csv', 'jsonl', 'parquet'])
def test_own_data_files_through_a_columns_map(fmt, pcap, tmp_path):
    from utils.core.conf import Columns
    rows, good = _own_rows(pcap[1])
    path = _write(fmt, rows, tmp_path / f'test.{fmt}')
    kept, stats = read_split(path, pcap[1], '.jpg', 'test', columns=Columns(**COLUMNS))
    assert [r['image'] for r in kept] == [str(g) for g in good]
    assert [r['style'] for r in kept] == ['Happy', 'Sarcastic', 'Romantic']
    assert kept[0]['references'] == ['what a lovely red circle', 'a red circle']
    assert kept[2]['references'] == ['my love']
    assert [r['row'] for r in kept] == [0, 1, 2]
    assert stats.rows == 7 and stats.kept == 3
    assert stats.skipped == {'image missing': 1, 'row with empty "tone"': 1, 'row with empty "caption"': 1,
                             'duplicate row': 1}
    with pytest.raises(DataError, match=rf'test file .*test\.{fmt}, row 3: image missing'):
        read_split(path, pcap[1], '.jpg', 'test', columns=Columns(**COLUMNS), strict=True)


@pytest.mark.unit
def test_csv_cells_stay_text(pcap, tmp_path):
    """An image id of digits (0012) must not become the number 12."""
    from utils.core.conf import Columns
    img = next(Path(pcap[1]).glob('*.jpg'))
    shutil.copy(img, tmp_path / '0012.jpg')
    path = tmp_path / 'train.csv'
    path.write_text('tone,caption,file\nHappy,so nice,0012\n')
    kept, _ = read_split(path, str(tmp_path), '.jpg', 'train', columns=Columns(**COLUMNS))
    assert kept[0]['image'] == str(tmp_path / '0012.jpg')


@pytest.mark.unit
def test_a_column_the_file_lacks_is_named(pcap, tmp_path, make_conf, capsys):
    rows, _ = _own_rows(pcap[1])
    data = tmp_path / 'own'
    data.mkdir()
    for split in ('train', 'val', 'test'):
        _write('jsonl', rows, data / f'{split}.jsonl')
    conf = make_conf(dataset_path=str(data), train_json='train.jsonl', val_json='val.jsonl',
                     test_json='test.jsonl', columns={**COLUMNS, 'style': 'personality'})
    assert finetune.main(['train', '--conf', conf]) == 2
    err = capsys.readouterr().err
    assert 'has no column "personality"' in err and 'columns.style' in err and 'train.jsonl' in err
    assert not (tmp_path / 'work').exists()


@pytest.mark.integration
def test_training_on_own_csv_data(pcap, tmp_path, make_conf):
    """The whole path on a CSV in its own column names: train, then eval on a parquet test split."""
    src = json.loads(Path(pcap[0], 'train.json').read_text())[:8]
    own = [{'tone': r['personality'], 'caption': r['comment'], 'file': r['image_hash'] + '.jpg',
            'more': r.get('additional_comments') or []} for r in src]
    data = tmp_path / 'own'
    data.mkdir()
    _write('csv', own, data / 'train.csv')
    _write('parquet', own, data / 'test.parquet')
    _write('jsonl', own, data / 'val.jsonl')
    conf = make_conf(dataset_path=str(data), train_json='train.csv', val_json='val.jsonl',
                     test_json='test.parquet', columns=COLUMNS, batch_size=4,
                     checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 1})
    assert finetune.main(['train', '--conf', conf]) == 0
    assert finetune.main(['eval', '--conf', conf, '-n', '2']) == 0
    summary = json.loads(next((tmp_path / 'work').glob('train_*.json')).read_text())
    assert summary['data']['train']['kept'] == 8


@pytest.mark.parametrize('changes, message', [
    (dict(train_json='train.txt'), 'conf key "train_json": train.txt is not a data file'),
    (dict(columns={'style': 'personality', 'text': 'personality'}), 'name the same column'),
    (dict(columns={'style': ''}), 'conf key "columns.style" must name a column'),
    (dict(columns={'caption': 'x'}), 'unknown conf key "columns.caption"'),
    (dict(seed=-1), 'conf key "seed"'),
    (dict(checkpoint={'interval': 0}), 'conf key "checkpoint.interval"'),
])
@pytest.mark.unit
def test_settings_that_cannot_make_sense_are_refused(changes, message, make_conf, capsys, tmp_path):
    conf = make_conf(**changes)
    assert finetune.main(['train', '--conf', conf]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'work').exists()
