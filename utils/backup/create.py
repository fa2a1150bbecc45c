"""Making a backup: the archive of a trained model dir (``{work_dir}/output``, or ``-m``'s; with
``--checkpoint``, its weights from that checkpoint), with the conf as resolved (``-e``: shareable; ``-n``:
none) and a manifest naming the model, its styles, the checkpoint and the toolkit version."""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Dict, Optional, Union

from utils import __version__
from utils.backup.archive import CONF_FILE, FORMAT, FORMAT_VERSION, MODEL_DIR, WEIGHTS_FILES, Entry, write_archive
from utils.backup.shareable import path_roots, scrubbed_json, shareable_conf
from utils.core.checksums import check_model_dir, format_sums, sha256_of
from utils.core.conf import is_local_model
from utils.core.conf_checks import load_conf
from utils.core.errors import BackupError, CheckpointError, ModelDirError, first_line, raise_system_failure
from utils.core.io import timestamp
from utils.core.layout import OUTPUT_DIR, STYLE_MAP_FILE, WEIGHTS_CHECKSUM_FILE

logger = logging.getLogger(__name__)


def short_model_name(model_name: str) -> str:
    """A file-system-safe short name: a local dir's last component, or owner_name for a hub id."""
    if is_local_model(model_name):
        base = os.path.basename(os.path.normpath(model_name))
    else:
        base = model_name.replace('/', '_')
    return re.sub(r'[^A-Za-z0-9._-]+', '_', base).strip('._-') or 'model'


def _model_files(model_dir: str) -> Dict[str, Union[str, bytes]]:
    """rel path inside model/ -> file, for every file of model_dir (symlinked files by content)."""
    files = {}
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if not os.path.isfile(path):  # a dangling link, a socket, ...
                raise ModelDirError(f'{path} is not a regular file: cannot back it up')
            files[os.path.relpath(path, model_dir).replace(os.sep, '/')] = path
    return files


def _read_style_map(output: str) -> dict:
    path = os.path.join(output, STYLE_MAP_FILE)
    if not os.path.isfile(path):
        raise ModelDirError(f'{path} not found: {output} is not a model trained by this toolkit')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f'{path} is not valid JSON: {e}') from None
    if not isinstance(data, dict) or not isinstance(data.get('tokens'), dict):
        raise ModelDirError(f'{path} is not a style map (no "tokens" object)')
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
        raise_system_failure(e)
        raise CheckpointError(f'checkpoint {ckpt} could not be read: {first_line(e) or repr(e)}') from None
    wrapped = isinstance(state, dict) and isinstance(state.get('state_dict'), dict)
    weights = state['state_dict'] if wrapped else state
    if not isinstance(weights, dict) or not weights or not all(hasattr(v, 'shape') for v in weights.values()):
        raise CheckpointError(f'checkpoint {ckpt} does not hold a model state_dict')
    try:
        reference = _load_state_dict(model_weights)
    except Exception as e:  # noqa: BLE001
        raise_system_failure(e)
        raise ModelDirError(f'{model_weights} could not be read: {first_line(e) or repr(e)}') from None
    if isinstance(reference, dict) and isinstance(reference.get('state_dict'), dict):
        reference = reference['state_dict']
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    reshaped = sorted(k for k in set(weights) & set(reference)
                      if tuple(weights[k].shape) != tuple(reference[k].shape))
    if missing or unexpected or reshaped:
        what = [f'{len(v)} {kind} (e.g. {v[0]})' for kind, v in
                (('missing keys', missing), ('unexpected keys', unexpected), ('keys of another shape', reshaped)) if v]
        raise CheckpointError(f'checkpoint {ckpt} does not fit the model in {os.path.dirname(model_weights)}: '
                              + ', '.join(what))
    if not wrapped:
        return ckpt
    import torch
    path = os.path.join(scratch, os.path.basename(model_weights))
    torch.save(weights, path)
    return path


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
        raise ModelDirError(f'-m {model}: no such model dir')
    if not os.path.isdir(output):
        raise ModelDirError(f'no trained model at {output}: train first (python3 finetune.py train --conf {conf_path})')
    if not os.path.isfile(os.path.join(output, 'configuration.json')):
        raise ModelDirError(f'{output} has no configuration.json (not a ModelScope model dir): train first')
    style_map = _read_style_map(output)
    files = _model_files(output)
    weights_rel = next((w for w in WEIGHTS_FILES if w in files), None)
    if weights_rel is None:
        raise ModelDirError(f'{output} has no {WEIGHTS_FILES[0]}: train until the first checkpoint is written')
    if checkpoint is None:  # weights that do not match their weights.sha256 are not backed up
        check_model_dir(output)

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
            # the model/ dir's weights.sha256 describes the checkpoint's weights it holds
            files[WEIGHTS_CHECKSUM_FILE] = format_sums([(sha256_of(files[weights_rel]), weights_rel)]).encode()
            checkpoint_name = os.path.basename(prefix)
            logger.info('weights from checkpoint %s', prefix + '.pth')

        roots = path_roots(conf) if conf_mode == 'shareable' else []
        entries = []
        for rel, path in files.items():
            source: Union[str, bytes] = path
            if isinstance(path, bytes):
                entries.append(Entry(f'{MODEL_DIR}/{rel}', path))
                continue
            if roots and rel.endswith('.json'):
                source = scrubbed_json(path, roots) or path
            entries.append(Entry(f'{MODEL_DIR}/{rel}', source))
        if conf_mode != 'none':
            conf_dict = conf.to_dict()
            if conf_mode == 'shareable':
                conf_dict = shareable_conf(conf_dict)
            text = json.dumps(conf_dict, indent=2, ensure_ascii=False) + '\n'
            entries.append(Entry(CONF_FILE, text.encode('utf-8')))

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
