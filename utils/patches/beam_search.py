"""ModelScope's OFA beam search (``SequenceGenerator._generate`` with ``BeamSearch``), step for step, without the work
it does not need. Same hypotheses: the same tokens, and scores that are the stock ones up to float rounding
(``tests/test_generation_speed.py``, ``tests/test_inference.py`` compare them with the stock generator's).

The stock loop, per step, on a ``(sentences x beam) x vocabulary`` tensor of log-probabilities (80 x 59,457 floats at
batch 16, beam 5) makes about ten passes over it, each into a new tensor: the logits (and ``.div_(temperature)``),
log-softmax, ``lprobs != lprobs`` and a masked write for NaN, a full copy and write-back around the n-gram blocker
(``lprobs[out_prefix]``), ``lprobs + scores`` and a top-k over ``beam x vocabulary`` entries per sentence. Here:

- the projection onto the vocabulary is oneDNN's linear on a weight packed once for it (:func:`packed_weight`), or,
  where that is not there, written into one buffer kept for the call, a block of vocabulary rows at a time
  (``weight @ x.T`` per block, transposed while the block is in cache): :func:`project`;
- log-softmax is computed in place (``torch.log_softmax(..., out=)``, the same kernel, so the same values), the
  min-length/pad/unk/max-length writes and the n-gram bans are made on that buffer as the stock loop makes them;
- the top ``2 x beam`` of each row are taken first (:func:`row_top`: from the row's blocks with the highest maxima),
  then the scores of the hypotheses are added to those candidates only and the top ``2 x beam`` of each sentence
  taken among them. The best ``2 x beam`` of ``beam x vocabulary`` entries are among the best ``2 x beam`` of each
  beam's row, and the sums are the same float additions as the stock ``lprobs + scores``, so the candidates and
  their scores are the stock ones, but for an exact tie at the edge of the best ``2 x beam``, which top-k may break
  the other way (with fp32 logits, two equal sums of different log-probabilities). Logits computed in half or
  bfloat16 precision (a model in that dtype, autocast), where ties are common, take the stock arithmetic
  (``candidates(exact_ties=True)``); log-softmax is in float32 for every model, as the stock OFA model's
  ``get_normalized_probs`` computes it;
- NaN is looked for in those candidates only: a NaN anywhere in a row of log-softmax makes the row NaN, and top-k
  ranks NaN first, so a NaN row always shows in its candidates. Only then is the stock NaN write made (and the
  candidates taken again), with the same result as the stock loop, which makes it before every step's writes;
- at the first step every beam of a sentence holds the same prefix and the stock search reads the first beam's
  row only: the decoder runs one row per sentence at that step (beam times less work), and the rows are copied to
  the beams by the first reorder.

The bookkeeping after the candidates (finished hypotheses, sentences leaving the batch, the next beams) is the stock
loop's, and finished hypotheses are recorded by the stock ``SequenceGenerator.finalize_hypos``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

BLOCK = 8192  # vocabulary rows per block of the projection: a block's logits (8192 x 80 floats) stay in cache
TOP_BLOCK = 64  # entries per block of a row in row_top: one vectorised max per block, then the best blocks only


class IncrementalDecoder:
    """The OFA decoder's arithmetic for one new token per row, with the state beam search needs and no more:
    self-attention keys/values per row; cross-attention keys/values, positional keys and padding mask per image.

    The image's cross-attention keys and values (every layer) and positional keys are computed once, at the first
    step, and every beam of that image attends to the same tensors: they are never reordered when beams are, only
    re-indexed when finished sentences leave the batch. Position biases are computed for the new query position only,
    once for all rows (they do not depend on the tokens). No attention weights are averaged or recorded."""

    def __init__(self, decoder, beam: int):
        self.decoder, self.beam = decoder, beam
        self.self_kv: List[Optional[tuple]] = []  # per layer (keys, values): (rows, heads, steps, head_dim)
        self.cross_kv: List[tuple] = []            # per layer (keys transposed, values): (images, heads, head_dim,
        #                                            src) and (images, heads, src, head_dim)
        self.cross_pos_k = None                    # (images, heads, src, head_dim)
        self.cross_mask = None                     # (images, 1, 1, src): 0, or the dtype's minimum at padding
        self.self_pos_k: List[torch.Tensor] = []   # per position: (heads, head_dim)
        self.rows_per_image = 0                    # of the self-attention state: 1 after the first step, then beam

    def _heads(self, x, rows):  # (rows, len, d) -> (rows, heads, len, head_dim)
        return x.view(rows, x.size(1), self.decoder.num_attention_heads, -1).transpose(1, 2)

    def start(self, encoder_out):
        dec = self.decoder
        hidden, padding = encoder_out.last_hidden_state, encoder_out.padding_mask
        n_images = hidden.size(0)
        self.self_kv = [None] * len(dec.layers)
        self.cross_kv = [(self._heads(layer.cross_attn.k_proj(hidden), n_images).transpose(2, 3).contiguous(),
                          self._heads(layer.cross_attn.v_proj(hidden), n_images).contiguous())
                         for layer in dec.layers]  # the keys transposed once, not at every step
        self.cross_pos_k = self._heads(dec.cross_pos_k_linear(encoder_out.position_embedding), n_images).contiguous()
        self.cross_mask = None
        if padding is not None:  # as the stock generator's _expand_mask, for the new query row
            self.cross_mask = torch.zeros(padding.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                padding, torch.finfo(hidden.dtype).min)[:, None, None, :]
        self.self_pos_k = []

    def step(self, prefix: torch.Tensor, pad: int) -> torch.Tensor:
        """The last layer's output for the last token of each row of ``prefix`` (rows, step + 1): (rows, 1, d)."""
        dec = self.decoder
        rows, length = prefix.shape
        step = length - 1
        n_images, heads = self.cross_pos_k.size(0), dec.num_attention_heads
        self.rows_per_image = rows // n_images

        # position biases of the new query position (the same for every row): absolute, then relative per layer
        pos_embed = dec.embed_positions(torch.full((1,), step, dtype=torch.long, device=prefix.device))
        pos = dec.pos_ln(pos_embed)                                                    # (1, d)
        self.self_pos_k.append(dec.self_pos_k_linear(pos).view(heads, -1))
        self_q = dec.self_pos_q_linear(pos).view(heads, 1, -1) * dec.pos_scaling       # (heads, 1, hd)
        self_abs = torch.matmul(self_q, torch.stack(self.self_pos_k, 1).transpose(1, 2))  # (heads, 1, length)
        cross_q = (dec.cross_pos_q_linear(pos).view(heads, 1, -1) * dec.pos_scaling).unsqueeze(0)
        cross_bias = torch.matmul(cross_q, self.cross_pos_k.transpose(2, 3))            # (images, heads, 1, src)
        rp_bucket = dec.token_rp_bucket[step, :length]

        x = dec.embed_scale * dec.embed_tokens(prefix[:, -1:])
        if dec.entangle_position_embedding and not dec.disable_entangle:
            x = x + pos_embed
        if dec.layernorm_embedding is not None:
            x = dec.layernorm_embedding(x)
        self_mask = None  # the search never puts a pad inside a prefix; kept for exactness if it did
        padded = prefix.eq(pad)
        if padded.any():
            self_mask = torch.zeros(padded.shape, dtype=x.dtype, device=x.device).masked_fill(
                padded, torch.finfo(x.dtype).min)[:, None, None, :]

        for idx, layer in enumerate(dec.layers):
            table = dec.token_rel_pos_table_list[0 if dec.share_attn_bias else idx].weight
            self_bias = self_abs + table[rp_bucket].t().unsqueeze(1)                    # (heads, 1, length)
            x = self._self_attention(layer, idx, x, self_bias, self_mask)
            x = self._cross_attention(layer, idx, x, cross_bias, n_images)
            x = self._ffn(layer, x)
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        return x

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
        w = torch.matmul(q, k.transpose(2, 3)) + bias                                   # (rows, heads, 1, length)
        if mask is not None:
            w = w + mask
        out = torch.matmul(F.softmax(w, dim=-1), v).transpose(1, 2)                     # (rows, 1, heads, hd)
        h = self._project(attn, out, rows)
        return self._close(layer, h, residual, layer.self_attn_mid_layer_norm, 'weight_self_attn',
                           layer.self_attn_layer_norm)

    def _cross_attention(self, layer, idx, x, bias, n_images):
        attn = layer.cross_attn
        residual = x
        h = layer.cross_attn_layer_norm(x) if layer.normalize_before else x
        # the rows of one image as one block of queries against that image's keys: (images, heads, rows/image, hd)
        q = (attn.q_proj(h) * attn.scaling).view(n_images, self.rows_per_image, attn.num_heads, -1).transpose(1, 2)
        keys_t, v = self.cross_kv[idx]
        w = torch.matmul(q, keys_t) + bias                                              # (images, heads, r, src)
        if self.cross_mask is not None:
            w = w + self.cross_mask
        out = torch.matmul(F.softmax(w, dim=-1), v).transpose(1, 2).reshape(h.size(0), 1, attn.num_heads,
                                                                              attn.head_dim)
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

    def reorder(self, new_order: torch.Tensor):
        """The search's reorder (rows of ``sentences x beam``, before sentences left): the rows' self-attention
        state follows it; the per-image state is re-indexed only when sentences left."""
        index = new_order if self.rows_per_image == self.beam else new_order // self.beam  # first step: a row each
        self.self_kv = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                        for kv in self.self_kv]
        if new_order.numel() != self.cross_pos_k.size(0) * self.beam:
            images = new_order[::self.beam] // self.beam
            self.cross_kv = [(k.index_select(0, images), v.index_select(0, images)) for k, v in self.cross_kv]
            self.cross_pos_k = self.cross_pos_k.index_select(0, images)
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.index_select(0, images)


def packed_weight(proj: torch.nn.Module, rows: int) -> Optional[torch.Tensor]:
    """oneDNN's pre-packed copy of ``proj.weight[:rows]`` for :func:`project`, or None where it does not apply (not
    an fp32 weight on the CPU, a torch without oneDNN, or a weight made under ``inference_mode``). Kept on the module
    (not in its state dict) with a plain copy of those rows, and packed again when the weight differs from that copy (a
    checkpoint loaded, a training step between two validations). The weight's version counter does not tell: torch's
    fused AdamW (the trainer's optimizer) and writes through ``.data`` change a weight without bumping it, so the rows
    are compared with the copy at every call (``torch.equal``, ~6 ms at OFA-tiny size, ~0.4 ms a caption at
    batch 16; packing them takes ~25 ms, and a stale packing would caption with old weights)."""
    weight = proj.weight
    if (weight.device.type != 'cpu' or weight.dtype != torch.float32 or weight.is_inference()
            or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, '_reorder_linear_weight')):
        return None
    current = weight.detach()[:rows]
    kept = proj.__dict__.get('_packed_for_search')  # (the rows it was packed from, the packing)
    if kept is None or not torch.equal(current, kept[0]):  # (other rows: another shape, not equal)
        copy = current.clone(memory_format=torch.contiguous_format)
        kept = (copy, torch.ops.mkldnn._reorder_linear_weight(copy))
        proj.__dict__['_packed_for_search'] = kept
    return kept[1]


def project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor],
            scratch: Optional[torch.Tensor], temperature: float = 1.0, packed: Optional[torch.Tensor] = None):
    """The logits of the output projection onto the vocabulary, ``F.linear(x, weight, bias) / temperature``,
    (rows, d) -> (rows, V), in float32 (as the stock generator's log-softmax makes them): (logits, whether they were
    computed in float32, else in the model's or autocast's lower precision, then converted).

    An fp32 model on the CPU without autocast: with ``packed`` (:func:`packed_weight`), oneDNN's linear on the
    pre-packed weight, straight into the (rows, V) layout (~1.5x the blocked GEMM below at 80 rows, no transpose; each
    logit is the same dot product up to float rounding, ~3e-6 at OFA-tiny size); without, per block of ``BLOCK``
    vocabulary rows, ``weight[block] @ x.T`` into ``scratch`` (the CPU's GEMM runs that layout ~1.5-2x faster than
    ``x @ weight.T`` with a few dozen rows), then transposed into ``out`` while it is in cache (the same dot products).
    Otherwise ``F.linear`` (under autocast as the stock decoder runs it) and the division in the logits' own dtype,
    as the stock loop does, converted into ``out`` (or a new float32 tensor where ``out`` is None)."""
    if (x.device.type != 'cpu' or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled('cpu')):
        logits = F.linear(x, weight, bias)
        if temperature != 1.0:
            logits.div_(temperature)
        full_precision = logits.dtype == torch.float32
        return (logits.float() if out is None else out.copy_(logits)), full_precision
    if packed is not None:
        logits = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, 'none', [], '')
        if temperature != 1.0:
            logits.div_(temperature)
        return logits, True
    rows, vocab = out.shape
    xt = x.t()
    for start in range(0, vocab, BLOCK):
        n = min(BLOCK, vocab - start)
        part = scratch[:n * rows].view(n, rows)
        torch.mm(weight[start:start + n], xt, out=part)
        block = out[:, start:start + n]
        block.copy_(part.t())
        if bias is not None:
            block.add_(bias[start:start + n])
    if temperature != 1.0:
        out.div_(temperature)
    return out, True


def row_top(x: torch.Tensor, k: int):
    """``torch.topk(x, k)`` of each row of a 2-D tensor, by way of its best blocks: the max of every block of
    ``TOP_BLOCK`` entries (one vectorised pass over the row, ~4x cheaper than top-k's per-row selection over OFA's
    50,265 text rows), then the top k among the entries of the k blocks with the highest maxima. Each of a row's k
    best entries lies in one of those blocks (a block holding none of them has a max below all of them but for exact
    ties), so the values are top-k's; where two entries tie, either may be returned, as with top-k itself. A NaN
    makes its block's max NaN, which ranks first, so it is found as top-k finds it. Rows shorter than
    ``4 x k`` blocks, and rows whose k-th best is -inf (the last step, where all but end-of-sentence are -inf; there
    the indices of the -inf entries are top-k's own), take ``torch.topk``."""
    rows, n = x.shape
    blocks = n // TOP_BLOCK
    if blocks < 4 * k or x.stride(1) != 1:
        return torch.topk(x, k)
    full = blocks * TOP_BLOCK
    maxima = x[:, :full].view(rows, blocks, TOP_BLOCK).amax(-1)
    if full < n:  # the tail, a shorter block
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], 1)
    best = torch.topk(maxima, k).indices
    index = (best * TOP_BLOCK).unsqueeze(-1) + torch.arange(TOP_BLOCK, device=x.device)
    index = index.view(rows, -1)
    past_end = index >= n  # the tail block's positions past the row's end
    values = x.gather(1, index.clamp(max=n - 1)).masked_fill_(past_end, -math.inf)
    top, pos = torch.topk(values, k)
    if torch.isneginf(top[:, -1]).any():
        return torch.topk(x, k)
    return top, index.gather(1, pos)


def candidates(lprobs: torch.Tensor, last_scores: Optional[torch.Tensor], bsz: int, cand_size: int,
               exact_ties: bool = False):
    """``BeamSearch.step`` on ``lprobs`` (rows, V) after the stock loop's NaN write: (scores, token ids, beams), each
    (bsz, k), k = ``cand_size`` but at most ``beam x V - 1``.

    ``last_scores`` (bsz, beam): each hypothesis's score so far; None at the first step, where ``lprobs`` holds one
    row per sentence (the stock search reads the first beam only). ``lprobs`` rows with a NaN are set to -inf (as the
    stock loop's ``lprobs[lprobs != lprobs] = -inf``).

    By default without a pass over the ``beam x V`` sums: each row's best first, where the NaN write is looked for
    (a NaN anywhere in a log-softmax row makes the whole row NaN, and top-k ranks NaN first). The candidates and
    their scores are the stock ones except where two candidates tie exactly at the edge of the best k, which
    top-k may break the other way; with fp32 logits that takes two equal sums of different log-probabilities.
    ``exact_ties``: the stock arithmetic itself (one top-k over all sums), for logits computed in half or bfloat16
    precision, where ties are common."""
    rows, vocab = lprobs.shape
    k = min(cand_size, vocab * (rows // bsz) - 1)  # -1 so we never select pad (the stock bound)
    if exact_ties:
        lprobs.masked_fill_(torch.isnan(lprobs), -math.inf)
        sums = lprobs if last_scores is None else (lprobs.view(bsz, -1, vocab) + last_scores.unsqueeze(-1)).view(
            bsz, -1)
        cand_scores, idx = torch.topk(sums, k)
        return cand_scores, idx.fmod(vocab), torch.div(idx, vocab, rounding_mode='floor')
    per_row = min(k, vocab)
    top, top_idx = row_top(lprobs, per_row)
    if torch.isnan(top).any():
        lprobs.masked_fill_(torch.isnan(lprobs), -math.inf)
        top, top_idx = row_top(lprobs, per_row)
    if last_scores is None:  # the first step: each sentence's one row, its top k are the candidates
        return top, top_idx, torch.zeros_like(top_idx)
    beam = rows // bsz
    total = (top.view(bsz, beam, per_row) + last_scores.unsqueeze(-1)).view(bsz, -1)  # the stock sums
    cand_scores, pos = torch.topk(total, k)
    return cand_scores, top_idx.view(bsz, -1).gather(1, pos), torch.div(pos, per_row, rounding_mode='floor')


def beam_search(generator, model, sample: Dict, text_rows: Optional[int] = None,
                masked_ids: Optional[torch.Tensor] = None) -> List[List[Dict[str, torch.Tensor]]]:
    """``generator._generate([model], sample)`` for a ModelScope OFA ``SequenceGenerator`` with ``BeamSearch`` and
    one ``OFAModel`` in eval mode (no prefix tokens, constraints or language model: ``generation._covered``).

    ``text_rows``: the projection onto the first ``text_rows`` vocabulary rows only (the others never chosen);
    ``masked_ids``: vocabulary rows set to -inf before log-softmax."""
    g = generator
    net_input = sample['net_input']
    src_tokens = net_input['input_ids']
    src_lengths = (src_tokens.ne(g.eos) & src_tokens.ne(g.pad)).long().sum(dim=1)
    bsz, src_len = src_tokens.size()[:2]
    beam = g.beam_size
    max_len = src_lengths.max().item() if g.match_source_len else int(g.max_len_a * src_len + g.max_len_b)
    assert g.min_len <= max_len, 'min_len cannot be larger than max_len, please adjust these!'
    device = src_tokens.device

    encoder_out = model.encoder(**{k: v for k, v in net_input.items() if k != 'decoder_input_ids'})
    decoder = IncrementalDecoder(model.decoder, beam)
    decoder.start(encoder_out)
    proj = model.decoder.output_projection
    weight, bias = proj.weight, proj.bias
    if text_rows is not None:
        weight, bias = weight[:text_rows], None if bias is None else bias[:text_rows]
    vocab = weight.size(0)
    if masked_ids is not None:
        masked_ids = masked_ids.to(device)
    packed = packed_weight(proj, vocab) if not torch.is_autocast_enabled('cpu') else None
    logits_buffer = scratch = None  # the blocked projection's buffers, where it runs
    if packed is None:
        logits_buffer = torch.empty(bsz * beam * vocab, dtype=torch.float32, device=device)
        scratch = torch.empty(min(BLOCK, vocab) * bsz * beam, dtype=torch.float32, device=device)

    scores = torch.zeros(bsz * beam, max_len + 1, dtype=torch.float, device=device)
    tokens = torch.full((bsz * beam, max_len + 2), g.pad, dtype=torch.long, device=device)
    tokens[:, 0] = g.bos
    cands_to_ignore = torch.zeros(bsz, beam, dtype=torch.bool, device=device)
    finalized: List[List[Dict[str, torch.Tensor]]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    num_remaining_sent = bsz
    cand_size = 2 * beam
    bbsz_offsets = (torch.arange(0, bsz, device=device) * beam).unsqueeze(1)
    cand_offsets = torch.arange(0, cand_size, device=device)
    reorder_state: Optional[torch.Tensor] = None
    batch_idxs: Optional[torch.Tensor] = None
    blocker = g.repeat_ngram_blocker
    ignore_eos = getattr(g, 'ignore_eos', False)
    stop_on_max_len = getattr(g.search, 'stop_on_max_len', False)

    for step in range(max_len + 1):  # one extra step for EOS marker
        if reorder_state is not None:
            if batch_idxs is not None:  # beam indices into the batch before sentences left
                corr = batch_idxs - torch.arange(batch_idxs.numel(), device=device)
                reorder_state.view(-1, beam).add_(corr.unsqueeze(-1) * beam)
            decoder.reorder(reorder_state)

        rows_per_sentence = 1 if step == 0 else beam  # at step 0 every beam of a sentence holds the same prefix
        prefix = tokens[::beam, :step + 1] if step == 0 else tokens[:, :step + 1]
        hidden = decoder.step(prefix, model.padding_idx)
        rows = hidden.size(0)
        out = None if logits_buffer is None else logits_buffer[:rows * vocab].view(rows, vocab)
        lprobs, full_precision = project(hidden.reshape(rows, -1), weight, bias, out, scratch, g.temperature, packed)
        if masked_ids is not None:
            lprobs.index_fill_(1, masked_ids, -math.inf)
        torch.log_softmax(lprobs, -1, out=lprobs)  # in float32, as the stock model's get_normalized_probs

        if step < g.min_len:
            lprobs[:, g.eos] = -math.inf
        lprobs[:, g.pad] = -math.inf  # never select pad
        lprobs[:, g.unk] -= g.unk_penalty
        if step >= max_len:
            lprobs[:, :g.eos] = -math.inf
            lprobs[:, g.eos + 1:] = -math.inf
            if ignore_eos:
                lprobs[:, g.eos] = 1
        if blocker is not None:
            lprobs = blocker(tokens=tokens[::beam].contiguous() if step == 0 else tokens, lprobs=lprobs, bsz=bsz,
                             beam_size=rows_per_sentence, step=step)

        cand_scores, cand_indices, cand_beams = candidates(
            lprobs, None if step == 0 else scores.view(bsz, beam, -1)[:, :, step - 1], bsz, cand_size,
            exact_ties=not full_precision)
        cand_bbsz_idx = cand_beams.add(bbsz_offsets)

        # from here on, the stock loop (SequenceGenerator._generate) as written
        eos_mask = cand_indices.eq(g.eos) & cand_scores.ne(-math.inf)
        eos_mask[:, :beam][cands_to_ignore] = False
        eos_bbsz_idx = torch.masked_select(cand_bbsz_idx[:, :beam], mask=eos_mask[:, :beam])
        finalized_sents: List[int] = []
        if eos_bbsz_idx.numel() > 0:
            eos_scores = torch.masked_select(cand_scores[:, :beam], mask=eos_mask[:, :beam])
            finalized_sents = g.finalize_hypos(step, eos_bbsz_idx, eos_scores, tokens, scores, finalized, finished,
                                               beam, None, src_lengths, max_len)
            num_remaining_sent -= len(finalized_sents)
        assert num_remaining_sent >= 0
        if num_remaining_sent == 0:
            break
        if stop_on_max_len and step >= max_len:
            break
        assert step < max_len, f'{step} < {max_len}'

        if len(finalized_sents) > 0:  # remove finalized sentences from the batch
            new_bsz = bsz - len(finalized_sents)
            batch_mask = torch.ones(bsz, dtype=torch.bool, device=device)
            batch_mask[finalized_sents] = False
            batch_idxs = torch.arange(bsz, device=device).masked_select(batch_mask)
            eos_mask = eos_mask[batch_idxs]
            cand_beams = cand_beams[batch_idxs]
            bbsz_offsets.resize_(new_bsz, 1)
            cand_bbsz_idx = cand_beams.add(bbsz_offsets)
            cand_scores = cand_scores[batch_idxs]
            cand_indices = cand_indices[batch_idxs]
            src_lengths = src_lengths[batch_idxs]
            cands_to_ignore = cands_to_ignore[batch_idxs]
            scores = scores.view(bsz, -1)[batch_idxs].view(new_bsz * beam, -1)
            tokens = tokens.view(bsz, -1)[batch_idxs].view(new_bsz * beam, -1)
            bsz = new_bsz
        else:
            batch_idxs = None

        # values >= cand_size mark eos hypotheses; the smallest per row are the top candidate active hypotheses
        eos_mask[:, :beam] = ~((~cands_to_ignore) & (~eos_mask[:, :beam]))
        active_mask = torch.add(eos_mask.type_as(cand_offsets) * cand_size, cand_offsets[:eos_mask.size(1)])
        new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam, dim=1, largest=False)
        cands_to_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam]
        assert (~cands_to_ignore).any(dim=1).all()
        active_bbsz_idx = torch.gather(cand_bbsz_idx, dim=1, index=active_hypos).view(-1)
        tokens[:, :step + 1] = torch.index_select(tokens[:, :step + 1], dim=0, index=active_bbsz_idx)
        tokens.view(bsz, beam, -1)[:, :, step + 1] = torch.gather(cand_indices, dim=1, index=active_hypos)
        if step > 0:
            scores[:, :step] = torch.index_select(scores[:, :step], dim=0, index=active_bbsz_idx)
        scores.view(bsz, beam, -1)[:, :, step] = torch.gather(cand_scores, dim=1, index=active_hypos)
        reorder_state = active_bbsz_idx

    for sent in range(len(finalized)):  # sort by score descending
        order = torch.sort(torch.tensor([float(h['score'].item()) for h in finalized[sent]]), descending=True)[1]
        finalized[sent] = [finalized[sent][i] for i in order]
    return finalized
