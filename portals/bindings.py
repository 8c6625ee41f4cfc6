"""Event bindings kept in sync with what the app wants.

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
from django.utils import timezone

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


def wanted_fingerprint() -> str:
    """Changes when the wanted bindings (or the connector they are bound with) change."""
    text = "\n".join([settings.BITRIX24_AUTH_CONNECTOR, *map(str, sorted(wanted_bindings()))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class SyncResult:
    bound: list[Binding] = field(default_factory=list)
    unbound: list[Binding] = field(default_factory=list)
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
    # Binding what is bound answers ERROR_HANDLER_ALREADY_BINDED (or "Handler already binded"); a retried
    # bind that landed the first time answers the same. Either way the binding is there.
    return "ALREADY_BINDED" in exc.code.upper() or "already" in exc.description.lower()


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
        result.bound, result.unbound = missing, stale
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
    Portal.objects.filter(pk=portal.pk).update(
        bindings_fingerprint=wanted_fingerprint(), bindings_synced_at=timezone.now()
    )
    if result.changed:
        logger.info("Bindings of %s: %s", portal.domain, result.summary())
    return result


def bind_events(*, portal: Portal) -> list[str]:
    """After a trusted install or update: the sync, returning the event names bound now."""
    return [binding.event for binding in sync_bindings(portal=portal).bound]
