"""Polite stops that never cut a refresh in half.

A refresh that the OAuth server has carried out but whose answer the process has not stored yet is
a pair in the air: a process that dies then takes it along. So while a refresh is in flight, the
signals that ask a process to stop (SIGTERM, SIGINT) only take note; once the new pair is stored
(or the attempt has failed), the stop goes ahead as the process would have carried it out without
us (its previous handler, or the signal's default). No new OAuth retries start once a stop was
asked for (`portals.http`).

The hold is set up around each refresh, not once per process, because process managers and pools
replace handlers after start-up (billiard does so in every Celery pool process after
`worker_process_init`). Python runs signal handlers in the main thread only, so the hold covers
refreshes made on the main thread (commands, prefork pool processes, sync web workers).

A loop that stops between items (`renew_tokens`) calls `install_poller`: a stop when idle ends it at
once, a stop during a refresh is only noted, and the loop asks `stop_requested()` before the next.
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

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_lock = threading.Lock()
_depth = 0
_requested = threading.Event()
_pending: list[int] = []
_saved: dict[int, Any] = {}
_poller: Callable[[int], None] | None = None
_poller_saved: dict[int, Any] = {}


def stop_requested() -> bool:
    return _requested.is_set()


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _hold(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    with _lock:
        _pending.append(signum)
    logger.warning(
        "%s received: finishing the token refresh in flight before stopping", signal.Signals(signum).name
    )


def _deliver(signum: int, previous: Any) -> None:
    """Carry out a stop the way the handler we stood in for would have."""
    if callable(previous):
        previous(signum, None)
    elif previous in (None, signal.SIG_DFL):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextmanager
def refresh_in_flight() -> Iterator[None]:
    """Around a refresh: from before its request is sent until its outcome is stored."""
    global _depth
    hold = _on_main_thread()
    with _lock:
        _depth += 1
        first = _depth == 1
    if hold and first:
        for signum in SIGNALS:
            _saved[signum] = signal.signal(signum, _hold)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            last = _depth == 0
        if hold and last:
            previous = dict(_saved)
            _saved.clear()
            for saved_signum, handler in previous.items():
                signal.signal(saved_signum, handler if handler is not None else signal.SIG_DFL)
            with _lock:
                pending = _pending[:1]
                _pending.clear()
            if pending and _poller is None:
                _deliver(pending[0], previous.get(pending[0]))


def _poll_handler(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    if _poller is not None:
        _poller(signum)


def install_poller(on_idle_stop: Callable[[int], None]) -> None:
    """For a loop that stops between items: `on_idle_stop(signum)` runs when a stop arrives while no
    refresh is in flight (it may raise SystemExit); a stop during a refresh is left to the loop."""
    global _poller
    if not _on_main_thread():
        return  # only the main thread may set handlers; a thread's caller owns the process's stops
    _poller = on_idle_stop
    for signum in SIGNALS:
        _poller_saved[signum] = signal.signal(signum, _poll_handler)


def uninstall_poller() -> None:
    """Put back what `install_poller` replaced, and forget any stop request."""
    global _poller
    if not _on_main_thread():
        return
    for signum, previous in list(_poller_saved.items()):
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _poller_saved.clear()
    _poller = None
    _requested.clear()
