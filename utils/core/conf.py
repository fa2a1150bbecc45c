"""The run conf: one typed object, loaded from the seed's JSON file and validated before anything runs.

Every setting is declared once, in :class:`Conf`, with its default and its meaning. CLI flags
override fields of the same name (see :func:`apply_overrides`); they never restate a default.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from utils.core.errors import ConfError
from utils.core.layout import DATA_SUFFIXES
from utils.core.io import read_json

DEFAULT_PROMPT = ' what does the image describe? write a {} reply.'
PRECISIONS = ('fp32', 'bf16', 'fp16')
STAGES = ('ce', 'scst')
SCST_SEARCHES = ('beam', 'sample')
VAL_METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
HUB_ID = re.compile(r'^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$')


@dataclass
class CheckpointConf:
    by_epoch: bool = False          # save every `interval` epochs (true) or iterations (false)
    interval: int = 5000            # epochs or iterations between checkpoints
    max_checkpoint_num: int = 3     # older checkpoints are deleted beyond this many (null: keep all)


@dataclass
class ScstConf:
    candidates: int = 5             # captions generated per training sample; each is rewarded against the others' mean
    search: str = 'beam'            # "beam": the beam's hypotheses (OFA's recipe); "sample": independent samples
    temperature: float = 1.0        # sampling temperature ("sample" only)


@dataclass
class Columns:
    """Which column of a data file holds each field the toolkit reads (default: Personality-Captions')."""
    style: str = 'personality'      # the requested style (personality)
    text: str = 'comment'           # the human caption: the training target and first reference
    image: str = 'image_hash'       # image: a PCap hash (img_addr + value + file_attr), a file name with its suffix, or an absolute path
    references: Optional[str] = 'additional_comments'  # extra references of val/test rows (a list; null: none)


@dataclass
class Conf:
    # --- the seed's keys (required unless a default is given) ---
    model_name: str                 # ModelScope hub id (damo/ofa_image-caption_coco_distilled_en) or a local model dir
    tokenize_style: bool            # true: each style is its own token in the prompt; false: the style word itself
    img_addr: str                   # folder of images; image path = img_addr / (image_hash + file_attr)
    dataset_path: str               # folder with the train/val/test JSON files (and personalities.txt, if any)
    file_attr: str                  # image file suffix, e.g. ".jpg"
    train_json: str                 # file name inside dataset_path: .json (PCap list), .jsonl, .csv or .parquet
    val_json: str                   # file name inside dataset_path (same formats)
    test_json: str                  # file name inside dataset_path (same formats)
    work_dir: str                   # checkpoints, output/, logs, inference and eval files go here
    model_revision: Optional[str] = None   # hub revision (v1.0.1); ignored for a local model dir
    prompt: Optional[str] = None    # template with one "{}" for the style; empty/null: DEFAULT_PROMPT

    # --- data ---
    columns: Columns = field(default_factory=Columns)  # data file column of each field (default: PCap names)
    strict: bool = False            # a bad data row (missing/unreadable image, missing field) stops the run instead of being skipped and counted
    demo: bool = False              # build the offline demo's tiny model and data set if they are absent

    # --- running (every command) ---
    batch_size: int = 4             # (CLI -b) samples per step, per device; captions per batch
    num_workers: int = 0            # (CLI -w) dataloader worker processes
    precision: str = 'fp32'         # fp32, bf16 or fp16 (autocast; fp16 training with a loss scaler): training and captioning
    seed: int = 42                  # random seed for weights of new layers, shuffling, sampling, -r picks
    verbose: bool = False           # also show ModelScope's own console output (config dump, hook table, per-iteration lines); it always goes to work_dir/{time}.log

    # --- training ---
    max_epochs: int = 3             # (CLI -e/--max_epoches) epochs to train
    lr: float = 5e-5                # peak learning rate (AdamW)
    warmup: float = 0.01            # fraction of all steps spent warming the learning rate up linearly
    weight_decay: float = 0.01      # AdamW weight decay
    label_smoothing: float = 0.1    # label smoothing of the cross-entropy loss
    log_interval: int = 10          # iterations between two log lines of the loss
    max_train_samples: Optional[int] = None  # use only the first N train rows (null: all)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)  # CheckpointHook settings
    image_cache: Optional[str] = None  # folder for a cache of decoded, resized train images (null: off)

    # --- validation and the best checkpoint (utils/training/validation.py) ---
    eval_interval: Optional[int] = 5000  # iterations between two validations on the val split (null: only at epoch ends)
    eval_every_epoch: bool = True   # also validate at the end of every epoch
    val_max_samples: Optional[int] = None  # validate on the first N val rows only (null: all)
    val_spice: bool = False         # also compute SPICE at each validation (slow; needs its CoreNLP jars)
    best_metric: str = 'CIDEr'      # metric whose best value picks work_dir/output_best (higher is better)

    # --- training stage (utils/training/stages.py) ---
    stage: str = 'ce'               # "ce": cross-entropy on the references; "scst": self-critical training on a CIDEr-D reward, from a CE model dir
    scst: ScstConf = field(default_factory=ScstConf)  # settings of the "scst" stage

    # --- images and generation ---
    patch_image_size: Optional[int] = None  # side of the square image the model sees (null: the model's own)
    max_image_size: Optional[int] = None    # largest image side the model's position buckets allow (null: the model's own)
    beam_size: int = 5              # beam width when captioning
    max_len: int = 16               # longest caption, in tokens, when captioning
    no_repeat_ngram_size: int = 3   # forbid repeating n-grams of this size when captioning (0: off)

    # ---------------------------------------------------------------- derived
    @property
    def prompt_template(self) -> str:
        return self.prompt or DEFAULT_PROMPT

    @property
    def model_cfg(self) -> dict:
        """The values that replace ``model.*`` of the model's configuration.json (None: keep the model's)."""
        return {'patch_image_size': self.patch_image_size, 'max_image_size': self.max_image_size}

    @property
    def model_is_local(self) -> bool:
        return is_local_model(self.model_name)

    def split_path(self, split: str) -> Path:
        return Path(self.dataset_path) / getattr(self, f'{split}_json')

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_local_model(name: str) -> bool:
    """A model name is a local dir when it exists, or is path-like (not `owner/name`)."""
    return os.path.isdir(name) or not HUB_ID.match(name)


# ------------------------------------------------------------------ loading

def _type_name(tp) -> str:
    return getattr(tp, '__name__', str(tp))


def _check_type(key: str, value: Any, tp) -> Any:
    """Return value coerced to tp (int -> float only), or raise ConfError naming key."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfError(f'conf key "{key}": expected {_type_name(tp)}, got {type(value).__name__} {value!r}')
    return value


def _from_dict(cls, data: dict, prefix: str = ''):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfError(f'unknown conf key "{prefix}{unknown[0]}" (known keys: {", ".join(fields)})')
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfError(f'missing conf key "{key}"')
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(data[name], dict):
                raise ConfError(f'conf key "{key}": expected an object, got {type(data[name]).__name__}')
            kwargs[name] = _from_dict(tp, data[name], prefix=key + '.')
        else:
            kwargs[name] = _check_type(key, data[name], tp)
    return cls(**kwargs)


def conf_from_dict(data: Any) -> Conf:
    if not isinstance(data, dict):
        raise ConfError(f'the conf must be a JSON object, got {type(data).__name__}')
    return _from_dict(Conf, data)


def read_conf(path: Union[str, Path]) -> Conf:
    """Read and type-check a conf file (no file-system checks: see validate)."""
    return conf_from_dict(read_json(path, 'conf file', ConfError))


def apply_overrides(conf: Conf, **overrides) -> Conf:
    """Replace fields with the CLI values that were given (None = not given), re-checking types."""
    hints = get_type_hints(Conf)
    changes = {k: _check_type(k, v, hints[k]) for k, v in overrides.items() if v is not None}
    return dataclasses.replace(conf, **changes)


# ------------------------------------------------------------------ command-line flags

SECTIONS = {  # Conf's "# --- name ---" sections whose keys are flags of each command
    'train': ('seed', 'data', 'running', 'training', 'validation', 'stage', 'generation'),
    'eval': ('seed', 'data', 'running', 'generation'),
    'caption': ('seed', 'data', 'running', 'generation'),   # pre_inference.py, web_demo.py
    'backup': ('seed',),
}
CHOICES = {'precision': PRECISIONS, 'stage': STAGES, 'best_metric': VAL_METRICS}
_SECTION_NAMES = {"the seed's keys": 'seed', 'training stage': 'stage', 'images and generation': 'generation'}


@functools.lru_cache(maxsize=None)
def conf_fields() -> tuple:
    """(section, name, type, help, short flags) of every scalar Conf field, read from Conf's own source:
    each field's help is its end-of-line comment, its section the "# --- section ---" line above it, and
    "(CLI -b)" or "(CLI -e/--max_epoches)" at the start of a comment names extra flags."""
    import inspect
    import io
    import tokenize

    hints = get_type_hints(Conf)
    found, section, name = [], None, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(Conf)).readline):
        if tok.type == tokenize.COMMENT:
            heading = re.match(r'#\s*---\s*(.+?)\s*(\(.*\))?\s*-*\s*$', tok.string)
            if heading and tok.start[1] == 4:
                title = heading.group(1).strip()
                section = _SECTION_NAMES.get(title, title.split()[0].lower())
                name = None
            elif name is not None:
                text = tok.string.lstrip('#').strip()
                cli = re.match(r'\(CLI ([^)]*)\)\s*', text)
                extra = tuple(cli.group(1).split('/')) if cli else ()
                found.append((section, name, hints[name], text[cli.end():] if cli else text, extra))
                name = None
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in hints and name is None \
                and not dataclasses.is_dataclass(hints[tok.string]):
            name = tok.string
        elif tok.type == tokenize.NEWLINE:
            name = None
    return tuple(found)


def add_conf_flags(parser, command: str) -> None:
    """One flag per Conf key of the command's sections (``--lr``, ``--batch_size``/``-b``, ...), typed from
    the field, helped by its comment, default None (= keep the conf's value; defaults live in Conf only)."""
    import argparse

    wanted = SECTIONS[command]
    groups = {}
    for section, name, tp, help_text, extra in conf_fields():
        if section not in wanted:
            continue
        group = groups.get(section) or groups.setdefault(
            section, parser.add_argument_group(f'conf keys ({section}); a flag overrides the conf file'))
        base = get_args(tp)[0] if get_origin(tp) is Union else tp
        kwargs = {'dest': name, 'default': None, 'help': help_text.replace('%', '%%')}
        if base is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        else:
            metavar = None if name in CHOICES else {int: 'N', float: 'X'}.get(base, 'TEXT')
            kwargs.update(type=base, metavar=metavar, choices=CHOICES.get(name))
        group.add_argument(*extra, f'--{name}', **kwargs)


def conf_overrides(args) -> dict:
    """The Conf keys given on a command line built with add_conf_flags (not given: left out)."""
    names = {name for _, name, *_ in conf_fields()}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def load_conf(path: Union[str, Path], overrides: Optional[dict] = None, splits=('train', 'val', 'test')) -> Conf:
    """The one way every entry point gets its conf: the file, the command line's overrides, then every check
    (``validate``) of the splits it reads. Reads and checks; builds and writes nothing."""
    return validate(apply_overrides(read_conf(path), **(overrides or {})), splits=splits)


# ------------------------------------------------------------------ validation

def validate(conf: Conf, splits=('train', 'val', 'test')) -> Conf:
    """Value and file-system checks; raises ConfError naming the key. Writes nothing."""
    positive = ['max_epochs', 'batch_size', 'beam_size', 'max_len', 'log_interval']
    for key in positive:
        if getattr(conf, key) < 1:
            raise ConfError(f'conf key "{key}" must be at least 1, got {getattr(conf, key)}')
    for key in ['num_workers', 'no_repeat_ngram_size']:
        if getattr(conf, key) < 0:
            raise ConfError(f'conf key "{key}" must not be negative, got {getattr(conf, key)}')
    if conf.precision not in PRECISIONS:
        raise ConfError(f'conf key "precision" must be one of {", ".join(PRECISIONS)}, got {conf.precision!r}')
    if not 0 <= conf.seed < 2 ** 32:
        raise ConfError(f'conf key "seed" must be in [0, 2**32), got {conf.seed}')
    names = {}
    for key in ('style', 'text', 'image', 'references'):
        col = getattr(conf.columns, key)
        if col is None and key == 'references':
            continue
        if not col or not col.strip():
            raise ConfError(f'conf key "columns.{key}" must name a column, got {col!r}')
        if col in names:
            raise ConfError(f'conf keys "columns.{names[col]}" and "columns.{key}" name the same column {col!r}')
        names[col] = key
    if not conf.lr > 0:
        raise ConfError(f'conf key "lr" must be positive, got {conf.lr}')
    if not 0 <= conf.warmup < 1:
        raise ConfError(f'conf key "warmup" is a fraction of all steps, in [0, 1), got {conf.warmup}')
    if conf.weight_decay < 0:
        raise ConfError(f'conf key "weight_decay" must not be negative, got {conf.weight_decay}')
    if not 0 <= conf.label_smoothing < 1:
        raise ConfError(f'conf key "label_smoothing" must be in [0, 1), got {conf.label_smoothing}')
    if conf.max_train_samples is not None and conf.max_train_samples < 1:
        raise ConfError(f'conf key "max_train_samples" must be at least 1, got {conf.max_train_samples}')
    if conf.checkpoint.interval < 1:
        raise ConfError(f'conf key "checkpoint.interval" must be at least 1, got {conf.checkpoint.interval}')
    if conf.checkpoint.max_checkpoint_num is not None and conf.checkpoint.max_checkpoint_num < 1:
        raise ConfError('conf key "checkpoint.max_checkpoint_num" must be at least 1, '
                        f'got {conf.checkpoint.max_checkpoint_num}')
    for key in ['eval_interval', 'val_max_samples']:
        if getattr(conf, key) is not None and getattr(conf, key) < 1:
            raise ConfError(f'conf key "{key}" must be at least 1 (or null), got {getattr(conf, key)}')
    if conf.best_metric not in VAL_METRICS:
        raise ConfError(f'conf key "best_metric" must be one of {", ".join(VAL_METRICS)}, got {conf.best_metric!r}')
    if conf.best_metric == 'SPICE' and not conf.val_spice:
        raise ConfError('conf key "best_metric" is SPICE but "val_spice" is false: SPICE is not computed')
    if conf.stage not in STAGES:
        raise ConfError(f'conf key "stage" must be one of {", ".join(STAGES)}, got {conf.stage!r}')
    if conf.scst.candidates < 2:
        raise ConfError(f'conf key "scst.candidates" must be at least 2 (the baseline is the others\' mean), '
                        f'got {conf.scst.candidates}')
    if conf.scst.search not in SCST_SEARCHES:
        raise ConfError(f'conf key "scst.search" must be one of {", ".join(SCST_SEARCHES)}, got {conf.scst.search!r}')
    if not conf.scst.temperature > 0:
        raise ConfError(f'conf key "scst.temperature" must be positive, got {conf.scst.temperature}')
    for key in ['patch_image_size', 'max_image_size']:
        v = getattr(conf, key)
        if v is not None and v < 16:
            raise ConfError(f'conf key "{key}" must be at least 16 pixels, got {v}')
    if conf.patch_image_size and conf.max_image_size and conf.patch_image_size > conf.max_image_size:
        raise ConfError(f'conf key "patch_image_size" ({conf.patch_image_size}) must not exceed '
                        f'"max_image_size" ({conf.max_image_size})')
    if conf.prompt:
        try:
            filled = conf.prompt.format('STYLE')
        except (IndexError, KeyError, ValueError):
            filled = None
        if filled is None or conf.prompt.count('{}') != 1:
            raise ConfError(f'conf key "prompt" must hold exactly one "{{}}" for the style, got {conf.prompt!r}')
    if not conf.file_attr:
        raise ConfError('conf key "file_attr" must not be empty (e.g. ".jpg")')
    if not conf.work_dir:
        raise ConfError('conf key "work_dir" must not be empty')
    if os.path.exists(conf.work_dir) and not os.path.isdir(conf.work_dir):
        raise ConfError(f'conf key "work_dir": {conf.work_dir} exists and is not a folder')

    if conf.image_cache and os.path.exists(conf.image_cache) and not os.path.isdir(conf.image_cache):
        raise ConfError(f'conf key "image_cache": {conf.image_cache} exists and is not a folder')
    if conf.model_is_local:
        if not os.path.isdir(conf.model_name):
            raise ConfError(f'conf key "model_name": local model dir {conf.model_name} does not exist '
                            '(a hub id looks like owner/name)')
        if not os.path.isfile(os.path.join(conf.model_name, 'configuration.json')):
            raise ConfError(f'conf key "model_name": {conf.model_name} has no configuration.json '
                            '(not a ModelScope model dir)')
    if conf.stage == 'scst' and conf.model_is_local and not os.path.isfile(os.path.join(conf.model_name, 'style_map.json')):
        raise ConfError(f'conf key "model_name": stage "scst" starts from a model this toolkit trained with cross-entropy '
                        f'(its output/ or output_best/ dir, with style_map.json); {conf.model_name} has no style_map.json')
    if not os.path.isdir(conf.img_addr):
        raise ConfError(f'conf key "img_addr": folder {conf.img_addr} does not exist')
    if not os.path.isdir(conf.dataset_path):
        raise ConfError(f'conf key "dataset_path": folder {conf.dataset_path} does not exist')

    for split in ('train', 'val', 'test'):
        p = conf.split_path(split)
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ConfError(f'conf key "{split}_json": {p.name} is not a data file this toolkit reads '
                            f'({", ".join(DATA_SUFFIXES)})')
    for split in splits:
        p = conf.split_path(split)
        if not p.is_file():
            raise ConfError(f'conf key "{split}_json": file {p} does not exist')
    return conf
