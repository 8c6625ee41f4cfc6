"""What each endpoint does with a request: parse, verify, call one service, answer."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from portals import operations, services, tasks
from portals.models import Portal

from . import parsing
from .inbound import describe, set_frame_policy
from .models import InboundRequest


def _claimed(data: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str):
            return value
    return ""


def _frame(request: HttpRequest, row: InboundRequest) -> tuple[parsing.FrameAuth, services.Verified]:
    query, body = parsing.read_params(request)
    merged = {**query, **body}
    describe(
        row,
        query=query,
        body=body,
        member_id=_claimed(merged, "member_id"),
        domain=_claimed(merged, "DOMAIN"),
    )
    auth = parsing.frame_auth(query, body)
    if services.is_portal_domain(auth.domain):
        row._frame_origin = f"{auth.protocol}://{auth.domain}"  # type: ignore[attr-defined]
    verified = services.verify_access_token(
        access_token=auth.access_token,
        member_id=auth.member_id,
        domain=auth.domain,
        server_endpoint=auth.server_endpoint,
    )
    return auth, verified


def _install(*, verified: services.Verified, access_token: str, **fields: Any) -> Portal:
    """Store a verified install or update; a trusted one also gets its event bindings redone."""
    trusted = services.install_is_trusted(verified=verified, access_token=access_token)
    portal = services.install_portal(verified=verified, access_token=access_token, trusted=trusted, **fields)
    if trusted:
        tasks.queue_bindings(portal=portal)
    _confirm(portal)
    return portal


def _confirm(portal: Portal) -> None:
    """A portal that had lost its tokens counts as installed once its new background pair renewed."""
    pair = services.needs_confirmation(portal)
    if pair is not None:
        tasks.queue_confirmation(pair=pair)


def install_frame(request: HttpRequest, row: InboundRequest) -> HttpResponse:
    auth, verified = _frame(request, row)
    portal = _install(
        verified=verified,
        access_token=auth.access_token,
        refresh_token=auth.refresh_token,
        expires_in=auth.expires_in,
        scope=auth.scope,
        application_token=auth.application_token,
    )
    response = render(request, "install/install.html", {"portal": portal, "lang": auth.lang})
    set_frame_policy(response, portal.origin)
    return response


def launch(request: HttpRequest, row: InboundRequest) -> HttpResponse:
    auth, verified = _frame(request, row)
    portal, pair = services.record_launch(
        verified=verified,
        access_token=auth.access_token,
        refresh_token=auth.refresh_token,
        expires_in=auth.expires_in,
        scope=auth.scope,
    )
    _confirm(portal)
    context = {
        "portal": portal,
        "user_id": verified.info.user_id,
        "is_background_user": bool(pair and pair.is_background),
        "placement": auth.placement,
        "placement_options": auth.placement_options,
        "lang": auth.lang,
    }
    response = render(request, "install/app.html", context)
    set_frame_policy(response, portal.origin)
    return response


# --- events -------------------------------------------------------------------------------------


def _verified_event(auth: dict[str, Any]) -> tuple[services.Verified, str, str, int]:
    access = parsing.text(auth, "access_token", pattern=parsing.TOKEN, max_length=512, where="auth")
    refresh = parsing.text(auth, "refresh_token", pattern=parsing.TOKEN, max_length=512, where="auth")
    verified = services.verify_access_token(
        access_token=access,
        member_id=parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth"),
        domain=parsing.domain(auth, "domain", where="auth"),
        server_endpoint=parsing.text(auth, "server_endpoint", required=False, max_length=255, where="auth"),
    )
    expires_in = parsing.integer(auth, "expires_in", default=3600, low=1, high=86400, where="auth")
    return verified, access, refresh, expires_in


def _on_install(auth: dict[str, Any], data: dict[str, Any]) -> Portal:
    verified, access, refresh, expires_in = _verified_event(auth)
    return _install(
        verified=verified,
        access_token=access,
        refresh_token=refresh,
        expires_in=expires_in,
        scope=parsing.text(auth, "scope", required=False, where="auth"),
        application_token=parsing.text(
            auth, "application_token", pattern=parsing.TOKEN, max_length=512, where="auth"
        ),
        version=parsing.text(data, "VERSION", required=False, max_length=32, where="data"),
    )


def _application_token_portal(auth: dict[str, Any]) -> Portal:
    return services.check_application_token(
        member_id=parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth"),
        application_token=parsing.text(
            auth, "application_token", pattern=parsing.TOKEN, max_length=512, where="auth"
        ),
    )


def _on_uninstall(auth: dict[str, Any], data: dict[str, Any]) -> Portal:
    portal = _application_token_portal(auth)
    clean = str(data.get("CLEAN", "0")).strip() in ("1", "Y", "true")
    return services.uninstall_portal(portal=portal, clean=clean)


def _on_payment(auth: dict[str, Any], data: dict[str, Any]) -> Portal:
    # The body proves nothing (no token in it): it is only a hint to ask app.info for the truth.
    member_id = parsing.text(auth, "member_id", pattern=parsing.MEMBER_ID, where="auth")
    portal = Portal.objects.filter(member_id=member_id).first()
    if portal is None:
        raise services.VerificationError("unknown portal", code="unknown_portal")
    try:
        operations.verify_portal(portal=portal)
    except operations.OperationRefused as exc:
        raise services.VerificationError(str(exc), status=409, code="cannot_verify") from exc
    return portal


def _on_other(auth: dict[str, Any], data: dict[str, Any]) -> Portal:
    return _application_token_portal(auth)


EVENT_HANDLERS = {
    "ONAPPINSTALL": _on_install,
    "ONAPPUPDATE": _on_install,  # carries a new pair and a NEW application token, verified the same way
    "ONAPPUNINSTALL": _on_uninstall,
    "ONAPPPAYMENT": _on_payment,
}


def event(request: HttpRequest, row: InboundRequest) -> HttpResponse:
    query, body = parsing.read_params(request)
    params = {**query, **body}
    maybe_auth = params.get("auth")
    raw_auth: dict[str, Any] = maybe_auth if isinstance(maybe_auth, dict) else {}
    describe(
        row,
        query=query,
        body=body,
        event=_claimed(params, "event").upper(),
        member_id=_claimed(raw_auth, "member_id"),
        domain=_claimed(raw_auth, "domain"),
    )
    name = parsing.text(params, "event", pattern=parsing.EVENT, max_length=64).upper()
    auth = parsing.section(params, "auth")
    data = parsing.section(params, "data", required=False)
    handler = EVENT_HANDLERS.get(name, _on_other)
    portal = handler(auth, data)
    return JsonResponse({"result": "ok", "event": name, "member_id": portal.member_id})
