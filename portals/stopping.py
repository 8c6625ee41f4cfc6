"""Polite stops that never cut a refresh in half.

A refresh that the OAuth server has carried out but whose answer the process has not stored yet is
a pair in the air: a process that dies then takes it along. So while a refresh is in flight, the
signals that ask a process to stop (SIGTERM, SIGINT) only take note; once the new pair is stored
(or the attempt has failed), the stop goes ahead. No new OAuth retries are started once a stop has
been asked for.

`install()` is called where a process decides how it stops: `renew_tokens`, each Celery pool
process (`worker_process_init`), gunicorn workers (`post_worker_init`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_in_flight = 0
_requested = threading.Event()
_pending: list[int] = []
_previous: dict[int, Any] = {}
_on_idle_stop: Callable[[int], None] | None = None


def stop_requested() -> bool:
    return _requested.is_set()


def _deliver(signum: int) -> None:
    """Carry out the stop as the process would have without us."""
    if _on_idle_stop is not None:
        _on_idle_stop(signum)
        return
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, None)
        return
    signal.signal(signum, signal.SIG_DFL if previous in (None, signal.SIG_DFL) else previous)
    os.kill(os.getpid(), signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    with _lock:
        busy = _in_flight > 0
        if busy:
            _pending.append(signum)
    if busy:
        logger.warning(
            "%s received: finishing the token refresh in flight before stopping",
            signal.Signals(signum).name,
        )
        return
    _deliver(signum)


def install(
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    *,
    on_idle_stop: Callable[[int], None] | None = None,
) -> None:
    """Hold stop signals while a refresh is in flight (main thread only, as Python requires).

    `on_idle_stop(signum)`: what a stop does when nothing is in flight, or once the refresh in flight
    is done; by default the handler that was there before (or the signal's default action).
    """
    global _on_idle_stop
    _on_idle_stop = on_idle_stop
    for signum in signals:
        previous = signal.signal(signum, _handler)
        if previous is not _handler:
            _previous[signum] = previous


@contextmanager
def refresh_in_flight() -> Iterator[None]:
    """Around a refresh: from before its request is sent until its outcome is stored."""
    global _in_flight
    with _lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1
            due = _pending[:1] if _in_flight == 0 else []
            if due:
                _pending.clear()
        if due and threading.current_thread() is threading.main_thread():
            _deliver(due[0])


def reset() -> None:
    """Forget a stop request (tests that run several commands in one process)."""
    _requested.clear()
    with _lock:
        _pending.clear()
