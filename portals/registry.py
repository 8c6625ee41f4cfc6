"""Where the app's own code plugs in: its handlers for Bitrix24 events and its placement views.

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

A placement view (a widget: a CRM card tab, a menu item) is registered the same way::

    @placement("CRM_DEAL_DETAIL_TAB", title=gettext_lazy("Deal notes"))
    def deal_tab(request, context):
        ...  # an HttpResponse; context: install.placements.PlacementContext

A launch whose PLACEMENT is registered is verified as every launch and handed to that view; the bindings
sync binds each registered placement with `placement.bind` (titles in every language, LANG_ALL).

This module imports nothing of the project: the bindings sync (which events and placements to bind),
the event worker (which handlers to run) and the launch (which view to show) all read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any, TypeVar

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import module_has_submodule

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
_placements: dict[str, Placement] = {}
PLACEMENT_CODE = re.compile(r"^[A-Z][A-Z0-9_]{1,80}$")


@dataclass(frozen=True)
class Placement:
    code: str
    view: Callable[..., Any]
    title: Any  # a str or a lazy translation: rendered in each language for LANG_ALL
    description: Any = ""
    group_name: Any = ""
    options: Any = None  # placement.bind's OPTIONS, as documented for the placement

    @property
    def name(self) -> str:
        return f"{self.view.__module__}.{self.view.__qualname__}"


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


V = TypeVar("V", bound=Callable[..., Any])


def placement(
    code: str, *, title: Any, description: Any = "", group_name: Any = "", options: Any = None
) -> Callable[[V], V]:
    """Register the decorated view for the placement `code` (e.g. CRM_DEAL_DETAIL_TAB). `title` (and
    `description`, `group_name`) may be lazy translations: each language the app is translated to gets
    its own in LANG_ALL. One view per placement: the launch has to know which one to show."""
    name = code.strip().upper()
    if not PLACEMENT_CODE.match(name):
        raise ImproperlyConfigured(f"{code!r} is not a Bitrix24 placement code (like 'CRM_DEAL_DETAIL_TAB')")
    if not str(title).strip():
        raise ImproperlyConfigured(f"placement {name} needs a title: Bitrix24 shows it on the tab or menu")

    def register(view: V) -> V:
        entry = Placement(name, view, title, description, group_name, options)
        existing = _placements.get(name)
        if existing is not None and existing.name != entry.name:
            raise ImproperlyConfigured(f"placement {name} already has a view: {existing.name}")
        _placements[name] = entry
        return view

    return register


def placement_for(code: str) -> Placement | None:
    return _placements.get(code.upper())


def placements() -> list[Placement]:
    return [_placements[code] for code in sorted(_placements)]


def handlers_for(event: str) -> list[EventHandler]:
    return list(_handlers.get(event.upper(), ()))


def events(*, offline: bool) -> list[str]:
    """The registered event names bound online (`offline=False`) or offline, sorted."""
    return sorted(name for name, handlers in _handlers.items() if handlers and handlers[0].offline == offline)


def app_modules(submodule: str) -> list[ModuleType]:
    """`<app>.<submodule>` of every installed Django app that has one, imported, in INSTALLED_APPS order: how
    the app's code is found, for its registrations (`bitrix24`) and its frontend endpoints (`frontend`)."""
    found = []
    for config in apps.get_app_configs():
        if module_has_submodule(config.module, submodule):
            found.append(import_module(f"{config.name}.{submodule}"))
    return found


def autodiscover() -> None:
    """Import every installed app's `bitrix24` module (called once at start-up): its decorators register."""
    app_modules("bitrix24")


@contextmanager
def replaced(register: Callable[[], None] | None = None) -> Iterator[None]:
    """Run with an empty registry (filled by `register`), restoring the app's afterwards: for tests."""
    saved = {name: list(handlers) for name, handlers in _handlers.items()}
    saved_placements = dict(_placements)
    _handlers.clear()
    _placements.clear()
    try:
        if register is not None:
            register()
        yield
    finally:
        _handlers.clear()
        _handlers.update(saved)
        _placements.clear()
        _placements.update(saved_placements)
