"""The conf's checks: values (ranges, choices, the prompt, columns) and the file system (model dir, image and
data folders, split files), each error naming the conf key; and :func:`load_conf`, the one way every entry
point gets its conf. Reads and checks; builds and writes nothing."""
from __future__ import annotations

import dataclasses
import json
import os
import string
from pathlib import Path
from typing import Optional, Union

from utils.core.conf import NESTED_SECTIONS, SECTIONS, Conf, apply_overrides, read_conf
from utils.core.errors import ConfError
from utils.core.layout import DATA_SUFFIXES


def load_conf(path: Union[str, Path], overrides: Optional[dict] = None, splits=('train', 'val', 'test')) -> Conf:
    """The one way every entry point gets its conf: the file, the command line's overrides, then every check
    (``validate``) of the splits it reads. Reads and checks; builds and writes nothing."""
    return validate(apply_overrides(read_conf(path), **(overrides or {})), splits=splits)


# ------------------------------------------------------------------ checks

def _at_least(key: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfError(f'conf key "{key}" must be at least {low}, got {value}')


def check_prompt(prompt: Optional[str]) -> None:
    """A prompt holds exactly one "{}" placeholder for the style; "{{" and "}}" are literal braces."""
    if not prompt:
        return
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
        prompt.format('STYLE')
    except (IndexError, KeyError, ValueError):
        fields = None
    if fields != ['']:
        raise ConfError(f'conf key "prompt" must hold exactly one "{{}}" for the style, got {prompt!r}')


def _check_values(conf: Conf) -> None:
    m, d, r, t, v, s, g = (conf.model, conf.data, conf.run, conf.train, conf.validation, conf.scst, conf.generation)
    for key, value in [('max_epochs', t.max_epochs), ('batch_size', r.batch_size), ('beam_size', g.beam_size),
                       ('max_len', g.max_len), ('log_interval', t.log_interval),
                       ('max_train_samples', t.max_train_samples), ('checkpoint.interval', t.checkpoint.interval),
                       ('checkpoint.max_checkpoint_num', t.checkpoint.max_checkpoint_num),
                       ('accumulate', t.accumulate)]:
        _at_least(key, value, 1)
    for key, value in [('eval_interval', v.eval_interval), ('val_max_samples', v.val_max_samples)]:
        if value is not None and value < 1:
            raise ConfError(f'conf key "{key}" must be at least 1 (or null), got {value}')
    for key, value in [('num_workers', r.num_workers), ('no_repeat_ngram_size', g.no_repeat_ngram_size)]:
        if value < 0:
            raise ConfError(f'conf key "{key}" must not be negative, got {value}')
    for name, cls in SECTIONS.items():  # every key with choices
        for f in dataclasses.fields(cls):
            choices = f.metadata.get('choices')
            value = getattr(getattr(conf, name), f.name)
            key = f'{name}.{f.name}' if name in NESTED_SECTIONS else f.name
            if choices and isinstance(value, list):
                for i, item in enumerate(value):
                    if item not in choices:
                        raise ConfError(f'conf key "{key}" item {i}: must be one of {", ".join(choices)}, '
                                        f'got {item!r}')
            elif choices and value not in choices:
                raise ConfError(f'conf key "{key}" must be one of {", ".join(choices)}, got {value!r}')
    if not 0 <= r.seed < 2 ** 32:
        raise ConfError(f'conf key "seed" must be in [0, 2**32), got {r.seed}')
    if not t.lr > 0:
        raise ConfError(f'conf key "lr" must be positive, got {t.lr}')
    if not 0 <= t.warmup < 1:
        raise ConfError(f'conf key "warmup" is a fraction of all steps, in [0, 1), got {t.warmup}')
    if t.weight_decay < 0:
        raise ConfError(f'conf key "weight_decay" must not be negative, got {t.weight_decay}')
    if not 0 <= t.label_smoothing < 1:
        raise ConfError(f'conf key "label_smoothing" must be in [0, 1), got {t.label_smoothing}')
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfError(f'conf key "ema" is a decay in (0, 1) (or null: off), got {t.ema}')
    if not 0 <= t.drop_worst_ratio < 1:
        raise ConfError(f'conf key "drop_worst_ratio" must be in [0, 1), got {t.drop_worst_ratio}')
    if t.drop_worst_after < 0:
        raise ConfError(f'conf key "drop_worst_after" must not be negative, got {t.drop_worst_after}')
    for key, parts in [('freeze', t.freeze), ('scst.freeze', t.freeze + s.freeze if t.stage == 'scst' else [])]:
        if {'encoder', 'decoder'} <= set(parts) and not m.tokenize_style:  # an OFA model is its encoder and decoder
            raise ConfError(f'conf key "{key}": {", ".join(dict.fromkeys(parts))} leave no parameter to train '
                            '(tokenize_style false: no style rows)')
    if v.best_metric == 'SPICE' and not v.val_spice:
        raise ConfError('conf key "best_metric" is SPICE but "val_spice" is false: SPICE is not computed')
    if s.candidates < 2:
        raise ConfError(f'conf key "scst.candidates" must be at least 2 (the baseline is the others\' mean), '
                        f'got {s.candidates}')
    if not s.temperature > 0:
        raise ConfError(f'conf key "scst.temperature" must be positive, got {s.temperature}')
    for key in ['patch_image_size', 'max_image_size']:
        value = getattr(m, key)
        if value is not None and value < 16:
            raise ConfError(f'conf key "{key}" must be at least 16 pixels, got {value}')
    if m.patch_image_size and m.max_image_size and m.patch_image_size > m.max_image_size:
        raise ConfError(f'conf key "patch_image_size" ({m.patch_image_size}) must not exceed '
                        f'"max_image_size" ({m.max_image_size})')
    check_prompt(m.prompt)
    names = {}
    for key in ('style', 'text', 'image', 'references'):
        col = getattr(d.columns, key)
        if col is None and key == 'references':
            continue
        if not col or not col.strip():
            raise ConfError(f'conf key "columns.{key}" must name a column, got {col!r}')
        if col in names:
            raise ConfError(f'conf keys "columns.{names[col]}" and "columns.{key}" name the same column {col!r}')
        names[col] = key
    if not d.file_attr:
        raise ConfError('conf key "file_attr" must not be empty (e.g. ".jpg")')
    if not r.work_dir:
        raise ConfError('conf key "work_dir" must not be empty')


def _check_files(conf: Conf, splits) -> None:
    m, d, r, t = conf.model, conf.data, conf.run, conf.train
    if os.path.exists(r.work_dir) and not os.path.isdir(r.work_dir):
        raise ConfError(f'conf key "work_dir": {r.work_dir} exists and is not a folder')
    if t.image_cache and os.path.exists(t.image_cache) and not os.path.isdir(t.image_cache):
        raise ConfError(f'conf key "image_cache": {t.image_cache} exists and is not a folder')
    if m.is_local:
        if not os.path.isdir(m.model_name):
            raise ConfError(f'conf key "model_name": local model dir {m.model_name} does not exist '
                            f'(a hub id looks like owner/name){_relative_hint(m.model_name)}')
        if not os.path.isfile(os.path.join(m.model_name, 'configuration.json')):
            raise ConfError(f'conf key "model_name": {m.model_name} has no configuration.json '
                            '(not a ModelScope model dir)')
        check_patch_image_size(m.model_name, m.patch_image_size)  # before any work (the trainer copies the model)
    if t.stage == 'scst' and m.is_local and not os.path.isfile(os.path.join(m.model_name, 'style_map.json')):
        raise ConfError(f'conf key "model_name": stage "scst" starts from a model this toolkit trained with cross-entropy '
                        f'(its output/ or output_best/ dir, with style_map.json); {m.model_name} has no style_map.json')
    if not os.path.isdir(d.img_addr):
        raise ConfError(f'conf key "img_addr": folder {d.img_addr} does not exist{_relative_hint(d.img_addr)}')
    if not os.path.isdir(d.dataset_path):
        raise ConfError(f'conf key "dataset_path": folder {d.dataset_path} does not exist'
                        f'{_relative_hint(d.dataset_path)}')
    for split in ('train', 'val', 'test'):
        p = d.split_path(split)
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ConfError(f'conf key "{split}_json": {p.name} is not a data file this toolkit reads '
                            f'({", ".join(DATA_SUFFIXES)})')
    for split in splits:
        p = d.split_path(split)
        if not p.is_file():
            raise ConfError(f'conf key "{split}_json": file {p} does not exist')


def max_patch_image_size(model_dir: str) -> Optional[int]:
    """The largest ``patch_image_size`` the model's image position buckets allow (None: unknown): the image is cut
    into patches of 16 px, and the patch grid's side must not exceed ``image_bucket_size`` of config.json
    (``modeling_ofa.get_patch_images_info``: position ids row * image_bucket_size + col + 1 index an embedding of
    image_bucket_size**2 + 1 rows)."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            buckets = json.load(f).get('image_bucket_size')
    except (OSError, ValueError):
        return None
    return 16 * buckets if isinstance(buckets, int) and buckets > 0 else None


def check_patch_image_size(model_dir: str, size, key: str = 'patch_image_size') -> None:
    """ConfError naming the conf key when ``size`` is beyond what the model's position buckets allow."""
    limit = max_patch_image_size(model_dir)
    if isinstance(size, int) and limit is not None and -(-size // 16) * 16 > limit:
        raise ConfError(f'conf key "{key}" must be at most {limit} for the model in {model_dir} (its image_bucket_size '
                        f'{limit // 16} x 16 px), got {size}')


def _relative_hint(path: str) -> str:
    """For a relative path that is missing: where it was looked for (relative paths are read from the
    current directory, not from the conf file's)."""
    if os.path.isabs(path):
        return ''
    return f' (relative paths are read from the current directory: looked for {os.path.abspath(path)})'


def validate(conf: Conf, splits=('train', 'val', 'test')) -> Conf:
    """Value and file-system checks; raises ConfError naming the key. Writes nothing."""
    _check_values(conf)
    _check_files(conf, splits)
    return conf
