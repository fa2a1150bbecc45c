"""Style-conditioned OFA captioning preprocessors (subclasses of ModelScope's).

``OfaStylishICPreprocessor`` changes one thing in ModelScope's ``OfaImageCaptioningPreprocessor``: the
prompt is built per sample from the template and the sample's style. ``OfaPreprocessorForStylishIC`` is
ModelScope's ``OfaPreprocessor`` with the task fixed to stylish captioning; it is what OFATrainer gets as
``preprocessor={'train': ..., 'val': ...}`` (set afterwards, the stock one would silently be used).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch
import torchvision.transforms.functional as F
from modelscope.preprocessors.base import Preprocessor
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.preprocessors.multi_modal import OfaPreprocessor
from modelscope.preprocessors.ofa.image_captioning import OfaImageCaptioningPreprocessor
from modelscope.preprocessors.ofa.utils.constant import OFA_TASK_KEY_MAPPING
from modelscope.utils.config import Config
from modelscope.utils.constant import Fields, ModeKeys, ModelFile, Tasks
from PIL import Image, ImageOps

from utils.core.layout import STYLISH_IC_PREPROCESSOR
from utils.core.conf_checks import check_patch_image_size, max_patch_image_size  # noqa: F401 (pipeline uses both)
from utils.data.images import open_image
from utils.data.styles import StyleMap

COLUMNS = {'image': 'image', 'text': 'text', 'style': 'style'}  # the fields of a row (utils/data/rows.py)


class OfaStylishICPreprocessor(OfaImageCaptioningPreprocessor):
    r"""OFA image-captioning preprocessor whose prompt carries the sample's style.

    step 1. As ModelScope's captioning preprocessor: load the image, resize (bicubic) and normalise it.
        This is deterministic in every mode (no random crop), so eval and inference are reproducible.
        With an ``image_cache`` the decoded, resized pixels come from the cache (bit-identical).
    step 2. Fill the prompt template with the style's token (or the style word): the ``source``.
        Tokenised prompts are cached per style.
    Training samples (``target``, ``prev_output_tokens``) come from the parent unchanged.

    Args:
        cfg, model_dir, mode: as ``OfaImageCaptioningPreprocessor``.
        style_map (StyleMap): styles the model knows and how each enters the prompt.
    """

    def __init__(self, cfg, model_dir, mode=ModeKeys.INFERENCE, *args, style_map: StyleMap, **kwargs):
        super().__init__(cfg, model_dir, mode, *args, **kwargs)
        self.style_map = style_map
        self.image_cache = None
        # The rows this preprocessor reads are the toolkit's own (utils/data/rows.py), whatever the model's
        # configuration.json says: ModelScope's OFA recipe writes `dataset.column_map` (e.g. text ->
        # caption) there, which the stock preprocessor would apply to our rows.
        self.column_map = dict(COLUMNS)
        self._source_cache: Dict[str, torch.Tensor] = {}

    def style_source(self, style: str) -> torch.Tensor:
        """The tokenised prompt for a style (raises UnknownStyleError for a style the map lacks)."""
        source = self._source_cache.get(style)
        if source is None:
            source = self.tokenize_text(self.style_map.prompt_for(style))
            self._source_cache[style] = source
        return source

    def use_image_cache(self, cache) -> None:
        """Take decoded, resized pixels from an ImageCache built at this preprocessor's image size."""
        if cache.size != self.patch_image_size:
            raise ValueError(f'image cache of {cache.size} px for a {self.patch_image_size} px preprocessor')
        self.image_cache = cache

    def get_img_pil(self, path_or_url_or_pil):
        """The toolkit's image loader (utils/data/images.py: its limits on pixels, bytes and truncation, whatever
        an imported module set globally) instead of ModelScope's ``load_image``."""
        if isinstance(path_or_url_or_pil, Image.Image):
            return open_image(path_or_url_or_pil)
        with open_image(path_or_url_or_pil) as im:  # as ModelScope's load_image: EXIF orientation, then RGB
            return ImageOps.exif_transpose(im).convert('RGB')

    def patch_image(self, image) -> torch.Tensor:
        pixels = self.image_cache.get(image) if self.image_cache is not None and isinstance(image, str) else None
        if pixels is None:
            return self.patch_resize_transform(self.get_img_pil(image))
        return F.normalize(F.to_tensor(np.array(pixels)), mean=self.mean, std=self.std)

    def _build_infer_sample(self, data: Dict[str, Any]) -> Dict[str, Any]:
        sample = {
            'source': self.style_source(data[self.column_map['style']]),
            'patch_image': self.patch_image(data[self.column_map['image']]),
            'patch_mask': torch.tensor([True]),
        }
        if self.column_map['text'] in data:
            sample['label'] = data[self.column_map['text']]
        return sample


@PREPROCESSORS.register_module(Fields.multi_modal, module_name=STYLISH_IC_PREPROCESSOR)
class OfaPreprocessorForStylishIC(OfaPreprocessor):
    r"""``OfaPreprocessor`` whose inner preprocessor is always ``OfaStylishICPreprocessor``.

    Args:
        model_dir (str): a local ModelScope OFA model dir.
        mode: train / eval / inference; setting ``.mode`` later reaches the inner preprocessor too.
        style_map (StyleMap, optional): default: the ``style_map.json`` saved in model_dir.
        model_cfg (dict, optional): values that replace ``model.*`` of the model's configuration.json
            (``patch_image_size``, ``max_image_size``, ...).
        no_collate (bool): return one sample (for a DataLoader) instead of a batch of one.
    """

    def __init__(self, model_dir: str, mode=ModeKeys.INFERENCE, *args, style_map: Optional[StyleMap] = None,
                 model_cfg: Optional[dict] = None, no_collate: bool = False, **kwargs):
        # OfaPreprocessor.__init__ picks the inner preprocessor from the task; ours is fixed, so we set up
        # the same attributes here instead of building a stock one first and replacing it.
        Preprocessor.__init__(self, mode, *args, **kwargs)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f'model dir {model_dir} does not exist')
        self.cfg = Config.from_file(os.path.join(model_dir, ModelFile.CONFIGURATION))
        self.cfg.task = Tasks.image_captioning  # e.g. a pretrain checkpoint that is fine-tuned for captioning
        for key, value in (model_cfg or {}).items():
            if value is not None:
                self.cfg.model[key] = value
        check_patch_image_size(model_dir, self.cfg.model.get('patch_image_size'))
        self.style_map = style_map if style_map is not None else StyleMap.load(model_dir)
        self.preprocess = OfaStylishICPreprocessor(self.cfg, model_dir, mode, style_map=self.style_map)
        self.keys = OFA_TASK_KEY_MAPPING[Tasks.image_captioning]
        self.tokenizer = self.preprocess.tokenizer
        self.no_collate = no_collate

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = value
        if hasattr(self, 'preprocess'):
            self.preprocess.mode = value

    def save_pretrained(self, target_folder, config=None, save_config_function=None):
        """Called by CheckpointHook when it writes the output model dir: the style map goes with it."""
        os.makedirs(target_folder, exist_ok=True)
        self.style_map.save(target_folder)
        super().save_pretrained(target_folder, config, save_config_function)
