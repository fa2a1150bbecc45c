"""The one chunked sha256 of the toolkit (backups, checkpoints and model dirs hash with it), and the checksum files
that say what a checkpoint or a model dir held when it was written.

A checksum file is in ``sha256sum``'s format, one ``<hex>  <name>`` line per file of its folder, so
``sha256sum -c`` checks it too:

* ``work_dir/iter_N.sha256`` (``epoch_N.sha256``): both files of checkpoint ``iter_N`` (``iter_N.pth``,
  ``iter_N_trainer_state.pth``), written before ``iter_N.pth`` gets its name: every complete checkpoint the
  toolkit wrote has one.
* ``weights.sha256`` in a model dir (``output/``, ``output_best/``, a backup's ``model/``): its weights file.
  While ``output/``'s weights are being replaced it lists two hashes for the file, the old and the new, so a kill
  between the two renames leaves a dir that still verifies.

A file that does not match is damaged (changed after it was written). A checkpoint or model dir without a
checksum file (written by an older toolkit, a hub model, a dir of your own) is accepted, unverified, with one
log line saying so.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import BinaryIO, Dict, Iterable, List, Optional, Set, Tuple

from utils.core.errors import ModelDirError
from utils.core.io import write_text_atomic
from utils.core.layout import CHECKPOINT_CHECKSUM_SUFFIX, WEIGHTS_CHECKSUM_FILE, WEIGHTS_FILES

logger = logging.getLogger(__name__)
CHUNK = 1 << 20
_LINE = re.compile(r'^([0-9a-fA-F]{64}) [ *]([^/\\]+)$')


# ---------------------------------------------------------------- hashes

class Digest:
    """The sha256 and size of the bytes fed to it: a backup manifest entry."""

    def __init__(self):
        self.sha, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> bytes:
        self.sha.update(data)
        self.size += len(data)
        return data

    def entry(self) -> dict:
        return {'sha256': self.sha.hexdigest(), 'size': self.size}


def hash_stream(f: BinaryIO, keep_up_to: int = 0) -> Tuple[dict, Optional[bytes]]:
    """Read the binary file f to its end, CHUNK bytes at a time: its entry ``{sha256, size}``, and,
    with ``keep_up_to``, its content when it is at most that many bytes long (else None)."""
    digest, kept = Digest(), []
    while True:
        data = f.read(CHUNK)
        if not data:
            break
        digest.update(data)
        if digest.size <= keep_up_to:
            kept.append(data)
    return digest.entry(), (b''.join(kept) if keep_up_to and digest.size <= keep_up_to else None)


def hash_file(path: str) -> dict:
    """The entry ``{sha256, size}`` of the file at path (one chunked pass)."""
    with open(path, 'rb') as f:
        return hash_stream(f)[0]


def sha256_of(path: str) -> str:
    return hash_file(path)['sha256']


def copy_hashed(src: str, dst: str) -> str:
    """Copy src to dst (a new file of its own, never a link), hashing the bytes written on the way: their sha256."""
    digest = Digest()
    with open(src, 'rb') as fin, open(dst, 'wb') as fout:
        while True:
            data = fin.read(CHUNK)
            if not data:
                break
            fout.write(digest.update(data))
    return digest.sha.hexdigest()


# ---------------------------------------------------------------- checksum files

def format_sums(entries: Iterable[Tuple[str, str]]) -> str:
    """``sha256sum`` lines for (sha256, file name) pairs."""
    return ''.join(f'{sha}  {name}\n' for sha, name in entries)


def write_sums(path: str, entries: Iterable[Tuple[str, str]]) -> None:
    write_text_atomic(path, format_sums(entries))


def read_sums(path: str) -> Dict[str, Set[str]]:
    """file name -> the sha256 values it may have; ValueError when the file is not a sha256 list."""
    sums: Dict[str, Set[str]] = {}
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = [line.rstrip('\r\n') for line in f if line.strip()]
    for line in lines:
        m = _LINE.match(line)
        if not m:
            raise ValueError(f'{path} is not a sha256 list (line {line[:60]!r})')
        sums.setdefault(m[2], set()).add(m[1].lower())
    if not sums:
        raise ValueError(f'{path} lists no file')
    return sums


def sums_problem(path: str, required: Iterable[str] = ()) -> Optional[str]:
    """None if every file the checksum file ``path`` lists (and each of ``required``) is in its folder and has
    its listed sha256, else what is wrong (naming the file)."""
    folder = os.path.dirname(path)
    try:
        sums = read_sums(path)
    except (OSError, ValueError) as e:
        return str(e)
    for name in required:
        if name not in sums:
            return f'{os.path.basename(path)} does not list {name}'
    for name, accepted in sorted(sums.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f'{name} is missing (listed in {os.path.basename(path)})'
        if sha256_of(file) not in accepted:
            return (f'{name} does not match its checksum in {os.path.basename(path)}: the file was changed or '
                    'damaged after it was written')
    return None


# ---------------------------------------------------------------- checkpoints

def checkpoint_sums_file(prefix: str) -> str:
    """work_dir/iter_N -> work_dir/iter_N.sha256."""
    return prefix + CHECKPOINT_CHECKSUM_SUFFIX


def checkpoint_problem(prefix: str, trainer_state_suffix: str = '_trainer_state.pth') -> Optional[str]:
    """None if checkpoint ``prefix`` (work_dir/iter_N) matches its iter_N.sha256, or has none (then one log line
    says it is unverified); else what is damaged."""
    path = checkpoint_sums_file(prefix)
    if not os.path.exists(path):
        logger.info('checkpoint %s has no %s (written by an older version): its files are not verified', prefix,
                    os.path.basename(path))
        return None
    base = os.path.basename(prefix)
    return sums_problem(path, required=(base + '.pth', base + trainer_state_suffix))


# ---------------------------------------------------------------- model dirs

def weights_file_of(model_dir: str) -> Optional[str]:
    """The weights file ModelScope loads from model_dir (pytorch_model.bin or .pt), None if it has none."""
    return next((os.path.join(model_dir, w) for w in WEIGHTS_FILES if os.path.isfile(os.path.join(model_dir, w))),
                None)


def write_weights_checksum(model_dir: str, sha: Optional[str] = None) -> None:
    """Write model_dir's weights.sha256 for its weights file (``sha``: already computed from the bytes written)."""
    weights = weights_file_of(model_dir)
    if weights is None:
        raise FileNotFoundError(f'{model_dir} has no {WEIGHTS_FILES[0]}')
    write_sums(os.path.join(model_dir, WEIGHTS_CHECKSUM_FILE), [(sha or sha256_of(weights), os.path.basename(weights))])


_verified: Dict[str, tuple] = {}  # model dir -> the stat of its weights and checksum file when they last verified


def _signature(*paths: str) -> tuple:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def model_dir_problem(model_dir: str) -> Optional[str]:
    """None if model_dir's weights match its weights.sha256, or it has none (one log line says it is unverified);
    else what is damaged. A dir verified before in this process is not hashed again while its files are unchanged."""
    sums = os.path.join(model_dir, WEIGHTS_CHECKSUM_FILE)
    if not os.path.exists(sums):
        logger.info('model dir %s has no %s: its weights are not verified', model_dir, WEIGHTS_CHECKSUM_FILE)
        return None
    weights = weights_file_of(model_dir)
    if weights is None:
        return f'it has no {WEIGHTS_FILES[0]}'
    key = os.path.realpath(model_dir)
    try:
        signature = _signature(weights, sums)
    except OSError:
        signature = None
    if signature is not None and _verified.get(key) == signature:
        return None
    problem = sums_problem(sums, required=(os.path.basename(weights),))
    if problem is None and signature is not None:
        _verified[key] = signature
    return problem


def check_model_dir(model_dir: str) -> None:
    """Refuse a model dir whose weights do not match their checksum (:class:`ModelDirError`, exit 2)."""
    problem = model_dir_problem(model_dir)
    if problem is not None:
        raise ModelDirError(f'model dir {model_dir} is damaged: {problem}; use another model dir (output_best/, a '
                            'backup) or export a checkpoint with python3 -m utils.backup_model --checkpoint')


def replacement_entries(model_dir: str, new_sha: str, name: str) -> List[Tuple[str, str]]:
    """The entries of model_dir's weights.sha256 while its weights file ``name`` is replaced by one of sha256
    ``new_sha``: the new hash and the one(s) listed now, so that the dir verifies before and after the rename."""
    entries = [(new_sha, name)]
    try:
        entries += [(sha, name) for sha in sorted(read_sums(os.path.join(model_dir, WEIGHTS_CHECKSUM_FILE)).get(name, ()))
                    if sha != new_sha]
    except (OSError, ValueError):
        pass
    return entries
