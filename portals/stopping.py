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

# SIGUSR1 is how Celery's soft time limit interrupts a task: it must not land between the answer and
# its store either.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPS = (signal.SIGTERM, signal.SIGINT)

_depth = 0  # refreshes in flight on the main thread (signal handlers run there only)
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
    # No lock here: a handler may run while the main thread holds one. list.append is atomic.
    if signum in STOPS:
        _requested.set()
    _pending.append(signum)
    # INFO: this is the polite stop working as designed (a process manager's stop during a refresh, an
    # install's first renewal still trying a stand-in that is gone), not a problem for anyone to look into.
    logger.info("%s received: finishing the token refresh in flight first", signal.Signals(signum).name)


def _deliver(signum: int, previous: Any) -> bool:
    """Carry out a signal the way the handler we stood in for would have; False if it ignores it."""
    if callable(previous):
        previous(signum, None)
        return True
    if previous in (None, signal.SIG_DFL):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return True
    return False  # SIG_IGN


@contextmanager
def refresh_in_flight() -> Iterator[None]:
    """Around a refresh: from before its request is sent until its outcome is stored."""
    global _depth
    if not _on_main_thread():
        # Handlers are the main thread's; a refresh on another thread relies on the process's own
        # stop handling (which `install_poller` or a pool's warm shutdown provide).
        yield
        return
    _depth += 1
    if _depth == 1:
        for signum in SIGNALS:
            _saved[signum] = signal.signal(signum, _hold)
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            previous = dict(_saved)
            _saved.clear()
            for saved_signum, handler in previous.items():
                signal.signal(saved_signum, handler if handler is not None else signal.SIG_DFL)
            pending = list(dict.fromkeys(_pending))  # each signal once, in arrival order
            _pending.clear()
            if _poller is None:
                for held in pending:
                    if _deliver(held, previous.get(held)):
                        break


def note_stops() -> None:
    """In a process that ignores a stop signal outside refreshes (Celery pool processes ignore SIGINT:
    the main process owns the warm shutdown), note it instead, so that a renewal not yet sent is not
    started and no OAuth retry follows. Called when such a process starts a task."""
    if not _on_main_thread():
        return
    for signum in STOPS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _note)


def _note(signum: int, frame: FrameType | None) -> None:
    _requested.set()


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
    for signum in STOPS:
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
