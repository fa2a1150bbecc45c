"""Repairs to ModelScope's OFA ``SequenceGenerator`` for batched captioning: the stock beam search and its results
(the same tokens; the same scores up to float rounding), without the work it does not need.

A covered call (below) runs :func:`utils.patches.beam_search.beam_search`, the stock loop
(``SequenceGenerator._generate`` with ``BeamSearch``) step for step, which the stock generator's own
``finalize_hypos`` records the hypotheses of, with these changes:

1. **Decoder key/value cache.** The stock generator hands the decoder an empty incremental state at every step and
   drops the cache the decoder returns: each step re-ran the whole prefix through every decoder layer. Here the
   self-attention keys and values are kept and one token per step is decoded (``IncrementalDecoder``).
2. **Cross-attention per image, not per beam.** The image's cross-attention keys and values (every decoder layer)
   and its positional keys are computed once per image, at the first step, and every beam of that image attends
   to the same tensors: they are never reordered when beams are, only re-indexed when finished sentences leave the
   batch. The stock path computed them for each of the ``beam`` copies, recomputed the positional keys (a
   ``d_model x d_model`` projection of every source position) for every beam at every step, and reordered all of it
   (and the encoder output with every layer's hidden states, ``reorder_encoder_out``) at every step.
3. **One position per step, one row per sentence at the first.** Position biases are computed for the new query
   position only (the stock decoder computed them for every position of the prefix and kept the last row), once
   for all rows (they do not depend on the tokens); no attention weights are averaged or recorded (``attention``
   of a hypothesis is empty). At the first step, where every beam holds the same prefix and the stock search reads
   the first beam's row only, one row per sentence is decoded. Finished sentences leave the batch as in the stock
   loop, and nothing is computed for them after.
4. **Captions are text** (``mask_image_tokens``): OFA's 8,192 ``<code_k>`` image-code and 1,000 ``<bin_k>``
   location tokens are never generated. They are the last rows of the vocabulary, so the output projection is
   sliced to the text rows, which is the stock search over logits whose image-token rows are ``-inf``
   (:func:`mask_rows_hook` is that reference) at ~15% less projection work.
5. **No-repeat n-gram blocking** (:class:`VectorisedNGramRepeatBlock`): the stock CPU path builds Python dicts of
   every n-gram of every hypothesis at every step (and on a GPU copies the tokens to the host). The vectorised
   version compares all windows of the prefix at once and bans exactly the same tokens.
6. **Vocabulary-sized work.** The stock loop makes about ten passes per step over the ``rows x vocabulary``
   log-probabilities, each into a new tensor; here the projection, log-softmax and the stock writes share one
   buffer, and the candidates are the top ``2 x beam`` of each row before the hypotheses' scores are added (the
   module docstring of ``beam_search`` says why these are the stock candidates).
7. **The CPU's fast layouts.** The vocabulary projection runs as oneDNN's linear on a copy of the weight packed once
   into its blocked layout (``beam_search.packed_weight``: packed again when the weight changes; ~1.3x the blocked
   GEMM in a batch's search, float rounding apart the same logits), or where that is not there as ``weight @ x.T``
   per block of vocabulary rows (``beam_search.project``: the same dot products; the CPU's GEMM runs that shape
   ~1.5-2x faster than ``x @ weight.T``), and
   :func:`fold_batch_norms` gives the Captioner a copy of the ResNet with each BatchNorm folded into its
   convolution, each ReLU fused with its convolution and the residuals added in place (float rounding apart, the
   same function; utils/captioning/captioner.py swaps it in for a model it loaded itself).

:func:`speed_up` installs them on one generator instance; nothing global is patched, the model and its weights are
untouched (a model being trained, as in SCST, is read afresh at every call). A call not covered (a model in training
mode, a search other than ``BeamSearch`` such as SCST's sampling, prefix tokens, constraints, code or box generation,
a language model, an ensemble) runs the stock ``_generate``, with the image-token rows set to ``-inf`` when masking is
on. ``tests/test_inference.py`` and ``tests/test_generation_speed.py`` check tokens and scores against the stock
generator's.
"""
from __future__ import annotations

import math
import re
from typing import List

import torch
from modelscope.models.multi_modal.ofa.generate.ngram_repeat_block import NGramRepeatBlock

IMAGE_TOKEN = re.compile(r'<(code|bin)_\d+>')  # the tokens ModelScope's OFA preprocessor adds to the tokenizer


def image_token_ids(tokenizer) -> List[int]:
    """Ids of the ``<code_k>`` and ``<bin_k>`` tokens of an OFA tokenizer, ascending."""
    return sorted(i for t, i in tokenizer.get_vocab().items() if IMAGE_TOKEN.fullmatch(t))


def mask_rows_hook(module: torch.nn.Module, ids: List[int]):
    """A forward hook on ``module`` (a decoder's ``output_projection``) that sets the logits of ``ids`` to -inf;
    returns its handle (``.remove()``)."""
    index = torch.tensor(ids, dtype=torch.long)

    def hook(_module, _inputs, out):
        return out.index_fill(-1, index.to(out.device), -math.inf)
    return module.register_forward_hook(hook)


class _ConvReLU(torch.nn.Module):
    """A (folded) convolution followed by ReLU; on the CPU, in inference, one oneDNN call with the ReLU fused
    (``torch.ops.mkldnn._convolution_pointwise``, the op torch's own compiler emits for this pattern): the same
    values without a second pass over the activations."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        if (x.device.type == 'cpu' and x.dtype == torch.float32 and c.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
                and c.padding_mode == 'zeros' and isinstance(c.padding, tuple)
                and hasattr(torch.ops.mkldnn, '_convolution_pointwise') and torch.backends.mkldnn.is_available()):
            return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                           list(c.dilation), c.groups, 'relu', [], '')
        return torch.relu(c(x))


class _FoldedBottleneck(torch.nn.Module):
    """ModelScope's ResNet ``Bottleneck`` in eval mode with its BatchNorms folded: conv1 and conv2 with their ReLU
    fused, and the residual added and rectified in place (``relu(identity + out)``, the same values, without two
    more activation-sized tensors: at 16 images of 256 px each is up to 64 MiB, paged in afresh)."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = _ConvReLU(block.conv1), _ConvReLU(block.conv2), block.conv3
        self.downsample = block.downsample

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return out.add_(identity).relu_()  # eval mode: drop_path is the identity


def fold_batch_norms(backbone: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ModelScope's OFA ``ResNet`` (``embed_images``) in which every BatchNorm is folded into
    the convolution it follows (``torch.nn.utils.fusion.fuse_conv_bn_eval``), each convolution followed by a ReLU
    runs with the ReLU fused and each block adds its residual in place (:class:`_FoldedBottleneck`), in the
    backbone's memory format. For inference only. A backbone of another shape (a ViT) is returned as it is."""
    import copy

    from modelscope.models.multi_modal.ofa.resnet import Bottleneck, ResNet
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    if not isinstance(backbone, ResNet):
        return backbone
    channels_last = backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    folded = copy.deepcopy(backbone).eval()
    for module in folded.modules():
        for k in range(1, 4):
            conv, bn = getattr(module, f'conv{k}', None), getattr(module, f'bn{k}', None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(module, f'conv{k}', fuse_conv_bn_eval(conv, bn))
                setattr(module, f'bn{k}', torch.nn.Identity())
        down = getattr(module, 'downsample', None)
        if (isinstance(down, torch.nn.Sequential) and len(down) == 2 and isinstance(down[0], torch.nn.Conv2d)
                and isinstance(down[1], torch.nn.BatchNorm2d)):
            module.downsample = torch.nn.Sequential(fuse_conv_bn_eval(down[0], down[1]))
    if isinstance(folded.bn1, torch.nn.Identity) and isinstance(folded.relu, torch.nn.ReLU):  # the stem
        folded.conv1, folded.relu = _ConvReLU(folded.conv1), torch.nn.Identity()
    for layer in (m for m in folded.children() if isinstance(m, torch.nn.Sequential)):  # layer1..layer3
        for i, block in enumerate(layer):
            if type(block) is Bottleneck and all(isinstance(getattr(block, f'bn{k}'), torch.nn.Identity)
                                                 for k in range(1, 4)):
                layer[i] = _FoldedBottleneck(block)
    folded.eval()  # the new modules too: a module in training mode would send the search to the stock loop
    return folded.to(memory_format=torch.channels_last) if channels_last else folded


class VectorisedNGramRepeatBlock(NGramRepeatBlock):
    """ModelScope's NGramRepeatBlock with its per-hypothesis Python loop replaced by tensor operations.

    Same rule: at ``step``, for each hypothesis, every token that followed an earlier occurrence of the
    last ``n - 1`` tokens is banned (its log-probability set to -inf)."""

    def __init__(self, no_repeat_ngram_size: int):
        super().__init__(no_repeat_ngram_size, use_extension=False)

    def _no_repeat_ngram(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        n = self.no_repeat_ngram_size
        if step + 1 < n:  # no complete earlier n-gram yet
            return lprobs
        # the stock rule reads the whole buffer, where the positions after ``step`` hold padding; an
        # n-gram reaching into them can only ban the pad token, which the generator bans anyway
        prefix = tokens[:, :step + 1]
        key = prefix[:, step + 2 - n:]                                    # (hyps, n - 1)
        windows = prefix.unfold(1, n, 1)                                  # (hyps, step + 2 - n, n)
        hits = (windows[:, :, :n - 1] == key.unsqueeze(1)).all(-1)        # earlier occurrences of key
        hyp, at = hits.nonzero(as_tuple=True)
        if hyp.numel():
            lprobs[hyp, windows[hyp, at, n - 1]] = -math.inf
        return lprobs


def _covered(generator, models, sample, kwargs) -> bool:
    """Whether :func:`utils.patches.beam_search.beam_search` covers this call (else the stock ``_generate`` runs)."""
    from modelscope.models.multi_modal.ofa.modeling_ofa import OFAModel
    from modelscope.models.multi_modal.ofa.generate.search import BeamSearch
    if len(models) != 1 or not isinstance(models[0], OFAModel) or any(m.training for m in models[0].modules()):
        return False
    net_input = sample['net_input']
    if 'src_tokens' in net_input or 'input_ids' not in net_input:
        return False
    if type(generator.search) is not BeamSearch or generator.should_set_src_lengths:
        return False
    model = models[0]
    if model.config.use_ofasys or not hasattr(model.decoder, 'self_pos_q_linear'):
        return False
    if kwargs.get('prefix_tokens') is not None or kwargs.get('constraints') is not None:
        return False
    return not (generator.constraint_trie is not None or generator.constraint_start is not None
                or generator.gen_code or generator.gen_box or generator.lm_model is not None)


def speed_up(ofa_model, generator, mask_image_tokens: bool = False) -> None:
    """Install the repairs on ``generator`` (a ModelScope OFA ``SequenceGenerator``) for ``ofa_model``'s
    tokenizer (an ``OfaForAllTasks``); ``mask_image_tokens``: never generate ``<code_k>`` / ``<bin_k>`` tokens.
    Calling it again on the same generator replaces the settings."""
    blocker = generator.repeat_ngram_blocker
    if blocker is not None and not blocker.use_extension and not isinstance(blocker, VectorisedNGramRepeatBlock):
        generator.repeat_ngram_blocker = VectorisedNGramRepeatBlock(blocker.no_repeat_ngram_size)
    ids = image_token_ids(ofa_model.tokenizer) if mask_image_tokens else []
    vocab = generator.vocab_size
    tail = bool(ids) and ids == list(range(vocab - len(ids), vocab))  # the last rows: slice them off
    text_rows = vocab - len(ids) if tail else None
    masked = torch.tensor(ids, dtype=torch.long) if ids and not tail else None
    stock = type(generator)._generate.__get__(generator)

    def generate(models, sample, **kwargs):
        if not _covered(generator, models, sample, kwargs):
            handles = [mask_rows_hook(m.decoder.output_projection, ids) for m in models] if ids else []
            try:
                return stock(models, sample, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        from utils.patches.beam_search import beam_search
        return beam_search(generator, models[0], sample, text_rows, masked)

    generator._generate = generate
    generator.mask_image_tokens = bool(ids)
