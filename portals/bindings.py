"""Event bindings: Bitrix24 drops `event.bind` handlers on update and uninstall, so after every
install and update the app binds ONAPPUNINSTALL and BITRIX24_EVENTS again, idempotently."""

from __future__ import annotations

import logging

from django.conf import settings

from .client import PortalClient, RestError
from .models import Portal

logger = logging.getLogger(__name__)


def handler_url() -> str:
    return f"{settings.BITRIX24_PUBLIC_URL}/events/" if settings.BITRIX24_PUBLIC_URL else ""


def wanted_events() -> list[str]:
    return list(dict.fromkeys(["ONAPPUNINSTALL", *settings.BITRIX24_EVENTS]))


def bind_events(*, portal: Portal) -> list[str]:
    """Bind every wanted event to our handler that is not bound yet; returns the ones bound now."""
    handler = handler_url()
    if not handler:
        return []
    client = PortalClient(portal)
    existing = client.call("event.get") or []
    bound_already = {
        (str(item.get("event", "")).upper(), str(item.get("handler", "")))
        for item in existing
        if isinstance(item, dict)
    }
    bound: list[str] = []
    for event in wanted_events():
        if (event, handler) in bound_already:
            continue
        try:
            client.call("event.bind", {"event": event, "handler": handler}, idempotent=True)
        except RestError as exc:
            # A retried bind that did land the first time answers "Handler already binded".
            if "already" not in exc.description.lower():
                raise
        bound.append(event)
    if bound:
        logger.info("Bound %s on %s", ", ".join(bound), portal.domain)
    return bound
