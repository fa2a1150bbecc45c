"""Process-level set-up shared by the entry points: logging, the hub check, checkpoint loading."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)
LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'


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


def write_json_atomic(path: str, data) -> None:
    """Write a JSON file under a temporary name, then rename it: readers never see half a file."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for the toolkit's own modules (ModelScope keeps its own handlers)."""
    root = logging.getLogger()
    if not any(getattr(h, '_stylish', False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, '%H:%M:%S'))
        handler._stylish = True
        root.addHandler(handler)
    root.setLevel(level)


def log_to_file(path: str) -> logging.Handler:
    """Also write the toolkit's log lines to path (in work_dir)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


@contextlib.contextmanager
def no_hub_check_for_local_model(model_is_local: bool):
    """ModelScope's trainer asks the hub whether a *local* model dir is the latest version (an advisory
    log line, with retries: ~20 s with no network). For a local model dir we skip that question."""
    if not model_is_local:
        yield
        return
    import modelscope.trainers.trainer as trainer_module
    original = trainer_module.check_local_model_is_latest
    trainer_module.check_local_model_is_latest = lambda *a, **k: None
    try:
        yield
    finally:
        trainer_module.check_local_model_is_latest = original


@contextlib.contextmanager
def trainer_state_loading():
    """Let ``torch.load(weights_only=True)`` read ModelScope trainer-state files, which hold numpy RNG
    state. Allow-lists the numpy types needed instead of turning weights_only off."""
    import numpy as np
    import torch
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        yield


def pick_device(requested: Optional[str] = None) -> str:
    import torch
    return requested or ('cuda' if torch.cuda.is_available() else 'cpu')
