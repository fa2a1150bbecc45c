"""Work done beside the command's own start-up: a forked child process computes a value while the parent goes on.

A training run spends its first ~12 s importing torch, transformers, fairseq and ModelScope's trainer (one core),
and ~5 s reading a Personality-Captions-sized split (186k rows: parsing them, stat-ing every image against the
remembered checks). Neither needs the other, and the machine has a second core: :class:`Beside` forks a child that
reads the data while the parent imports, and hands the parent the child's value, or raises the child's exception
there (a bad data file is the same one-line error, exit 2, as before). Nothing is written by the child.

It forks only where that is safe and useful: ``os.fork`` exists, no other thread runs, and torch is not imported
yet (its thread pools do not survive a fork, and once it is imported there is nothing left to overlap). Otherwise,
and with ``OFASTYLEIC_NO_FORK=1`` in the environment, the function simply runs in this process when
:meth:`Beside.result` is called: the same value, the same errors, no overlap.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

NO_FORK_ENV = 'OFASTYLEIC_NO_FORK'


def can_fork() -> bool:
    """Whether a child forked now is safe and worth it (see the module's docstring)."""
    return (hasattr(os, 'fork') and os.environ.get(NO_FORK_ENV, '') in ('', '0')
            and threading.active_count() == 1 and 'torch' not in sys.modules)


class ChildDied(RuntimeError):
    """The child process ended without handing back a whole value (killed, out of memory)."""


def _transferable_error(value: BaseException) -> BaseException:
    """What travels instead of an exception pickle cannot re-create: its type and message, as bad input (exit 2)
    when it was bad input."""
    from utils.core.errors import BadInput
    return BadInput(str(value)) if isinstance(value, BadInput) else RuntimeError(f'{type(value).__name__}: {value}')


class Beside:
    """``Beside(fn, *args, **kwargs)`` starts ``fn(*args, **kwargs)`` in a forked child (when :func:`can_fork`,
    or ``fork=True``); :meth:`result` waits for its value (or raises its exception). The value and the exception
    travel pickled; an exception that cannot be pickled arrives with its type and message (bad input stays bad
    input). ``seconds`` is the time fn took (in the child or here), ``waited`` the time :meth:`result` blocked.

    Use it as a context manager: leaving the block without having taken the result (the parent failed, or was
    interrupted, meanwhile) ends the child and reaps it, so no reader outlives its command."""

    def __init__(self, fn: Callable[..., Any], *args, fork: Optional[bool] = None, **kwargs):
        self._call = (fn, args, kwargs)
        self.pid: Optional[int] = None
        self.seconds = self.waited = 0.0
        self._done = False
        self._status: Optional[int] = None  # the child's wait status, once reaped
        self._read_fd: Optional[int] = None
        if not (can_fork() if fork is None else fork):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compute, send, leave without running the parent's exit handlers
            code = 1
            try:
                os.close(read_fd)
                self._send(write_fd)
                code = 0
            except BaseException:  # noqa: BLE001 - a parent that is gone (broken pipe): nothing to tell
                pass
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(write_fd)
        self.pid, self._read_fd = pid, read_fd

    def _send(self, write_fd: int) -> None:
        payload = self._run()
        try:
            blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            if not payload[0]:
                pickle.loads(blob)  # an exception whose arguments do not re-create it fails only here
        except Exception as e:  # noqa: BLE001 - an exception (or value) pickle cannot carry
            ok, value, trace, seconds = payload
            error = _transferable_error(value) if not ok else RuntimeError(f'value not transferable: {e}')
            blob = pickle.dumps((False, error, trace, seconds), protocol=pickle.HIGHEST_PROTOCOL)
        with os.fdopen(write_fd, 'wb') as f:
            f.write(blob)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        return False

    def cancel(self) -> None:
        """End and reap a child whose result was not taken; close the pipe. Nothing to do once taken."""
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        if self.pid is not None and self._status is None:
            import signal
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(block=True)

    def _reap(self, block: bool) -> None:
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped by someone else (SIGCHLD ignored): the pipe says how it ended
            pid, status = self.pid, 0
        if pid:
            self._status = status

    def ended(self) -> bool:
        """Whether the child has ended already (a failure, or a value small enough for the pipe, waits there): the
        parent can stop what it does beside and take it at once. Always False without a child."""
        if self.pid is None:
            return False
        if self._status is None:
            self._reap(block=False)
        return self._status is not None

    def _run(self):
        fn, args, kwargs = self._call
        t = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            return True, value, '', time.perf_counter() - t
        except BaseException as e:  # noqa: BLE001 - handed to the parent, raised there
            return False, e, traceback.format_exc(), time.perf_counter() - t

    def result(self):
        """fn's value (waiting for the child), or fn's exception raised here. Call it once."""
        if self._done:
            raise RuntimeError('Beside.result() called twice')
        self._done = True
        t = time.perf_counter()
        try:
            if self.pid is None:
                ok, value, trace, self.seconds = self._run()
            else:
                ok, value, trace, self.seconds = self._receive()
        finally:
            self.waited = time.perf_counter() - t
        if ok:
            return value
        if trace and hasattr(value, 'add_note') and self.pid is not None:
            value.add_note(f'(raised in the child process {self.pid}):\n{trace}')
        raise value

    def _receive(self):
        fd, self._read_fd = self._read_fd, None
        with os.fdopen(fd, 'rb') as f:
            blob = f.read()
        if self._status is None:
            self._reap(block=True)
        status = self._status
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0 or not blob:  # killed, maybe mid-write
            how = f'signal {os.WTERMSIG(status)}' if os.WIFSIGNALED(status) else f'exit status {os.WEXITSTATUS(status)}'
            raise ChildDied(f'the process reading beside the start-up (pid {self.pid}) ended without a result ({how})')
        return pickle.loads(blob)
