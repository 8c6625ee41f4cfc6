"""The operations staff run on portals: the portal list's actions and the portal page's buttons.

Each one is a call to `portals.operations`; what this module adds is the staff's side of it (which
portals were selected, the confirmation page before a purge, the messages saying what happened).
The list's actions and the page's buttons run the same functions.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse

from portals import operations, verification
from portals.models import Portal, PortalState, WantedAction, WantedKind

# The portal page's buttons: the operation's name in the URL (…/operate/<name>/) → its label.
BUTTONS = {
    "renew": "Renew now",
    "verify": "Verify with app.info",
    "reinstall": "Mark as needing reinstall",
    "approve": "Approve pending install",
    "confirm_uninstall": "Confirm uninstall",
    "dismiss_uninstall": "Dismiss uninstall claim",
    "acknowledge_lost": "Acknowledge lost pairs",
    "purge": "Purge data",
}


@admin.action(description="Renew now (queued)", permissions=["change"])
def renew_now(modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]) -> None:
    queued = portals = 0
    refused = []
    for portal in queryset:
        try:
            queued += operations.queue_renewal(portal=portal)
        except operations.OperationRefused as exc:
            refused.append(str(exc))
            continue
        portals += 1
    if queued:
        modeladmin.message_user(
            request,
            f"Queued the renewal of {queued} token pair(s) on {portals} portal(s). A worker renews "
            "them in a moment; the renewal log shows the outcome.",
            messages.SUCCESS,
        )
    for message in refused:
        modeladmin.message_user(request, f"Not queued: {message}", messages.WARNING)


@admin.action(description="Verify with app.info", permissions=["change"])
def verify_with_app_info(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    for portal in queryset:
        try:
            info = operations.verify_portal(portal=portal)
        except (operations.OperationRefused, verification.UpstreamUnavailable, ImproperlyConfigured) as exc:
            modeladmin.message_user(request, f"{portal.domain}: not verified: {exc}", messages.ERROR)
            continue
        status = Portal(app_status=info.status[:1]).get_app_status_display() or info.status or "unknown"
        installed = "installed" if info.installed else "NOT installed, per Bitrix24"
        modeladmin.message_user(
            request,
            f"{portal.domain}: verified with app.info: app {installed}, status {status}, "
            f"version {info.version or '?'}.",
            messages.SUCCESS if info.installed else messages.WARNING,
        )


@admin.action(description="Mark as needing reinstall", permissions=["change"])
def mark_needs_reinstall(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    reason = (request.POST.get("reason") or "").strip() or f"marked by staff ({request.user})"
    done = []
    for portal in queryset:
        try:
            operations.mark_needs_reinstall(portal=portal, reason=reason)
        except operations.OperationRefused as exc:
            modeladmin.message_user(request, str(exc), messages.WARNING)
            continue
        done.append(portal.domain)
    if done:
        modeladmin.message_user(
            request, f"Marked as needing a reinstall: {', '.join(done)}.", messages.SUCCESS
        )


def _each(
    modeladmin: admin.ModelAdmin[Portal],
    request: HttpRequest,
    queryset: QuerySet[Portal],
    run: Callable[[Portal], str],
    *,
    refused: str,
) -> None:
    """`run` on each selected portal: what it says on success, `refused: why` when the operation refuses."""
    for portal in queryset:
        try:
            said = run(portal)
        except operations.OperationRefused as exc:
            modeladmin.message_user(request, f"{refused}: {exc}", messages.WARNING)
            continue
        modeladmin.message_user(request, f"{portal.domain}: {said}", messages.SUCCESS)


@admin.action(description="Approve pending installs", permissions=["change"])
def approve_pending(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    """Vouch for a portal first seen through a user who is not a portal admin."""

    def approve(portal: Portal) -> str:
        operations.approve_pending(portal=portal)
        return "approved, now installed."

    _each(modeladmin, request, queryset, approve, refused="Not approved")


@admin.action(description="Confirm uninstall (a claim held for want of proof)", permissions=["change"])
def confirm_uninstall(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    """For an uninstall claim Bitrix24 gave no proof of (held): staff know better. The tokens go at once;
    with CLEAN=1 the data BITRIX24_PURGE_DELAY_DAYS later."""
    for portal in queryset:
        pending = WantedAction.objects.filter(
            portal=portal, kind=WantedKind.CONFIRM_UNINSTALL, done_at=None
        ).first()
        if pending is None:
            modeladmin.message_user(
                request, f"{portal.domain}: no uninstall event is waiting for confirmation.", messages.WARNING
            )
            continue
        try:
            operations.confirm_uninstall(portal=portal, clean=pending.force)
        except operations.OperationRefused as exc:
            modeladmin.message_user(request, f"Not confirmed: {exc}", messages.WARNING)
            continue
        modeladmin.message_user(request, f"{portal.domain}: uninstall confirmed.", messages.SUCCESS)


@admin.action(description="Dismiss uninstall claim", permissions=["change"])
def dismiss_uninstall(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    """The app is still wanted on the portal (a forged or mistaken ONAPPUNINSTALL): nothing is deleted."""

    def dismiss(portal: Portal) -> str:
        operations.dismiss_uninstall(portal=portal)
        return "uninstall claim dismissed."

    _each(modeladmin, request, queryset, dismiss, refused="Not dismissed")


@admin.action(description="Acknowledge lost pairs", permissions=["change"])
def acknowledge_lost(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> None:
    """Staff know the portal needs a reinstall: `renew_tokens --all-unacknowledged` stops naming its pairs."""
    _each(
        modeladmin,
        request,
        queryset,
        lambda portal: f"{operations.acknowledge_lost(portal=portal)} lost pair(s) acknowledged.",
        refused="Not acknowledged",
    )


@admin.action(description="Purge data of uninstalled portals", permissions=["change"])
def purge_data(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]
) -> TemplateResponse | None:
    """The list's action: the confirmation page first, the purge once it is confirmed."""
    if request.POST.get("confirmed") != "yes":
        return purge_confirmation(modeladmin, request, list(queryset), single=False)
    purge(modeladmin, request, queryset)
    return None


def purge(modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, queryset: QuerySet[Portal]) -> None:
    """The purge itself, once staff confirmed it."""
    done = []
    for portal in queryset:
        try:
            operations.purge_portal(portal=portal)
        except operations.OperationRefused as exc:
            modeladmin.message_user(request, f"Not purged: {exc}", messages.WARNING)
            continue
        done.append(portal.domain)
    if done:
        modeladmin.message_user(
            request,
            f"Purged the tokens, renewal log and inbound requests of: {', '.join(done)}.",
            messages.SUCCESS,
        )


def purge_confirmation(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, portals: list[Portal], *, single: bool
) -> TemplateResponse:
    """What a purge would delete, and which of the selected portals it would refuse."""
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Purge the data of uninstalled portals?",
        "opts": modeladmin.model._meta,
        "portals": portals,
        "purgeable": [p for p in portals if p.state == PortalState.UNINSTALLED],
        "refused": [p for p in portals if p.state != PortalState.UNINSTALLED],
        "single": single,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/portals/portal/purge_confirmation.html", context)


# A button runs what the list's action runs, on that one portal; purge's confirmation comes first.
_BUTTON_RUNS: dict[str, Callable[[admin.ModelAdmin[Portal], HttpRequest, QuerySet[Portal]], None]] = {
    "renew": renew_now,
    "verify": verify_with_app_info,
    "reinstall": mark_needs_reinstall,
    "approve": approve_pending,
    "confirm_uninstall": confirm_uninstall,
    "dismiss_uninstall": dismiss_uninstall,
    "acknowledge_lost": acknowledge_lost,
    "purge": purge,
}


def operate(
    modeladmin: admin.ModelAdmin[Portal], request: HttpRequest, object_id: str, operation: str
) -> HttpResponse:
    """A button on the portal page: POST runs the operation; purge asks for confirmation first."""
    if operation not in _BUTTON_RUNS:
        raise PermissionDenied
    portal = get_object_or_404(modeladmin.get_queryset(request), pk=object_id)
    if not modeladmin.has_change_permission(request, portal):
        raise PermissionDenied
    back = reverse("admin:portals_portal_change", args=(portal.pk,))
    if operation == "purge" and request.POST.get("confirmed") != "yes":
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        return purge_confirmation(modeladmin, request, [portal], single=True)
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    _BUTTON_RUNS[operation](modeladmin, request, modeladmin.get_queryset(request).filter(pk=portal.pk))
    return HttpResponseRedirect(back)
