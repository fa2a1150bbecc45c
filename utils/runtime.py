"""Process-level set-up shared by the entry points: logging, the hub check, checkpoint loading."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Callable, Optional

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


def write_text_atomic(path: str, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers never see half a file, and a failed
    write leaves neither the file nor its temporary."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w', encoding='utf-8', newline='') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + '\n')


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


class BadInput(Exception):
    """Bad input, worded for the user (names the conf key, file, row or style at fault): exit code 2.
    ConfError, DataError, UnknownStyleError and the metrics and backup commands' errors are kinds of it."""


def read_json(path, what: str, error=BadInput):
    """The parsed JSON file ``path``, or ``error`` naming it as ``what`` (e.g. "train file", "-j file")."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f'{what} {path} does not exist') from None
    except json.JSONDecodeError as e:
        raise error(f'{what} {path} is not valid JSON: {e}') from None
    except UnicodeDecodeError:
        raise error(f'{what} {path} is not valid UTF-8 text') from None
    except IsADirectoryError:
        raise error(f'{what} {path} is a folder, not a file') from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ('' when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ''


EXIT_USAGE = 2   # bad input: conf, data, checkpoint, style, model dir
EXIT_FAILURE = 1  # anything else


def run_reporting_errors(fn: Callable, debug: bool = False):
    """fn() for an entry point: bad input becomes one line on stderr and exit 2, any other error one
    line and exit 1; --debug lets the traceback through instead."""
    try:
        return fn()
    except BadInput as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns a crash into a message
        if debug:
            raise
        logger.debug('unexpected error', exc_info=True)
        print(f'error: {type(e).__name__}: {first_line(e)} (run again with --debug for the traceback)', file=sys.stderr)
        return EXIT_FAILURE


def pick_device(requested: Optional[str] = None) -> str:
    import torch
    return requested or ('cuda' if torch.cuda.is_available() else 'cpu')


def autocast(precision: str, device_type: str):
    """The conf's ``precision`` as a context manager: nothing for fp32, else ``torch.autocast`` in bf16 or
    fp16 (weights stay fp32). Also usable as a decorator where precision is not fp32."""
    import torch
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[precision])
