"""The backup archive's format: one tar.gz holding one folder {model}_{time}/ with the model, the conf and a
manifest of the sha256 and size of every other file. Its members (written with fixed owners and modes), the
checks that keep an entry from being extracted (links, devices, absolute paths, ".."), the manifest's
reading and writing; every part of a backup hashes with the toolkit's one chunked sha256 (utils/core/checksums.py).

An archive is written under a temporary name in its folder and renamed when complete, never onto an
existing file (:func:`write_archive`).
"""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Union

from utils.core.checksums import CHUNK, Digest, hash_file, hash_stream  # noqa: F401 - the backup's hashes
from utils.core.errors import BackupError
from utils.core.io import sweep_stale, writer_tag
from utils.core.layout import WEIGHTS_FILES  # noqa: F401 - what ModelScope loads from a model dir

SUFFIX = '.tar.gz'
MODEL_DIR = 'model'
CONF_FILE = 'conf.json'
MANIFEST = 'manifest.json'
FORMAT = 'ofa-stylish-ic-backup'
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20


# ---------------------------------------------------------------- hashes
# Digest, hash_stream, hash_file: the toolkit's one chunked sha256 (utils/core/checksums.py), shared with the
# checksums of checkpoints and model dirs.


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


ARCHIVE_TEMPORARY = r'.+\.tar\.gz\..+\.tmp'  # {stem}.tar.gz.@{host}-{pid}.XXXX.tmp (older ones: no @tag)


def sweep_stale_archives(directory: str):
    """Remove the temporaries of backups into ``directory`` that were interrupted (a kill, a power cut): those whose
    writer is gone or that were not written to for an hour (utils.core.io.sweep_stale); a running backup's stays."""
    return sweep_stale(directory, ARCHIVE_TEMPORARY, 'backup temporaries')


def write_archive(directory: str, stem: str, entries: List[Entry], manifest: dict) -> str:
    """Write {directory}/{stem}.tar.gz (or _N) holding folder {stem}/ with the entries and a manifest
    of their hashes; atomic: a temporary file in the same folder, renamed when complete."""
    sweep_stale_archives(directory)
    fd, tmp = tempfile.mkstemp(prefix=f'{stem}{SUFFIX}.{writer_tag()}.', suffix='.tmp', dir=directory)
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
