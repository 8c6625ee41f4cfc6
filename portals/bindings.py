"""Event and placement bindings kept in sync with what the app wants.

Bitrix24 drops `event.bind` handlers on update and uninstall, an outage can lose a bind, and the app's
list of handlers changes between releases. So the wanted bindings are computed (ONAPPUNINSTALL,
BITRIX24_EVENTS, the registry's online and offline handlers, ONOFFLINEEVENT when any handler is offline),
a fingerprint of them is kept per portal once they are applied, and a portal whose fingerprint differs is
synced again: after a trusted install or update, by the beat sweep, and by `manage.py bitrix24_sync`.

Only online handlers under this deployment's BITRIX24_PUBLIC_URL are ever unbound: another deployment
of the same app (staging, another region) binds its own URL. Offline bindings have no URL: one that is
no longer wanted is reported, and unbound only when asked (`unbind_offline`), since it is the app's as a
whole, not this deployment's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone, translation

from . import registry
from .client import PortalClient, RestError
from .models import Portal

logger = logging.getLogger(__name__)


def handler_url() -> str:
    return f"{settings.BITRIX24_PUBLIC_URL}/events/" if settings.BITRIX24_PUBLIC_URL else ""


@dataclass(frozen=True, order=True)
class Binding:
    event: str
    offline: bool = False
    handler: str = ""  # the URL of an online binding; offline ones have none

    def __str__(self) -> str:
        return f"{self.event} (offline)" if self.offline else f"{self.event} → {self.handler}"


def wanted_events() -> list[str]:
    """Online events bound to /events/."""
    online = ["ONAPPUNINSTALL", *settings.BITRIX24_EVENTS, *registry.events(offline=False)]
    if registry.events(offline=True):
        online.append("ONOFFLINEEVENT")  # tells us that the portal's offline queue has records
    return list(dict.fromkeys(online))


def wanted_bindings() -> set[Binding]:
    handler = handler_url()
    if not handler:
        return set()
    wanted = {Binding(event, handler=handler) for event in wanted_events()}
    wanted |= {Binding(event, offline=True) for event in registry.events(offline=True)}
    return wanted


def placement_handler_url() -> str:
    """Every placement opens the app's launch URL; the launch routes by PLACEMENT (install.placements)."""
    return f"{settings.BITRIX24_PUBLIC_URL}/app/" if settings.BITRIX24_PUBLIC_URL else ""


@dataclass(frozen=True, order=True)
class PlacementBinding:
    placement: str
    handler: str
    title: str = ""
    lang_all: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def __str__(self) -> str:
        return f"placement {self.placement} → {self.handler}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.placement, self.handler)


def _in_each_language(text: object) -> dict[str, str]:
    values = {}
    for code, _name in settings.LANGUAGES:
        with translation.override(code):
            values[code] = str(text)
    return values


def wanted_placements() -> set[PlacementBinding]:
    handler = placement_handler_url()
    if not handler:
        return set()
    wanted = set()
    for entry in registry.placements():
        titles = _in_each_language(entry.title)
        descriptions = _in_each_language(entry.description)
        groups = _in_each_language(entry.group_name)
        lang_all = tuple(
            (
                code,
                tuple(
                    (key, value)
                    for key, value in (
                        ("TITLE", titles[code]),
                        ("DESCRIPTION", descriptions[code]),
                        ("GROUP_NAME", groups[code]),
                    )
                    if value
                ),
            )
            for code in sorted(titles)
        )
        wanted.add(PlacementBinding(entry.code, handler, titles.get("en", str(entry.title)), lang_all))
    return wanted


def wanted_fingerprint() -> str:
    """Changes when the wanted bindings (or the connector they are bound with, or a placement's titles)
    change."""
    lines = [settings.BITRIX24_AUTH_CONNECTOR, *map(str, sorted(wanted_bindings()))]
    lines += [repr(binding) for binding in sorted(wanted_placements())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


@dataclass
class SyncResult:
    bound: list[Binding | PlacementBinding] = field(default_factory=list)
    unbound: list[Binding | PlacementBinding] = field(default_factory=list)
    kept: int = 0
    unwanted_offline: list[Binding] = field(default_factory=list)  # reported, not removed

    @property
    def changed(self) -> bool:
        return bool(self.bound or self.unbound)

    def summary(self) -> str:
        parts = [f"bound {len(self.bound)}", f"unbound {len(self.unbound)}", f"kept {self.kept}"]
        if self.unwanted_offline:
            parts.append(f"{len(self.unwanted_offline)} offline binding(s) no longer wanted, left bound")
        return ", ".join(parts)


def _existing(client: PortalClient) -> set[Binding]:
    found = set()
    for item in client.call("event.get") or []:
        if not isinstance(item, dict):
            continue
        offline = str(item.get("offline", "0")) in ("1", "true", "True")
        found.add(
            Binding(
                str(item.get("event", "")).upper(),
                offline=offline,
                handler="" if offline else str(item.get("handler", "")),
            )
        )
    return found


def _is_ours(binding: Binding) -> bool:
    base = settings.BITRIX24_PUBLIC_URL
    return bool(base) and not binding.offline and binding.handler.startswith(base + "/")


def _already(exc: RestError) -> bool:
    # Binding what is bound answers ERROR_HANDLER_ALREADY_BINDED (placement.bind:
    # ERROR_PLACEMENT_HANDLER_ALREADY_BINDED, or "Handler already binded"); a retried bind that landed the
    # first time answers the same. Either way the binding is there.
    return "ALREADY_BINDED" in exc.code.upper() or "already" in exc.description.lower()


def _field(item: dict[str, object], name: str) -> str:
    # placement.get answers upper- or lower-case keys depending on the portal's version.
    value = item.get(name.upper(), item.get(name.lower(), ""))
    return str(value or "")


def _placements_apply(portal: Portal) -> bool:
    """Placements are synced when the app has some, or when it may have had some (the portal granted the
    `placement` scope): a placement removed from the app is then unbound too."""
    scopes = {part.strip() for part in portal.scope.replace(" ", ",").split(",")}
    return bool(registry.placements()) or "placement" in scopes


def _sync_placements(client: PortalClient, result: SyncResult, dry_run: bool) -> None:
    wanted = {binding.key: binding for binding in wanted_placements()}
    existing: dict[tuple[str, str], str] = {}
    for item in client.call("placement.get") or []:
        if isinstance(item, dict):
            key = (_field(item, "placement").upper(), _field(item, "handler"))
            existing[key] = _field(item, "title")
    base = settings.BITRIX24_PUBLIC_URL
    stale = sorted(key for key in existing if key not in wanted and base and key[1].startswith(base + "/"))
    # A title that changed is bound again: placement.bind cannot change a binding in place.
    retitled = sorted(
        key
        for key, binding in wanted.items()
        if key in existing and existing[key] and existing[key] != binding.title
    )
    missing = sorted(key for key in wanted if key not in existing)
    result.kept += len(wanted) - len(missing) - len(retitled)
    for placement, handler in stale + retitled:
        if not dry_run:
            client.call("placement.unbind", {"PLACEMENT": placement, "HANDLER": handler}, idempotent=True)
        result.unbound.append(PlacementBinding(placement, handler))
    for key in retitled + missing:
        binding = wanted[key]
        if not dry_run:
            params: dict[str, object] = {
                "PLACEMENT": binding.placement,
                "HANDLER": binding.handler,
                "TITLE": binding.title,
                "LANG_ALL": {code: dict(values) for code, values in binding.lang_all},
            }
            entry = registry.placement_for(binding.placement)
            if entry is not None and entry.description:
                params["DESCRIPTION"] = dict(dict(binding.lang_all).get("en", ())).get("DESCRIPTION", "")
            if entry is not None and entry.options:
                params["OPTIONS"] = entry.options
            try:
                client.call("placement.bind", params, idempotent=True)
            except RestError as exc:
                if not _already(exc):
                    raise
        result.bound.append(binding)


def sync_bindings(*, portal: Portal, dry_run: bool = False, unbind_offline: bool = False) -> SyncResult:
    """Make the portal's bindings the wanted ones; with `dry_run`, only say what would change."""
    wanted = wanted_bindings()
    result = SyncResult()
    if not handler_url():
        return result
    client = PortalClient(portal)
    existing = _existing(client)
    result.kept = len(wanted & existing)
    missing = sorted(wanted - existing)
    stale = sorted(b for b in existing - wanted if _is_ours(b))
    unwanted_offline = sorted(b for b in existing - wanted if b.offline)
    if unbind_offline:
        stale += unwanted_offline
    else:
        result.unwanted_offline = unwanted_offline
    if dry_run:
        result.bound, result.unbound = list(missing), list(stale)
        if _placements_apply(portal):
            _sync_placements(client, result, dry_run=True)
        return result
    for binding in missing:
        params: dict[str, str] = {"event": binding.event}
        if binding.offline:
            params["event_type"] = "offline"
            if settings.BITRIX24_AUTH_CONNECTOR:
                params["auth_connector"] = settings.BITRIX24_AUTH_CONNECTOR
        else:
            params["handler"] = binding.handler
        try:
            client.call("event.bind", params, idempotent=True)
        except RestError as exc:
            if not _already(exc):
                raise
        result.bound.append(binding)
    for binding in stale:
        params = {"event": binding.event}
        if binding.offline:
            params["event_type"] = "offline"
        else:
            params["handler"] = binding.handler
        client.call("event.unbind", params, idempotent=True)  # unbinding twice removes nothing more
        result.unbound.append(binding)
    if _placements_apply(portal):
        _sync_placements(client, result, dry_run=False)
    Portal.objects.filter(pk=portal.pk).update(
        bindings_fingerprint=wanted_fingerprint(), bindings_synced_at=timezone.now()
    )
    if result.changed:
        logger.info("Bindings of %s: %s", portal.domain, result.summary())
    return result


def bind_events(*, portal: Portal) -> list[str]:
    """After a trusted install or update: the sync, returning the event names bound now."""
    return [binding.event for binding in sync_bindings(portal=portal).bound if isinstance(binding, Binding)]
