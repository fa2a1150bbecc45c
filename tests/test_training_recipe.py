"""The training recipe (utils/training/): validation during training, output_best, CIDEr-D and SCST."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import pre_inference
from conftest import ROOT, read_log_json
from utils.training.cider import CiderD
from utils.training.criteria import baselines, scst_loss, sequence_logprobs


# ---------------------------------------------------------------- arithmetic

@pytest.mark.unit
def test_baseline_is_the_mean_of_the_other_candidates():
    rewards = [1.0, 2.0, 6.0, 0.5, 1.5, 3.0]
    groups = [3, 2, 1]
    # by hand: (2+6)/2, (1+6)/2, (1+2)/2 | 1.5, 0.5 | a lone candidate: its own reward (advantage 0)
    assert baselines(rewards, groups) == [4.0, 3.5, 1.5, 1.5, 0.5, 3.0]
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    # advantages -3, -1.5, 4.5, -1, 1, 0: loss = -sum(logp * adv) / 6
    expected = -((-1 * -3) + (-2 * -1.5) + (-3 * 4.5) + (-4 * -1) + (-5 * 1) + 0) / 6
    assert scst_loss(logp, rewards, groups).item() == pytest.approx(expected)


@pytest.mark.unit
def test_cider_d_by_hand_and_as_modelscope_computes_it(tmp_path):
    scorer = CiderD.from_references([['a red cross'], ['a blue circle']])
    # identical to its reference: cosine 1 for 1-, 2- and 3-grams ("a" has df 2 = N, weight 0, but the others
    # keep the norms non-zero), no 4-gram: mean (1 + 1 + 1 + 0) / 4, times 10
    assert scorer.score('A red cross!', ['a red cross']) == pytest.approx(7.5)
    assert scorer.score('green triangle', ['a red cross']) == 0.0

    # pycocoevalcap's Cider is the same CIDEr-D, with document frequencies from the references it is given:
    # scoring one candidate per train reference set, its frequencies are the train ones
    from pycocoevalcap.cider.cider import Cider
    train = [['what a lovely red cross', 'such a lovely red cross'], ['oh great another blue circle how original'],
             ['i am so worried about that yellow triangle'], ['this red circle reminds me of you my love']]
    cands = ['what a lovely red circle', 'oh great another red cross how original', 'i am worried', 'my love']
    _, expected = Cider().compute_score({i: r for i, r in enumerate(train)}, {i: [c] for i, c in enumerate(cands)})
    ours = CiderD.from_references(train).scores(cands, train)
    assert ours == pytest.approx(list(expected))
    assert ours[0] > 0 and ours[1] > 0


@pytest.mark.unit
def test_cider_document_frequencies_are_cached(tmp_path, monkeypatch):
    groups = [['a red cross'], ['a blue circle']]
    first = CiderD.cached(str(tmp_path), groups)
    files = list(tmp_path.glob('cider_df_*.json'))
    assert len(files) == 1
    with monkeypatch.context() as m:  # the second time they come from the file, not computed again
        m.setattr(CiderD, 'from_references', classmethod(lambda cls, g: pytest.fail('computed again')))
        again = CiderD.cached(str(tmp_path), groups)
    assert again.df == first.df and again.ref_len == first.ref_len
    CiderD.cached(str(tmp_path), groups + [['a green triangle']])  # other references: a file of their own
    assert len(list(tmp_path.glob('cider_df_*.json'))) == 2


# ---------------------------------------------------------------- a built trainer

@pytest.fixture(scope='module')
def built(trained):
    """A real OFATrainer (stage scst) on the trained model, with its conf and rows."""
    from utils.core.conf import apply_overrides, read_conf
    from utils.core.conf_checks import validate
    from utils.data.rows import load_split
    from utils.data.styles import StyleMap
    from utils.training import trainer as assembly

    conf_path, work = trained
    conf = read_conf(conf_path)
    conf = validate(apply_overrides(conf, model_name=str(work / 'output'), work_dir=str(work.parent / 'built')))
    conf.train.stage, conf.scst.candidates = 'scst', 2
    rows, _ = load_split(conf, 'train')
    style_map = StyleMap.load(str(work / 'output'))
    trainer = assembly.build_trainer(conf, rows, style_map, conf.model.model_name)
    return conf, trainer, rows, style_map


def batch_of(trainer, rows, n):
    samples = [trainer.train_dataset[i] for i in range(n)]
    return trainer.train_data_collator(samples)


@pytest.mark.integration
def test_one_scst_step_raises_the_higher_reward_candidate(built):
    """Two candidates for one image, the first rewarded more: one SGD step on the SCST loss makes the first
    more likely and the second less likely, relative to each other."""
    conf, trainer, rows, _ = built
    model = trainer.unwrap_module(trainer.model)
    model.train()
    batch = batch_of(trainer, rows, 1)
    tok = model.tokenizer
    cands = [tok(' ' + text, return_tensors='pt').input_ids[0, 1:]  # without <s>, ending with </s>
             for text in ('what a lovely red cross', 'i am so worried about that blue circle')]
    rewards, groups = [2.0, 0.5], [2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        before = sequence_logprobs(model, batch['net_input'], cands, groups, tok.bos_token_id, tok.pad_token_id)
        loss = scst_loss(before, rewards, groups)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            after = sequence_logprobs(model, batch['net_input'], cands, groups, tok.bos_token_id, tok.pad_token_id)
    finally:
        model.load_state_dict(state)
        model.zero_grad()
    assert after[0] > before[0]
    assert after[0] - after[1] > before[0] - before[1]


@pytest.mark.integration
def test_scst_criterion_on_a_batch(built):
    """The criterion trainer.train_step calls: candidates from the beam, rewards against the references of the
    rows the batch's ids point to, mean reward and baseline into the trainer's log buffer, a loss with a
    gradient."""
    from utils.training.criteria import ScstCriterion
    conf, trainer, rows, _ = built
    criterion = trainer.criterion
    assert isinstance(criterion, ScstCriterion)
    model = trainer.unwrap_module(trainer.model)
    model.train()
    batch = batch_of(trainer, rows, 3)
    assert list(batch['id']) == [0, 1, 2]
    loss, size, log = criterion(model, batch)
    assert size == 6 and loss.requires_grad and math.isfinite(loss.item())
    # the trained model's beams share n-grams with the rows' references: a CIDEr-D reward above 0
    assert log['reward'] > 0 and log['baseline'] == pytest.approx(log['reward'])  # the mean of the others' means
    assert trainer.log_buffer.val_history['reward'][-1] == log['reward']
    model.zero_grad()


# ---------------------------------------------------------------- validation and output_best

def weights(path):
    state = torch.load(path, map_location='cpu', weights_only=True)
    return state.get('state_dict', state)


def same_weights(a, b):
    keys = [k for k in a if 'embed_tokens' in k or 'output_projection' in k]
    return bool(keys) and all(torch.equal(a[k], b.get(k, b.get('model.' + k, b.get(k.replace('model.', '', 1)))))
                              for k in keys)


@pytest.mark.integration
def test_validation_keeps_the_best_not_the_last(built, tmp_path):
    """A better model validated first, a worse (re-initialised) one second: output_best keeps the first;
    resumed, the best survives; the live generator captions as Captioner(output_best) does."""
    from utils.captioning.captioner import Captioner
    from utils.core.conf import apply_overrides
    from utils.training.validation import ValidationHook
    conf, trainer, rows, style_map = built
    conf = apply_overrides(conf, work_dir=str(tmp_path), stage='ce')
    val = [dict(r, references=r['references']) for r in rows[:6]]  # train rows: the trained model knows them
    hook = ValidationHook(conf, val, style_map, resuming=False)
    hook.before_run(trainer)
    model = trainer.unwrap_module(trainer.model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    first = hook.validate(trainer, 3, 1)
    assert first['best'] and first['metrics']['CIDEr'] > 0
    live = hook.captioner.caption(trainer, [{'style': r['style'], 'image': r['image']} for r in val])
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if 'embed_tokens' in name:
                    p.normal_(0, 1)
        second = hook.validate(trainer, 6, 2)
        assert not second['best'] and second['metrics']['CIDEr'] < first['metrics']['CIDEr']
        best = Path(tmp_path, 'output_best')
        assert same_weights(good, weights(best / 'pytorch_model.bin'))
        for name in ('configuration.json', 'config.json', 'vocab.json', 'merges.txt', 'style_map.json'):
            assert (best / name).is_file(), name
        assert json.loads((best / 'best.json').read_text())['iteration'] == 3
        lines = [json.loads(x) for x in (tmp_path / 'val_metrics.jsonl').read_text().splitlines()]
        assert [(x['iteration'], x['epoch']) for x in lines] == [(3, 1), (6, 2)]
        assert all(set(x['metrics']) >= {'CIDEr', 'Bleu_4', 'METEOR', 'ROUGE_L'} and x['seconds'] > 0 for x in lines)
        assert hook.validate(trainer, 6, 2) is None  # an epoch end at the interval's iteration: validated once

        resumed = ValidationHook(conf, val, style_map, resuming=True)
        resumed.meteor, hook.meteor = hook.meteor, None  # one METEOR process for the test (~10 s to start)
        resumed.before_run(trainer)
        assert resumed.best.value == first['metrics']['CIDEr'] and resumed.best.iteration == 3
        assert not resumed.validate(trainer, 9, 3)['best']
        assert same_weights(good, weights(best / 'pytorch_model.bin'))
        resumed.close()
    finally:
        model.load_state_dict(good)
        hook.close()
    stored = Captioner(str(best), conf.generation, model_cfg=conf.model.model_cfg)
    assert stored.caption([{'style': r['style'], 'image': r['image']} for r in val]) == live


@pytest.mark.integration
def test_training_validates_and_output_best_is_a_usable_model(trained, make_conf, tmp_path):
    """finetune.py train with validation every 2 iterations: one val_metrics.jsonl line per validation,
    output_best holds the weights of the best validation's iteration, survives -p latest, and is the model
    `pre_inference.py -m work_dir/output_best` captions with."""
    from modelscope.models import Model
    conf = make_conf(max_epochs=1, eval_interval=2, eval_every_epoch=True, lr=2e-3, warmup=0.0,
                     checkpoint={'by_epoch': False, 'interval': 2, 'max_checkpoint_num': 10})
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    lines = [json.loads(x) for x in (work / 'val_metrics.jsonl').read_text().splitlines()]
    assert [x['iteration'] for x in lines] == [2, 4, 6]  # the epoch end (6) coincides with the interval
    assert [x['epoch'] for x in lines] == [1, 1, 1]
    values = [x['metrics']['CIDEr'] for x in lines]
    best_at = lines[values.index(max(values))]['iteration']
    best = json.loads((work / 'output_best' / 'best.json').read_text())
    assert best['iteration'] == best_at and best['value'] == max(values)
    assert same_weights(weights(work / f'iter_{best_at}.pth'), weights(work / 'output_best' / 'pytorch_model.bin'))
    summary = json.loads(next(work.glob('train_*.json')).read_text())
    assert summary['best']['iteration'] == best_at
    Model.from_pretrained(str(work / 'output_best'))

    assert finetune.main(['train', '--conf', conf, '-p', str(work / 'iter_4')]) == 0
    lines = [json.loads(x) for x in (work / 'val_metrics.jsonl').read_text().splitlines()]
    assert [x['iteration'] for x in lines] == [2, 4, 6, 6]  # appended: the resumed run validated at 6
    again = json.loads((work / 'output_best' / 'best.json').read_text())
    # the best so far came back with the resume: only a strictly better value replaces it
    if lines[-1]['best']:
        assert again['iteration'] == 6 and again['value'] == lines[-1]['metrics']['CIDEr'] > best['value']
    else:
        assert again == best

    out = tmp_path / 'inf'
    assert pre_inference.main(['--conf', conf, '-m', str(work / 'output_best'), '-o', str(out), '-n', '4']) == 0
    result = json.loads(next(out.glob('inference_*.json')).read_text())
    assert result['model'] == str(work / 'output_best') and result['model_name'] == json.loads(Path(conf).read_text())['model_name']
    from utils.captioning.captioner import Captioner
    c = json.loads(Path(conf).read_text())
    from utils.core.conf import GenerationConf
    captioner = Captioner(str(work / 'output_best'), GenerationConf(beam_size=c['beam_size'], max_len=c['max_len']),
                          model_cfg={'patch_image_size': 32, 'max_image_size': 32})
    assert [r['caption'] for r in result['results']] == captioner.caption(
        [{'style': r['style'], 'image': r['image']} for r in result['results']])

    assert finetune.main(['eval', '--conf', conf, '-m', str(work / 'output_best'), '-n', '4']) == 0
    assert json.loads(next(work.glob('eval_*.json')).read_text())['model'] == str(work / 'output_best')
    from utils import backup_model
    assert backup_model.main(['--conf', conf, '-m', str(work / 'output_best'), '-o', str(tmp_path / 'bak')]) == 0
    archive = next((tmp_path / 'bak').glob('*.tar.gz'))
    assert backup_model.main(['--verify', str(archive)]) == 0
    assert backup_model.restore(str(archive), str(tmp_path / "restored"))[0] == 0
    assert same_weights(weights(work / 'output_best' / 'pytorch_model.bin'),
                        weights(next((tmp_path / 'restored').glob('*/model')) / 'pytorch_model.bin'))


@pytest.mark.integration
def test_scst_stage_end_to_end(trained, make_conf):
    """stage scst from the CE output: trains, logs reward and baseline, validates, keeps the style map."""
    conf = make_conf(model_name=str(trained[1] / 'output'), stage='scst', scst={'candidates': 2},
                     lr=1e-5, warmup=0.0, eval_every_epoch=True, max_train_samples=16)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    logged = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert len(logged) == 2 and all('reward' in e and 'baseline' in e for e in logged)
    assert len(list(work.glob('cider_df_*.json'))) == 1
    assert len((work / 'val_metrics.jsonl').read_text().splitlines()) == 1
    assert json.loads((work / 'output_best' / 'style_map.json').read_text()) == \
        json.loads((trained[1] / 'output' / 'style_map.json').read_text())


# ---------------------------------------------------------------- torchrun

@pytest.mark.e2e
def test_validation_under_torchrun_equals_one_process(trained, make_conf, tmp_path):
    conf = make_conf(model_name=str(trained[1] / 'output'), val_max_samples=3)
    probe = ROOT / 'tests' / 'validation_probe.py'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f'n{nproc}'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               str(probe), conf, str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads((out / 'val_metrics.jsonl').read_text().splitlines()[0])
        assert len(list(out.glob('val_metrics.jsonl'))) == 1
    assert results[2]['metrics'] == results[1]['metrics']
    assert results[2]['n_samples'] == results[1]['n_samples'] == 3


# ---------------------------------------------------------------- conf

@pytest.mark.parametrize('overrides, key', [
    ({'stage': 'rl'}, '"stage"'),
    ({'scst': {'candidates': 1}}, '"scst.candidates"'),
    ({'scst': {'search': 'greedy'}}, '"scst.search"'),
    ({'best_metric': 'SPICE'}, '"best_metric"'),
    ({'best_metric': 'cider'}, '"best_metric"'),
    ({'eval_interval': 0}, '"eval_interval"'),
    ({'val_max_samples': 0}, '"val_max_samples"'),
    ({'stage': 'scst'}, '"model_name"'),  # the tiny model dir has no style_map.json: not a CE output
    ({'val_json': 'missing.json'}, '"val_json"'),
])
@pytest.mark.unit
def test_bad_recipe_keys_are_named(make_conf, capsys, overrides, key):
    conf = make_conf(**overrides)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and key in err[0], err
    assert not work.exists()
