"""ModelScope's global logger (``modelscope.utils.logger.get_logger()``, the ``modelscope`` logger), as a person
training sees it.

* :func:`modelscope_console`: ModelScope's console handler shows every INFO line: the config dump, the hook
  table and a line per iteration drown the toolkit's progress. It is set to warnings only (or everything with
  the conf's ``verbose``); the lines still reach work_dir/{time}.log through ModelScope's file handler.
* :func:`detach_file_logs`: the trainer attaches a file handler for work_dir/{time}.log to that global logger
  and never removes it: later work in the same process (an eval after a train, the tests) would keep
  writing into the finished run's log.
"""
from __future__ import annotations

import logging
import os

MODELSCOPE_LOGGER = 'modelscope'  # the name of the logger get_logger() returns


def modelscope_console(verbose: bool) -> None:
    """ModelScope's own console handler shows warnings only (everything stays in its log file), or
    everything with ``verbose``."""
    from modelscope.utils.logger import get_logger
    for handler in get_logger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)


def detach_file_logs(work_dir: str) -> None:
    """ModelScope's trainer attaches a file handler for work_dir/{time}.log to its global logger; once
    the run is over, later work in the same process must not keep writing into that run's log."""
    root = os.path.abspath(work_dir)
    log = logging.getLogger(MODELSCOPE_LOGGER)
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler) and os.path.abspath(handler.baseFilename).startswith(root):
            log.removeHandler(handler)
            handler.close()
