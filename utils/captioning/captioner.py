"""Batched, style-conditioned captioning with a trained model dir (or a hub id).

Real batching: samples go through the stylish preprocessor in a DataLoader, are collated by
ModelScope's OFA ``collate_fn`` and generated together by ModelScope's OFA ``SequenceGenerator``
(beam size, max length, no-repeat n-gram from the conf); captions are cleaned by the model's own
``postprocess``. Eval and inference are deterministic.
"""
from __future__ import annotations

import logging
import os
import threading
from functools import partial
from typing import List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.core.conf import GenerationConf
from utils.core.device import autocast, pick_device
from utils.core.errors import first_line

logger = logging.getLogger(__name__)


class _StyledImages(Dataset):
    def __init__(self, items: Sequence[dict], preprocessor):
        self.items, self.preprocessor = items, preprocessor

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return self.preprocessor({'image': item['image'], 'style': item['style']})


class Captioner:
    """Load once, caption many: ``Captioner(model_dir).caption([{"style", "image"}, ...])``.

    ``model`` may also be an already loaded ``OfaForAllTasks`` (the one a trainer is training, for
    validation), with its ``style_map``: nothing is read from disk but the tokenizer and configuration."""

    def __init__(self, model, generation: Optional[GenerationConf] = None, *, revision: Optional[str] = None,
                 model_cfg: Optional[dict] = None, device: Optional[str] = None, fast: bool = True,
                 precision: str = 'fp32', style_map=None):
        from modelscope.models import Model

        from utils.captioning.preprocessor import OfaPreprocessorForStylishIC

        if isinstance(model, str):
            if os.path.isdir(model):  # a damaged model dir is refused (ModelDirError) before ModelScope loads it
                from utils.core.checksums import check_model_dir
                check_model_dir(model)
            kwargs = {'revision': revision} if revision else {}
            self.model = Model.from_pretrained(model, **kwargs)
        else:
            self.model = model
        self.model_dir = self.model.model_dir
        self.preprocessor = OfaPreprocessorForStylishIC(self.model_dir, mode='inference', no_collate=True,
                                                        model_cfg=model_cfg, style_map=style_map)
        self.style_map = self.preprocessor.style_map
        self.fast = fast
        self.set_generation(generation or GenerationConf())
        self.device = torch.device(pick_device(device))
        self.model.to(self.device).eval()
        # A model this captioner loaded itself (not one a trainer is training) keeps its ResNet in channels-last
        # on the CPU, where oneDNN runs those convolutions ~1.3-1.6x faster (bench/RESULTS.md); the images are fed
        # the same way in caption(). The weights' values are unchanged, only their memory layout.
        self._channels_last = fast and isinstance(model, str) and self.device.type == 'cpu'
        if self._channels_last:
            self.model.model.encoder.embed_images.to(memory_format=torch.channels_last)
        self._folded = None  # (the weights' fingerprint, the backbone with its BatchNorms folded): _backbone()
        self._lock = threading.Lock()  # one caption() at a time: it swaps the backbone and reuses the generator
        self.precision = precision  # fp32, or bf16/fp16 autocast around generation (weights stay fp32)
        tok = self.model.tokenizer
        self.collate = partial(_collate, pad_idx=tok.pad_token_id, eos_idx=tok.eos_token_id)

    def set_generation(self, generation: GenerationConf) -> None:
        """A new sequence generator with these settings for the loaded model (the web demo's controls)."""
        from modelscope.models.multi_modal.ofa.generate import sequence_generator as sg
        if getattr(self, '_mask_hook', None) is not None and not generation.mask_image_tokens:
            self._mask_hook.remove()
            self._mask_hook = None
        self.model.generator = sg.SequenceGenerator(
            tokenizer=self.model.tokenizer, beam_size=generation.beam_size, max_len_b=generation.max_len, min_len=1,
            no_repeat_ngram_size=generation.no_repeat_ngram_size)
        if self.fast:  # the stock search without its wasted work (utils.patches.generation): same captions, faster
            from utils.patches.generation import speed_up
            speed_up(self.model, self.model.generator, mask_image_tokens=generation.mask_image_tokens)
        elif generation.mask_image_tokens:  # the stock generator, image-token logits at -inf
            self._mask_stock_generator()
        self.generation = generation

    def _mask_stock_generator(self) -> None:
        """fast=False with mask_image_tokens: the stock search over logits whose <code_k>/<bin_k> rows are -inf."""
        from utils.patches.generation import image_token_ids, mask_rows_hook
        if getattr(self, '_mask_hook', None) is None:
            self._mask_hook = mask_rows_hook(self.model.model.decoder.output_projection,
                                             image_token_ids(self.model.tokenizer))

    def caption(self, items: Sequence[dict], batch_size: int = 16, num_workers: int = 0,
                progress: bool = True) -> List[str]:
        """Captions for ``[{"style", "image"}, ...]``, in order. An unknown style fails, naming its row, before
        any work."""
        for i, item in enumerate(items):  # an item's "row" (its row in a file) names it, else its position
            self.style_map.check(item['style'], where=f'row {item.get("row", i)}')
        loader = DataLoader(_StyledImages(items, self.preprocessor), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=self.collate)
        captions: List[str] = []
        self.model.eval()
        encoder = self.model.model.encoder
        backbone = encoder.embed_images
        with self._lock, torch.inference_mode(), autocast(self.precision, self.device.type):
            if self._channels_last:
                encoder.embed_images = self._backbone()
            try:
                for batch in tqdm(loader, desc='captioning', unit='batch', disable=not progress):
                    if self._channels_last:
                        images = batch['net_input']['patch_images']
                        batch['net_input']['patch_images'] = images.contiguous(memory_format=torch.channels_last)
                    out = self.model(batch)  # forward (generation) + postprocess
                    caps = out['caption']
                    if caps and isinstance(caps[0], str):  # postprocess unwraps a batch of one
                        caps = [caps]
                    captions.extend(c[0] if isinstance(c, list) else c for c in caps)
            finally:
                encoder.embed_images = backbone
        return captions

    def _backbone(self):
        """The image backbone captioning runs: ModelScope's ResNet with each BatchNorm folded into the convolution
        before it (in eval mode a BatchNorm is a per-channel affine map, so the folded convolution computes the same
        function up to float rounding, with one pass over every feature map less), channels-last. A copy, built
        from the model's current weights and built again when their version counters change (a checkpoint loaded
        with ``load_state_dict``): the model itself, its state dict and its checkpoints are untouched. Only a model the
        captioner loaded itself is folded, which nothing trains (validation captions the live model unfolded; torch's
        fused AdamW and ``.data`` writes change a weight without bumping its counter, which is why the projection's
        packing, :func:`utils.patches.beam_search.packed_weight`, compares the weight itself). Any other backbone runs
        as it is."""
        from utils.patches.generation import fold_batch_norms
        source = self.model.model.encoder.embed_images
        tensors = [*source.parameters(), *source.buffers()]
        if any(t.is_inference() for t in tensors):  # (a model built under inference_mode: no version counters)
            fingerprint = None  # built again at every call
        else:
            fingerprint = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._folded is None or fingerprint is None or self._folded[0] != fingerprint:
            self._folded = (fingerprint, fold_batch_norms(source))
        return self._folded[1]


def _collate(samples, pad_idx, eos_idx):
    from modelscope.preprocessors.ofa.utils.collate import collate_fn
    return collate_fn(samples, pad_idx=pad_idx, eos_idx=eos_idx)


def trained_model_dir(conf, model: Optional[str] = None) -> str:
    """The model to caption with: ``model`` (a dir or hub id) or the trained ``{work_dir}/output``; a model dir whose
    weights do not match their checksum is refused."""
    from utils.core.layout import OUTPUT_DIR
    from utils.core.errors import ModelDirError
    from utils.core.conf import is_local_model
    if model is None:
        model = os.path.join(conf.run.work_dir, OUTPUT_DIR)
        if not os.path.isdir(model):
            hint = '' if os.path.isabs(model) else f' (relative paths are read from the current directory, {os.getcwd()})'
            raise ModelDirError(f'no trained model at {os.path.abspath(model)}{hint}: train first, or name a model dir with -m')
    elif is_local_model(model) and not os.path.isdir(model):
        raise ModelDirError(f'model dir {model} does not exist')
    if is_local_model(model) and not os.path.isfile(os.path.join(model, 'configuration.json')):
        raise ModelDirError(f'model dir {model} has no configuration.json (not a ModelScope model dir)')
    if os.path.isdir(model):  # weights that do not match their weights.sha256: refused, before any work
        from utils.core.checksums import check_model_dir
        check_model_dir(model)
    return model


def load_captioner(conf, model: Optional[str] = None, checkpoint: Optional[str] = None,
                   revision: Optional[str] = None) -> Captioner:
    """A Captioner for conf's generation settings; ``checkpoint`` (a CheckpointHook ``iter_N.pth``)
    replaces the model dir's weights, through ModelScope's own checkpoint loader."""
    from utils.core.errors import CheckpointError, ModelDirError, raise_system_failure

    model_dir = trained_model_dir(conf, model)
    from utils.core.memory import keep_freed_memory
    keep_freed_memory()  # the commands that caption reuse their freed batches' memory instead of faulting it in again
    try:
        captioner = Captioner(model_dir, conf.generation, revision=revision, precision=conf.run.precision,
                              model_cfg=conf.model.model_cfg)
    except FileNotFoundError as e:  # e.g. a model dir without style_map.json
        raise ModelDirError(str(e)) from None
    if checkpoint is not None:
        from modelscope.utils.checkpoint import load_checkpoint
        try:
            load_checkpoint(checkpoint, captioner.model)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise_system_failure(e)
            raise CheckpointError(f'checkpoint {checkpoint} could not be loaded: {first_line(e)}') from None
        captioner.model.to(captioner.device).eval()
        logger.info('weights from checkpoint %s', checkpoint)
    return captioner
