"""ModelScope ``pipeline()`` for models this toolkit trained: captions in a requested style.

    import preprocessors                       # registers the preprocessor and this pipeline with ModelScope
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    captioner = pipeline(Tasks.image_captioning, model='/abs/path/to/work_dir/output')
    captioner({'image': 'a.jpg', 'style': 'Sarcastic'})                    # {'caption': '...'}
    captioner([{'image': 'a.jpg', 'style': 'Happy'}, ...], batch_size=8)   # [{'caption': '...'}, ...]

A trained model dir's ``configuration.json`` names this pipeline (``pipeline.type``) and the toolkit's
preprocessor; ``utils/patches/checkpoints.py`` writes both at every checkpoint, after ModelScope's
CheckpointHook has reset ``pipeline.type`` to the task.

Captioning is the toolkit's ``Captioner``: the same batched generation (key/value cache, vectorised n-gram
blocker) as ``pre_inference.py``, so the same inputs and settings give the same captions. The stock
``ImageCaptioningPipeline`` would build a stock ``OfaPreprocessor`` (no style) and concatenate samples whose
prompts differ in length; this one pads them as training does.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Union

from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks
from PIL import Image

from utils.core.conf import GenerationConf
from utils.core.conf import PRECISIONS
from utils.core.layout import STYLISH_IC_PIPELINE
from utils.data.images import ImageError, check_image, open_image

GENERATION_KEYS = {'beam_size': 'beam_size', 'max_len_b': 'max_len', 'no_repeat_ngram_size': 'no_repeat_ngram_size'}


def _check_kwargs(**kwargs) -> None:
    """pipeline()'s keyword arguments checked like conf keys: a ValueError naming the argument."""
    def bad(name, must, value):
        raise ValueError(f'pipeline() argument {name} must be {must}, got {value!r}')

    for name, low in (('beam_size', 1), ('max_len', 1), ('no_repeat_ngram_size', 0), ('patch_image_size', 16),
                      ('max_image_size', 16)):
        value = kwargs[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            bad(name, f'an integer of at least {low}' + (' (pixels)' if low == 16 else ''), value)
    if not isinstance(kwargs['mask_image_tokens'], bool):
        bad('mask_image_tokens', 'True or False', kwargs['mask_image_tokens'])
    if kwargs['precision'] not in PRECISIONS:
        bad('precision', 'one of ' + ', '.join(PRECISIONS), kwargs['precision'])
    p, m = kwargs['patch_image_size'], kwargs['max_image_size']
    if p is not None and m is not None and p > m:
        bad('patch_image_size', f'at most max_image_size ({m})', p)
    device = kwargs['device']
    if not isinstance(device, str) or not re.fullmatch(r'(cpu|gpu|cuda)(:\d+)?', device):
        bad('device', "'gpu', 'cpu', 'cuda' or 'cuda:N'", device)
    if device.startswith(('cuda', 'gpu:')):
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(':')[1]) if ':' in device else 0
        if index >= count:
            bad('device', f'a CUDA device this machine has ({count} visible)', device)


@PIPELINES.register_module(Tasks.image_captioning, module_name=STYLISH_IC_PIPELINE)
class StylishImageCaptioningPipeline(Pipeline):
    r"""Image captioning in a requested style with a model dir this toolkit trained.

    Input: ``{'image': path | URL | PIL image, 'style': str}``, or a list of them (captioned in batches of
    ``batch_size``; default 1, as in ModelScope's pipelines). ``style=`` given to the call is the style of
    every input that names none (a bare image is then accepted too). A style the model was not trained
    with raises ``UnknownStyleError`` (a ``KeyError``) naming the nearest known styles; an input without a
    style and no ``style=`` raises ``ValueError``.

    Output: ``{'caption': str}`` per input (a list for a list).

    Args:
        model: a local model dir (pass an absolute path: a relative ``a/b`` looks like a hub id to ModelScope)
            or a loaded ``OfaForAllTasks``.
        beam_size, max_len, no_repeat_ngram_size: generation settings; default: the model's
            ``configuration.json`` ``model.beam_search`` (what training's conf set), else the Captioner's.
        mask_image_tokens: never generate OFA's ``<code_k>`` / ``<bin_k>`` tokens (default True, as the conf key).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast.
        patch_image_size, max_image_size: replace the model's (default: the model's).
        device: ``gpu`` (CUDA where there is one, else the CPU), ``cpu``, ``cuda:1``, ...
    """

    def __init__(self, model, preprocessor=None, device: str = 'gpu', *, beam_size: Optional[int] = None,
                 max_len: Optional[int] = None, no_repeat_ngram_size: Optional[int] = None,
                 mask_image_tokens: bool = True, precision: str = 'fp32',
                 patch_image_size: Optional[int] = None, max_image_size: Optional[int] = None, **kwargs):
        from modelscope.utils.device import create_device
        from modelscope.utils.hub import read_config

        from utils.captioning.captioner import Captioner

        if preprocessor is not None:
            raise ValueError(f'the {STYLISH_IC_PIPELINE} pipeline builds its own preprocessor from the model dir '
                             '(its style_map.json): do not pass preprocessor=')
        _check_kwargs(beam_size=beam_size, max_len=max_len, no_repeat_ngram_size=no_repeat_ngram_size,
                      mask_image_tokens=mask_image_tokens, precision=precision, patch_image_size=patch_image_size, max_image_size=max_image_size,
                      device=device)
        model_dir = model if isinstance(model, str) else model.model_dir
        if isinstance(model_dir, str) and os.path.isdir(model_dir):
            from utils.captioning.preprocessor import check_patch_image_size
            from utils.core.errors import ConfError
            try:
                check_patch_image_size(model_dir, patch_image_size)
            except ConfError as e:
                raise ValueError(str(e).replace('conf key "patch_image_size"', 'pipeline() argument patch_image_size')) from None
        settings = {GENERATION_KEYS[k]: v for k, v in (read_config(model_dir).safe_get('model.beam_search') or {}).items()
                    if k in GENERATION_KEYS}
        settings.update({k: v for k, v in (('beam_size', beam_size), ('max_len', max_len),
                                           ('no_repeat_ngram_size', no_repeat_ngram_size)) if v is not None})
        settings['mask_image_tokens'] = mask_image_tokens
        self.captioner = Captioner(model, GenerationConf(**settings), precision=precision,
                                   device=str(create_device(device)),
                                   model_cfg={'patch_image_size': patch_image_size, 'max_image_size': max_image_size})
        super().__init__(model=self.captioner.model, preprocessor=self.captioner.preprocessor, device=device,
                         **kwargs)
        self._model_prepare = True  # the Captioner has put the model on its device, in eval mode

    @property
    def styles(self) -> List[str]:
        """The styles the model was trained with."""
        return self.captioner.style_map.styles

    def __call__(self, input: Union[Any, List[Any]], *args, batch_size: Optional[int] = None,
                 style: Optional[str] = None, **kwargs) -> Union[Dict[str, str], List[Dict[str, str]]]:
        if args or kwargs:
            raise TypeError(f'unexpected arguments to the {STYLISH_IC_PIPELINE} pipeline: '
                            f'{", ".join([repr(a) for a in args] + list(kwargs))}')
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
        single = not isinstance(input, list)
        inputs = [input] if single else input
        items = [self.preprocess(x, style=style, where='input' if single else f'input {i}')
                 for i, x in enumerate(inputs)]
        if single:  # the same message as pre_inference.py's, without a row number
            self.captioner.style_map.check(items[0]['style'])
        outputs = [self.postprocess(c) for c in self.forward(items, batch_size=batch_size or 1)]
        return outputs[0] if single else outputs

    def preprocess(self, input: Any, style: Optional[str] = None, where: str = 'input') -> Dict[str, Any]:
        """One input as a Captioner item ``{'image', 'style'}``; a malformed input is a ValueError naming it."""
        item = dict(input) if isinstance(input, dict) else {'image': input}
        item.setdefault('style', style)
        image = item.get('image')
        if image is None:
            raise ValueError(f'{where}: needs "image" (a path, URL or PIL image)')
        if isinstance(image, str):
            if image.startswith(('http://', 'https://')):
                image = open_image(image, where)  # downloaded once, within the toolkit's limits
            elif not os.path.isfile(image):
                raise ValueError(f'{where}: image file {image} does not exist')
            else:
                problem = check_image(image)  # the loader's verdict, before any work
                if problem:
                    raise ImageError(f'{where}: {problem}: {image}', problem)
        elif isinstance(image, Image.Image):
            open_image(image, where)
        else:
            raise ValueError(f'{where}: "image" must be a path, URL or PIL image, not {type(image).__name__}')
        if not isinstance(item['style'], str):
            raise ValueError(f'{where}: no style: give "style" (one of the model\'s {len(self.styles)} styles, '
                             'e.g. ' + ', '.join(repr(s) for s in self.styles[:3]) + ') or style= to the call')
        return {'image': image, 'style': item['style']}

    def forward(self, inputs: List[Dict[str, Any]], batch_size: int = 1) -> List[str]:
        """Captions of Captioner items, batched; an unknown style fails before any work, naming its row."""
        return self.captioner.caption(inputs, batch_size=batch_size, progress=False)

    def postprocess(self, inputs: str) -> Dict[str, str]:
        return {OutputKeys.CAPTION: inputs}
