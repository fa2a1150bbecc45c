"""File I/O every layer shares: time-stamped names that never overwrite, atomic writes, JSON reads whose
errors name the file."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import List

from utils.core.errors import BadInput

logger = logging.getLogger(__name__)
STALE_AFTER_S = 3600  # a temporary of a writer not known to be gone is stale once unmodified this long


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


# ---------------------------------------------------------------- temporaries of writers that may have died

def writer_tag() -> str:
    """``@{host}-{pid}`` of this process, for the name of a temporary that an unlocked writer (a backup's archive,
    a restore's staging folder) leaves in a folder others may write to: :func:`sweep_stale` tells from it whether
    its writer is gone."""
    return f'@{re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname()) or "host"}-{os.getpid()}'


def _writer_gone(name: str) -> bool:
    """True when the name's writer tag is this machine's and its pid is not running."""
    tags = re.findall(r'@([A-Za-z0-9_]+)-(\d+)\.', name)
    if not tags or '@' + tags[-1][0] != writer_tag().rsplit('-', 1)[0]:
        return False  # no tag, or another machine's: only the age tells
    try:
        os.kill(int(tags[-1][1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        pass
    return False


def remove_path(path: str) -> bool:
    """Remove a file, link or folder tree; True when it is gone (False: it could not be removed)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        return False
    return True


def sweep_stale(directory: str, pattern: str, what: str) -> List[str]:
    """Remove the entries of ``directory`` whose name matches the regex ``pattern`` (temporaries of an interrupted
    write) and that are stale: their writer's pid (in a :func:`writer_tag` in the name) is not running on this
    machine, or they were not modified for ``STALE_AFTER_S`` (an hour: a writer streams into its temporary, so
    a live one keeps it fresh). Logs and returns what it removed."""
    removed = []
    with contextlib.suppress(OSError):
        names = os.listdir(directory)
        for name in sorted(names):
            if not re.fullmatch(pattern, name):
                continue
            path = os.path.join(directory, name)
            try:
                age = time.time() - os.lstat(path).st_mtime
            except OSError:
                continue
            if not (_writer_gone(name) or age > STALE_AFTER_S):
                continue
            if remove_path(path):
                removed.append(name)
    if removed:
        logger.info('removed %d stale %s left by an interrupted run in %s: %s', len(removed), what, directory,
                    ', '.join(removed))
    return removed
