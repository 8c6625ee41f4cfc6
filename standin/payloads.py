"""The requests Bitrix24 sends to an app, built for a :class:`~standin.portal.FakePortal`.

Events are ``application/x-www-form-urlencoded`` POSTs with PHP-style nested keys, so the event builders
return form pairs (post them with ``requests.post(url, data=pairs)``). The launch / install frame is a POST
whose query string and body carry different fields, so :func:`launch` returns both as dicts.

Each builder mirrors a page of ``bitrix24/b24restdocs`` (named in its docstring); the samples are in
``tests/payloads/``. Endpoints point at the stand-in: ``server_endpoint`` is the stand-in's
``oauth_url + "/rest/"``, ``client_endpoint`` the portal's ``url + "/rest/"``, ``domain`` the portal's.
Standard library only.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import form as phpform

if TYPE_CHECKING:  # a portal builds its app frame and events with these payloads
    from .state import PortalState

__all__ = ["event", "launch", "onappinstall", "onapppayment", "onappuninstall", "onappupdate"]

Pairs = list[tuple[str, str]]


def _ts(portal: PortalState) -> str:
    return str(int(portal.standin.now()))


def _token_auth(portal: PortalState, tokens: Mapping[str, Any]) -> dict[str, Any]:
    """The ``auth`` block of an event that carries tokens. The docs' install example leaves out ``expires``
    (when the access token expires, UNIX time) and ``user_id`` (the installing user); portals send both, as
    ONAPPINSTALL requests captured from live portals show (``auth[expires]=1579689753``,
    ``auth[user_id]=1``), in this order."""
    expires_in = int(tokens.get("expires_in", portal.standin.access_ttl))
    return {
        "access_token": tokens["access_token"],
        "expires": str(tokens.get("expires", int(portal.standin.now()) + expires_in)),
        "expires_in": str(expires_in),
        "scope": tokens.get("scope", portal.scope),
        "domain": portal.domain,
        "server_endpoint": portal.standin.server_endpoint,
        "status": portal.status,
        "client_endpoint": portal.client_endpoint,
        "member_id": portal.member_id,
        "user_id": str(tokens.get("user_id", 1)),
        "refresh_token": tokens["refresh_token"],
        "application_token": portal.application_token,
    }


def _portal_auth(portal: PortalState) -> dict[str, Any]:
    """The ``auth`` of the lifecycle events that carry no token: the portal's address and member_id."""
    return {
        "domain": portal.domain,
        "server_endpoint": portal.standin.server_endpoint,
        "client_endpoint": portal.client_endpoint,
        "member_id": portal.member_id,
    }


def onappinstall(portal: PortalState, tokens: Mapping[str, Any]) -> Pairs:
    """ONAPPINSTALL for an API-only app (settings/oauth/simple-way.md, "Application Installation Event";
    api-reference/common/events/on-app-install.md). The only routine event carrying a refresh token."""
    return phpform.encode(
        {
            "event": "ONAPPINSTALL",
            "data": {"VERSION": str(portal.app_version), "LANGUAGE_ID": portal.language_id},
            "ts": _ts(portal),
            "auth": _token_auth(portal, tokens),
        }
    )


def onappuninstall(portal: PortalState, clean: bool = False) -> Pairs:
    """ONAPPUNINSTALL (api-reference/common/events/on-app-uninstall.md): no tokens in ``auth``, only the
    domain, endpoints, member_id and the application token — the one thing that verifies it.

    Builds the request only; call ``portal.uninstall()`` to make the portal's tokens die as well.
    """
    return phpform.encode(
        {
            "event": "ONAPPUNINSTALL",
            "data": {"LANGUAGE_ID": portal.language_id, "CLEAN": "1" if clean else "0"},
            "ts": _ts(portal),
            "auth": {**_portal_auth(portal), "application_token": portal.application_token},
        }
    )


def onappupdate(portal: PortalState, tokens: Mapping[str, Any]) -> Pairs:
    """ONAPPUPDATE (api-reference/common/events/on-app-update.md): tokens and a NEW application token.

    Side effect, as on a real portal: the app version goes up, the application token rotates and event
    bindings are dropped (``portal.update_app()``) before the event is built.
    """
    previous, version = portal.update_app()
    return phpform.encode(
        {
            "event": "ONAPPUPDATE",
            "data": {
                "VERSION": str(version),
                "PREVIOUS_VERSION": str(previous),
                "LANGUAGE_ID": portal.language_id,
            },
            "ts": _ts(portal),
            "auth": _token_auth(portal, tokens),
        }
    )


def onapppayment(portal: PortalState) -> Pairs:
    """ONAPPPAYMENT (api-reference/common/events/on-app-payment.md): ``auth`` holds only the domain,
    endpoints and member_id — nothing to verify it with; the app must ask ``app.info``."""
    return phpform.encode(
        {
            "event": "ONAPPPAYMENT",
            "data": {
                "CODE": portal.standin.client_id,
                "VERSION": str(portal.app_version),
                "STATUS": portal.status,
                "PAYMENT_EXPIRED": "Y" if portal.payment_required else "N",
                "DAYS": "28",
                "LANGUAGE_ID": portal.language_id,
            },
            "ts": _ts(portal),
            "auth": _portal_auth(portal),
        }
    )


def _event_auth(portal: PortalState, tokens: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``auth`` block of an ordinary event: the docs' order, without a refresh token.

    The event pages' examples (e.g. api-reference/crm/deals/events/on-crm-deal-add.md) print a
    ``refresh_token``, but _includes/auth-params-in-events.md marks it optional and events other than the
    install normally carry none (docs/bitrix24-protocol.md §3): an app must not count on it.
    ``scope`` is the app's scope, as the token carries it (on-offline-event.md: "the list of permissions
    granted to the application"). Without ``tokens`` (a change no user made) there is no ``access_token``
    nor ``expires_in``: "If the hit that initiated the event could not be linked to a specific Bitrix24
    user, the tokens are not passed" (auth-params-in-events.md).
    """
    token_fields = (
        {
            "access_token": tokens["access_token"],
            "expires_in": str(tokens.get("expires_in", portal.standin.access_ttl)),
        }
        if tokens is not None
        else {}
    )
    return {
        **token_fields,
        "scope": tokens.get("scope", portal.scope) if tokens is not None else portal.scope,
        "domain": portal.domain,
        "server_endpoint": portal.standin.server_endpoint,
        "status": portal.status,
        "client_endpoint": portal.client_endpoint,
        "member_id": portal.member_id,
        "application_token": portal.application_token,
    }


def event(
    portal: PortalState, name: str, data: Any, tokens: Mapping[str, Any] | None, *, handler_id: int | str
) -> Pairs:
    """An event as the queue server posts it to a handler bound with ``event.bind``:
    ``event``, ``event_handler_id``, ``data``, ``ts`` (when it is sent), ``auth`` with a token of the user
    the binding is authorized as (api-reference/crm/deals/events/on-crm-deal-add.md; oncrmcontactadd-docs.json).

    ``data`` is the event's own (``{"FIELDS": {"ID": "89"}}`` for CRM events); ONOFFLINEEVENT's is empty
    (api-reference/events/on-offline-event.md), and an empty array is not sent at all, as PHP does.
    """
    return phpform.encode(
        {
            "event": name,
            "event_handler_id": str(handler_id),
            "data": data,
            "ts": _ts(portal),
            "auth": _event_auth(portal, tokens),
        }
    )


def _php_json(value: Any) -> str:
    # PHP's json_encode escapes "/" as "\/" (see PLACEMENT_OPTIONS in api-reference/widgets/crm/detail-tab.md).
    # Escaping every "/" is safe: it only occurs inside strings, and "\/" is a valid JSON escape.
    return json.dumps(value).replace("/", "\\/")


def launch(
    portal: PortalState,
    tokens: Mapping[str, Any],
    placement: str = "DEFAULT",
    options: Mapping[str, Any] | None = None,
    lang: str = "en",
) -> tuple[dict[str, str], dict[str, str]]:
    """The POST that opens the app in the portal's frame (settings/oauth/simple-way.md, "What the
    Application Receives on Opening"; launch-default-docs.txt): ``DOMAIN``, ``PROTOCOL``, ``LANG``,
    ``APP_SID`` in the query string, the rest in the form body. Also the install frame's request.

    Returns ``(query, body)``: ``requests.post(handler_url, params=query, data=body)``.
    """
    query = {
        "DOMAIN": portal.domain,
        "PROTOCOL": "1" if portal.url.startswith("https://") else "0",
        "LANG": lang,
        "APP_SID": secrets.token_hex(16),  # a per-render id for the JS library, not the application token
    }
    body = {
        "AUTH_ID": str(tokens["access_token"]),
        "AUTH_EXPIRES": str(tokens.get("expires_in", portal.standin.access_ttl)),
        "REFRESH_ID": str(tokens["refresh_token"]),
        "SERVER_ENDPOINT": portal.standin.server_endpoint,
        "APPLICATION_TOKEN": portal.application_token,
        "APPLICATION_SCOPE": str(tokens.get("scope", portal.scope)),
        "member_id": portal.member_id,
        "status": portal.status,
        "PLACEMENT": placement,
    }
    if options is not None:
        body["PLACEMENT_OPTIONS"] = _php_json(dict(options))
    return query, body
