"""Two repairs to ModelScope's OFA ``SequenceGenerator`` for batched captioning; its search is unchanged.

1. **Key/value cache.** The generator passes the decoder an empty incremental state at every step and drops
   the ``past_key_values`` the decoder returns, so each step re-runs the whole prefix through every decoder
   layer, recomputes the cross-attention keys and values of the image, and projects every position onto
   the vocabulary to keep only the last. :func:`enable_kv_cache` keeps the cache the decoder already
   builds (its own ``use_cache`` path) and reorders it with the decoder's own
   ``reorder_incremental_state_scripting`` whenever the generator reorders beams or drops finished
   sentences: each step then decodes one token.
2. **No-repeat n-gram blocking** (:class:`VectorisedNGramRepeatBlock`): the stock CPU path builds Python
   dicts of every n-gram of every hypothesis at every step (and on a GPU copies the tokens to the host).
   The vectorised version compares all windows of the prefix at once and bans exactly the same tokens.

Both are installed on one model instance and one generator by :func:`speed_up` (the Captioner does this);
nothing global is patched, the weights and their names are untouched. ``tests/test_inference.py`` checks
that captions and scores are the same as the stock generator's.
"""
from __future__ import annotations

import math
import types

from modelscope.models.multi_modal.ofa.generate.ngram_repeat_block import NGramRepeatBlock


def enable_kv_cache(decoder) -> None:
    """Make ``decoder`` (an OFA decoder) keep its key/value cache between the generator's steps (once: a second
    call on the same decoder, e.g. a second generator on a model being trained, changes nothing)."""
    if getattr(decoder, 'keeps_kv_cache', False):
        return
    decoder.keeps_kv_cache = True
    stock_forward = decoder.forward
    stock_reorder = decoder.reorder_incremental_state_scripting
    state = {'past': None}

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        if not use_cache or past_key_values:  # not the generator's call: the stock behaviour
            return stock_forward(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask,
                                 past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        past = state['past']
        if past is not None and (past[0][0].size(2) != input_ids.size(1) - 1
                                 or past[0][0].size(0) != input_ids.size(0)):
            past = None  # step 0 of a new generation (or any mismatch): decode the whole prefix
        if past is not None and encoder_attention_mask is not None:
            encoder_attention_mask = encoder_attention_mask[:, :, -1:, :]  # the one new query position
        out = stock_forward(input_ids=input_ids, attention_mask=attention_mask,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask,
                            past_key_values=past, use_cache=True, **kwargs)
        state['past'] = out.past_key_values
        return out

    def reorder(self, past_key_values, new_order):
        if state['past'] is not None:
            state['past'] = tuple(tuple(t) for t in stock_reorder(state['past'], new_order))
        return stock_reorder(past_key_values, new_order)

    decoder.forward = types.MethodType(forward, decoder)
    decoder.reorder_incremental_state_scripting = types.MethodType(reorder, decoder)


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


def speed_up(ofa_model, generator) -> None:
    """Install both repairs on an ``OfaForAllTasks`` model's decoder and on ``generator``."""
    enable_kv_cache(ofa_model.model.decoder)
    blocker = generator.repeat_ngram_blocker
    if blocker is not None and not blocker.use_extension:
        generator.repeat_ngram_blocker = VectorisedNGramRepeatBlock(blocker.no_repeat_ngram_size)

