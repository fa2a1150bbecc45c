"""Reading a backup: one streaming pass that hashes every entry and notes the unsafe ones (:func:`scan_archive`),
``--verify`` (every file against the manifest) and ``--restore`` (extract to DIR/{model}_{time}/ only when the
archive is safe and matches its manifest, then check the extracted files again)."""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from utils.backup.archive import (MANIFEST, MAX_MANIFEST_BYTES, MODEL_DIR, hash_file, hash_stream, member_problem,
                                  name_parts, read_manifest, strict_filter)
from utils.core.errors import BackupError, raise_system_failure
from utils.core.io import sweep_stale, writer_tag

logger = logging.getLogger(__name__)

EXIT_DIFFERS = 1
RESTORE_STAGING = r'\..+\.@[A-Za-z0-9_]+-\d+\..+\.partial'  # .{top}.@{host}-{pid}.XXXX.partial in the restore folder


@dataclass
class Scan:
    """What one pass over an archive found."""
    top: str                                   # the folder holding manifest.json
    manifest: dict
    files: Dict[str, dict] = field(default_factory=dict)   # rel inside top -> {sha256, size}
    outside: List[str] = field(default_factory=list)       # entries not under top/
    unsafe: List[Tuple[str, str]] = field(default_factory=list)  # (entry, why)
    bad_fields: List[Tuple[str, str]] = field(default_factory=list)  # (manifest field, why): paths out of top/


def _plain(value) -> str:
    """A manifest value as printed: no control characters (a crafted manifest writes nothing to the terminal)."""
    return re.sub(r'[\x00-\x1f\x7f]', '?', str(value))


def field_problems(manifest: dict) -> List[Tuple[str, str]]:
    """(field, why) for each path field of the manifest that does not name a file of the archive's top folder:
    ``model_dir`` must be a relative folder holding files of the manifest, ``conf`` (null: no conf) one of its
    files. Restore prints these paths (users pass the model dir to ``-m``), so none may point outside the target."""
    files = manifest['files']
    problems = []
    for key, default in (('model_dir', MODEL_DIR), ('conf', None)):
        value = manifest.get(key, default)
        if value is None and key == 'conf':
            continue
        if not isinstance(value, str) or not value:
            problems.append((key, f'{_plain(value)!r} is not a path'))
        elif value.startswith(('/', '\\')) or os.path.isabs(value) or re.match(r'^[A-Za-z]:', value):
            problems.append((key, f'{_plain(value)!r} is an absolute path'))
        elif any(p in ('..', '.', '') for p in re.split(r'[\\/]', value.rstrip('/'))):
            problems.append((key, f'{_plain(value)!r} is not a plain path inside the archive (".", ".." or "//")'))
        elif key == 'conf' and value not in files:
            problems.append((key, f'{_plain(value)!r} is not a file of the manifest'))
        elif key == 'model_dir' and not any(rel.startswith(value.rstrip('/') + '/') for rel in files):
            problems.append((key, f'{_plain(value)!r} is not a folder of the manifest\'s files'))
    return problems


def scan_archive(archive: str) -> Scan:
    """Read the archive once, in a stream: hash every file, note unsafe entries, load the manifest.
    BackupError when it cannot be read or is no backup."""
    if not os.path.isfile(archive):
        raise BackupError(f'archive {archive} does not exist or is not a file')
    found: Dict[str, dict] = {}  # entry name (normalised) -> hash
    unsafe, manifests = [], {}
    try:
        with tarfile.open(archive, 'r|*') as tar:
            for m in tar:
                problem = member_problem(m)
                if problem:
                    unsafe.append((m.name, problem))
                    continue
                parts = name_parts(m.name)
                if m.isdir() or not parts:
                    continue
                name = '/'.join(parts)
                if name in found:
                    unsafe.append((m.name, 'a second entry of the same name'))
                    continue
                is_manifest = len(parts) == 2 and parts[1] == MANIFEST
                found[name], content = hash_stream(tar.extractfile(m), MAX_MANIFEST_BYTES if is_manifest else 0)
                if is_manifest:
                    if content is None:
                        raise BackupError(f'archive {archive}: {name} is too large to be a manifest')
                    manifests[parts[0]] = content
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # OSError: gzip's BadGzipFile
        raise_system_failure(e)  # a failing disk is not a corrupt archive
        raise BackupError(f'archive {archive} is unreadable or corrupt: {e}') from None
    if not manifests:
        if unsafe:
            raise BackupError(f'archive {archive}: entry {unsafe[0][0]!r} is {unsafe[0][1]} (and there is no '
                              f'{MANIFEST}: not a backup made by utils.backup_model)')
        raise BackupError(f'archive {archive} has no {{folder}}/{MANIFEST}: not a backup made by utils.backup_model')
    if len(manifests) > 1:
        raise BackupError(f'archive {archive} has {len(manifests)} top folders with a {MANIFEST} '
                          f'({", ".join(sorted(manifests))}): not a backup made by utils.backup_model')
    top, data = next(iter(manifests.items()))
    scan = Scan(top=top, manifest=read_manifest(data, f'{archive}: {top}/{MANIFEST}'), unsafe=unsafe)
    scan.bad_fields = field_problems(scan.manifest)
    for name, h in found.items():
        if name.startswith(top + '/'):
            scan.files[name[len(top) + 1:]] = h
        else:
            scan.outside.append(name)
    return scan


def differences(manifest: dict, files: Dict[str, dict]) -> List[Tuple[str, str]]:
    """(kind, file) for every file missing, changed or extra with respect to the manifest."""
    expected = manifest['files']
    diffs = []
    for rel in sorted(expected):
        if rel not in files:
            diffs.append(('missing', rel))
        elif files[rel]['sha256'] != expected[rel]['sha256']:
            diffs.append(('changed', rel))
        elif files[rel]['size'] != expected[rel].get('size'):  # a manifest without sizes differs too
            diffs.append(('changed', f'{rel} (size {files[rel]["size"]}, the manifest says '
                                     f'{_plain(expected[rel].get("size"))})'))
    diffs += [('extra', rel) for rel in sorted(files) if rel not in expected and rel != MANIFEST]
    return diffs


def _report(archive: str, scan: Scan, diffs: List[Tuple[str, str]]) -> int:
    """Print the problems found, one a line; the exit code."""
    problems = [f'{kind}: {scan.top}/{rel}' for kind, rel in diffs]
    problems += [f'extra: {name} (outside {scan.top}/)' for name in sorted(scan.outside)]
    problems += [f'unsafe: {name} is {why}' for name, why in scan.unsafe]
    problems += [f'unsafe: {scan.top}/{MANIFEST} field {key}: {why}' for key, why in scan.bad_fields]
    if not problems:
        return 0
    for line in problems:
        print(line)
    kinds = {}
    for line in problems:
        kinds[line.split(':')[0]] = kinds.get(line.split(':')[0], 0) + 1
    print(f'error: archive {archive} differs from its manifest: '
          + ', '.join(f'{n} {k}' for k, n in kinds.items()) + f' (first: {problems[0]})', file=sys.stderr)
    return EXIT_DIFFERS


def verify(archive: str) -> int:
    scan = scan_archive(archive)
    code = _report(archive, scan, differences(scan.manifest, scan.files))
    if code == 0:
        m = scan.manifest
        print(f'ok: {archive}: {len(m["files"])} files match the manifest (model {_plain(m.get("model_name"))}, '
              f'checkpoint {_plain(m.get("checkpoint") or "output")}, created {_plain(m.get("created"))})')
    return code


def _tree_hashes(directory: str) -> Tuple[Dict[str, dict], List[str]]:
    """rel path -> hash of every regular file under directory; and anything else found there."""
    files, other = {}, []
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, '/')
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)):
                other.append(rel)
            elif name in names:
                files[rel] = hash_file(path)
    return files, other


def restore(archive: str, dest: str) -> Tuple[int, Optional[str]]:
    """Extract archive into dest/{top}/ after checking it, check the extracted files; (exit code,
    model dir). Nothing is written unless the archive is safe and matches its manifest."""
    scan = scan_archive(archive)
    if scan.unsafe:
        name, why = scan.unsafe[0]
        raise BackupError(f'archive {archive}: refusing to restore: entry {name!r} is {why}')
    if scan.bad_fields:
        key, why = scan.bad_fields[0]
        raise BackupError(f'archive {archive}: refusing to restore: {scan.top}/{MANIFEST} field {key}: {why}')
    code = _report(archive, scan, differences(scan.manifest, scan.files))
    if code:
        return code, None
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise BackupError(f'restore folder {dest} exists and is not a folder')
    target = os.path.join(dest, scan.top)
    if os.path.lexists(target):
        raise BackupError(f'{target} already exists: restore into another folder or remove it first')
    model_rel = scan.manifest.get('model_dir') or MODEL_DIR
    os.makedirs(dest, exist_ok=True)
    sweep_stale(dest, RESTORE_STAGING, 'restore staging folders')  # of restores killed before they finished
    staging = tempfile.mkdtemp(prefix=f'.{scan.top}.{writer_tag()}.', suffix='.partial', dir=dest)
    try:
        try:
            with tarfile.open(archive, 'r|*') as tar:
                tar.extractall(staging, filter=strict_filter)
        except BackupError as e:
            raise BackupError(f'archive {archive}: refusing to restore: {e}') from None
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise BackupError(f'archive {archive} is unreadable or corrupt: {e}') from None
        extracted = os.path.join(staging, scan.top)
        files, other = _tree_hashes(extracted)
        stray = sorted(set(os.listdir(staging)) - {scan.top})
        diffs = differences(scan.manifest, files) + [('extra', rel) for rel in other]
        if diffs or stray:
            scan = Scan(top=scan.top, manifest=scan.manifest, outside=stray)
            return _report(archive, scan, diffs) or EXIT_DIFFERS, None
        if os.path.lexists(target):
            raise BackupError(f'{target} already exists: restore into another folder or remove it first')
        os.rename(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    model_dir = os.path.join(target, model_rel)
    conf = os.path.join(target, scan.manifest['conf']) if scan.manifest.get('conf') else None
    for path in filter(None, (model_dir, conf)):  # checked above; the paths printed are inside the target
        if os.path.commonpath([os.path.realpath(path), os.path.realpath(target)]) != os.path.realpath(target):
            raise BackupError(f'archive {archive}: {path} is outside {target}')
    logger.info('restored %s to %s', archive, target)
    print(f'restored {archive}: {len(scan.manifest["files"])} files match the manifest')
    if conf:
        print(f'conf: {conf}')
    print(f'model dir: {model_dir}')
    return 0, model_dir
