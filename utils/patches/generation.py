"""Repairs to ModelScope's OFA ``SequenceGenerator`` for batched captioning; its search is unchanged.

The stock generator's loop (``SequenceGenerator._generate``: beam bookkeeping, ``BeamSearch`` or ``Sampling``,
finalisation, scores) runs as shipped. What it calls on the model is replaced, for the duration of one call, by a
stand-in (:class:`_FastOFA`) that does the same arithmetic without the work that beam search does not need:

1. **Decoder key/value cache.** The stock generator hands the decoder an empty incremental state at every step and
   drops the cache the decoder returns: each step re-ran the whole prefix through every decoder layer. The stand-in
   keeps the self-attention keys and values and decodes one token per step.
2. **Cross-attention per image, not per beam.** The image's cross-attention keys and values (every decoder layer)
   and its positional keys are computed once per image, at the first step, and every beam of that image attends
   to the same tensors: they are never reordered when beams are, only re-indexed when finished sentences leave the
   batch. The stock path computed them for each of the ``beam`` copies, recomputed the positional keys (a
   ``d_model x d_model`` projection of every source position) for every beam at every step, and reordered all of it
   (and the encoder output with every layer's hidden states, ``reorder_encoder_out``) at every step.
3. **One position per step.** Position biases are computed for the new query position only (the stock decoder
   computed them for every position of the prefix and kept the last row), once for all rows (they do not depend
   on the tokens); no attention weights are averaged or recorded (``attention`` of a hypothesis is empty). Finished
   sentences leave the batch as in the stock loop, and nothing is computed for them after.
4. **Captions are text** (``mask_image_tokens``): OFA's 8,192 ``<code_k>`` image-code and 1,000 ``<bin_k>``
   location tokens are never generated. They are the last rows of the vocabulary, so the output projection is
   sliced to the text rows (and the generator's ``vocab_size`` set to match for the call), which is the stock
   search over logits whose image-token rows are ``-inf`` (:func:`mask_rows_hook` is that reference) at ~15% less
   projection work.
5. **No-repeat n-gram blocking** (:class:`VectorisedNGramRepeatBlock`): the stock CPU path builds Python dicts of
   every n-gram of every hypothesis at every step (and on a GPU copies the tokens to the host). The vectorised
   version compares all windows of the prefix at once and bans exactly the same tokens.

6. **The CPU's fast layouts.** The vocabulary projection is computed as ``weight @ x.T`` (:func:`_vocab_logits`: the
   same dot products; the CPU's GEMM runs that shape ~1.5x faster), and :func:`fold_batch_norms` gives the
   Captioner a copy of the ResNet with each BatchNorm folded into its convolution (float rounding apart, the same
   function; utils/captioning/captioner.py swaps it in for a model it loaded itself).

:func:`speed_up` installs them on one generator instance; nothing global is patched, the model and its weights are
untouched (a model being trained, as in SCST, is read afresh at every call). A call the stand-in does not cover (a
model in training mode, prefix tokens, constraints, code or box generation, an ensemble) runs the stock path, with
the image-token rows set to ``-inf`` when masking is on. ``tests/test_inference.py`` and
``tests/test_generation_speed.py`` check that tokens and scores are the stock generator's.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional

import torch
import torch.nn.functional as F
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


class _FastEncoder(torch.nn.Module):
    """The encoder as the generator sees it: one output row per image, whatever the beam."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.beam: Optional[int] = None

    def forward(self, output_hidden_states=False, **net_input):  # no per-layer states: nothing reads them
        return self.encoder(**net_input)

    def reorder_encoder_out(self, encoder_out, new_order):
        """The generator's expansion to beams (first call) and its reorders: the output stays one row per image,
        re-indexed only when sentences leave the batch."""
        from modelscope.models.multi_modal.ofa.modeling_ofa import OFAEncoderOutput
        n_images = encoder_out.last_hidden_state.size(0)
        if self.beam is None:  # new_order is arange(bsz) repeated beam times: every beam reads its image's row
            self.beam = new_order.numel() // n_images
            return encoder_out
        if new_order.numel() == n_images * self.beam:  # beams reordered within their images: nothing to do
            return encoder_out
        images = new_order[::self.beam] // self.beam  # the kept sentences' rows before the reorder
        return OFAEncoderOutput(last_hidden_state=encoder_out.last_hidden_state.index_select(0, images),
                                padding_mask=encoder_out.padding_mask.index_select(0, images),
                                position_embedding=encoder_out.position_embedding.index_select(0, images))


class _FastDecoder(torch.nn.Module):
    """The OFA decoder's arithmetic for one new token per row, with the state beam search needs and no more:
    self-attention keys/values per row, cross-attention keys/values and positional keys per image."""

    def __init__(self, decoder, text_rows: Optional[int], masked_ids: Optional[torch.Tensor]):
        super().__init__()
        self.decoder = decoder
        self.text_rows, self.masked_ids = text_rows, masked_ids
        self.beam = 0
        self.self_kv: List[Optional[tuple]] = []  # per layer (keys, values): (rows, heads, steps, head_dim)
        self.cross_kv: List[tuple] = []            # per layer (keys, values): (images, heads, src, head_dim)
        self.cross_pos_k = None                    # (images, heads, src, head_dim)
        self.self_pos_k: List[torch.Tensor] = []   # per position: (heads, head_dim)

    def _heads(self, x, rows):  # (rows, len, d) -> (rows, heads, len, head_dim)
        return x.view(rows, x.size(1), self.decoder.num_attention_heads, -1).transpose(1, 2)

    def _start(self, encoder_hidden_states, src_pos_embed, rows: int):
        dec = self.decoder
        n_images = encoder_hidden_states.size(0)
        self.beam = rows // n_images
        self.self_kv = [None] * len(dec.layers)
        self.cross_kv = [(self._heads(layer.cross_attn.k_proj(encoder_hidden_states), n_images).contiguous(),
                          self._heads(layer.cross_attn.v_proj(encoder_hidden_states), n_images).contiguous())
                         for layer in dec.layers]
        self.cross_pos_k = self._heads(dec.cross_pos_k_linear(src_pos_embed), n_images).contiguous()
        self.self_pos_k = []

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                code_masks=None, src_pos_embed=None, past_key_values=None, use_cache=False, output_attentions=False,
                output_hidden_states=False):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
        dec = self.decoder
        rows, length = input_ids.shape
        step = length - 1
        if step == 0:
            self._start(encoder_hidden_states, src_pos_embed, rows)
        n_images, heads = encoder_hidden_states.size(0), dec.num_attention_heads

        # position biases of the new query position (the same for every row): absolute, then relative per layer
        pos_embed = dec.embed_positions(torch.full((1,), step, dtype=torch.long, device=input_ids.device))
        pos = dec.pos_ln(pos_embed)                                                    # (1, d)
        self.self_pos_k.append(dec.self_pos_k_linear(pos).view(heads, -1))
        self_q = dec.self_pos_q_linear(pos).view(heads, 1, -1) * dec.pos_scaling       # (heads, 1, hd)
        self_abs = torch.matmul(self_q, torch.stack(self.self_pos_k, 1).transpose(1, 2))  # (heads, 1, length)
        cross_q = (dec.cross_pos_q_linear(pos).view(heads, 1, -1) * dec.pos_scaling).unsqueeze(0)
        cross_bias = torch.matmul(cross_q, self.cross_pos_k.transpose(2, 3))            # (images, heads, 1, src)
        rp_bucket = dec.token_rp_bucket[step, :length]

        x = dec.embed_scale * dec.embed_tokens(input_ids[:, -1:])
        if dec.entangle_position_embedding and not dec.disable_entangle:
            x = x + pos_embed
        if dec.layernorm_embedding is not None:
            x = dec.layernorm_embedding(x)
        self_mask = None  # the generator never puts a pad inside a prefix; kept for exactness if it did
        if attention_mask is not None and attention_mask.any():
            self_mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                attention_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        cross_mask = None
        if encoder_attention_mask is not None:  # (images, 1, length, src) -> the new row, per image
            cross_mask = encoder_attention_mask[:, :, -1:, :]                           # (images, 1, 1, src)

        for idx, layer in enumerate(dec.layers):
            table = dec.token_rel_pos_table_list[0 if dec.share_attn_bias else idx].weight
            self_bias = self_abs + table[rp_bucket].t().unsqueeze(1)                    # (heads, 1, length)
            x = self._self_attention(layer, idx, x, self_bias, self_mask)
            x = self._cross_attention(layer, idx, x, cross_bias, cross_mask, n_images)
            x = self._ffn(layer, x)
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        proj = dec.output_projection
        if self.text_rows is not None:  # the text rows only: the image-token rows are never chosen
            logits = _vocab_logits(x, proj.weight[:self.text_rows],
                                   None if proj.bias is None else proj.bias[:self.text_rows])
        else:
            logits = _vocab_logits(x, proj.weight, proj.bias)
            if self.masked_ids is not None:
                logits = logits.index_fill(-1, self.masked_ids.to(logits.device), -math.inf)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=logits)

    def _self_attention(self, layer, idx, x, bias, mask):
        attn = layer.self_attn
        residual = x
        h = layer.self_attn_layer_norm(x) if layer.normalize_before else x
        rows = h.size(0)
        q = self._heads(attn.q_proj(h) * attn.scaling, rows)
        k, v = self._heads(attn.k_proj(h), rows), self._heads(attn.v_proj(h), rows)
        past = self.self_kv[idx]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.self_kv[idx] = (k, v)
        h = self._attend(attn, q, k, v, bias, mask, rows)
        return self._close(layer, h, residual, layer.self_attn_mid_layer_norm, 'weight_self_attn',
                           layer.self_attn_layer_norm)

    def _cross_attention(self, layer, idx, x, bias, mask, n_images):
        attn = layer.cross_attn
        residual = x
        h = layer.cross_attn_layer_norm(x) if layer.normalize_before else x
        # the beams of one image as one block of queries against that image's keys: (images, heads, beam, hd)
        q = (attn.q_proj(h) * attn.scaling).view(n_images, self.beam, attn.num_heads, -1).transpose(1, 2)
        k, v = self.cross_kv[idx]
        w = torch.matmul(q, k.transpose(2, 3)) + bias                                   # (images, heads, beam, src)
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1)
        out = torch.matmul(w, v).transpose(1, 2).reshape(h.size(0), 1, attn.num_heads, attn.head_dim)
        h = self._project(attn, out, h.size(0))
        return self._close(layer, h, residual, layer.cross_attn_mid_layer_norm, 'weight_cross_attn',
                           layer.cross_attn_layer_norm)

    @staticmethod
    def _close(layer, h, residual, mid_norm, gamma: str, norm):
        """An attention block's end, as OFA's decoder layer does it: mid norm, dropout, gamma, residual, norm."""
        if mid_norm:
            h = mid_norm(h)
        h = layer.dropout(h)
        if layer.use_gamma_feature:
            h = getattr(layer, gamma) * h
        h = layer.residual_connection(h, residual)
        return h if layer.normalize_before else norm(h)

    def _attend(self, attn, q, k, v, bias, mask, rows):
        w = torch.matmul(q, k.transpose(2, 3)) + bias                                   # (rows, heads, 1, length)
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1)
        out = torch.matmul(w, v).transpose(1, 2)                                        # (rows, 1, heads, hd)
        return self._project(attn, out, rows)

    @staticmethod
    def _project(attn, out, rows):
        if attn.c_attn is not None:  # NormFormer's per-head scale
            out = out * attn.c_attn[:, None]
        return attn.out_proj(out.reshape(rows, 1, attn.embed_dim))

    @staticmethod
    def _ffn(layer, x):
        residual = x
        h = layer.final_layer_norm(x) if layer.normalize_before else x
        h = layer.activation_dropout(layer.activation_fn(layer.fc1(h)))
        if layer.ffn_layer_norm:
            h = layer.ffn_layer_norm(h)
        h = layer.dropout(layer.fc2(h))
        if layer.use_gamma_feature:
            h = layer.weight_ffn * h
        h = layer.residual_connection(h, residual)
        return h if layer.normalize_before else layer.final_layer_norm(h)

    def reorder_incremental_state_scripting(self, past_key_values, new_order):
        """Reorder the rows' self-attention state; re-index the per-image state only when sentences left."""
        self.self_kv = [None if kv is None else (kv[0].index_select(0, new_order), kv[1].index_select(0, new_order))
                        for kv in self.self_kv]
        if self.cross_pos_k is not None and new_order.numel() != self.cross_pos_k.size(0) * self.beam:
            images = new_order[::self.beam] // self.beam
            self.cross_kv = [(k.index_select(0, images), v.index_select(0, images)) for k, v in self.cross_kv]
            self.cross_pos_k = self.cross_pos_k.index_select(0, images)
        return past_key_values


def fold_batch_norms(backbone: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ModelScope's OFA ``ResNet`` (``embed_images``) in which every BatchNorm is folded into
    the convolution it follows (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by an identity, in the
    backbone's memory format. A backbone of another shape (a ViT) is returned as it is."""
    import copy

    from modelscope.models.multi_modal.ofa.resnet import ResNet
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
    return folded.to(memory_format=torch.channels_last) if channels_last else folded


def _vocab_logits(x, weight, bias):
    """``F.linear(x, weight, bias)`` for the output projection onto the vocabulary: (rows, 1, d) -> (rows, 1, V).
    Computed as ``weight @ x.T`` then transposed (one copy): with a few dozen rows against a 50k-row matrix, the
    CPU's GEMM runs that layout ~1.5x faster than ``x @ weight.T``, and each logit is the same dot product."""
    rows = x.size(0)
    if x.device.type != 'cpu' or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, -1).t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(rows, 1, -1)


class _FastOFA(torch.nn.Module):
    """What the stock generator's ``EnsembleModel`` sees in place of an ``OFAModel`` for one ``generate`` call."""

    def __init__(self, model, text_rows: Optional[int], masked_ids: Optional[torch.Tensor]):
        super().__init__()
        self.model = model
        self.encoder = _FastEncoder(model.encoder)
        self.decoder = _FastDecoder(model.decoder, text_rows, masked_ids)
        self.padding_idx = model.padding_idx
        self.config = model.config

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        return self.model.get_normalized_probs(net_output, log_probs, sample)


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


def _covered(generator, models, kwargs) -> bool:
    """Whether the stand-in does this call's arithmetic (else the stock path runs)."""
    from modelscope.models.multi_modal.ofa.modeling_ofa import OFAModel
    if len(models) != 1 or not isinstance(models[0], OFAModel) or models[0].training:
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
        if not _covered(generator, models, kwargs):
            handles = [mask_rows_hook(m.decoder.output_projection, ids) for m in models] if ids else []
            try:
                return stock(models, sample, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        fast = [_FastOFA(models[0], text_rows, masked)]
        if text_rows is not None:
            generator.vocab_size = text_rows
        try:
            return stock(fast, sample, **kwargs)
        finally:
            generator.vocab_size = vocab

    generator._generate = generate
    generator.mask_image_tokens = bool(ids)
