"""Styles (personalities) and the style -> prompt map that travels with a trained model.

With ``tokenize_style`` each style is written into the prompt as its own token. We reuse OFA's
``<code_k>`` image-code tokens, as the original project did: they already sit in every OFA vocabulary
and embedding matrix (the preprocessor adds 8192 of them) and a captioning model never generates
them, so no embedding resize is needed and a stock ModelScope model dir stays loadable. Without
``tokenize_style`` the style word itself goes into the prompt.

The map is saved as ``style_map.json`` in the trained model dir and reloaded from there at inference.
Styles match exactly: no case folding or trimming on one side only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from utils.core.errors import UnknownStyleError
from utils.core.layout import STYLE_MAP_FILE

CODE_TOKEN = re.compile(r'<code_(\d+)>')
MAX_STYLE_TOKENS = 8192


@dataclass
class StyleMap:
    tokenize_style: bool
    prompt: str                     # template with one "{}"
    tokens: Dict[str, str]          # style -> what goes into the prompt

    @classmethod
    def build(cls, styles: List[str], tokenize_style: bool, prompt: str) -> 'StyleMap':
        if len(set(styles)) != len(styles):
            raise ValueError('duplicate styles in the style list')
        if tokenize_style and len(styles) > MAX_STYLE_TOKENS:
            raise ValueError(f'{len(styles)} styles, more than the {MAX_STYLE_TOKENS} <code_k> tokens')
        tokens = {s: (f'<code_{i}>' if tokenize_style else s) for i, s in enumerate(styles)}
        return cls(tokenize_style=tokenize_style, prompt=prompt, tokens=tokens)

    def extended(self, styles: Iterable[str]) -> 'StyleMap':
        """This map plus the styles it lacks, in the given order, after its own tokens: a style it has
        keeps its token, no token is renumbered."""
        tokens = dict(self.tokens)
        new = [s for s in dict.fromkeys(styles) if s not in tokens]
        if self.tokenize_style:
            used = [int(m.group(1)) for m in map(CODE_TOKEN.fullmatch, tokens.values()) if m]
            start = max(used, default=-1) + 1
            if start + len(new) > MAX_STYLE_TOKENS:
                raise ValueError(f'{start + len(new)} styles, more than the {MAX_STYLE_TOKENS} <code_k> tokens')
            tokens.update({s: f'<code_{start + i}>' for i, s in enumerate(new)})
        else:
            tokens.update({s: s for s in new})
        return StyleMap(tokenize_style=self.tokenize_style, prompt=self.prompt, tokens=tokens)

    @property
    def styles(self) -> List[str]:
        return list(self.tokens)

    def check(self, style: str, where: str = '') -> None:
        if style not in self.tokens:
            raise UnknownStyleError(style, self.tokens, where=where)

    def prompt_for(self, style: str) -> str:
        self.check(style)
        return self.prompt.format(self.tokens[style])

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {'tokenize_style': self.tokenize_style, 'prompt': self.prompt, 'tokens': self.tokens}

    def save(self, model_dir) -> Path:
        path = Path(model_dir) / STYLE_MAP_FILE
        tmp = path.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding='utf-8')
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, model_dir) -> 'StyleMap':
        path = Path(model_dir) / STYLE_MAP_FILE
        if not path.is_file():
            raise FileNotFoundError(f'{path} not found: {model_dir} is not a model trained by this toolkit '
                                    '(no style map)')
        data = json.loads(path.read_text(encoding='utf-8'))
        return cls(tokenize_style=bool(data['tokenize_style']), prompt=data['prompt'], tokens=dict(data['tokens']))


def training_style_map(styles: List[str], tokenize_style: bool, prompt: Optional[str], default_prompt: str,
                       model_dir: Optional[str] = None) -> 'StyleMap':
    """The style map a training run uses. A model dir this toolkit trained (it carries ``style_map.json``)
    keeps its map: its styles keep their tokens and styles it lacks are appended after them. Its
    ``tokenize_style`` and prompt must not change (each token would silently change meaning): a conf that
    asks otherwise is an error (ConfError) naming the key. ``prompt`` empty/None: the model's own."""
    from utils.core.errors import ConfError

    if model_dir is None or not (Path(model_dir) / STYLE_MAP_FILE).is_file():
        return StyleMap.build(styles, tokenize_style, prompt or default_prompt)
    base = StyleMap.load(model_dir)
    where = f'model_name {model_dir} was trained with'
    if tokenize_style != base.tokenize_style:
        raise ConfError(f'conf key "tokenize_style" is {str(tokenize_style).lower()}, but {where} '
                        f'tokenize_style {str(base.tokenize_style).lower()} ({STYLE_MAP_FILE}); use the same')
    if prompt and prompt != base.prompt:
        raise ConfError(f'conf key "prompt" is {prompt!r}, but {where} {base.prompt!r} ({STYLE_MAP_FILE}); '
                        'leave "prompt" empty to keep it')
    return base.extended(styles)
