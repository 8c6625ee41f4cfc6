"""What each endpoint does with a request: parse, verify, call one service, answer."""

from __future__ import annotations

from typing import Any

from celery import current_app
from django.db import InterfaceError, OperationalError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import translation

from events import tasks as event_tasks
from portals import licence, outage, registry, services, spool, tasks, verification
from portals.client import PortalClient
from portals.errors import TooManyEvents
from portals.models import Portal
from portals.tasks import publish

from . import deferred, parsing, placements
from .inbound import Inbound, LogUnavailable, record_request, set_frame_policy


def _claimed(data: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str):
            return value
    return ""


def _frame(request: HttpRequest, inbound: Inbound) -> tuple[parsing.FrameAuth, verification.Verified, int]:
    query, body = parsing.read_params(request)
    merged = {**query, **body}
    record_request(
        inbound,
        query=query,
        body=body,
        member_id=_claimed(merged, "member_id"),
        domain=_claimed(merged, "DOMAIN"),
    )
    auth = parsing.frame_auth(query, body)
    if verification.is_portal_domain(auth.domain):
        inbound.frame_origin = f"{auth.protocol}://{auth.domain}"
    # Read before verifying: an uninstall confirmed while app.info is asked makes the answer stale.
    generation = verification.install_generation(auth.member_id)
    verified = verification.verify_access_token(
        access_token=auth.access_token,
        member_id=auth.member_id,
        domain=auth.domain,
        server_endpoint=auth.server_endpoint,
        generation=generation,
    )
    inbound.verified()
    return auth, verified, generation


def _install(*, verified: verification.Verified, access_token: str, **fields: Any) -> Portal:
    """Store a verified install or update; a trusted one also gets its event bindings redone."""
    trusted = services.install_is_trusted(verified=verified, access_token=access_token)
    portal = services.install_portal(verified=verified, access_token=access_token, trusted=trusted, **fields)
    if trusted:
        tasks.queue_bindings(portal=portal)
    _confirm(portal, install=True)
    # A valid token at hand: the licence as the portal's own app.info says it.
    licence.read(portal, access_token=access_token)
    return portal


def _confirm(portal: Portal, *, install: bool = False) -> None:
    """A portal that had lost its tokens counts as installed once its new background pair renewed; an
    install's new background pair is renewed once at once, to make its refresh token ours."""
    pair = services.needs_confirmation(portal=portal)
    if pair is None and install:
        pair = services.background_to_prove(portal=portal)
    if pair is not None:
        tasks.queue_confirmation(pair=pair)


def install_frame(request: HttpRequest, inbound: Inbound) -> HttpResponse:
    auth, verified, generation = _frame(request, inbound)
    portal = _install(
        verified=verified,
        generation=generation,
        access_token=auth.access_token,
        refresh_token=auth.refresh_token,
        expires_in=auth.expires_in,
        scope=auth.scope,
        application_token=auth.application_token,
    )
    lang = placements.language(auth.lang)
    with translation.override(lang):
        response = render(request, "install/install.html", {"portal": portal, "lang": lang})
    set_frame_policy(response, portal.origin)
    return response


def launch(request: HttpRequest, inbound: Inbound) -> HttpResponse:
    auth, verified, generation = _frame(request, inbound)
    portal, pair = services.record_launch(
        verified=verified,
        generation=generation,
        access_token=auth.access_token,
        refresh_token=auth.refresh_token,
        expires_in=auth.expires_in,
        scope=auth.scope,
    )
    _confirm(portal)
    licence.read_if_stale(portal, access_token=auth.access_token)
    lang = placements.language(auth.lang)
    user_id = int(verified.info.user_id or 0)
    if (auth.placement or "DEFAULT").upper() != "DEFAULT" or registry.placement_for("DEFAULT"):
        # A placement (a CRM tab, a menu item) opened: the app's view for it, or a page saying it has none.
        context = placements.PlacementContext(
            portal=portal,
            user_id=user_id,
            placement=(auth.placement or "DEFAULT").upper(),
            options=auth.placement_options,
            lang=lang,
            access_token=auth.access_token,
            client=PortalClient(portal, user_id=user_id),
        )
        response = placements.show(request, context)
    else:
        with translation.override(lang):
            response = render(
                request,
                "install/app.html",
                {
                    "portal": portal,
                    "user_id": verified.info.user_id,
                    "is_background_user": bool(pair and pair.is_background),
                    "placement": auth.placement,
                    "placement_options": auth.placement_options,
                    "lang": lang,
                },
            )
    set_frame_policy(response, portal.origin)
    return response


# --- events -------------------------------------------------------------------------------------


def _verified_event(auth: dict[str, Any]) -> tuple[verification.Verified, str, str, int, int]:
    access = parsing.text(auth, "access_token", pattern=parsing.TOKEN, max_length=512, where="auth")
    refresh = parsing.text(auth, "refresh_token", pattern=parsing.TOKEN, max_length=512, where="auth")
    member_id = parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth")
    generation = verification.install_generation(member_id)
    verified = verification.verify_access_token(
        access_token=access,
        member_id=member_id,
        domain=parsing.domain(auth, "domain", where="auth"),
        server_endpoint=parsing.text(auth, "server_endpoint", required=False, max_length=255, where="auth"),
        generation=generation,
    )
    expires_in = parsing.integer(auth, "expires_in", default=3600, low=1, high=86400, where="auth")
    return verified, access, refresh, expires_in, generation


def _on_install(auth: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    verified, access, refresh, expires_in, generation = _verified_event(auth)
    portal = _install(
        verified=verified,
        generation=generation,
        access_token=access,
        refresh_token=refresh,
        expires_in=expires_in,
        scope=parsing.text(auth, "scope", required=False, where="auth"),
        application_token=parsing.text(
            auth, "application_token", pattern=parsing.TOKEN, max_length=512, where="auth"
        ),
        version=parsing.text(data, "VERSION", required=False, max_length=32, where="data"),
    )
    return portal.member_id, "ok"


def _application_token_portal(auth: dict[str, Any]) -> Portal:
    return verification.check_application_token(
        member_id=parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth"),
        application_token=parsing.text(
            auth, "application_token", pattern=parsing.TOKEN, max_length=512, where="auth"
        ),
    )


def _on_uninstall(auth: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    # The application token admits the event, but every employee who opens the app can read it: it
    # never destroys on its own. A worker asks Bitrix24 first (portals.tasks, CONFIRM_UNINSTALL).
    portal = _application_token_portal(auth)
    clean = str(data.get("CLEAN", "0")).strip() in ("1", "Y", "true")
    tasks.queue_uninstall_confirmation(portal=portal, clean=clean)
    return portal.member_id, "pending"


def _on_payment(auth: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    # The body proves nothing (no token in it): it is only a hint for a worker, which looks the portal up
    # and asks app.info, at most once a minute per portal. Nothing here reads the database: known and
    # unknown member_ids get the same answer, byte for byte, after the same statements.
    member_id = parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth")
    tasks.queue_payment_hint(member_id=member_id)
    return "", "ok"


def _on_offline_notice(auth: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    # Only a hint that the portal's offline queue has records: the pull reads them from the portal
    # itself, so a forged notice costs one debounced pull at most.
    portal = _application_token_portal(auth)
    event_tasks.queue_pull(portal=portal)
    return portal.member_id, "pull queued"


# Events whose handling proves nothing about the sender: ONAPPPAYMENT carries no token (a worker asks
# Bitrix24 itself), so its row keeps a summary only.
UNPROVEN = frozenset({"ONAPPPAYMENT"})

EVENT_HANDLERS = {
    "ONAPPINSTALL": _on_install,
    "ONAPPUPDATE": _on_install,  # carries a new pair and a NEW application token, verified the same way
    "ONAPPUNINSTALL": _on_uninstall,
    "ONAPPPAYMENT": _on_payment,
    "ONOFFLINEEVENT": _on_offline_notice,
}


def _on_app_event(
    name: str, params: dict[str, Any], auth: dict[str, Any], data: dict[str, Any]
) -> tuple[str, str]:
    """Any other event: admitted by the application token, stored for the app's handlers (if any
    registered for it), answered at once; the handlers run in a worker."""
    portal = _application_token_portal(auth)
    outcome = event_tasks.accept_event(portal=portal, event=name, data=data, ts=params.get("ts"), auth=auth)
    return portal.member_id, outcome


def _handle_event(
    inbound: Inbound, name: str, params: dict[str, Any], auth: dict[str, Any], data: dict[str, Any]
) -> tuple[str, str]:
    handler = EVENT_HANDLERS.get(name)
    if handler is None:
        member_id, result = _on_app_event(name, params, auth, data)
        inbound.verified()  # its application token matched
        if result == "ignored":
            inbound.summary_only()  # nothing handles it: its body is not worth keeping
        return member_id, result
    try:
        member_id, result = handler(auth, data)
    except (verification.TooManyUnverified, verification.UpstreamUnavailable) as exc:
        if name not in deferred.LIFECYCLE:
            raise
        # Bitrix24 delivers it once: kept and verified by a worker later, never dropped for a budget.
        row = deferred.defer(name=name, auth=auth, data=data, ts=params.get("ts"), reason=str(exc))
        transaction.on_commit(_drain_soon)
        return row.member_id, "deferred"
    if name not in UNPROVEN:
        inbound.verified()
    return member_id, result


def _drain_soon() -> None:
    publish(current_app.signature(deferred.APPLY_TASK), countdown=30)


def _spooled(params: dict[str, Any]) -> HttpResponse:
    """An event that came while the database is away: kept in the spool (200), refused as the database
    would refuse it, or, when it cannot be kept anywhere, 503 (LogUnavailable)."""
    name = parsing.text(params, "event", pattern=parsing.EVENT, max_length=64).upper()
    auth = parsing.section(params, "auth")
    data = parsing.section(params, "data", required=False)
    if name in UNPROVEN:
        member_id, result = EVENT_HANDLERS[name](auth, data)  # a hint for a worker: needs no database
    else:
        try:
            member_id = deferred.spool_delivery(name=name, auth=auth, data=data, ts=params.get("ts"))
        except spool.SpoolUnavailable as exc:
            raise LogUnavailable(str(exc)) from exc
        except spool.SpoolFull as exc:
            if not exc.sender:  # full, or too large for it: nowhere to keep it
                raise LogUnavailable(str(exc)) from exc
            raise TooManyEvents(f"the database is away and {exc}", retry_after=exc.retry_after) from exc
        result = "spooled"
        _drain_soon()
    answer = {"result": result, "event": name}
    if member_id:
        answer["member_id"] = member_id
    return JsonResponse(answer)


def event(request: HttpRequest, inbound: Inbound) -> HttpResponse:
    query, body = parsing.read_params(request)
    params = {**query, **body}
    maybe_auth = params.get("auth")
    raw_auth: dict[str, Any] = maybe_auth if isinstance(maybe_auth, dict) else {}
    try:
        record_request(
            inbound,
            query=query,
            body=body,
            event=_claimed(params, "event").upper(),
            member_id=_claimed(raw_auth, "member_id"),
            domain=_claimed(raw_auth, "domain"),
        )
    except LogUnavailable:
        # The database is away: kept in the spool when it can be admitted without it, else 503.
        inbound.spooled = True
        return _spooled(params)
    name = parsing.text(params, "event", pattern=parsing.EVENT, max_length=64).upper()
    auth = parsing.section(params, "auth")
    data = parsing.section(params, "data", required=False)
    try:
        member_id, result = _handle_event(inbound, name, params, auth, data)
    except (OperationalError, InterfaceError):
        # The database went away while the event was handled (its transaction rolled back): spooled too.
        outage.failed_if_lost()
        inbound.spooled = True
        return _spooled(params)
    answer = {"result": result, "event": name}
    if member_id:  # not for an anonymous ONAPPPAYMENT: the answer says nothing of whether it is ours
        answer["member_id"] = member_id
    return JsonResponse(answer)


def replay_event(name: str, auth: dict[str, Any], data: dict[str, Any], ts: Any) -> tuple[str, str]:
    """A deferred event, handled as if it had just come (install.deferred)."""
    handler = EVENT_HANDLERS.get(name)
    if handler is not None:
        return handler(auth, data)
    return _on_app_event(name, {"ts": ts}, auth, data)
