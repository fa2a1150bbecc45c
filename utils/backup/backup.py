"""Back up a trained model with its conf as one tar.gz; check a backup; restore one safely.

    python3 -m utils.backup_model --conf C [-o OUT_DIR] [-e | -n] [--checkpoint CKPT | -m MODEL_DIR]
    python3 -m utils.backup_model --verify ARCHIVE
    python3 -m utils.backup_model --restore ARCHIVE DIR

A backup is {OUT_DIR or work_dir}/{model}_{time}.tar.gz ({model}: the last component of a local
model_name, or owner_name for a hub id; {time}: YYYYmmdd_HHMMSS). An existing archive is never
overwritten: when the name is taken, _1, _2, ... is added to it. The archive is written under a
temporary name in the same folder and renamed when complete, so an interrupted backup leaves no
file under the final name. It holds one folder:

    {model}_{time}/model/...        the trained model dir ({work_dir}/output, or -m's, e.g.
                                    {work_dir}/output_best; with --checkpoint, the same files with
                                    pytorch_model.bin taken from that checkpoint)
    {model}_{time}/conf.json        the conf as loaded and resolved (none with -n; with -e the local
                                    paths img_addr, dataset_path and work_dir are null)
    {model}_{time}/manifest.json    sha256 and size of every other file, toolkit version, style map,
                                    model_name/model_revision, checkpoint, creation time

--restore extracts to DIR/{model}_{time}/ (refusing absolute paths, "..", links and device files,
and an existing target), checks every file against the manifest, and prints the model dir, which
pre_inference.py -m takes.

Exit codes: 0 ok; 1 the archive's content differs from its manifest (--verify, --restore: the
differences are listed); 2 bad input (conf, checkpoint, paths) or an unreadable, corrupt or unsafe
archive. Errors are one line, "error: ...".
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from utils import __version__
from utils.core.errors import BackupError, first_line
from utils.core.io import timestamp
from utils.core.logs import setup_logging
from utils.core.layout import OUTPUT_DIR
from utils.core.conf import Conf, is_local_model, load_conf
from utils.core.flags import add_conf_flags, conf_overrides
from utils.core.cli import EXIT_USAGE, run_reporting_errors
from utils.core.layout import STYLE_MAP_FILE

logger = logging.getLogger(__name__)

EXIT_DIFFERS = 1
SUFFIX = '.tar.gz'
MODEL_DIR = 'model'
CONF_FILE = 'conf.json'
MANIFEST = 'manifest.json'
FORMAT = 'ofa-stylish-ic-backup'
FORMAT_VERSION = 1
WEIGHTS_FILES = ('pytorch_model.bin', 'pytorch_model.pt')  # what ModelScope loads from a model dir
PATH_KEYS = ('img_addr', 'dataset_path', 'work_dir')     # nulled by -e
MAX_MANIFEST_BYTES = 64 << 20
MAX_SCRUB_BYTES = 16 << 20
CHUNK = 1 << 20


# ---------------------------------------------------------------- names and hashes

def short_model_name(model_name: str) -> str:
    """A file-system-safe short name: a local dir's last component, or owner_name for a hub id."""
    if is_local_model(model_name):
        base = os.path.basename(os.path.normpath(model_name))
    else:
        base = model_name.replace('/', '_')
    return re.sub(r'[^A-Za-z0-9._-]+', '_', base).strip('._-') or 'model'


class _HashingReader:
    """Wraps a binary file: what tarfile reads through it is hashed and counted on the way."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _sha256_file(path: str) -> Tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return sha.hexdigest(), size
            sha.update(data)
            size += len(data)


# ---------------------------------------------------------------- backup

@dataclass
class _Entry:
    rel: str                         # path inside the top folder, "/"-separated
    source: Union[str, bytes]        # a file to copy, or the content itself


def _model_files(model_dir: str) -> Dict[str, str]:
    """rel path inside model/ -> file, for every file of model_dir (symlinked files by content)."""
    files = {}
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if not os.path.isfile(path):  # a dangling link, a socket, ...
                raise BackupError(f'{path} is not a regular file: cannot back it up')
            files[os.path.relpath(path, model_dir).replace(os.sep, '/')] = path
    return files


def _read_style_map(output: str) -> dict:
    path = os.path.join(output, STYLE_MAP_FILE)
    if not os.path.isfile(path):
        raise BackupError(f'{path} not found: {output} is not a model trained by this toolkit')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackupError(f'{path} is not valid JSON: {e}') from None
    if not isinstance(data, dict) or not isinstance(data.get('tokens'), dict):
        raise BackupError(f'{path} is not a style map (no "tokens" object)')
    return data


def _load_state_dict(path: str):
    import torch
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format: retry for a legacy file
        return torch.load(path, map_location='cpu', weights_only=True)


def checkpoint_weights(prefix: str, model_weights: str, scratch: str) -> str:
    """The weights file of CheckpointHook checkpoint ``prefix`` (iter_N.pth), checked against the
    model's own weights file (same keys, same shapes). CheckpointHook writes a plain state_dict of the
    model, which is stored as is; a {"state_dict": ...} file is unwrapped into ``scratch``."""
    ckpt = prefix + '.pth'
    try:
        state = _load_state_dict(ckpt)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise BackupError(f'checkpoint {ckpt} could not be read: {first_line(e) or repr(e)}') from None
    wrapped = isinstance(state, dict) and isinstance(state.get('state_dict'), dict)
    weights = state['state_dict'] if wrapped else state
    if not isinstance(weights, dict) or not weights or not all(hasattr(v, 'shape') for v in weights.values()):
        raise BackupError(f'checkpoint {ckpt} does not hold a model state_dict')
    try:
        reference = _load_state_dict(model_weights)
    except Exception as e:  # noqa: BLE001
        raise BackupError(f'{model_weights} could not be read: {first_line(e) or repr(e)}') from None
    if isinstance(reference, dict) and isinstance(reference.get('state_dict'), dict):
        reference = reference['state_dict']
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    reshaped = sorted(k for k in set(weights) & set(reference)
                      if tuple(weights[k].shape) != tuple(reference[k].shape))
    if missing or unexpected or reshaped:
        what = [f'{len(v)} {kind} (e.g. {v[0]})' for kind, v in
                (('missing keys', missing), ('unexpected keys', unexpected), ('keys of another shape', reshaped)) if v]
        raise BackupError(f'checkpoint {ckpt} does not fit the model in {os.path.dirname(model_weights)}: '
                          + ', '.join(what))
    if not wrapped:
        return ckpt
    import torch
    path = os.path.join(scratch, os.path.basename(model_weights))
    torch.save(weights, path)
    return path


def _path_roots(conf: Conf) -> List[str]:
    roots = set()
    for key in PATH_KEYS:
        value = getattr(conf, key)
        if value:
            roots.update({os.path.normpath(value), os.path.normpath(os.path.abspath(value)),
                          os.path.realpath(value)})
    return sorted(roots)


def _is_local_path(value, roots: List[str]) -> bool:
    """Is value one of the roots or a path inside one (absolute values against absolute roots)?"""
    if not isinstance(value, str) or not value:
        return False
    v = os.path.normpath(value)
    for r in roots:
        if os.path.isabs(v) != os.path.isabs(r):
            continue
        if v == r or v.startswith(r.rstrip('/') + '/'):
            return True
    return False


def _scrub(obj, roots: List[str]):
    """obj with every string that is a local data/work path replaced by None; and how many were."""
    if isinstance(obj, dict):
        n, out = 0, {}
        for k, v in obj.items():
            out[k], m = _scrub(v, roots)
            n += m
        return out, n
    if isinstance(obj, list):
        n, out = 0, []
        for v in obj:
            v, m = _scrub(v, roots)
            out.append(v)
            n += m
        return out, n
    if _is_local_path(obj, roots):
        return None, 1
    return obj, 0


def _scrubbed_json(path: str, roots: List[str]) -> Optional[bytes]:
    """The JSON file at path without local paths, or None when it holds none (or is not JSON)."""
    if os.path.getsize(path) > MAX_SCRUB_BYTES:
        return None
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    data, n = _scrub(data, roots)
    if not n:
        return None
    logger.info('shareable: %d local path(s) removed from %s', n, os.path.basename(path))
    return (json.dumps(data, indent=4, ensure_ascii=False) + '\n').encode('utf-8')


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
        return {'sha256': hashlib.sha256(source).hexdigest(), 'size': len(source)}
    with open(source, 'rb') as f:
        st = os.fstat(f.fileno())
        reader = _HashingReader(f)
        tar.addfile(_tarinfo(arcname, size=st.st_size, mtime=st.st_mtime), reader)
    return {'sha256': reader.sha.hexdigest(), 'size': reader.size}


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


def write_archive(directory: str, stem: str, entries: List[_Entry], manifest: dict) -> str:
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
                manifest = dict(manifest, files=files)
                _add_file(tar, f'{stem}/{MANIFEST}',
                          (json.dumps(manifest, indent=2, ensure_ascii=False) + '\n').encode('utf-8'))
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


def _in_work_dir(arg: str, work_dir: str) -> str:
    """A bare checkpoint name (iter_N, iter_N.pth) that is not in the current folder: the one in work_dir."""
    if arg == 'latest' or os.path.dirname(arg):
        return arg
    prefix = arg[:-4] if arg.endswith('.pth') else arg
    if not os.path.isfile(prefix + '.pth') and os.path.isfile(os.path.join(work_dir, prefix + '.pth')):
        return os.path.join(work_dir, arg)
    return arg


def backup(conf_path: str, out_dir: Optional[str] = None, conf_mode: str = 'full',
           checkpoint: Optional[str] = None, model: Optional[str] = None, overrides: Optional[dict] = None) -> str:
    """Write the backup archive of the model trained with conf_path; return its path.
    conf_mode: "full" (the conf as resolved), "shareable" (local paths null), "none" (no conf)."""
    conf = load_conf(conf_path, overrides, splits=())
    output = model or os.path.join(conf.run.work_dir, OUTPUT_DIR)
    if model is not None and not os.path.isdir(model):
        raise BackupError(f'-m {model}: no such model dir')
    if not os.path.isdir(output):
        raise BackupError(f'no trained model at {output}: train first (python3 finetune.py train --conf {conf_path})')
    if not os.path.isfile(os.path.join(output, 'configuration.json')):
        raise BackupError(f'{output} has no configuration.json (not a ModelScope model dir): train first')
    style_map = _read_style_map(output)
    files = _model_files(output)
    weights_rel = next((w for w in WEIGHTS_FILES if w in files), None)
    if weights_rel is None:
        raise BackupError(f'{output} has no {WEIGHTS_FILES[0]}: train until the first checkpoint is written')

    out_dir = out_dir or conf.run.work_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BackupError(f'-o {out_dir} exists and is not a folder')
    os.makedirs(out_dir, exist_ok=True)

    from utils.core.workdir import WorkDirLock
    lock = WorkDirLock(conf.run.work_dir)  # a run still training would change output/ under our feet
    lock.__enter__()
    scratch = None
    try:
        checkpoint_name = None
        if checkpoint is not None:
            from utils.training.resume import resolve_checkpoint  # the one rule for naming a checkpoint
            prefix = resolve_checkpoint(_in_work_dir(checkpoint, conf.run.work_dir), conf.run.work_dir)
            scratch = tempfile.mkdtemp(prefix='.backup_', dir=out_dir)
            files[weights_rel] = checkpoint_weights(prefix, files[weights_rel], scratch)
            checkpoint_name = os.path.basename(prefix)
            logger.info('weights from checkpoint %s', prefix + '.pth')

        roots = _path_roots(conf) if conf_mode == 'shareable' else []
        entries = []
        for rel, path in files.items():
            source: Union[str, bytes] = path
            if roots and rel.endswith('.json'):
                source = _scrubbed_json(path, roots) or path
            entries.append(_Entry(f'{MODEL_DIR}/{rel}', source))
        if conf_mode != 'none':
            conf_dict = conf.to_dict()
            if conf_mode == 'shareable':
                conf_dict.update({k: None for k in PATH_KEYS})
            text = json.dumps(conf_dict, indent=2, ensure_ascii=False) + '\n'
            entries.append(_Entry(CONF_FILE, text.encode('utf-8')))

        stamp = timestamp()
        manifest = {
            'format': FORMAT,
            'format_version': FORMAT_VERSION,
            'toolkit_version': __version__,
            'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'model_name': conf.model.model_name,
            'model_revision': conf.model.model_revision,
            'checkpoint': checkpoint_name,
            'model_dir': MODEL_DIR,
            'conf': None if conf_mode == 'none' else CONF_FILE,
            'conf_mode': conf_mode,
            'style_map': style_map,
        }
        path = write_archive(out_dir, f'{short_model_name(conf.model.model_name)}_{stamp}', entries, manifest)
    finally:
        lock.__exit__(None, None, None)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info('backup of %s%s written to %s', output, f' (checkpoint {checkpoint_name})' if checkpoint_name else '',
                path)
    return path


# ---------------------------------------------------------------- reading an archive

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


def _parts(name: str) -> List[str]:
    return [p for p in name.split('/') if p not in ('', '.')]


@dataclass
class Scan:
    """What one pass over an archive found."""
    top: str                                   # the folder holding manifest.json
    manifest: dict
    files: Dict[str, dict] = field(default_factory=dict)   # rel inside top -> {sha256, size}
    outside: List[str] = field(default_factory=list)       # entries not under top/
    unsafe: List[Tuple[str, str]] = field(default_factory=list)  # (entry, why)


def _read_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackupError(f'{where} is not valid JSON: {e}') from None
    files = manifest.get('files') if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get('sha256'), str)
                                              for v in files.values()):
        raise BackupError(f'{where} is not a backup manifest (no "files" with sha256 hashes)')
    return manifest


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
                parts = _parts(m.name)
                if m.isdir() or not parts:
                    continue
                name = '/'.join(parts)
                if name in found:
                    unsafe.append((m.name, 'a second entry of the same name'))
                    continue
                f = tar.extractfile(m)
                sha, size, keep = hashlib.sha256(), 0, []
                is_manifest = len(parts) == 2 and parts[1] == MANIFEST
                while True:
                    data = f.read(CHUNK)
                    if not data:
                        break
                    sha.update(data)
                    size += len(data)
                    if is_manifest and size <= MAX_MANIFEST_BYTES:
                        keep.append(data)
                found[name] = {'sha256': sha.hexdigest(), 'size': size}
                if is_manifest:
                    if size > MAX_MANIFEST_BYTES:
                        raise BackupError(f'archive {archive}: {name} is too large to be a manifest')
                    manifests[parts[0]] = b''.join(keep)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
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
    scan = Scan(top=top, manifest=_read_manifest(data, f'{archive}: {top}/{MANIFEST}'), unsafe=unsafe)
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
    diffs += [('extra', rel) for rel in sorted(files) if rel not in expected and rel != MANIFEST]
    return diffs


def _report(archive: str, scan: Scan, diffs: List[Tuple[str, str]]) -> int:
    """Print the problems found, one a line; the exit code."""
    problems = [f'{kind}: {scan.top}/{rel}' for kind, rel in diffs]
    problems += [f'extra: {name} (outside {scan.top}/)' for name in sorted(scan.outside)]
    problems += [f'unsafe: {name} is {why}' for name, why in scan.unsafe]
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
        print(f'ok: {archive}: {len(m["files"])} files match the manifest (model {m.get("model_name")}, '
              f'checkpoint {m.get("checkpoint") or "output"}, created {m.get("created")})')
    return code


def _strict_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, and no links or special files at all."""
    problem = member_problem(member)
    if problem:
        raise BackupError(f'entry {member.name!r} is {problem}')
    return tarfile.data_filter(member, path)


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
                sha, size = _sha256_file(path)
                files[rel] = {'sha256': sha, 'size': size}
    return files, other


def restore(archive: str, dest: str) -> Tuple[int, Optional[str]]:
    """Extract archive into dest/{top}/ after checking it, check the extracted files; (exit code,
    model dir). Nothing is written unless the archive is safe and matches its manifest."""
    scan = scan_archive(archive)
    if scan.unsafe:
        name, why = scan.unsafe[0]
        raise BackupError(f'archive {archive}: refusing to restore: entry {name!r} is {why}')
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
    staging = tempfile.mkdtemp(prefix=f'.{scan.top}.', suffix='.partial', dir=dest)
    try:
        try:
            with tarfile.open(archive, 'r|*') as tar:
                tar.extractall(staging, filter=_strict_filter)
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
    logger.info('restored %s to %s', archive, target)
    print(f'restored {archive}: {len(scan.manifest["files"])} files match the manifest')
    if scan.manifest.get('conf'):
        print(f'conf: {os.path.join(target, scan.manifest["conf"])}')
    print(f'model dir: {model_dir}')
    return 0, model_dir


# ---------------------------------------------------------------- command line

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (from main), instead of usage + message
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog='python3 -m utils.backup_model', description=__doc__.split('\n\n', 2)[2],
                usage='\n       '.join(line.strip() for line in __doc__.split('\n\n')[1].splitlines()),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', help='back up the model trained with this conf ({work_dir}/output)')
    p.add_argument('-o', '--out_dir', help='where the archive goes (default: work_dir); it is never '
                                           'overwritten: a taken name gets _1, _2, ... added')
    p.add_argument('-e', '--shareable', action='store_true',
                   help='store the conf with img_addr, dataset_path and work_dir set to null (and those paths '
                        'removed from the model\'s JSON files): safe to share')
    p.add_argument('-n', '--no_conf', action='store_true', help='store no conf')
    p.add_argument('-p', '--checkpoint',
                   help='back up the weights of this CheckpointHook checkpoint instead of work_dir/output\'s: '
                        'work_dir/iter_N or its iter_N.pth (a bare iter_N is looked for in work_dir), or "latest"')
    p.add_argument('-m', '--model', help='back up this model dir instead of work_dir/output, e.g. work_dir/output_best')
    p.add_argument('--verify', metavar='ARCHIVE', help='check every file of ARCHIVE against its manifest')
    p.add_argument('--restore', nargs=2, metavar=('ARCHIVE', 'DIR'),
                   help='check ARCHIVE, extract it to DIR/{model}_{time}/ and print the model dir')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'backup')  # with --conf: e.g. --work_dir
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        modes = [flag for flag, value in (('--conf', args.conf), ('--verify', args.verify),
                                          ('--restore', args.restore)) if value is not None]
        if len(modes) != 1:
            raise _UsageError('give one of --conf, --verify or --restore' if not modes
                              else f'{" and ".join(modes)} exclude each other')
        if args.checkpoint and args.model:
            raise _UsageError('--checkpoint (weights of a checkpoint) and -m (a model dir) exclude each other')
        if args.shareable and args.no_conf:
            raise _UsageError('-e (store a shareable conf) and -n (store no conf) exclude each other')
        if args.conf is None:
            extra = [flag for flag, value in (('-o', args.out_dir), ('-e', args.shareable), ('-n', args.no_conf),
                                              ('--checkpoint', args.checkpoint), ('-m', args.model)) if value]
            if extra:
                raise _UsageError(f'{", ".join(extra)} only go with --conf')
    except _UsageError as e:
        print(f'error: {e} (see --help)', file=sys.stderr)
        return EXIT_USAGE

    setup_logging()

    def run() -> int:
        if args.verify is not None:
            return verify(args.verify)
        if args.restore is not None:
            return restore(*args.restore)[0]
        mode = 'shareable' if args.shareable else 'none' if args.no_conf else 'full'
        print(backup(args.conf, args.out_dir, mode, args.checkpoint, args.model, conf_overrides(args)))
        return 0

    # bad input (the conf, the archive, a checkpoint, a work_dir in use): exit 2; a full disk or another
    # OSError: exit 1 (nothing was left under a final name either way)
    return run_reporting_errors(run, debug=args.debug)

if __name__ == '__main__':
    sys.exit(main())
