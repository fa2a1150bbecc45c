"""The one error harness every command uses: bad input is one line and exit 2, an interrupt exit 130, any
other error one line and exit 1; ``--debug`` lets the traceback through instead."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from utils.core.errors import BadInput, first_line

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1      # anything else: a crash, a full disk, a verify that found differences
EXIT_USAGE = 2        # bad input: conf, flag, data, checkpoint, style, model dir, work_dir in use
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def run_reporting_errors(fn: Callable, debug: bool = False):
    """fn() for an entry point, its errors turned into one line on stderr and an exit code."""
    try:
        return fn()
    except BadInput as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that turns a crash into a message
        if debug:
            raise
        logger.debug('unexpected error', exc_info=True)
        print(f'error: {type(e).__name__}: {first_line(e)} (run again with --debug for the traceback)', file=sys.stderr)
        return EXIT_FAILURE
