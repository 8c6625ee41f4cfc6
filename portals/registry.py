"""Where the app's own code plugs in: its handlers for Bitrix24 events.

An app built on this project keeps its code in a Django app of its own and registers from that app's
`bitrix24.py` module, which is imported at start-up in every process (web, worker, beat), as Django's
admin imports each app's `admin.py`::

    # myapp/bitrix24.py
    from portals.registry import on

    @on("ONCRMDEALADD")
    def deal_added(event):
        deal = event.client.call("crm.deal.get", {"id": event.object_id})
        ...

    @on("ONCRMCONTACTUPDATE", offline=True)
    def contact_changed(event): ...

A handler gets one argument, an `events.handling.EventContext`: the portal, the event's name, the
object's identifiers, the acting user's id and a `PortalClient` ready to call the portal. It runs in a
worker, never in the request that delivered the event, and may run more than once for one delivery
(at-least-once): it should read the object through the REST API and act idempotently. The event's
body beyond identifiers is not trusted (the application token that admits an event is known to every
employee who opens the app).

This module imports nothing of the project: the bindings sync (which events to bind) and the event
worker (which handlers to run) both read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules

EVENT_NAME = re.compile(r"^ON[A-Z0-9_]{2,60}$")
# Events the project handles itself: an app's handler for them would run beside (or instead of) the
# install, uninstall and payment logic that keeps custody of the portal's tokens.
RESERVED = frozenset({"ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL", "ONAPPPAYMENT", "ONOFFLINEEVENT"})

Handler = Callable[[Any], None]
F = TypeVar("F", bound=Handler)


@dataclass(frozen=True)
class EventHandler:
    event: str
    func: Handler
    offline: bool

    @property
    def name(self) -> str:
        """Stable across processes and restarts: what an event record keeps of the handlers already run."""
        return f"{self.func.__module__}.{self.func.__qualname__}"


_handlers: dict[str, list[EventHandler]] = {}


def on(event: str, *, offline: bool = False) -> Callable[[F], F]:
    """Register the decorated function as a handler of `event`.

    `offline=True` binds the event with `event_type=offline`: the portal queues changes (one record per
    object) and the backend pulls them, so nothing is lost while it is down. One event is either online
    or offline for the whole app: bound both ways, every change would be handled twice.
    """
    name = event.strip().upper()
    if not EVENT_NAME.match(name):
        raise ImproperlyConfigured(f"{event!r} is not a Bitrix24 event name (like 'ONCRMDEALADD')")
    if name in RESERVED:
        raise ImproperlyConfigured(
            f"{name} is handled by the project itself (token custody); it cannot take an app handler"
        )

    def register(func: F) -> F:
        existing = _handlers.setdefault(name, [])
        if any(handler.offline != offline for handler in existing):
            raise ImproperlyConfigured(
                f"{name} has both online and offline handlers: choose one, or every change runs twice"
            )
        handler = EventHandler(event=name, func=func, offline=offline)
        if all(other.name != handler.name for other in existing):  # a module imported twice registers once
            existing.append(handler)
        return func

    return register


def handlers_for(event: str) -> list[EventHandler]:
    return list(_handlers.get(event.upper(), ()))


def events(*, offline: bool) -> list[str]:
    """The registered event names bound online (`offline=False`) or offline, sorted."""
    return sorted(name for name, handlers in _handlers.items() if handlers and handlers[0].offline == offline)


def autodiscover() -> None:
    """Import every installed app's `bitrix24` module (called once at start-up)."""
    autodiscover_modules("bitrix24")


@contextmanager
def replaced(register: Callable[[], None] | None = None) -> Iterator[None]:
    """Run with an empty registry (filled by `register`), restoring the app's afterwards: for tests."""
    saved = {name: list(handlers) for name, handlers in _handlers.items()}
    _handlers.clear()
    try:
        if register is not None:
            register()
        yield
    finally:
        _handlers.clear()
        _handlers.update(saved)
