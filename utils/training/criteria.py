"""Training criteria. ``OFATrainer.train_step`` calls ``trainer.criterion(model, batch)`` and backpropagates the
loss it returns, so a stage swaps the criterion: cross-entropy is ModelScope's own
``AdjustLabelSmoothedCrossEntropyCriterion`` (:func:`cross_entropy`: from the cfg OFATrainer built it from, told
the optimizer steps done), SCST is :class:`ScstCriterion`.

ModelScope's cross-entropy returns the mean over the batch's target tokens (``sentence_avg`` false: the summed
token losses divided by the sample size, the number of target tokens, after ``drop_worst_ratio`` dropped the
worst-scoring ones once more than ``drop_worst_after`` optimizer steps are done). OFATrainer calls it without
``update_num`` (always 0: ``drop_worst_after`` never counted); :func:`cross_entropy`'s criterion reads it from its
``steps``, which ``utils.training.recipe_trainer.RecipeTrainer`` sets before each step.

SCST (self-critical sequence training, OFA's caption stage 2, ``criterions/scst_loss.py``) for each sample:

1. generates ``n`` candidate captions with the model in eval mode, without gradients: the beam's
   ``n`` hypotheses (``search: beam``, OFA's choice) or ``n`` independent samples (``search: sample``);
2. rewards each with CIDEr-D (:mod:`utils.training.cider`) against the references of the sample's image and
   style in the train split;
3. baseline of a candidate = the mean reward of the *other* candidates of the same sample;
4. re-scores the candidates with teacher forcing in train mode and returns
   ``loss = -sum_c (r_c - b_c) * sum_t log p(token_t of c)`` over the non-pad tokens, divided by the number
   of candidates (fairseq divides OFA's sum by its sample size the same way).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from utils.training.cider import CiderD


def baselines(rewards: Sequence[float], groups: Sequence[int]) -> List[float]:
    """For each candidate, the mean reward of the other candidates of its sample (``groups``: candidates per
    sample, in order). A sample with one candidate has no other: its baseline is its own reward (no signal)."""
    out, start = [], 0
    for size in groups:
        chunk = rewards[start:start + size]
        total = sum(chunk)
        out.extend((total - r) / (size - 1) if size > 1 else r for r in chunk)
        start += size
    return out


def scst_loss(seq_logprobs: torch.Tensor, rewards: Sequence[float], groups: Sequence[int]) -> torch.Tensor:
    """``-sum((r - b) * log p(candidate)) / n_candidates`` from each candidate's summed token log-probability."""
    advantage = torch.tensor([r - b for r, b in zip(rewards, baselines(rewards, groups))],
                             dtype=seq_logprobs.dtype, device=seq_logprobs.device)
    return -(seq_logprobs * advantage).sum() / len(rewards)


def sequence_logprobs(model, net_input: Dict[str, torch.Tensor], candidates: List[torch.Tensor],
                      groups: Sequence[int], bos: int, pad: int) -> torch.Tensor:
    """Teacher-forced log-probability of each candidate (its tokens end with EOS), summed over its tokens: the
    encoder inputs are repeated once per candidate, the decoder is fed BOS + the candidate's tokens but the last."""
    device = net_input['input_ids'].device
    counts = torch.tensor(list(groups), device=device)
    target = torch.nn.utils.rnn.pad_sequence([c.to(device) for c in candidates], batch_first=True, padding_value=pad)
    prev = torch.cat([torch.full_like(target[:, :1], bos), target[:, :-1]], dim=1)
    out = model.model(input_ids=net_input['input_ids'].repeat_interleave(counts, dim=0),
                      patch_images=net_input['patch_images'].repeat_interleave(counts, dim=0),
                      patch_masks=net_input['patch_masks'].repeat_interleave(counts, dim=0),
                      decoder_input_ids=prev)
    lprobs = F.log_softmax(out.logits.float(), dim=-1)
    token_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (token_lp * target.ne(pad)).sum(dim=1)


def cross_entropy(criterion_cfg):
    """ModelScope's label-smoothed cross-entropy criterion from the trainer's ``cfg.train.criterion`` (OFATrainer put
    the tokenizer in it), whose ``update_num`` is its ``steps`` attribute when the caller passes none."""
    from modelscope.trainers.multi_modal.ofa.ofa_trainer_utils import AdjustLabelSmoothedCrossEntropyCriterion

    class StepCountingCrossEntropy(AdjustLabelSmoothedCrossEntropyCriterion):
        steps = 0

        def forward(self, model, sample, update_num=None, reduce=True):
            return super().forward(model, sample, self.steps if update_num is None else update_num, reduce)

    return StepCountingCrossEntropy(criterion_cfg)


class ScstCriterion(torch.nn.Module):
    """``criterion(model, batch) -> (loss, sample_size, logging_output)`` as OFATrainer expects. Needs the batch's
    ``id`` (the row index: ``StylishCaptionDataset(..., with_ids=True)``) to find the references."""

    def __init__(self, conf, tokenizer, references: List[List[str]], cider: CiderD):
        super().__init__()
        from modelscope.models.multi_modal.ofa.generate import search
        from modelscope.models.multi_modal.ofa.generate import sequence_generator as sg

        self.tokenizer, self.references, self.cider = tokenizer, references, cider
        self.n = conf.scst.candidates
        strategy = search.Sampling(tokenizer) if conf.scst.search == 'sample' else None
        self.generator = sg.SequenceGenerator(
            tokenizer=tokenizer, beam_size=self.n, max_len_b=conf.generation.max_len, min_len=1,
            no_repeat_ngram_size=conf.generation.no_repeat_ngram_size, search_strategy=strategy,
            temperature=conf.scst.temperature if conf.scst.search == 'sample' else 1.0)
        self.log_buffer = None  # the trainer's: mean reward and baseline go into its log lines

    def generate(self, model, batch) -> List[List[torch.Tensor]]:
        """n candidates per sample (token ids ending with EOS), from the model in eval mode, without gradients."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hypos = self.generator.generate([model.model], batch)
        finally:
            model.train(was_training)
        return [[h['tokens'] for h in per_sample[:self.n]] for per_sample in hypos]

    def decode(self, tokens: torch.Tensor) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def forward(self, model, sample, update_num=0, reduce=True):
        for key in ('labels', 'samples'):
            sample.pop(key, None)
        per_sample = self.generate(model, sample)
        groups = [len(c) for c in per_sample]
        candidates = [c for cands in per_sample for c in cands]
        texts = [self.decode(c) for c in candidates]
        refs = [self.references[int(i)] for i, size in zip(sample['id'], groups) for _ in range(size)]
        rewards = self.cider.scores(texts, refs)
        seq_lp = sequence_logprobs(model, sample['net_input'], candidates, groups,
                                   bos=self.tokenizer.bos_token_id, pad=self.tokenizer.pad_token_id)
        loss = scst_loss(seq_lp, rewards, groups)
        reward = sum(rewards) / len(rewards)
        baseline = sum(baselines(rewards, groups)) / len(rewards)
        if self.log_buffer is not None:
            self.log_buffer.update({'reward': reward, 'baseline': baseline})
        return loss, len(candidates), {'loss': loss.data, 'reward': reward, 'baseline': baseline,
                                       'nsentences': sample['nsentences'], 'sample_size': len(candidates)}
