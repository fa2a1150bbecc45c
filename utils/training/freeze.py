"""What trains: the conf's ``freeze`` parts kept bit-identical, the style tokens' rows of the token embedding kept
trainable, and the count of the parameters that train.

The parts of an OFA model (``OFAModel``, ``model.model`` of ModelScope's ``OfaForAllTasks``):

* ``image_backbone``: the encoder's ResNet (``encoder.embed_images``), its BatchNorm statistics included (its
  BatchNorm layers normalise with their running statistics and stop updating them, as OFA's ``--freeze-resnet``);
* ``encoder_embeddings``: the encoder's token embedding matrix (OFA's ``--freeze-encoder-embedding``);
* ``decoder_embeddings``: the decoder's token embedding matrix and the output projection that shares its storage
  (OFA's ``--freeze-decoder-embedding``). In OFA models the encoder and decoder share one token matrix: either
  part freezes it;
* ``encoder``, ``decoder``: every parameter of that side (the shared token matrix included).

A parameter that belongs to a frozen part is frozen, whatever other part it also belongs to. Frozen parameters get
``requires_grad = False`` and leave the optimizer: torch's AdamW decays every parameter it holds whose gradient is
not None, so a zero gradient would not keep one still.

The style tokens (``<code_k>``, :mod:`utils.data.styles`) are rows of the shared token matrix: with
``tokenize_style`` a frozen token matrix keeps those rows trainable. It stays in the optimizer; before each
optimizer step the gradients of its other rows are zeroed (so they count for nothing in the gradient clipping),
and after the step those rows are copied back from a snapshot taken before the first step (AdamW's decay moved
them): they stay bit-identical.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def _params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    return list(module.parameters())


def part_parameters(ofa: torch.nn.Module, part: str) -> List[torch.nn.Parameter]:
    """The parameters of one part of an ``OFAModel`` (see the module docstring)."""
    enc, dec = ofa.encoder, ofa.decoder
    if part == 'image_backbone':
        return _params(enc.embed_images)
    if part == 'encoder_embeddings':
        return _params(enc.embed_tokens)
    if part == 'decoder_embeddings':
        found = _params(dec.embed_tokens)
        if getattr(dec, 'output_projection', None) is not None:
            found += _params(dec.output_projection)
        return found
    if part == 'encoder':
        return _params(enc)
    if part == 'decoder':
        return _params(dec)
    raise ValueError(f'unknown part {part!r}')


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr()


def _count(params: Iterable[torch.Tensor]) -> int:
    """Elements of params, a storage shared by several parameter objects counted once."""
    return sum({_storage(p): p.numel() for p in params}.values())


class Freeze:
    """The frozen parameters of a model and the style rows that train inside a frozen token matrix.

    ``mask_gradients`` (before each optimizer step, after the gradients are unscaled) and ``restore_rows`` (after
    the step) keep the frozen rows bit-identical; both do nothing when no matrix has trainable rows."""

    def __init__(self, frozen: List[torch.nn.Parameter], row_params: List[torch.nn.Parameter],
                 rows: Optional[torch.Tensor], total: int, trainable: int, parts: Sequence[str]):
        self.frozen, self.row_params, self.rows = frozen, row_params, rows
        self.total, self.trainable, self.parts = total, trainable, list(parts)
        self.snapshot: Dict[int, torch.Tensor] = {}  # storage -> the matrix before the first step

    def mask_gradients(self) -> None:
        """Zero the gradients of the frozen rows of each row-frozen matrix (the style rows keep theirs); the first
        time, snapshot the matrix that ``restore_rows`` restores."""
        if not self.snapshot:
            self.take_snapshot()
        for p in self.row_params:
            if p.grad is None:
                continue
            keep = p.grad[self.rows].clone()
            p.grad.zero_()
            p.grad[self.rows] = keep

    @torch.no_grad()
    def take_snapshot(self) -> None:
        for p in self.row_params:
            if _storage(p) not in self.snapshot:
                self.snapshot[_storage(p)] = p.detach().clone()

    @torch.no_grad()
    def restore_rows(self) -> None:
        """Every row but the style rows back to its value before the first step (the optimizer's weight decay and
        moments moved them)."""
        done = set()
        for p in self.row_params:
            key = _storage(p)
            if key in done:
                continue
            done.add(key)
            trained = p[self.rows].clone()
            p.copy_(self.snapshot[key])
            p[self.rows] = trained

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        if not self.parts:
            return f'all {self.total:,} parameters train'
        rows = '' if self.rows is None else f', with the {len(self.rows)} style rows of the token embedding'
        return (f'freeze {", ".join(self.parts)}: {self.trainable:,} of {self.total:,} parameters train '
                f'({share:.1f}%{rows})')


def apply_freeze(ofa: torch.nn.Module, parts: Sequence[str], style_token_ids: Sequence[int] = (),
                 optimizer: Optional[torch.optim.Optimizer] = None) -> Freeze:
    """Freeze ``parts`` of an ``OFAModel``: ``requires_grad = False``, out of ``optimizer``'s groups, BatchNorm
    statistics fixed; the rows ``style_token_ids`` of a frozen token matrix stay trainable. Returns the
    :class:`Freeze` whose ``mask_gradients`` / ``restore_rows`` the training step calls."""
    parts = list(dict.fromkeys(parts))
    everything = list(ofa.parameters())
    total = _count(everything)
    frozen_storages = {_storage(p) for part in parts for p in part_parameters(ofa, part)}
    token_matrix = _storage(ofa.encoder.embed_tokens.weight)
    rows = None
    if style_token_ids and token_matrix in frozen_storages:
        frozen_storages.discard(token_matrix)
        rows = torch.tensor(sorted(set(style_token_ids)), dtype=torch.long,
                            device=ofa.encoder.embed_tokens.weight.device)
    frozen = [p for p in everything if _storage(p) in frozen_storages]
    row_params = [p for p in everything if rows is not None and _storage(p) == token_matrix]
    for p in frozen:
        p.requires_grad_(False)
    if 'image_backbone' in parts or 'encoder' in parts:
        _fix_batchnorm(ofa.encoder.embed_images)
    if optimizer is not None:
        gone = {id(p) for p in frozen}
        for group in optimizer.param_groups:
            group['params'] = [p for p in group['params'] if id(p) not in gone]
    trainable = _count(p for p in everything if _storage(p) not in frozen_storages)
    if rows is not None:
        width = ofa.encoder.embed_tokens.weight.shape[1]
        trainable -= ofa.encoder.embed_tokens.weight.numel() - len(rows) * width
    if parts and trainable == 0:
        from utils.core.errors import ConfError
        raise ConfError(f'conf key "freeze": {", ".join(parts)} leave no parameter to train')
    return Freeze(frozen, row_params, rows, total, trainable, parts)


def _eval_mode(module, args):
    module.training = False


def _fix_batchnorm(module: torch.nn.Module) -> None:
    """BatchNorm layers of a frozen part normalise with their running statistics and never update them, whatever
    ``model.train()`` says (OFATrainer calls it at every step): a forward pre-hook puts each back in eval mode."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_eval_mode)


def style_token_ids(tokenizer, style_map) -> List[int]:
    """The token ids of the style tokens (``<code_k>``) when the style map tokenises styles; else none."""
    if not style_map.tokenize_style:
        return []
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(style_map.tokens.values()))]


def dropout_off(module: torch.nn.Module) -> int:
    """Turn every dropout of a model off (dropout, drop-path, layer-drop probabilities 0), as OFA's SCST stage
    runs with ``--dropout 0``; the saved config.json keeps the model's own values. Returns how many were on."""
    from torch.nn.modules.dropout import _DropoutNd
    changed = 0
    for m in module.modules():
        for attr in ('p', 'drop_prob'):
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0 and (isinstance(m, _DropoutNd) or attr == 'drop_prob'
                                                           or type(m).__name__ == 'LayerDropModuleList'):
                setattr(m, attr, 0.0)
                changed += 1
    return changed
