"""End to end: finetune.py train on the tiny model with ModelScope's real OFATrainer."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import finetune
from utils.core.errors import CheckpointError
from utils.training import trainer as assembly
from conftest import read_log_json

pytestmark = pytest.mark.integration


def test_loss_goes_down(trained):
    losses = [e['loss'] for e in read_log_json(trained[1], run=0) if e.get('mode') == 'train']
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_checkpoints_and_output_written(trained):
    work = trained[1]
    for n in (3, 6, 9, 12):
        assert (work / f'iter_{n}.pth').is_file() and (work / f'iter_{n}_trainer_state.pth').is_file()
    out = work / 'output'
    for name in ('configuration.json', 'config.json', 'pytorch_model.bin', 'vocab.json', 'merges.txt',
                 'style_map.json'):
        assert (out / name).is_file(), name
    styles = json.loads((out / 'style_map.json').read_text())['tokens']
    assert set(styles) == {'Happy', 'Sarcastic', 'Romantic', 'Anxious'}
    summary = json.loads(next(work.glob('train_*.json')).read_text())
    assert summary['iterations'] == 12 and summary['data']['train']['kept'] == 48


def test_output_is_a_modelscope_model_dir_with_the_final_weights(trained):
    from modelscope.models import Model
    out = trained[1] / 'output'
    model = Model.from_pretrained(str(out))
    final = torch.load(trained[1] / 'iter_12.pth', weights_only=True)
    final = final.get('state_dict', final)
    loaded = model.state_dict()
    key = next(k for k in final if 'embed_tokens' in k)
    assert torch.equal(loaded.get(key, loaded.get('model.' + key)), final[key])


def test_resume_continues_from_the_saved_iteration(trained_copy):
    conf_path, work = trained_copy
    first = [e['loss'] for e in read_log_json(work, run=0) if e.get('mode') == 'train']
    assert finetune.main(['train', '--conf', conf_path, '-p', str(work / 'iter_6')]) == 0
    resumed = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert len(resumed) == 6 and all(e['epoch'] == 2 for e in resumed)  # iterations 7..12 only
    assert resumed[0]['loss'] < first[0] - 0.5  # weights came back, not a fresh start
    summaries = sorted(work.glob('train_*.json'), key=os.path.getmtime)
    assert json.loads(summaries[-1].read_text())['iterations'] == 12


def test_resume_mid_epoch_skips_the_trained_batches_without_loading_them(trained_copy):
    """iter_9 is the 3rd of the 6 iterations of epoch 2: the resumed run trains iterations 10..12 of that epoch and
    loads none of the 3 batches trained before the checkpoint (ModelScope's loop loaded all 6)."""
    from utils.data.dataset import StylishCaptionDataset
    conf_path, work = trained_copy
    loaded = []
    get = StylishCaptionDataset.__getitem__

    def counted(self, index):
        loaded.append(index)
        return get(self, index)
    StylishCaptionDataset.__getitem__ = counted
    try:
        assert finetune.main(['train', '--conf', conf_path, '-p', str(work / 'iter_9'), '-w', '0']) == 0
    finally:
        StylishCaptionDataset.__getitem__ = get
    resumed = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert [e['iter'] for e in resumed] == [4, 5, 6] and all(e['epoch'] == 2 for e in resumed)  # 10..12 overall
    assert len(loaded) == 3 * 8  # the 3 batches of 8 it trained, none of the 3 it skipped


def test_latest_checkpoint_is_found(trained):
    assert finetune.resolve_checkpoint('latest', str(trained[1])) == str(trained[1] / 'iter_12')
    assert finetune.resolve_checkpoint(str(trained[1] / 'iter_9.pth'), '') == str(trained[1] / 'iter_9')


def test_checkpoint_without_trainer_state_is_refused(trained, tmp_path):
    lone = tmp_path / 'iter_1.pth'
    lone.write_bytes((trained[1] / 'iter_3.pth').read_bytes())
    with pytest.raises(CheckpointError, match='not a CheckpointHook checkpoint'):
        finetune.resolve_checkpoint(str(lone), '')


def test_train_with_image_cache_and_workers(make_conf, tmp_path):
    path = make_conf(image_cache=str(tmp_path / 'cache'), num_workers=1)
    assert finetune.main(['train', '--conf', path]) == 0
    assert len(list((tmp_path / 'cache').glob('images_32px_*.u8'))) == 1
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    assert (work / 'output' / 'pytorch_model.bin').is_file()


def test_resume_with_other_styles_is_refused(trained_copy, tmp_path, capsys):
    trained = trained_copy  # train takes work_dir's lock (its file is written) before it refuses
    conf = json.loads(Path(trained[0]).read_text())
    data = tmp_path / 'data'
    shutil.copytree(conf['dataset_path'], data)
    (data / 'personalities.txt').write_text('Romantic\nHappy\nSarcastic\nAnxious\n')  # same styles, new order
    conf['dataset_path'] = str(data)
    path = tmp_path / 'conf.json'
    path.write_text(json.dumps(conf))
    before = sorted(p.name for p in trained[1].iterdir())
    assert finetune.main(['train', '--conf', str(path), '-p', str(trained[1] / 'iter_6')]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'styles differ from those it was trained with' in errors[0]
    assert sorted(p.name for p in trained[1].iterdir()) == before


@pytest.mark.parametrize('precision, dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_mixed_precision_training(make_conf, monkeypatch, precision, dtype):
    """precision bf16/fp16: the forward the OFA criterion runs is under autocast (the logits come out in
    that dtype), fp16 steps go through a gradient scaler, the loss stays finite and the weights saved
    in output/ are fp32."""
    from utils.patches.train_step import TrainStepProcessor
    seen, scalers = set(), []
    build = assembly.build_trainer

    def build_and_watch(*args, **kwargs):
        trainer = build(*args, **kwargs)
        projection = trainer.model.model.decoder.output_projection
        projection.register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training else None)
        return trainer
    monkeypatch.setattr(assembly, 'build_trainer', build_and_watch)
    step = TrainStepProcessor.backward

    def backward(self, trainer, *args):
        scalers.append(self.scaler)
        return step(self, trainer, *args)
    monkeypatch.setattr(TrainStepProcessor, 'backward', backward)

    path = make_conf(precision=precision)
    assert finetune.main(['train', '--conf', path]) == 0
    assert seen == {dtype}
    assert len(scalers) == 6 and all((s is not None) == (precision == 'fp16') for s in scalers)
    work = Path(json.loads(Path(path).read_text())['work_dir'])
    losses = [e['loss'] for e in read_log_json(work) if e.get('mode') == 'train']
    assert len(losses) == 6 and all(l == l and abs(l) < 100 for l in losses)  # finite
    weights = torch.load(work / 'output' / 'pytorch_model.bin', weights_only=True)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
