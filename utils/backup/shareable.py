"""A shareable backup (``-e``): the conf's local paths (img_addr, dataset_path, work_dir) set to null, and every
string in the model's JSON files that is one of those paths, or a path inside one, removed."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

from utils.core.conf import Conf

logger = logging.getLogger(__name__)

PATH_KEYS = ('img_addr', 'dataset_path', 'work_dir')     # nulled by -e
MAX_SCRUB_BYTES = 16 << 20


def path_roots(conf: Conf) -> List[str]:
    """The conf's local paths, each as given, absolute and resolved."""
    roots = set()
    flat = conf.to_dict()
    for key in PATH_KEYS:
        value = flat[key]
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


def scrubbed_json(path: str, roots: List[str]) -> Optional[bytes]:
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


def shareable_conf(conf_dict: dict) -> dict:
    """The conf's dict with its local paths null."""
    return dict(conf_dict, **{k: None for k in PATH_KEYS})
