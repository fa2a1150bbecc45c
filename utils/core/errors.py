"""The toolkit's error family: one base, :class:`BadInput` (exit code 2), and a subclass per thing that can be
bad, each worded for the user (names the conf key, file, row, checkpoint or style at fault).

An ``OSError`` (a full disk, a permission) is not bad input: the harness (:mod:`utils.core.cli`) reports it
as a failure (exit 1); :func:`raise_system_failure` keeps a library's wrapped one from being reported as bad input.
"""
from __future__ import annotations

import difflib
import errno
from typing import Iterable


class BadInput(Exception):
    """Bad input, worded for the user: exit code 2."""


class ConfError(BadInput, ValueError):
    """A conf key or conf file: names the key (or file) at fault."""


class UsageError(BadInput, ValueError):
    """A command-line flag that is not a conf key (``-n``, ``--port``, ``-j``, ``-o``): names the flag."""


class DataError(BadInput, ValueError):
    """A data file or row: names the file (and row)."""


class UnknownStyleError(BadInput, KeyError):
    """A style the model was not trained with; names the nearest known ones."""

    def __init__(self, style: str, known: Iterable[str], where: str = ''):
        known = list(known)
        near = difflib.get_close_matches(style, known, n=3, cutoff=0.5)
        hint = f'; nearest known: {", ".join(repr(s) for s in near)}' if near else ''
        prefix = f'{where}: ' if where else ''
        super().__init__(f'{prefix}unknown style {style!r} (the model was trained with {len(known)} styles{hint})')
        self.style = style
        self.nearest = near

    def __str__(self):
        return self.args[0]


class CheckpointError(BadInput, ValueError):
    """A checkpoint given with ``-p`` / ``--checkpoint`` (missing, incomplete, unreadable, not fitting the model,
    or trained on other styles)."""


class ModelDirError(BadInput, ValueError):
    """A model dir (``-m``, ``work_dir/output``) that is missing, not a ModelScope model dir, or not one this
    toolkit trained (no ``style_map.json``). The conf key ``model_name`` is a :class:`ConfError`."""


class WorkDirInUse(BadInput):
    """Another training run holds the work_dir's lock."""


class ResultFileError(BadInput, ValueError):
    """A result file (inference or eval JSON) given to the metrics command."""


class BackupError(BadInput):
    """A backup archive or its destination (the backup command's own bad input)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ('' when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ''


# a failed system call that says nothing about the user's input: the machine's or the file system's state
SYSTEM_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def raise_system_failure(e: BaseException) -> None:
    """Raise the OSError of a failed system call (a full disk, a quota, a read-only or failing device) that
    ``e`` is, or was raised from, however a library wrapped it: a failure (exit 1), never bad input. Called
    first in an ``except Exception`` that turns a library's errors into bad input."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in SYSTEM_FAILURES:
            raise e
        e = e.__cause__ or e.__context__
