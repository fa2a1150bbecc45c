"""The run conf: the seed's flat JSON file, read into one dataclass per section and checked before anything runs.

The JSON file stays flat, as the seed wrote it (``{"model_name": ..., "lr": ..., "beam_size": ...}``, with
``columns``, ``checkpoint`` and ``scst`` as objects). Inside, each key belongs to one section:

    conf.model       ModelConf        what to fine-tune and how the style enters the prompt
    conf.data        DataConf         where the rows and images are
    conf.run         RunConf          work_dir, batches, workers, precision, seed (every command)
    conf.train       TrainConf        the optimisation, checkpoints, the stage
    conf.validation  ValidationConf   validation during training and the best model
    conf.scst        ScstConf         the SCST stage
    conf.generation  GenerationConf   beam search when captioning

Every setting is declared once, with :func:`setting`: its default, its help text (``metadata['help']``),
extra short flags (``metadata['flags']``) and allowed values. Command-line flags are made from these fields
(:mod:`utils.core.flags`); they never restate a default. Each part of the toolkit takes the section it
needs (``Captioner(model_dir, conf.generation)``), not the whole conf.

Reading is pure: :func:`read_conf` reads and type-checks, :func:`apply_overrides` applies the command line's
values; the value and file checks are :mod:`utils.core.conf_checks` (``load_conf`` does all three). Nothing
is built or written. Relative paths in a conf are read from the current directory, as every command's own paths
are (the README says so).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from utils.core.errors import ConfError
from utils.core.io import read_json

DEFAULT_PROMPT = ' what does the image describe? write a {} reply.'
PRECISIONS = ('fp32', 'bf16', 'fp16')
STAGES = ('ce', 'scst')
SCST_SEARCHES = ('beam', 'sample')
# the parts of an OFA model that `freeze` names (utils.training.freeze says which parameters each holds)
FREEZE_PARTS = ('image_backbone', 'encoder_embeddings', 'decoder_embeddings', 'encoder', 'decoder')
VAL_METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
HUB_ID = re.compile(r'^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$')


def setting(default: Any = dataclasses.MISSING, *, help: str, flags: tuple = (), choices: Optional[tuple] = None,
            seed: bool = False, caption_help: Optional[str] = None, factory=None):
    """A conf field: ``default`` (none: the key is required), ``help`` (its meaning, unit, allowed values),
    extra ``flags`` (``('-b',)``), ``choices``, ``seed`` (one of the seed's keys: a flag of every command),
    ``caption_help`` (the help where the key is a captioning command's flag, when it differs)."""
    metadata = {'help': help, 'flags': flags, 'choices': choices, 'seed': seed, 'caption_help': caption_help}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------- nested objects

@dataclass
class CheckpointConf:
    by_epoch: bool = setting(False, help='save every `interval` epochs (true) or iterations (false)')
    interval: int = setting(5000, help='epochs or iterations between checkpoints')
    max_checkpoint_num: Optional[int] = setting(3, help='older checkpoints are deleted beyond this many (null: keep all)')


@dataclass
class Columns:
    """Which column of a data file holds each field the toolkit reads (default: Personality-Captions')."""
    style: str = setting('personality', help='the requested style (personality)')
    text: str = setting('comment', help='the human caption: the training target and first reference')
    image: str = setting('image_hash', help='image: a PCap hash (img_addr + value + file_attr), a file name with '
                                            'its suffix, or an absolute path')
    references: Optional[str] = setting('additional_comments',
                                        help='extra references of val/test rows (a list; null: none)')


# ---------------------------------------------------------------- sections

@dataclass
class ModelConf:
    model_name: str = setting(seed=True, help='ModelScope hub id (damo/ofa_image-caption_coco_distilled_en) or a '
                                              'local model dir',
                              caption_help='the base model (hub id or local dir) the captioning model was trained '
                                           'from, recorded as model_name in the output; -m picks the model that '
                                           'captions')
    tokenize_style: bool = setting(seed=True, help='true: each style is its own token in the prompt; false: the '
                                                   'style word itself')
    model_revision: Optional[str] = setting(None, seed=True, help='hub revision (v1.0.1); ignored for a local model dir',
                                            caption_help="model_name's hub revision, recorded in the output")
    prompt: Optional[str] = setting(None, seed=True, help='template with one "{}" for the style ("{{" and "}}" '
                                                          'for literal braces); empty/null: the default prompt')
    patch_image_size: Optional[int] = setting(None, help='side of the square image the model sees (null: the '
                                                         "model's own)")
    max_image_size: Optional[int] = setting(None, help="largest image side the model's position buckets allow "
                                                       "(null: the model's own)")

    @property
    def prompt_template(self) -> str:
        return self.prompt or DEFAULT_PROMPT

    @property
    def model_cfg(self) -> dict:
        """The values that replace ``model.*`` of the model's configuration.json (None: keep the model's)."""
        return {'patch_image_size': self.patch_image_size, 'max_image_size': self.max_image_size}

    @property
    def is_local(self) -> bool:
        return is_local_model(self.model_name)


@dataclass
class DataConf:
    img_addr: str = setting(seed=True, help='folder of images; image path = img_addr / (image_hash + file_attr)')
    dataset_path: str = setting(seed=True, help='folder with the train/val/test files (and personalities.txt, '
                                                'if any)')
    file_attr: str = setting(seed=True, help='image file suffix, e.g. ".jpg"')
    train_json: str = setting(seed=True, help='file name inside dataset_path: .json (PCap list), .jsonl, .csv '
                                              'or .parquet')
    val_json: str = setting(seed=True, help='file name inside dataset_path (same formats)')
    test_json: str = setting(seed=True, help='file name inside dataset_path (same formats)')
    columns: Columns = setting(factory=Columns, help='data file column of each field (default: PCap names)')
    strict: bool = setting(False, help='a bad data row (missing/unreadable image, missing field) stops the run '
                                       'instead of being skipped and counted')
    demo: bool = setting(False, help="build the offline demo's tiny model and data set if they are absent "
                                     '(finetune.py)')

    def split_path(self, split: str) -> Path:
        return Path(self.dataset_path) / getattr(self, f'{split}_json')


@dataclass
class RunConf:
    work_dir: str = setting(seed=True, help='checkpoints, output/, logs, inference and eval files go here')
    batch_size: int = setting(4, flags=('-b',), help='samples per training step, per device',
                              caption_help='captions per batch')
    num_workers: int = setting(0, flags=('-w',), help='dataloader worker processes')
    precision: str = setting('fp32', choices=PRECISIONS,
                             help='fp32, bf16 or fp16 (autocast; fp16 training adds a loss scaler)',
                             caption_help='fp32, bf16 or fp16 autocast while captioning (weights stay fp32)')
    seed: int = setting(42, help='random seed for weights of new layers, shuffling, sampling, -r picks')
    verbose: bool = setting(False, help="also show ModelScope's own console output (config dump, hook table, "
                                        'per-iteration lines); it always goes to work_dir/{time}.log')


@dataclass
class TrainConf:
    max_epochs: int = setting(3, flags=('-e', '--max_epoches'), help='epochs to train')
    lr: float = setting(5e-5, help='peak learning rate (AdamW)')
    warmup: float = setting(0.01, help='fraction of all steps spent warming the learning rate up linearly')
    weight_decay: float = setting(0.01, help='AdamW weight decay')
    label_smoothing: float = setting(0.1, help='label smoothing of the cross-entropy loss')
    log_interval: int = setting(10, help='iterations between two log lines of the loss')
    max_train_samples: Optional[int] = setting(None, help='use only the first N train rows (null: all)')
    checkpoint: CheckpointConf = setting(factory=CheckpointConf, help='CheckpointHook settings')
    image_cache: Optional[str] = setting(None, help='folder for a cache of decoded, resized train images (null: off)')
    stage: str = setting('ce', choices=STAGES,
                         help='"ce": cross-entropy on the references; "scst": self-critical training on a CIDEr-D '
                              'reward, from a CE model dir')
    accumulate: int = setting(1, help='batches whose gradients are summed before one optimizer step (effective '
                                      'batch: batch_size x accumulate x ranks); steps, not batches, drive the '
                                      'schedule, logs, checkpoints and eval_interval')
    freeze: List[str] = setting(choices=FREEZE_PARTS, factory=list,
                                help='parts kept bit-identical: ' + ', '.join(FREEZE_PARTS) + '; the style '
                                     "tokens' embedding rows stay trainable when tokenize_style is on")
    ema: Optional[float] = setting(None, help='decay of an exponential moving average of the weights, e.g. 0.999 '
                                              '(null: off); validation, output_best/ and output/ then hold the '
                                              'averaged weights')
    drop_worst_ratio: float = setting(0.0, help="fraction of each batch's worst-scoring samples left out of the "
                                                'loss (noisy captions), after drop_worst_after steps')
    drop_worst_after: int = setting(0, help='optimizer steps before drop_worst_ratio applies')
    tensorboard: bool = setting(True, help='write TensorBoard event files to work_dir/tensorboard/ (loss, '
                                           'learning rate, validation metrics, SCST reward)')


@dataclass
class ValidationConf:
    eval_interval: Optional[int] = setting(5000, help='iterations between two validations on the val split '
                                                      '(null: only at epoch ends)')
    eval_every_epoch: bool = setting(True, help='also validate at the end of every epoch')
    val_max_samples: Optional[int] = setting(None, help='validate on the first N val rows only (null: all)')
    val_spice: bool = setting(False, help='also compute SPICE at each validation (slow; needs its CoreNLP jars)')
    best_metric: str = setting('CIDEr', choices=VAL_METRICS,
                               help='metric whose best value picks work_dir/output_best (higher is better)')


@dataclass
class ScstConf:
    candidates: int = setting(5, help="captions generated per training sample; each is rewarded against the "
                                      "others' mean")
    search: str = setting('beam', choices=SCST_SEARCHES,
                          help='"beam": the beam\'s hypotheses (OFA\'s recipe); "sample": independent samples')
    temperature: float = setting(1.0, help='sampling temperature ("sample" only)')
    dropout: bool = setting(False, help="keep the model's dropout during SCST (OFA's stage 2 turns it off)")
    freeze: List[str] = setting(choices=FREEZE_PARTS, factory=lambda: ['encoder_embeddings', 'decoder_embeddings'],
                                help='parts frozen during SCST, beside `freeze` (OFA\'s stage 2: the embeddings; '
                                     'style rows stay trainable)')
    fresh_optimizer: bool = setting(True, help='a -p checkpoint of a CE run gives SCST its weights only: the '
                                               'optimizer, schedule and step count start anew (OFA\'s stage 2)')


@dataclass
class GenerationConf:
    beam_size: int = setting(5, help='beam width when captioning')
    max_len: int = setting(16, help='longest caption, in tokens, when captioning')
    no_repeat_ngram_size: int = setting(3, help='forbid repeating n-grams of this size when captioning (0: off)')
    mask_image_tokens: bool = setting(True, help="never generate OFA's <code_k> image-code and <bin_k> location "
                                                 'tokens (false: the stock search over the whole vocabulary)')


@dataclass
class Conf:
    model: ModelConf
    data: DataConf
    run: RunConf
    train: TrainConf = field(default_factory=TrainConf)
    validation: ValidationConf = field(default_factory=ValidationConf)
    scst: ScstConf = field(default_factory=ScstConf)
    generation: GenerationConf = field(default_factory=GenerationConf)

    def value(self, key: str):
        """The value of a flat key of the file (``conf.value('beam_size')`` is ``conf.generation.beam_size``)."""
        return getattr(getattr(self, KEY_SECTION[key]), key)

    def to_dict(self) -> dict:
        """The flat JSON conf (the file format), every key resolved."""
        flat: Dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if name in NESTED_SECTIONS:
                flat[name] = dataclasses.asdict(section)
            else:
                flat.update(dataclasses.asdict(section))
        return flat


SECTIONS: Dict[str, type] = {f.name: get_type_hints(Conf)[f.name] for f in dataclasses.fields(Conf)}
NESTED_SECTIONS = ('scst',)  # a section that is one object of the JSON file ("scst": {...})


def is_local_model(name: str) -> bool:
    """A model name is a local dir when it exists, or is path-like (not `owner/name`)."""
    return os.path.isdir(name) or not HUB_ID.match(name)


def section_of_key() -> Dict[str, str]:
    """Each top-level key of the JSON file -> the section that holds it."""
    keys = {}
    for name, cls in SECTIONS.items():
        if name in NESTED_SECTIONS:
            keys[name] = name
        else:
            keys.update({f.name: name for f in dataclasses.fields(cls)})
    return keys


KEY_SECTION = section_of_key()


# ------------------------------------------------------------------ reading

def _type_name(tp) -> str:
    return getattr(tp, '__name__', str(tp))


def check_type(key: str, value: Any, tp) -> Any:
    """Return value coerced to tp (int -> float only), or raise ConfError naming key."""
    origin = get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfError(f'conf key "{key}": expected a list, got {type(value).__name__} {value!r}')
        return [check_type(f'{key}[{i}]', v, get_args(tp)[0]) for i, v in enumerate(value)]
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return check_type(key, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfError(f'conf key "{key}": expected {_type_name(tp)}, got {type(value).__name__} {value!r}')
    if tp is float and not math.isfinite(value):
        raise ConfError(f'conf key "{key}" must be a finite number, got {value!r}')
    return value


def _unknown(key: str, known) -> ConfError:
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f'did you mean "{near[0]}"? ' if near else ''
    return ConfError(f'unknown conf key "{key}" ({hint}known keys: {", ".join(known)})')


def _from_dict(cls, data: dict, prefix: str = ''):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _unknown(prefix + unknown[0], [prefix + f for f in fields])
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
            kwargs[name] = check_type(key, data[name], tp)
    return cls(**kwargs)


def conf_from_dict(data: Any) -> Conf:
    """The flat JSON object of a conf file -> a Conf of sections (types checked, values not yet)."""
    if not isinstance(data, dict):
        raise ConfError(f'the conf must be a JSON object, got {type(data).__name__}')
    unknown = [k for k in data if k not in KEY_SECTION]
    if unknown:
        raise _unknown(unknown[0], list(KEY_SECTION))
    parts = {}
    for name, cls in SECTIONS.items():
        if name in NESTED_SECTIONS:
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise ConfError(f'conf key "{name}": expected an object, got {type(value).__name__}')
            parts[name] = _from_dict(cls, value, prefix=name + '.')
        else:
            parts[name] = _from_dict(cls, {k: v for k, v in data.items() if KEY_SECTION[k] == name})
    return Conf(**parts)


def read_conf(path: Union[str, Path]) -> Conf:
    """Read and type-check a conf file (no file-system checks: see validate)."""
    return conf_from_dict(read_json(path, 'conf file', ConfError))


def apply_overrides(conf: Conf, **overrides) -> Conf:
    """Replace keys with the command line's values that were given (None = not given), re-checking types.
    Keys are the JSON file's flat names (``batch_size``, ``lr``)."""
    changes: Dict[str, dict] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in KEY_SECTION or key in NESTED_SECTIONS:
            raise _unknown(key, list(KEY_SECTION))
        section = KEY_SECTION[key]
        changes.setdefault(section, {})[key] = check_type(key, value, get_type_hints(SECTIONS[section])[key])
    return dataclasses.replace(conf, **{s: dataclasses.replace(getattr(conf, s), **c) for s, c in changes.items()})
