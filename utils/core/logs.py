"""Logging: one console set-up per entry point, and a copy of the toolkit's lines in a work_dir file."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by a test harness)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _GenerationMixinNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return 'GenerationMixin' not in record.getMessage()


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for the toolkit's own modules (ModelScope keeps its own handlers)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, '%H:%M:%S'))
        root.addHandler(handler)
    root.setLevel(level)
    # transformers warns on every OFA model load that OFAModel does not inherit GenerationMixin: noise
    # for our users, who generate with ModelScope's own sequence generator. (A filter, not a level:
    # transformers changes what it checks when that logger's level is raised.)
    logging.getLogger('fairseq').setLevel(logging.WARNING)  # e.g. "Please install tensorboardX" at import
    hf_logger = logging.getLogger('transformers.modeling_utils')
    if not any(isinstance(f, _GenerationMixinNotice) for f in hf_logger.filters):
        hf_logger.addFilter(_GenerationMixinNotice())


@contextlib.contextmanager
def log_to_file(path: str):
    """While in the block, also write the toolkit's log lines to path (in work_dir)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
