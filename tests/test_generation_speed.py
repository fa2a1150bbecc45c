"""utils.patches.generation at work: the stock search's tokens and scores without its wasted work, and captions
that are text (mask_image_tokens). The equality at OFA-tiny's real size is in bench/bench_real_sizes.py (building a
real-size model dir alone takes ~20 s here)."""
import dataclasses
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STYLES = ['Happy', 'Sarcastic', 'Romantic', 'Anxious']


@pytest.fixture(scope='module')
def model_dir(tiny_model, tmp_path_factory):
    """The random tiny model with a style map whose prompts differ in length (style words, not style tokens), so
    a batch's prompts are padded."""
    from utils.core.conf import DEFAULT_PROMPT
    from utils.data.styles import StyleMap
    out = tmp_path_factory.mktemp('gen_speed') / 'model'
    shutil.copytree(tiny_model, out)
    StyleMap.build(STYLES, False, DEFAULT_PROMPT).save(str(out))
    return str(out)


@pytest.fixture(scope='module')
def items(pcap):
    images = sorted(Path(pcap[1]).glob('test*.jpg'))
    return [{'image': str(img), 'style': STYLES[i % 4]} for i, img in enumerate(images)]


def captioners(model_dir, bias=None, **settings):
    """(fast, stock) Captioners of the same weights; ``bias``: {token id: value} added to the output logits (a
    bias of the output projection), to steer what the random model prefers."""
    import torch

    from utils.captioning.captioner import Captioner
    from utils.core.conf import GenerationConf
    generation = GenerationConf(**{'beam_size': 4, 'max_len': 10, 'no_repeat_ngram_size': 3, **settings})
    pair = tuple(Captioner(model_dir, generation, fast=f) for f in (True, False))
    for c in pair:
        proj = c.model.model.decoder.output_projection
        if bias:
            proj.bias = torch.nn.Parameter(torch.zeros(proj.weight.size(0)), requires_grad=False)
            for token, value in bias.items():
                proj.bias.data[token] = value
    return pair


def hypotheses(captioner, items):
    import torch
    batch = captioner.collate([captioner.preprocessor(item) for item in items])
    with torch.inference_mode():
        return captioner.model.generator.generate([captioner.model.model], batch)


def assert_same_hypotheses(ours, theirs, tolerance=1e-5):
    import torch
    assert len(ours) == len(theirs)
    for a_sent, b_sent in zip(ours, theirs):
        assert len(a_sent) == len(b_sent)
        for a, b in zip(a_sent, b_sent):
            assert torch.equal(a['tokens'], b['tokens'])
            assert torch.allclose(a['score'], b['score'], rtol=tolerance, atol=tolerance)
            assert torch.allclose(a['positional_scores'], b['positional_scores'], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('projection', ['packed', 'blocked'])
def test_same_hypotheses_as_the_stock_generator_when_sentences_finish_at_different_steps(model_dir, items, projection,
                                                                                         monkeypatch):
    """Padded prompts, and sentences leaving the batch at different steps (an end-of-sentence bias makes the random
    model stop early on some images): the per-image state is re-indexed, not reordered, and the beams and scores
    are the stock generator's (image-token masking off, as the stock generator has none). Both vocabulary
    projections: oneDNN's on the pre-packed weight (where it is there) and the blocked GEMM (where it is not)."""
    from utils.patches import beam_search
    packs = []
    pack = beam_search.packed_weight
    monkeypatch.setattr(beam_search, 'packed_weight',
                        lambda *a: packs.append(1) or (pack(*a) if projection == 'packed' else None))
    fast, stock = captioners(model_dir, mask_image_tokens=False)
    assert_same_hypotheses(hypotheses(fast, items[:7]), hypotheses(stock, items[:7]))
    assert packs  # the search asked for the packed weight
    if projection == 'packed':
        assert fast.model.model.decoder.output_projection.__dict__['_packed_for_search'][-1].is_mkldnn
    eos = fast.model.tokenizer.eos_token_id
    fast, stock = captioners(model_dir, bias={eos: 0.0}, mask_image_tokens=False)
    for value in [0.1 * i for i in range(1, 30)]:  # the first bias at which the finishing steps differ
        for c in (fast, stock):
            c.model.model.decoder.output_projection.bias.data[eos] = value
        ours = hypotheses(fast, items[:7])
        finished_at = {max(len(h['tokens']) for h in sent) for sent in ours}
        if len(finished_at) > 1:
            break
    assert len(finished_at) > 1, finished_at  # sentences really left the batch at different steps
    assert_same_hypotheses(ours, hypotheses(stock, items[:7]))
    assert fast.caption(items, batch_size=3) == stock.caption(items, batch_size=5)


SETTINGS = {  # generator attributes the toolkit's conf does not reach but ModelScope's generator has
    'temperature 0.7': dict(temperature=0.7), 'temperature 1.9': dict(temperature=1.9),
    'unk penalty': dict(unk_penalty=-5.0), 'min_len 4': dict(min_len=4), 'min_len 0': dict(min_len=0),
    'max_len_b 3': dict(max_len_b=3), 'max_len_b 0': dict(max_len_b=0, min_len=0),
    'match_source_len': dict(match_source_len=True), 'max_len_a': dict(max_len_a=0.3, max_len_b=2),
    'ignore_eos': dict(ignore_eos=True, max_len_b=5), 'beam 1': dict(beam_size=1), 'beam 2': dict(beam_size=2),
    'beam 5': dict(beam_size=5),
}


def test_same_hypotheses_as_the_stock_generator_under_every_generator_setting(model_dir, items):
    """The loop's handling of each setting of ModelScope's SequenceGenerator (temperature, unk penalty, min and max
    length, match_source_len, ignore_eos, beam sizes) against the stock loop, with sentences finishing at different
    steps (an end-of-sentence bias)."""
    fast, stock = captioners(model_dir, bias={0: 0.0}, mask_image_tokens=False)
    for c in (fast, stock):  # an end-of-sentence bias
        c.model.model.decoder.output_projection.bias.data[c.model.tokenizer.eos_token_id] = 2.0
    defaults = {k: getattr(stock.model.generator, k) for k in
                ('temperature', 'unk_penalty', 'min_len', 'max_len_a', 'max_len_b', 'match_source_len', 'ignore_eos',
                 'beam_size')}
    for name, setting in SETTINGS.items():
        for c in (fast, stock):
            for key, value in {**defaults, **setting}.items():
                setattr(c.model.generator, key, value)
        ours, theirs = hypotheses(fast, items[:6]), hypotheses(stock, items[:6])
        assert all(sent for sent in theirs), name
        try:
            assert_same_hypotheses(ours, theirs)
        except AssertionError as e:
            raise AssertionError(f'{name}: {e}') from e


@pytest.mark.parametrize('how', ['a bf16 model', 'bf16 autocast'])
def test_same_hypotheses_as_the_stock_generator_in_bfloat16(model_dir, items, how):
    """Logits in bfloat16 (the conf's precision bf16, i.e. autocast, or a model converted to it): log-softmax and the
    scores in float32 as the stock model computes them, the stock candidate arithmetic (bf16 logits tie often), and
    the stock generator's best hypotheses."""
    import torch

    from utils.core.device import autocast
    fast, stock = captioners(model_dir, mask_image_tokens=False)

    def run(c):
        batch = c.collate([c.preprocessor(item) for item in items[:6]])
        if how == 'a bf16 model':
            c.model.model.to(torch.bfloat16)
            batch['net_input']['patch_images'] = batch['net_input']['patch_images'].to(torch.bfloat16)
        with torch.inference_mode(), autocast('bf16' if how == 'bf16 autocast' else 'fp32', 'cpu'):
            return c.model.generator.generate([c.model.model], batch)
    ours, theirs = run(fast), run(stock)
    assert all(h['score'].dtype == torch.float32 for sent in ours + theirs for h in sent)
    # the decoder's products are rounded to bf16 (2^-8), and the stock decoder re-runs the whole prefix where ours
    # reads the key/value cache, in another order: near-equal beams can swap; the best hypotheses score the same
    # within that rounding, and here the best hypotheses are the stock ones
    same = [torch.equal(a[0]['tokens'], b[0]['tokens']) for a, b in zip(ours, theirs)]
    assert all(same), same  # (here; a lower beam may differ)
    for a, b in zip(ours, theirs):
        assert abs(a[0]['score'] - b[0]['score']) <= 8e-3 * abs(b[0]['score'])


def test_masked_captions_hold_no_image_token_and_equal_the_stock_search_over_text(model_dir, items):
    """A model biased toward a <code_k> row says it everywhere unmasked; masked (the default), no hypothesis holds
    a <code_k>/<bin_k> token, and the sliced projection gives the stock search's beams over logits whose image-token
    rows are -inf."""
    from utils.patches.generation import image_token_ids
    fast, _ = captioners(model_dir)
    codes = image_token_ids(fast.model.tokenizer)
    assert len(codes) == 8192 + 1000 and codes[-1] == len(fast.model.tokenizer) - 1
    favourite = fast.model.tokenizer.convert_tokens_to_ids('<code_77>')
    fast, _ = captioners(model_dir, bias={favourite: 30.0}, mask_image_tokens=False)
    unmasked = hypotheses(fast, items[:4])
    assert all(favourite in sent[0]['tokens'].tolist() for sent in unmasked)
    assert all('code77' in c for c in fast.caption(items[:4]))  # what a user saw: "code77 code77 ..."

    fast, stock = captioners(model_dir, bias={favourite: 30.0})  # mask_image_tokens: the default, on
    assert fast.generation.mask_image_tokens and fast.model.generator.mask_image_tokens
    ours = hypotheses(fast, items[:6])
    code_set = set(codes)
    assert not any(code_set & set(h['tokens'].tolist()) for sent in ours for h in sent)
    assert_same_hypotheses(ours, hypotheses(stock, items[:6]))  # stock: the same rows at -inf (mask_rows_hook)
    captions = fast.caption(items)
    assert captions == stock.caption(items, batch_size=3)
    assert not any(re.search(r'\b(code|bin)_?\d+', c) for c in captions)

    fast.set_generation(dataclasses.replace(fast.generation, mask_image_tokens=False))
    assert not fast.model.generator.mask_image_tokens  # the web demo's set_generation turns it off again
    assert all('code77' in c for c in fast.caption(items[:2]))


def test_executed_flops_are_close_to_what_beam_search_needs(model_dir, items):
    """FLOPs torch counts for a batch against the hand count of bench/bench_real_sizes.py: no per-beam copies of
    the image's cross-attention work, no recomputed prefix, no positional keys per step; the stock generator
    executes several times more. (The bench's counter: torch's, with the oneDNN ops it has no formula for counted
    as the products they compute.)"""
    from bench.bench_real_sizes import flops_of, needed_flops, resnet_flops
    fast, stock = captioners(model_dir, beam_size=5, max_len=16)
    batch = items[:8]
    counted, found = [], []
    for c in (fast, stock):
        counted.append(flops_of(lambda c=c: found.append(hypotheses(c, batch))))
    sents = found[0]
    model = fast.model.model
    sample = fast.collate([fast.preprocessor(item) for item in batch])
    size = sample['net_input']['patch_images'].shape[-1]
    lens = sample['net_input']['input_ids'].ne(fast.model.tokenizer.pad_token_id).sum(1).tolist()
    steps = [max(len(h['tokens']) for h in sent) for sent in sents]
    rows = len(fast.model.tokenizer) - sum(bool(re.fullmatch(r'<(code|bin)_\d+>', t)) for t in fast.model.tokenizer.get_vocab())
    needed = needed_flops(model.config, resnet_flops(model.encoder.embed_images, size), (size // 16) ** 2, lens,
                          steps, 5, rows)
    assert needed <= counted[0] <= 1.15 * needed, (counted[0] / needed)
    assert counted[1] > 2 * counted[0], counted[1] / counted[0]


def test_a_loaded_model_runs_its_resnet_channels_last_with_the_stock_captions_and_a_trained_one_is_left_alone(
        model_dir, items):
    """The Captioner keeps the ResNet of a model it loaded itself in channels-last layout on the CPU (faster
    oneDNN convolutions, bench/RESULTS.md) and its captions stay the stock generator's (fast=False keeps the
    stock layout); a model handed to it (the one a trainer trains, for validation) keeps its layout."""
    import torch

    from utils.captioning.captioner import Captioner
    fast, stock = captioners(model_dir)

    def convs(captioner):
        return [m for m in captioner.model.model.encoder.embed_images.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs(fast) and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs(fast))
    assert all(m.weight.is_contiguous() for m in convs(stock))
    assert fast.caption(items, batch_size=3, progress=False) == stock.caption(items, batch_size=3, progress=False)
    handed = Captioner(stock.model, stock.generation, style_map=stock.style_map)
    assert all(m.weight.is_contiguous() for m in convs(handed))


def test_the_folded_resnet_computes_what_the_model_does_and_follows_its_weights(model_dir, items, monkeypatch):
    """The BatchNorms folded into the convolutions (with running statistics and affine terms far from the identity),
    the ReLUs fused and the residuals added in place give the backbone's output within float rounding; caption() puts the model's own backbone back (after an error
    too) and leaves its state dict alone; new weights (a checkpoint loaded) are folded again: the captions are those
    of a Captioner built on the new weights."""
    import torch

    from modelscope.models.multi_modal.ofa.resnet import Bottleneck

    from utils.core.device import autocast
    from utils.patches.generation import _ConvReLU, _FoldedBottleneck, fold_batch_norms
    fast, _ = captioners(model_dir)
    backbone = fast.model.model.encoder.embed_images
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.2)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
    folded = fold_batch_norms(backbone)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, _FoldedBottleneck) for m in folded.modules()) == sum(
        isinstance(m, Bottleneck) for m in backbone.modules()) > 0
    assert isinstance(folded.conv1, _ConvReLU)  # the stem
    x = torch.randn(3, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    images = x.clone()
    fused_calls = []
    fused_op = torch.ops.mkldnn._convolution_pointwise

    def spy(*args):
        fused_calls.append(args[0].shape)
        return fused_op(*args)
    with torch.inference_mode():
        want = backbone.eval()(x)
        monkeypatch.setattr(torch.ops.mkldnn, '_convolution_pointwise', spy)
        got = folded(x)  # the oneDNN convolutions with ReLU fused (as in caption())
        n_fused = len(fused_calls)
        with autocast('bf16', 'cpu'):  # autocast: the plain convolutions, in bf16
            low = folded(x)
    assert n_fused == 1 + 2 * sum(isinstance(m, Bottleneck) for m in backbone.modules()) == len(fused_calls)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), want, rtol=0.1, atol=0.1 * want.abs().max())
    assert torch.equal(x, images)  # the in-place residuals never touch the caller's images
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()
    assert torch.allclose(folded(x), got, rtol=1e-5, atol=1e-5 * want.abs().max().item())  # grad on: plain ReLU
    assert len(fused_calls) == n_fused

    assert not any(m.training for m in folded.modules())
    keys = list(fast.model.model.state_dict())
    from utils.patches import beam_search
    searches = []
    run_search = beam_search.beam_search
    monkeypatch.setattr(beam_search, 'beam_search', lambda *a, **k: searches.append(1) or run_search(*a, **k))
    fast.caption(items[:4], batch_size=2, progress=False)
    assert len(searches) == 2  # with the folded ResNet swapped in, the search is still the toolkit's loop
    built = fast._folded[1]
    assert fast.model.model.encoder.embed_images is backbone and list(fast.model.model.state_dict()) == keys
    with pytest.raises((OSError, ValueError)):  # the image loader's error for a missing file
        fast.caption([{'image': '/no/such/image.jpg', 'style': STYLES[0]}], progress=False)
    assert fast.model.model.encoder.embed_images is backbone

    # new weights, loaded as load_checkpoint does (load_state_dict): the fold follows them
    state = {k: v.clone() for k, v in fast.model.model.state_dict().items()}
    for k, v in state.items():
        if k.startswith('encoder.embed_images.') and v.dim() == 4:  # the convolutions' weights
            v.mul_(-1.5)
    fast.model.model.load_state_dict(state)
    again = fast.caption(items[:4], batch_size=2, progress=False)
    assert fast._folded[1] is not built  # folded again from the new weights
    fresh, _ = captioners(model_dir)
    fresh.model.model.load_state_dict(state)
    assert again == fresh.caption(items[:4], batch_size=2, progress=False)
    refolded = fold_batch_norms(fast.model.model.encoder.embed_images)
    assert all(torch.equal(a, b) for a, b in zip(fast._folded[1].state_dict().values(), refolded.state_dict().values()))


def test_the_packed_projection_weight_is_kept_while_the_weight_is_unchanged_and_follows_it_when_it_changes():
    """beam_search.packed_weight: one packing per weight (a training step or a loaded checkpoint changes it, also
    fused AdamW and .data writes, which leave the version counter as it was), the text rows only, and none for a
    weight without a version counter (made under inference_mode)."""
    import torch
    import torch.nn.functional as F

    from utils.patches.beam_search import packed_weight, project
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 50, bias=False)
    first = packed_weight(proj, 40)
    if first is None:
        pytest.skip('this torch has no oneDNN')
    assert packed_weight(proj, 40) is first
    x = torch.randn(6, 16)
    with torch.inference_mode():
        logits, full = project(x, proj.weight[:40], None, None, None, 1.0, first)
    assert full and logits.shape == (6, 40)
    assert torch.allclose(logits, F.linear(x, proj.weight[:40]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        proj.weight.mul_(-2.0)  # as an optimizer step or load_state_dict writes it
    again = packed_weight(proj, 40)
    assert again is not first
    with torch.inference_mode():
        logits, _ = project(x, proj.weight[:40], None, None, None, 0.5, again)
    assert torch.allclose(logits, F.linear(x, proj.weight[:40]) / 0.5, rtol=1e-5, atol=1e-6)
    assert packed_weight(proj, 30) is not again  # other rows, another packing
    # torch's fused AdamW (the trainer's optimizer) changes the weight without bumping its version counter
    proj.weight.grad = torch.randn_like(proj.weight)
    packed = packed_weight(proj, 40)
    torch.optim.AdamW(proj.parameters(), lr=0.1, fused=True).step()
    stepped = packed_weight(proj, 40)
    assert stepped is not packed
    with torch.inference_mode():
        logits, _ = project(x, proj.weight[:40], None, None, None, 1.0, stepped)
    assert torch.allclose(logits, F.linear(x, proj.weight[:40]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        proj.weight.data[3] += 1.0  # a write through .data: no version bump either
    assert packed_weight(proj, 40) is not stepped
    with torch.inference_mode():
        made_there = torch.nn.Linear(16, 50, bias=False)
    assert packed_weight(made_there, 40) is None
