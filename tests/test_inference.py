"""pre_inference.py and finetune.py eval on the tiny trained model."""
import csv
import json
from pathlib import Path

import pytest

import finetune
import pre_inference


def run_inference(conf_path, *extra):
    return pre_inference.main(['--conf', conf_path, '-b', '4', *extra])


def newest(directory, pattern):
    files = sorted(Path(directory).glob(pattern))
    return files[-1] if files else None


@pytest.fixture(scope='module')
def test_rows(trained):
    conf = json.loads(Path(trained[0]).read_text())
    rows = json.loads((Path(conf['dataset_path']) / 'test.json').read_text())
    return conf, rows


@pytest.mark.integration
def test_default_captions_the_whole_test_split(trained, test_rows, tmp_path):
    conf, rows = test_rows
    assert run_inference(trained[0], '-o', str(tmp_path)) == 0
    out = json.loads(newest(tmp_path, 'inference_*.json').read_text())
    assert set(out) == {'model_name', 'model_revision', 'model', 'n_eval_sample', 'results', 'data'}
    assert out['data']['test'] == {'rows': len(rows), 'kept': len(rows), 'skipped': {}}
    assert out['model_name'] == conf['model_name'] and out['n_eval_sample'] == len(rows) == len(out['results'])
    assert out['model'] == str(Path(conf['work_dir']) / 'output')  # the model dir that captioned (absolute)
    for r, row in zip(out['results'], rows):
        assert set(r) == {'style', 'image', 'caption', 'reference'}
        assert r['style'] == row['personality'] and r['image'].endswith(row['image_hash'] + '.jpg')
        assert isinstance(r['caption'], str) and r['caption']
        assert r['reference'] == [row['comment']] + row['additional_comments']


@pytest.mark.integration
def test_n_first_and_random(trained, test_rows, tmp_path):
    _, rows = test_rows
    assert run_inference(trained[0], '-n', '3', '-o', str(tmp_path / 'a')) == 0
    first = json.loads(newest(tmp_path / 'a', 'inference_*.json').read_text())['results']
    assert [r['image'].split('/')[-1] for r in first] == [r['image_hash'] + '.jpg' for r in rows[:3]]
    picks = []
    for d in ('b', 'c'):
        assert run_inference(trained[0], '-n', '3', '-r', '-o', str(tmp_path / d)) == 0
        picks.append([r['image'] for r in json.loads(newest(tmp_path / d, 'inference_*.json').read_text())['results']])
    assert picks[0] == picks[1] and len(set(picks[0])) == 3  # seeded: reproducible
    assert set(p.split('/')[-1] for p in picks[0]) <= {r['image_hash'] + '.jpg' for r in rows}


@pytest.mark.integration
def test_json_list_in_order_with_two_styles_for_one_image(trained, test_rows, tmp_path):
    conf, _ = test_rows
    image = str(Path(conf['img_addr']) / 'test0001.jpg')
    items = [{'style': 'Sarcastic', 'image': image, 'reference': 'a ref'},
             {'style': 'Happy', 'image': image},
             {'style': 'Anxious', 'image_hash': 'test0002', 'reference': ['r1', 'r2']}]
    j = tmp_path / 'list.json'
    j.write_text(json.dumps(items))
    assert run_inference(trained[0], '-j', str(j), '-o', str(tmp_path), '-d', 'my model') == 0
    out = json.loads(newest(tmp_path, 'inference_*.json').read_text())
    assert out['model_name'] == 'my model' and out['n_eval_sample'] == 3
    assert out['data'] == {'json': {'rows': 3, 'kept': 3, 'skipped': {}}} and 'skipped' not in out
    assert [r['style'] for r in out['results']] == ['Sarcastic', 'Happy', 'Anxious']
    assert out['results'][0]['reference'] == 'a ref' and 'reference' not in out['results'][1]
    assert out['results'][2]['reference'] == ['r1', 'r2']
    assert out['results'][2]['image'] == str(Path(conf['img_addr']) / 'test0002.jpg')


@pytest.mark.integration
def test_batching_does_not_change_captions(trained, test_rows):
    from utils.captioning.captioner import load_captioner
    from utils.core.conf import read_conf
    conf, rows = test_rows
    captioner = load_captioner(read_conf(trained[0]))
    items = [{'style': r['personality'], 'image': str(Path(conf['img_addr']) / (r['image_hash'] + '.jpg'))}
             for r in rows]
    assert captioner.caption(items, batch_size=1) == captioner.caption(items, batch_size=5)


@pytest.mark.parametrize('items, message', [
    ([{'style': 'Sarcastik', 'image_hash': 'test0001'}], "unknown style 'Sarcastik'"),
    ([{'style': 'Happy', 'image_hash': 'nope'}], 'row 0: image missing'),
    ([{'style': 'Happy'}], 'row 0: needs "image"'),
    ({'style': 'Happy'}, 'must hold a non-empty JSON list'),
])
@pytest.mark.integration
def test_bad_json_list_is_a_clear_error(trained, tmp_path, capsys, items, message):
    j = tmp_path / 'list.json'
    j.write_text(json.dumps(items))
    assert run_inference(trained[0], '-j', str(j), '-o', str(tmp_path / 'out')) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0] and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.integration
def test_unknown_style_names_nearest(trained, tmp_path, capsys):
    j = tmp_path / 'list.json'
    j.write_text(json.dumps([{'style': 'Happy', 'image_hash': 'test0001'}, {'style': 'anxious', 'image_hash': 'test0001'}]))
    assert run_inference(trained[0], '-j', str(j)) == 2
    err = capsys.readouterr().err
    assert 'row 1' in err and "unknown style 'anxious'" in err and "'Anxious'" in err


@pytest.mark.integration
def test_model_dir_without_configuration(trained, tmp_path, capsys):
    assert run_inference(trained[0], '-m', str(tmp_path)) == 2
    assert 'has no configuration.json' in capsys.readouterr().err


@pytest.mark.integration
def test_eval_writes_metrics_and_csv(trained_copy, tmp_path, capsys, meteor):
    from conftest import coco_scores
    csv_path = tmp_path / 'runs.csv'
    for _ in range(2):
        assert finetune.main(['eval', '--conf', trained_copy[0], '-b', '4', '-l', str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert 'CIDEr' in out and 'Bleu_4' in out
    result = json.loads(newest(trained_copy[1], 'eval_*.json').read_text())
    # the figures are pycocoevalcap's own on the captions and references the file holds
    expected = coco_scores([r['caption'] for r in result['results']], [r['reference'] for r in result['results']],
                           meteor)
    for key, value in expected.items():
        assert result['metrics'][key] == pytest.approx(value, rel=1e-9, abs=0), key
        assert 0 <= value <= (10 if key == 'CIDEr' else 1), key  # pycocoevalcap's scale, not x100
    assert result['metrics']['Bleu_1'] > 0  # the trained model's captions share words with the references
    assert len(result['results']) == 8 and len(result['results'][0]['reference']) == 2
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 and rows[0]['CIDEr'] == rows[1]['CIDEr'] and rows[0]['beam_size'] == '5'


@pytest.mark.integration
def test_eval_file_has_the_inference_schema_and_rescores_to_the_same_figures(trained_copy, tmp_path):
    """One result schema: eval_*.json is an inference file (plus metrics), and `python -m utils.metrics`
    scores it through the same code, to the same figures."""
    from utils import metrics
    assert finetune.main(['eval', '--conf', trained_copy[0], '-n', '6']) == 0
    path = newest(trained_copy[1], 'eval_*.json')
    result = json.loads(path.read_text())
    assert {'model_name', 'model_revision', 'n_eval_sample', 'results'} <= set(result)
    assert result['n_eval_sample'] == len(result['results']) == 6
    assert all(isinstance(r['reference'], list) and set(r) >= {'style', 'image', 'caption'} for r in result['results'])
    out = tmp_path / 'rescored.json'
    assert metrics.main([str(path), '-o', str(out)]) == 0
    again = json.loads(out.read_text())['metrics']
    for key, value in result['metrics'].items():
        if key in ('SPICE', 'style_status'):
            continue
        if isinstance(value, dict):  # per_style: style -> its figures
            assert set(again[key]) == set(value), key
            for style, figures in value.items():
                assert again[key][style] == pytest.approx(figures), (key, style)
        elif isinstance(value, (list, str)):  # style_confusions, per_style_note
            assert again[key] == value, key
        else:
            assert again[key] == pytest.approx(value), key


@pytest.mark.integration
def test_eval_of_a_checkpoint(trained_copy):
    conf, work = trained_copy
    assert finetune.main(['eval', '--conf', conf, '-p', str(work / 'iter_3'), '-n', '4']) == 0
    result = json.loads(newest(work, 'eval_*.json').read_text())
    assert result['checkpoint'].endswith('iter_3') and len(result['results']) == 4


@pytest.mark.integration
def test_fast_generation_gives_the_stock_generators_captions_and_scores(trained, test_rows):
    """utils.patches.generation (key/value cache, cross-attention per image, vectorised n-gram blocker) against
    ModelScope's stock SequenceGenerator on the same trained model, image-token masking off: same beams, same scores
    (to float rounding)."""
    import torch

    from utils.captioning.captioner import Captioner
    conf, rows = test_rows
    model_dir = str(Path(conf['work_dir']) / 'output')
    items = [{'style': s, 'image': str(Path(conf['img_addr']) / (r['image_hash'] + '.jpg'))}
             for r in rows for s in ('Happy', 'Sarcastic', 'Romantic', 'Anxious')]
    from utils.core.conf import GenerationConf
    settings = GenerationConf(beam_size=3, max_len=12, no_repeat_ngram_size=2, mask_image_tokens=False)
    fast, stock = (Captioner(model_dir, settings, fast=f) for f in (True, False))
    assert fast.caption(items, batch_size=7) == stock.caption(items, batch_size=5)

    batch = fast.collate([fast.preprocessor(item) for item in items[:6]])
    with torch.inference_mode():
        hypos = [c.model.generator.generate([c.model.model], batch) for c in (fast, stock)]
    for ours, theirs in zip(*hypos):
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            assert torch.equal(a['tokens'], b['tokens'])
            assert torch.allclose(a['score'], b['score'], atol=1e-5)
            assert torch.allclose(a['positional_scores'], b['positional_scores'], atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize('n', [2, 3, 4])
def test_vectorised_ngram_blocker_bans_what_the_stock_one_bans(n):
    import math

    import torch
    from modelscope.models.multi_modal.ofa.generate.ngram_repeat_block import NGramRepeatBlock

    from utils.patches.generation import VectorisedNGramRepeatBlock
    gen = torch.Generator().manual_seed(n)
    bsz, beam, length, vocab, pad = 3, 4, 14, 12, 1
    stock, ours = NGramRepeatBlock(n, use_extension=False), VectorisedNGramRepeatBlock(n)
    banned_any = 0
    for step in range(length - 1):
        tokens = torch.full((bsz * beam, length + 1), pad)
        tokens[:, 0] = 0  # bos
        tokens[:, 1:step + 1] = torch.randint(4, 7, (bsz * beam, step), generator=gen)  # few symbols: repeats
        lprobs = torch.randn(bsz * beam, vocab, generator=gen)
        lprobs[:, pad] = -math.inf  # as the generator does before blocking
        expected = stock._no_repeat_ngram(tokens, lprobs.clone(), bsz, beam, step)
        got = ours._no_repeat_ngram(tokens, lprobs.clone(), bsz, beam, step)
        assert torch.equal(expected, got), step
        banned_any += int(torch.isinf(expected).sum()) - bsz * beam
    assert banned_any > 0  # the comparison exercised real bans


@pytest.mark.unit
@pytest.mark.parametrize('seed', range(6))
def test_beam_search_candidates_are_the_stock_beam_search_step(seed):
    """utils.patches.beam_search.candidates (each row's best first, then the hypotheses' scores added) against the
    stock BeamSearch.step over all beam x vocabulary sums, after the stock loop's NaN write: same scores, tokens and
    beams (of the candidates that are not -inf), at the first step (one row per sentence) and later, with -inf
    (banned) entries, a small vocabulary where k is bounded by V - 1, and a row that is all NaN (a NaN logit) while its sentence's other rows are not."""
    import math
    from types import SimpleNamespace

    import torch
    from modelscope.models.multi_modal.ofa.generate.search import BeamSearch

    from utils.patches.beam_search import candidates
    gen = torch.Generator().manual_seed(seed)
    bsz, beam, vocab = 3, 4, (37 if seed % 2 else 3)
    tokenizer = SimpleNamespace(pad_token_id=1, unk_token_id=3, eos_token_id=2,
                                get_vocab=lambda: {str(i): i for i in range(vocab)}, get_added_vocab=lambda: {})
    stock = BeamSearch(tokenizer)
    for step in (0, 5):
        rows = bsz if step == 0 else bsz * beam
        lprobs = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 3, -1)
        lprobs[:, 1] = -math.inf
        lprobs[torch.rand(rows, vocab, generator=gen) < 0.2] = -math.inf
        if step:
            lprobs[beam + 1] = math.nan  # sentence 1's beam 1
        scores = torch.randn(bsz * beam, step + 1, generator=gen).cumsum(1) * -1
        theirs = lprobs.clone()
        theirs[theirs != theirs] = -math.inf
        if step == 0:  # the stock loop hands every beam's row; they are equal at the first step
            theirs = theirs.repeat_interleave(beam, 0)
        expected = stock.step(step, theirs.view(bsz, beam, vocab), scores.view(bsz, beam, -1)[:, :, :step])
        got = candidates(lprobs, None if step == 0 else scores.view(bsz, beam, -1)[:, :, step - 1], bsz, 2 * beam)
        assert torch.equal(expected[0], got[0]), (step, expected[0], got[0])
        finite = expected[0].isfinite()  # the order among -inf (never chosen) candidates is top-k's own
        assert finite.sum() >= bsz
        for want, have in zip(expected[1:], got[1:]):
            assert torch.equal(want[finite], have[finite]), (step, want, have)
        assert not torch.isnan(lprobs).any()  # the NaN row was written -inf, as the stock loop does


@pytest.mark.integration
def test_captioning_in_bf16(trained, test_rows):
    """precision bf16: generation runs under autocast (the decoder's products, the logits included, are bf16) and
    still captions."""
    import torch

    from utils.captioning.captioner import load_captioner
    from utils.core.conf import apply_overrides, read_conf
    conf, rows = test_rows
    captioner = load_captioner(apply_overrides(read_conf(trained[0]), precision='bf16'))
    seen = set()  # (the output projection is sliced to the text rows, not called as a module: its input is read)
    captioner.model.model.decoder.layers[-1].fc2.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    items = [{'style': r['personality'], 'image': str(Path(conf['img_addr']) / (r['image_hash'] + '.jpg'))}
             for r in rows]
    captions = captioner.caption(items, batch_size=4)
    assert seen == {torch.bfloat16}
    assert len(captions) == len(items) and all(c.strip() for c in captions)


@pytest.mark.integration
def test_bad_rows_of_a_json_list_are_skipped_and_said(trained, tmp_path, capsys):
    """-j lists are treated like data sets: bad rows skipped and counted, the result file says which and why;
    --strict makes the first one an error; an unknown style still stops the run, naming its row of the file."""
    j = tmp_path / 'list.json'
    rows = [{'style': 'Happy', 'image_hash': 'test0001'}, {'style': 'Happy', 'image_hash': 'gone'}, 'Happy',
            {'style': 'Sarcastic', 'image_hash': 'test0002', 'reference': 3},
            {'style': 'Romantic', 'image_hash': 'test0002'}]
    j.write_text(json.dumps(rows))
    out = tmp_path / 'out'
    assert run_inference(trained[0], '-j', str(j), '-o', str(out)) == 0
    result = json.loads(next(out.glob('inference_*.json')).read_text())
    assert [r['style'] for r in result['results']] == ['Happy', 'Romantic']
    assert [(s['row'], s['reason'].split(':')[0]) for s in result['skipped']] == [
        (1, 'image missing'), (2, 'not an object'), (3, '"reference" must be a string or a list of strings')]
    assert result['data']['json']['rows'] == 5 and result['data']['json']['kept'] == 2
    assert run_inference(trained[0], '-j', str(j), '-o', str(tmp_path / 'strict'), '--strict') == 2
    assert 'row 1: image missing' in capsys.readouterr().err and not (tmp_path / 'strict').exists()
    j.write_text(json.dumps(rows + [{'style': 'Sarcastik', 'image_hash': 'test0001'}]))
    assert run_inference(trained[0], '-j', str(j), '-o', str(tmp_path / 'typo')) == 2
    assert "row 5: unknown style 'Sarcastik'" in capsys.readouterr().err
