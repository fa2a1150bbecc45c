"""File I/O every layer shares: time-stamped names that never overwrite, atomic writes, JSON reads whose
errors name the file."""
from __future__ import annotations

import contextlib
import json
import os
import time

from utils.core.errors import BadInput


def timestamp() -> str:
    return time.strftime('%Y%m%d_%H%M%S')


def unique_path(directory: str, prefix: str, stamp: str, ext: str = '.json') -> str:
    """{directory}/{prefix}_{stamp}{ext}, with _1, _2, ... added if that name is taken: never overwrite."""
    path = os.path.join(directory, f'{prefix}_{stamp}{ext}')
    n = 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f'{prefix}_{stamp}_{n}{ext}')
    return path


def write_text_atomic(path: str, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers never see half a file, and a failed
    write leaves neither the file nor its temporary."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w', encoding='utf-8', newline='') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + '\n')


def read_json(path, what: str, error=BadInput):
    """The parsed JSON file ``path``, or ``error`` naming it as ``what`` (e.g. "train file", "-j file")."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f'{what} {path} does not exist') from None
    except json.JSONDecodeError as e:
        raise error(f'{what} {path} is not valid JSON: {e}') from None
    except UnicodeDecodeError:
        raise error(f'{what} {path} is not valid UTF-8 text') from None
    except IsADirectoryError:
        raise error(f'{what} {path} is a folder, not a file') from None
