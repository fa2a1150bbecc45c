"""Captioning at OFA's real sizes: pre_inference.py's Captioner vs ModelScope's stock image-captioning pipeline.

    python3 -m bench.bench_real_sizes [--sizes tiny,base] [--images-tiny 32] [--images-base 8] [--batch 16]

For each size a randomly initialised OFA model dir with the real dimensions and the real 59,457-entry vocabulary
(50,265 text tokens + 8,192 <code_k> + 1,000 <bin_k>) is built locally (nothing is downloaded):

    tiny  d_model 256, 4+4 layers, 4 heads, ffn 1024, ResNet-50 stages, 256 px
    base  d_model 768, 6+6 layers, 12 heads, ffn 3072, ResNet-101 stages, 384 px

and the same images (one style, so the stock pipeline can batch them) are captioned with beam 5, max_len 16,
no-repeat 3 by: the stock pipeline image by image, the stock pipeline with batch_size=--batch (both fed the
toolkit's stylish preprocessor, so both sides see the same prompt), and the Captioner (batch --batch) with
mask_image_tokens off (its captions must equal the stock ones: checked and printed) and on (the default: no
caption may hold a <code_k>/<bin_k> token). Printed per caption: seconds (one untimed warm-up on 2 images, then the best
of --repeat timed passes), executed FLOPs (torch.utils.flop_counter.FlopCounterMode), the FLOPs beam search needs
(counted by hand, see needed_flops and bench/RESULTS.md), the machine's fp32 matmul peak (a timed torch.mm, at the
start and again after each size's timings: the higher of the two is used) and the share of it reached on the needed
FLOPs.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {  # the real OFA dimensions (OFA-Sys checkpoints; ModelScope's OFAConfig fields)
    'tiny': dict(d_model=256, layers=4, heads=4, resnet_type='resnet50', image_size=256),
    'base': dict(d_model=768, layers=6, heads=12, resnet_type='resnet101', image_size=384),
}
TEXT_VOCAB = 50265  # OFA's BPE vocabulary; the preprocessor adds 8192 <code_k> + 1000 <bin_k>
STYLE = 'Happy'


def build_assets(root: str, size: str, n_images: int):
    from utils.core.conf import DEFAULT_PROMPT
    from utils.data.styles import StyleMap
    from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption
    from utils.demo.tiny_model import build_tiny_ofa

    build_demo_data(f'{root}/data', f'{root}/images', sizes={'test': n_images})
    texts = [caption(st, c, s) for st in STYLES for c in COLOURS for s in SHAPES]
    model_dir = build_tiny_ofa(f'{root}/model_{size}', texts, text_vocab_size=TEXT_VOCAB, **SIZES[size])
    StyleMap.build(list(STYLES), True, DEFAULT_PROMPT).save(model_dir)
    return model_dir, [f'{root}/images/test{i:04d}.jpg' for i in range(n_images)]


def timed(fn, repeat: int):
    """(best seconds of ``repeat`` timed passes, the last pass's result); the caller has warmed up."""
    best, result = float('inf'), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def flops_of(fn) -> int:
    """FLOPs torch's FLOP counter counts in ``fn()``; the oneDNN ops the Captioner calls, which the counter has no
    formula for, are counted as what they compute: the fused convolution + ReLU of its folded ResNet as the
    convolution it is (torch's own formula for it), and the linear on a pre-packed weight of its vocabulary
    projection (``beam_search.packed_weight``) as the matrix product, 2 x rows x d x vocabulary rows."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def fused_conv(x_shape, w_shape, *_args, out_shape=None, **_kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)

    def packed_linear(x_shape, w_shape, *_args, out_shape=None, **_kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]
    mapping = {}
    for name, formula in (('_convolution_pointwise', fused_conv), ('_linear_pointwise', packed_linear)):
        op = getattr(torch.ops.mkldnn, name, None)
        if op is not None:
            mapping[op] = formula
    counter = FlopCounterMode(display=False, custom_mapping=mapping)  # by packet
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of the best of ``repeat`` fp32 torch.mm of two n x n matrices."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n ** 3 / timed(lambda: torch.mm(a, b), repeat)[0]


def resnet_flops(backbone, image_size: int) -> int:
    """2 x multiply-adds of every convolution of the image backbone: 2 * (C_in / groups) * k_h * k_w * C_out * H_out
    * W_out summed over the convs (their output sizes read from one forward of a single image)."""
    import torch
    total = [0]

    def hook(conv, _inputs, out):
        kh, kw = conv.kernel_size
        total[0] += 2 * conv.in_channels // conv.groups * kh * kw * conv.out_channels * out.shape[-2] * out.shape[-1]
    handles = [m.register_forward_hook(hook) for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def needed_flops(config, conv_flops: int, patches: int, text_lens, steps, beam: int, vocab_rows: int) -> int:
    """FLOPs (2 per multiply-add, matrix products only) that beam search needs for these sentences.

    Per image (``patches`` image positions + its ``text_len`` prompt tokens = S source positions): the ResNet
    (``conv_flops``), the image projection 1024 -> d, the encoder's positional q/k projections and bias (S x S), and per
    encoder layer q/k/v/o projections, attention scores and weighted sum over S x S, the feed-forward; then, once,
    every decoder layer's cross-attention keys and values and the decoder's positional keys of the S positions.
    Per decoding step of a sentence still in the batch (``steps``: the steps it was decoded for): one row at step 0
    (every beam holds the same prefix), ``beam`` rows after; per row and layer the self-attention projections, the
    scores and weighted sum over the t + 1 cached positions, the cross-attention q/o projections, the scores and
    weighted sum over the S source positions, the feed-forward; then the output projection onto ``vocab_rows`` rows.
    Per step and sentence, the cross-attention position bias of the new position (S x d)."""
    d, f = config.d_model, config.encoder_ffn_dim
    fd, n_layers_e, n_layers_d = config.decoder_ffn_dim, config.encoder_layers, config.decoder_layers
    total = 0
    for text_len, n_steps in zip(text_lens, steps):
        s = patches + text_len
        total += conv_flops + 2 * patches * 1024 * d
        total += 2 * 2 * s * d * d + 2 * s * s * d                                      # encoder position bias
        total += n_layers_e * (4 * 2 * s * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * f)
        total += n_layers_d * 2 * 2 * s * d * d + 2 * s * d * d                         # cross k/v, positional k
        for t in range(n_steps):
            rows = 1 if t == 0 else beam
            per_row = n_layers_d * (4 * 2 * d * d + 2 * 2 * (t + 1) * d + 2 * 2 * d * d + 2 * 2 * s * d
                                    + 2 * 2 * d * fd) + 2 * d * vocab_rows
            total += rows * per_row + 2 * s * d
    return total


def search_steps(captioner, items, batch: int, image_ids):
    """Per sentence: the prompt length (tokens) and how many decoding steps it stayed in the batch (the step at
    which its last hypothesis was finalised, + 1), from the generator's own hypotheses; and how many sentences' best
    hypothesis holds one of ``image_ids``."""
    import torch
    lens, steps, hits = [], [], 0
    pad = captioner.model.tokenizer.pad_token_id
    for i in range(0, len(items), batch):
        sample = captioner.collate([captioner.preprocessor(it) for it in items[i:i + batch]])
        with torch.inference_mode():
            hypos = captioner.model.generator.generate([captioner.model.model], sample)
        lens += sample['net_input']['input_ids'].ne(pad).sum(1).tolist()
        steps += [max(len(h['tokens']) for h in per) for per in hypos]
        hits += sum(any(int(t) in image_ids for t in per[0]['tokens']) for per in hypos)
    return lens, steps, hits


def caption_text(out):
    cap = out['caption']
    while isinstance(cap, list):
        cap = cap[0]
    return cap


def bench_size(size: str, n_images: int, batch: int, repeat: int, root: str, peak: float):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from utils.captioning.captioner import Captioner
    from utils.captioning.preprocessor import OfaPreprocessorForStylishIC
    from utils.core.conf import GenerationConf
    from utils.patches.generation import image_token_ids

    t0 = time.perf_counter()
    model_dir, images = build_assets(root, size, n_images)
    build_s = time.perf_counter() - t0
    items = [{'image': img, 'style': STYLE} for img in images]
    pipe = pipeline(Tasks.image_captioning, model=model_dir, device='cpu',
                    preprocessor=OfaPreprocessorForStylishIC(model_dir, mode='inference'))
    settings = dict(beam_size=5, max_len=16, no_repeat_ngram_size=3)
    mask_off, mask_on = (GenerationConf(**settings, mask_image_tokens=m) for m in (False, True))
    ours = Captioner(model_dir, mask_off, device='cpu')

    def stock_one(subset=items):
        return [caption_text(pipe(it)) for it in subset]

    def stock_batched(subset=items):
        return [caption_text(o) for o in pipe(subset, batch_size=batch)]

    def captioner(generation):  # the Captioner's generator with these settings (one model, one generator)
        if ours.generation != generation:
            ours.set_generation(generation)
        return ours

    def ours_run(subset=items):
        return captioner(mask_off).caption(subset, batch_size=batch, progress=False)

    def masked_run(subset=items):
        return captioner(mask_on).caption(subset, batch_size=batch, progress=False)

    results, seconds = {}, {}
    for name, fn in (('stock, image by image', stock_one), (f'stock, batch_size={batch}', stock_batched),
                     (f'Captioner, batch {batch}, mask off', ours_run), (f'Captioner, batch {batch}, mask on', masked_run)):
        fn(items[:2])  # warm-up (first-call allocations and set-up), untimed
        seconds[name], results[name] = timed(fn, repeat)
        seconds[name] /= n_images
    names = list(results)
    peak_now = matmul_peak()  # this VM's peak moves between runs and within one: the higher of the two is used
    print(f'\nfp32 matmul peak after timing OFA-{size}: {peak_now / 1e9:.1f} GFLOP/s (at the start: {peak / 1e9:.1f}); '
          f'the shares of the peak below are of the higher one')
    peak = max(peak, peak_now)
    first = items[:batch]
    executed = {names[1]: flops_of(lambda: pipe(first, batch_size=batch)) / len(first),
                names[2]: flops_of(lambda: ours_run(first)) / len(first),
                names[3]: flops_of(lambda: masked_run(first)) / len(first)}

    config = ours.model.model.config
    patches = (SIZES[size]['image_size'] // 16) ** 2
    conv = resnet_flops(ours.model.model.encoder.embed_images, SIZES[size]['image_size'])
    n_text = len(ours.model.tokenizer) - len(image_token_ids(ours.model.tokenizer))
    needed, hits = {}, {}
    codes = set(image_token_ids(ours.model.tokenizer))
    for name, generation, rows in ((names[2], mask_off, len(ours.model.tokenizer)), (names[3], mask_on, n_text)):
        lens, steps, hits[name] = search_steps(captioner(generation), first, batch, codes)
        needed[name] = needed_flops(config, conv, patches, lens, steps, 5, rows) / len(first)
    word = re.compile(r'\b(code|bin)_?\d+\b')  # an image token as the caption shows it ("code7477")
    masked_hits = sum(bool(word.search(c)) for c in results[names[3]])
    unmasked_hits = sum(bool(word.search(c)) for c in results[names[2]])

    print(f'\n== OFA-{size} size: d_model {config.d_model}, {config.encoder_layers}+{config.decoder_layers} layers, '
          f'{config.encoder_attention_heads} heads, ffn {config.encoder_ffn_dim}, {SIZES[size]["resnet_type"]}, '
          f'{SIZES[size]["image_size"]} px, vocabulary {config.vocab_size} ({n_text} text rows); random weights; '
          f'{n_images} images, one style; built in {build_s:.0f} s')
    print(f'{"path":36s} {"s/caption":>10s} {"GFLOP exec":>11s} {"GFLOP needed":>13s} {"exec/needed":>12s} '
          f'{"% peak (needed)":>16s}')
    for name in names:
        s = seconds[name]
        ex = executed.get(name)
        nd = needed.get(name, needed[names[2]])  # the stock paths search the whole vocabulary
        cells = [f'{s:10.4f}', f'{ex / 1e9:11.2f}' if ex else f'{"-":>11s}', f'{nd / 1e9:13.2f}',
                 f'{ex / nd:12.3f}' if ex else f'{"-":>12s}', f'{100 * nd / s / peak:15.1f}%']
        print(f'{name:36s} ' + ' '.join(cells))
    same_one = results[names[0]] == results[names[2]]
    same_batched = results[names[1]] == results[names[2]]
    print(f'captions identical to the stock pipeline (mask off): image by image {same_one}, batched {same_batched} '
          f'({sum(a == b for a, b in zip(results[names[1]], results[names[2]]))}/{n_images}); e.g. '
          f'{results[names[2]][0][:60]!r}')
    print(f'captions with a <code_k>/<bin_k> token: mask on {masked_hits}/{n_images}, mask off {unmasked_hits}/{n_images}; '
          f'best hypotheses holding one (first {len(first)}): mask on {hits[names[3]]}, mask off {hits[names[2]]}')
    print(f'ratio (mask off) vs stock image by image: {seconds[names[0]] / seconds[names[2]]:.2f}x; '
          f'vs stock batched: {seconds[names[1]] / seconds[names[2]]:.2f}x; mask on vs stock batched: '
          f'{seconds[names[1]] / seconds[names[3]]:.2f}x')
    return same_one and same_batched and masked_hits == 0 and hits[names[3]] == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='tiny,base', help='comma-separated: tiny, base')
    p.add_argument('--images-tiny', type=int, default=32)
    p.add_argument('--images-base', type=int, default=8)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--repeat', type=int, default=1, help='timed passes per path after the warm-up (the best is kept)')
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(',') if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f'--sizes: unknown size {unknown[0]!r} (tiny, base)')

    from utils.core.logs import setup_logging
    setup_logging()
    import torch

    command = 'python3 -m bench.bench_real_sizes ' + ' '.join(argv if argv is not None else sys.argv[1:])
    print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}; command: {command}')
    print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, '
          f'load average {" ".join(f"{x:.2f}" for x in os.getloadavg())}, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}')
    from utils.core.memory import keep_freed_memory
    # as in the commands that caption (load_captioner): both sides, stock and ours, run in this process with it
    print(f'freed memory kept for reuse (utils.core.memory): {keep_freed_memory()}')
    peak = matmul_peak()
    print(f'fp32 matmul peak (best of 5 torch.mm 2048 x 2048): {peak / 1e9:.1f} GFLOP/s')
    ok = True
    with tempfile.TemporaryDirectory() as root:
        for size in sizes:
            n = args.images_tiny if size == 'tiny' else args.images_base
            ok &= bench_size(size, n, args.batch, args.repeat, f'{root}/{size}', peak)
    peak_after = matmul_peak()
    print(f'\nfp32 matmul peak again at the end: {peak_after / 1e9:.1f} GFLOP/s; load average '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
