"""Command-line flags made from the conf's fields: one flag per scalar key of the sections a command reads
(``--lr``, ``--batch_size``/``-b``), typed from the field, its help the field's ``metadata['help']`` and its
default shown from the field (the flag's own default is None: not given = keep the conf file's value)."""
from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Optional, Union, get_args, get_origin, get_type_hints

from utils.core.conf import NESTED_SECTIONS, SECTIONS

COMMAND_SECTIONS = {  # the sections whose keys are flags of each command
    'train': ('model', 'data', 'run', 'train', 'validation', 'generation'),
    'eval': ('model', 'data', 'run', 'generation'),
    'caption': ('model', 'data', 'run', 'generation'),   # pre_inference.py, web_demo.py
    'backup': (),                                        # the seed's keys only
}
CAPTIONING = ('eval', 'caption')
TITLES = {'model': 'the model and the prompt', 'data': 'data', 'run': 'running', 'train': 'training',
          'validation': 'validation and the best model', 'generation': 'generation'}


@dataclasses.dataclass(frozen=True)
class Flag:
    section: str
    name: str
    type: type          # the value's type (Optional unwrapped)
    help: str
    flags: tuple        # extra names, e.g. ('-b',)
    choices: Optional[tuple]
    seed: bool
    caption_help: Optional[str]
    default: object     # dataclasses.MISSING: required in the conf file


@functools.lru_cache(maxsize=None)
def conf_flags() -> tuple:
    """Every scalar key of every section (nested objects such as ``columns`` and ``scst`` are the file's)."""
    found = []
    for section, cls in SECTIONS.items():
        if section in NESTED_SECTIONS:
            continue
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            base = next(a for a in get_args(tp) if a is not type(None)) if get_origin(tp) is Union else tp
            found.append(Flag(section, f.name, base, f.metadata['help'], f.metadata['flags'], f.metadata['choices'],
                              f.metadata['seed'], f.metadata['caption_help'],
                              f.default if f.default_factory is dataclasses.MISSING else f.default_factory()))
    return tuple(found)


def _shown_default(flag: Flag) -> str:
    if flag.default is dataclasses.MISSING:
        return 'required in the conf'
    if flag.default is None:
        return 'default: null'
    if isinstance(flag.default, bool):
        return f'default: {str(flag.default).lower()}'
    return f'default: {flag.default!r}' if isinstance(flag.default, str) else f'default: {flag.default}'


def add_conf_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per conf key of the command's sections (and the seed's keys for every command)."""
    wanted = COMMAND_SECTIONS[command]
    groups = {}
    for flag in conf_flags():
        if flag.section not in wanted and not flag.seed:
            continue
        group = groups.get(flag.section) or groups.setdefault(flag.section, parser.add_argument_group(
            f'conf keys ({TITLES[flag.section]}); a flag overrides the conf file'))
        text = flag.caption_help if command in CAPTIONING and flag.caption_help else flag.help
        kwargs = {'dest': flag.name, 'default': None,
                  'help': f'{text} ({_shown_default(flag)})'.replace('%', '%%')}
        if flag.type is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif get_origin(flag.type) is list:  # --freeze encoder_embeddings decoder_embeddings (none given: [])
            kwargs.update(nargs='*', type=get_args(flag.type)[0], metavar='PART' if flag.choices else 'TEXT',
                          choices=flag.choices)
        else:
            metavar = None if flag.choices else {int: 'N', float: 'X'}.get(flag.type, 'TEXT')
            kwargs.update(type=flag.type, metavar=metavar, choices=flag.choices)
        group.add_argument(*flag.flags, f'--{flag.name}', **kwargs)


def conf_overrides(args: argparse.Namespace) -> dict:
    """The conf keys given on a command line built with add_conf_flags (not given: left out)."""
    names = {flag.name for flag in conf_flags()}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
