"""The backup archive's format: one tar.gz holding one folder {model}_{time}/ with the model, the conf and a
manifest of the sha256 and size of every other file. Its members (written with fixed owners and modes), the
checks that keep an entry from being extracted (links, devices, absolute paths, ".."), the manifest's
reading and writing, and the one chunked sha256 every part of a backup hashes with.

An archive is written under a temporary name in its folder and renamed when complete, never onto an
existing file (:func:`write_archive`).
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, List, Optional, Tuple, Union

from utils.core.errors import BackupError

SUFFIX = '.tar.gz'
MODEL_DIR = 'model'
CONF_FILE = 'conf.json'
MANIFEST = 'manifest.json'
FORMAT = 'ofa-stylish-ic-backup'
FORMAT_VERSION = 1
WEIGHTS_FILES = ('pytorch_model.bin', 'pytorch_model.pt')  # what ModelScope loads from a model dir
MAX_MANIFEST_BYTES = 64 << 20
CHUNK = 1 << 20


# ---------------------------------------------------------------- hashes

class Digest:
    """The sha256 and size of the bytes fed to it: a manifest entry."""

    def __init__(self):
        self.sha, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> bytes:
        self.sha.update(data)
        self.size += len(data)
        return data

    def entry(self) -> dict:
        return {'sha256': self.sha.hexdigest(), 'size': self.size}


def hash_stream(f: BinaryIO, keep_up_to: int = 0) -> Tuple[dict, Optional[bytes]]:
    """Read the binary file f to its end, CHUNK bytes at a time: its manifest entry ``{sha256, size}``, and,
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
    """The manifest entry ``{sha256, size}`` of the file at path."""
    with open(path, 'rb') as f:
        return hash_stream(f)[0]


class _HashingReader:
    """Wraps a binary file: what tarfile reads through it is hashed and counted on the way."""

    def __init__(self, f):
        self.f, self.digest = f, Digest()

    def read(self, n=-1):
        return self.digest.update(self.f.read(n))


# ---------------------------------------------------------------- writing

@dataclass
class Entry:
    rel: str                         # path inside the top folder, "/"-separated
    source: Union[str, bytes]        # a file to copy, or the content itself


def _tarinfo(name: str, *, is_dir: bool = False, size: int = 0, mtime: Optional[float] = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.mode = 0o755 if is_dir else 0o644
    ti.size = size
    ti.mtime = int(mtime if mtime is not None else datetime.datetime.now().timestamp())
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ''
    return ti


def _add_file(tar: tarfile.TarFile, arcname: str, source: Union[str, bytes]) -> dict:
    """Add one regular file (from a path, or the bytes themselves); return its sha256 and size."""
    if isinstance(source, bytes):
        tar.addfile(_tarinfo(arcname, size=len(source)), io.BytesIO(source))
        digest = Digest()
        digest.update(source)
        return digest.entry()
    with open(source, 'rb') as f:
        st = os.fstat(f.fileno())
        reader = _HashingReader(f)
        tar.addfile(_tarinfo(arcname, size=st.st_size, mtime=st.st_mtime), reader)
    return reader.digest.entry()


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + '\n').encode('utf-8')


def _publish(tmp: str, directory: str, stem: str) -> str:
    """Give the complete temporary file its final name, {stem}.tar.gz or {stem}_N.tar.gz: never one
    that exists (a hard link fails rather than replace a file; where links are unsupported: a check,
    then a rename)."""
    n = 0
    while True:
        final = os.path.join(directory, f'{stem}{f"_{n}" if n else ""}{SUFFIX}')
        try:
            os.link(tmp, final)
        except FileExistsError:
            n += 1
            continue
        except OSError:
            if os.path.lexists(final):
                n += 1
                continue
            os.rename(tmp, final)
            return final
        os.unlink(tmp)
        return final


def write_archive(directory: str, stem: str, entries: List[Entry], manifest: dict) -> str:
    """Write {directory}/{stem}.tar.gz (or _N) holding folder {stem}/ with the entries and a manifest
    of their hashes; atomic: a temporary file in the same folder, renamed when complete."""
    fd, tmp = tempfile.mkstemp(prefix=f'{stem}{SUFFIX}.', suffix='.tmp', dir=directory)
    published = False
    try:
        with os.fdopen(fd, 'wb') as raw:
            with tarfile.open(fileobj=raw, mode='w:gz', compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
                made = set()
                for entry in entries:  # folders first, then the file
                    parts = entry.rel.split('/')[:-1]
                    for i in range(len(parts) + 1):
                        d = '/'.join([stem] + parts[:i])
                        if d not in made:
                            tar.addfile(_tarinfo(d, is_dir=True))
                            made.add(d)
                files = {}
                for entry in entries:
                    files[entry.rel] = _add_file(tar, f'{stem}/{entry.rel}', entry.source)
                _add_file(tar, f'{stem}/{MANIFEST}', manifest_bytes(dict(manifest, files=files)))
            raw.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        final = _publish(tmp, directory, stem)
        published = True
    finally:
        if not published:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return final


# ---------------------------------------------------------------- reading

def member_problem(member: tarfile.TarInfo) -> Optional[str]:
    """Why a member must not be extracted, or None. Links, devices, absolute paths and ".." are
    refused outright; the rest goes through tarfile's "data" filter as well."""
    if member.issym():
        return f'a symbolic link (to {member.linkname})'
    if member.islnk():
        return f'a hard link (to {member.linkname})'
    if not (member.isreg() or member.isdir()):
        return 'a device, FIFO or other special file'
    name = member.name
    if name.startswith(('/', '\\')) or os.path.isabs(name) or re.match(r'^[A-Za-z]:', name):
        return 'an absolute path'
    if '..' in re.split(r'[\\/]', name):
        return 'a path with ".."'
    try:
        tarfile.data_filter(member, os.path.abspath(os.sep + 'restore-check'))
    except tarfile.FilterError as e:
        return f'refused by tarfile\'s data filter ({e})'
    return None


def strict_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, and no links or special files at all."""
    problem = member_problem(member)
    if problem:
        raise BackupError(f'entry {member.name!r} is {problem}')
    return tarfile.data_filter(member, path)


def name_parts(name: str) -> List[str]:
    return [p for p in name.split('/') if p not in ('', '.')]


def read_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackupError(f'{where} is not valid JSON: {e}') from None
    files = manifest.get('files') if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get('sha256'), str)
                                              for v in files.values()):
        raise BackupError(f'{where} is not a backup manifest (no "files" with sha256 hashes)')
    return manifest
