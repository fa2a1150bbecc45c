"""The training recipe's settings (issue 19, items 1-5): accumulate, freeze (the style rows train), OFA's SCST
settings (dropout off, embeddings frozen, a fresh optimizer), the EMA of the weights, drop_worst_ratio/after.

Each trains the tiny model a few steps through the toolkit's own path (finetune.py train, or build_trainer and the
real OFATrainer's train())."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import finetune
from conftest import read_log_json


def weights(path) -> dict:
    """A weights file's tensors, keyed without ModelScope's ``model.`` prefix."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state)
    return {k[len('model.'):] if k.startswith('model.') else k: v for k, v in state.items()}


def work_dir_of(conf_path) -> Path:
    return Path(json.loads(Path(conf_path).read_text())['work_dir'])


def style_ids(model_dir) -> list:
    """The token ids of the style tokens of a trained model dir, from ModelScope's own tokenizer of it."""
    from modelscope.models import Model
    tokens = json.loads((Path(model_dir) / 'style_map.json').read_text())['tokens']
    tokenizer = Model.from_pretrained(str(model_dir)).tokenizer
    return tokenizer.convert_tokens_to_ids(list(tokens.values()))


def build(conf_path, checkpoint=None):
    """(conf, trainer) as finetune.py train builds them: the conf file's checks, rows, style map, build_trainer."""
    from utils.core.conf_checks import load_conf
    from utils.training import trainer as assembly
    conf = load_conf(conf_path)
    rows, _ = finetune.read_data(conf, 'train')
    style_map = finetune.build_style_map(conf, rows, checkpoint)
    return conf, assembly.build_trainer(conf, rows, style_map, assembly.model_dir_of(conf))


# ---------------------------------------------------------------- accumulate

def gradients_at_each_step(conf_path):
    """Train (the real trainer.train()) and return the gradients the optimizer saw at each step, and the trainer."""
    conf, trainer = build(conf_path)
    model = trainer.unwrap_module(trainer.model)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def record(optimizer, args, kwargs):
        seen.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g['params']
                     if p.grad is not None})
    trainer.optimizers[0].register_step_pre_hook(record)
    trainer.train()
    return seen, trainer


@pytest.mark.integration
def test_accumulated_micro_batches_step_as_one_big_batch(make_conf, tmp_path):
    """batch 2 x accumulate 4 makes the optimizer steps of batch 8: as many steps, the same gradients (the
    captions differ in length: a mean of the micro-batches' token means would not give them), the same weights."""
    common = dict(max_train_samples=16, warmup=0.0, lr=1e-3, weight_decay=0.01, freeze=['image_backbone'],
                  checkpoint={'by_epoch': False, 'interval': 1, 'max_checkpoint_num': 5})
    # image_backbone frozen: its BatchNorm normalises with running statistics, not with those of each micro-batch
    big = make_conf(batch_size=8, work_dir=str(tmp_path / 'big'), **common)
    small = make_conf(batch_size=2, accumulate=4, work_dir=str(tmp_path / 'small'), **common)
    big_grads, big_trainer = gradients_at_each_step(big)
    small_grads, small_trainer = gradients_at_each_step(small)
    assert len(big_grads) == len(small_grads) == 2  # 16 samples: two steps of 8
    assert small_trainer.iter == big_trainer.iter == 2
    for step, (a, b) in enumerate(zip(big_grads, small_grads)):
        assert a.keys() == b.keys()
        # float summation order differs: the first step's gradients within 1e-5 of each gradient's norm, plus 1e-7
        # of the whole gradient's (some are 0 but for float noise, e.g. a key projection's bias, to which softmax is
        # invariant); the second step's from weights that differ by that noise (after Adam's division by |grad|)
        rel, noise = (1e-5, 1e-7) if step == 0 else (1e-3, 1e-5)
        whole = torch.stack([g.norm() for g in a.values()]).norm()
        for name in a:
            error, norm = (a[name] - b[name]).norm(), a[name].norm()
            assert error <= rel * norm + noise * whole, (step, name, error.item(), norm.item(), whole.item())
    # the weights after each step (Adam divides by |grad|: float noise on a near-zero gradient moves a handful of
    # elements by up to lr, hence the share rather than an elementwise bound)
    for step in (1, 2):
        wa, wb = weights(work_dir_of(big) / f'iter_{step}.pth'), weights(work_dir_of(small) / f'iter_{step}.pth')
        floats = [k for k in wa if wa[k].is_floating_point()]
        close = sum(torch.isclose(wa[k], wb[k], rtol=0, atol=1e-6).sum().item() for k in floats)
        assert close / sum(wa[k].numel() for k in floats) > 0.9999
    # the schedule counts steps: the logged learning rates are those of the big batch's steps
    logged = [[e['lr'] for e in read_log_json(work_dir_of(c)) if e.get('mode') == 'train'] for c in (big, small)]
    assert logged[0] == logged[1] and len(logged[0]) == 2


# ---------------------------------------------------------------- freeze

@pytest.mark.integration
def test_frozen_parts_stay_bit_identical_and_the_style_rows_train(make_conf, tiny_model, tmp_path):
    """Several steps with a strong weight decay: the frozen embeddings (but the style rows) and the image backbone
    (BatchNorm statistics included) are bit-identical to the model trained from; the rest moved."""
    conf = make_conf(freeze=['encoder_embeddings', 'decoder_embeddings', 'image_backbone'], weight_decay=0.5,
                     lr=1e-2, warmup=0.0, accumulate=2, batch_size=4, max_train_samples=24)
    assert finetune.main(['train', '--conf', conf]) == 0
    work = work_dir_of(conf)
    before, after = weights(Path(tiny_model) / 'pytorch_model.bin'), weights(work / 'output' / 'pytorch_model.bin')
    ids = style_ids(work / 'output')
    assert len(ids) == 4
    others = torch.ones(before['encoder.embed_tokens.weight'].shape[0], dtype=torch.bool)
    others[ids] = False
    for key in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'decoder.output_projection.weight'):
        assert torch.equal(after[key][others], before[key][others]), key
        assert not torch.equal(after[key][ids], before[key][ids]), key
    backbone = [k for k in before if k.startswith('encoder.embed_images.')]
    assert any('running_mean' in k for k in backbone)
    assert all(torch.equal(after[k], before[k]) for k in backbone), [k for k in backbone if not torch.equal(after[k], before[k])]
    assert not torch.equal(after['encoder.layers.0.fc1.weight'], before['encoder.layers.0.fc1.weight'])
    log = next(work.glob('train_*.log')).read_text()
    assert 'parameters train' in log and 'with the 4 style rows of the token embedding' in log


@pytest.mark.integration
def test_frozen_parameters_are_not_given_to_the_optimizer(make_conf):
    conf, trainer = build(make_conf(freeze=['image_backbone', 'decoder']))
    model = trainer.unwrap_module(trainer.model).model
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g['params']}
    backbone = list(model.encoder.embed_images.parameters())
    assert backbone and not any(id(p) in held or p.requires_grad for p in backbone)
    assert not any(id(p) in held for p in model.decoder.layers.parameters())
    # the shared token matrix is the decoder's too, but its style rows train: it stays, row-frozen
    assert id(model.encoder.embed_tokens.weight) in held
    assert all(id(p) in held for p in model.encoder.layers.parameters())


# ---------------------------------------------------------------- EMA

def ema_by_hand(start: dict, steps: list, decay: float) -> dict:
    out = {k: v.clone() for k, v in start.items()}
    for trained in steps:
        for k in out:
            out[k] = decay * out[k] + (1 - decay) * trained[k]
    return out


def assert_close_floats(a: dict, b: dict, keys):
    for k in keys:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.integration
def test_ema_is_the_recurrence_by_hand_and_survives_a_resume(make_conf, tiny_model):
    """ema 0.5: after each step average = 0.5 average + 0.5 weights, from the start weights. output/ and
    output_best/ hold the average, iter_N.pth the trained weights; -p latest continues the average."""
    decay = 0.5
    conf = make_conf(ema=decay, max_train_samples=24, lr=1e-2, warmup=0.0, eval_interval=3, val_max_samples=2,
                     checkpoint={'by_epoch': False, 'interval': 1, 'max_checkpoint_num': 10})
    assert finetune.main(['train', '--conf', conf]) == 0
    work = work_dir_of(conf)
    start = weights(Path(tiny_model) / 'pytorch_model.bin')
    trained = [weights(work / f'iter_{i}.pth') for i in (1, 2, 3)]
    keys = [k for k in start if start[k].is_floating_point() and 'running_' not in k]
    expected = ema_by_hand({k: start[k] for k in keys}, trained, decay)
    output = weights(work / 'output' / 'pytorch_model.bin')
    assert_close_floats(output, expected, keys)
    assert not torch.allclose(output['encoder.layers.0.fc1.weight'], trained[-1]['encoder.layers.0.fc1.weight'])
    assert json.loads((work / 'output_best' / 'best.json').read_text())['iteration'] == 3
    assert_close_floats(weights(work / 'output_best' / 'pytorch_model.bin'), expected, keys)

    # resumed for a second epoch: the average goes on from the checkpoint's, not from its weights
    assert finetune.main(['train', '--conf', conf, '-p', 'latest', '-e', '2']) == 0
    more = [weights(work / f'iter_{i}.pth') for i in (4, 5, 6)]
    expected = ema_by_hand(expected, more, decay)
    restarted = ema_by_hand({k: trained[-1][k] for k in keys}, more, decay)
    output = weights(work / 'output' / 'pytorch_model.bin')
    assert_close_floats(output, expected, keys)
    key = 'encoder.layers.0.fc1.weight'
    assert (output[key] - restarted[key]).abs().max() > 100 * (output[key] - expected[key]).abs().max()


# ---------------------------------------------------------------- SCST

@pytest.fixture
def dropout_model(trained, tmp_path):
    """The trained CE output with dropout 0.3 everywhere in its config.json."""
    model = tmp_path / 'dropout_model'
    shutil.copytree(trained[1] / 'output', model)
    config = json.loads((model / 'config.json').read_text())
    config.update(dropout=0.3, attention_dropout=0.3, activation_dropout=0.3)
    (model / 'config.json').write_text(json.dumps(config))
    return model


@pytest.mark.integration
@pytest.mark.parametrize('dropout', [False, True])
def test_scst_runs_without_dropout_unless_asked(make_conf, dropout_model, dropout):
    conf, trainer = build(make_conf(model_name=str(dropout_model), stage='scst', scst={'candidates': 2,
                                                                                       'dropout': dropout}))
    model = trainer.unwrap_module(trainer.model)
    batch = trainer.train_data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    with torch.no_grad():
        first, second = (model.model(**batch['net_input']).logits for _ in range(2))
    assert torch.equal(first, second) != dropout


@pytest.mark.integration
def test_scst_freezes_the_embeddings_but_the_style_rows_and_starts_a_fresh_optimizer(trained, make_conf):
    """OFA's stage 2 by default: from a -p checkpoint of the CE run, only its weights (the step count starts at 0);
    the token embedding is bit-identical but for the style rows."""
    ce_work = trained[1]
    conf = make_conf(model_name=str(ce_work / 'output'), stage='scst', scst={'candidates': 2}, lr=1e-4,
                     warmup=0.0, max_train_samples=16, weight_decay=0.1)
    assert finetune.main(['train', '--conf', conf, '-p', str(ce_work / 'iter_6')]) == 0
    work = work_dir_of(conf)
    summary = json.loads(next(work.glob('train_*.json')).read_text())
    assert summary['iterations'] == 2  # 16 samples, batch 8: a fresh run of 2 steps, not a resume at step 6
    logged = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert len(logged) == 2 and all('reward' in e for e in logged)
    before, after = weights(ce_work / 'iter_6.pth'), weights(work / 'output' / 'pytorch_model.bin')
    ids = style_ids(work / 'output')
    others = torch.ones(before['encoder.embed_tokens.weight'].shape[0], dtype=torch.bool)
    others[ids] = False
    key = 'encoder.embed_tokens.weight'
    assert torch.equal(after[key][others], before[key][others])
    assert not torch.equal(after[key][ids], before[key][ids])
    assert not torch.equal(after['decoder.layers.0.fc1.weight'], before['decoder.layers.0.fc1.weight'])
    log = next(work.glob('train_*.log')).read_text()
    assert 'dropout off' in log and 'weights only (scst.fresh_optimizer)' in log


# ---------------------------------------------------------------- drop_worst

@pytest.mark.integration
def test_drop_worst_reaches_the_criterion_after_its_steps(make_conf):
    """drop_worst_ratio 0.5 after 1 step: the criterion ModelScope runs keeps half the target tokens from the
    second optimizer step on (OFATrainer alone never tells it the step count: update_num stays 0)."""
    conf, trainer = build(make_conf(drop_worst_ratio=0.5, drop_worst_after=1))
    assert trainer.criterion.drop_worst_ratio == 0.5 and trainer.criterion.drop_worst_after == 1
    sizes = []
    trainer.criterion.register_forward_hook(lambda module, args, output: sizes.append(output[1]))
    model = trainer.unwrap_module(trainer.model)
    batch = trainer.train_data_collator([trainer.train_dataset[i] for i in range(4)])
    tokens = int(batch['ntokens'])
    for steps_done in (0, 1, 2):
        trainer._iter = steps_done
        trainer.train_step(model, dict(batch, net_input=dict(batch['net_input'])))
    model.zero_grad()
    assert sizes == [tokens, tokens, int(tokens * 0.5)]


# ---------------------------------------------------------------- conf

@pytest.mark.parametrize('overrides, key', [
    ({'ema': 1.5}, '"ema"'),
    ({'ema': 0}, '"ema"'),
    ({'freeze': ['resnet']}, '"freeze"'),
    ({'freeze': 'encoder'}, '"freeze"'),
    ({'scst': {'freeze': ['everything']}}, '"scst.freeze"'),
    ({'accumulate': 0}, '"accumulate"'),
    ({'drop_worst_ratio': 1.0}, '"drop_worst_ratio"'),
    ({'drop_worst_after': -1}, '"drop_worst_after"'),
    ({'freeze': ['encoder', 'decoder'], 'tokenize_style': False}, '"freeze"'),
])
@pytest.mark.unit
def test_bad_recipe_settings_are_named(make_conf, capsys, overrides, key):
    conf = make_conf(**overrides)
    assert finetune.main(['train', '--conf', conf]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and key in err[0], err
    assert not work_dir_of(conf).exists()
