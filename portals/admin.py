"""Staff's view of installations: health at a glance, and the operations staff may run.

Tokens are never shown in full, never editable and never searchable (crypto.mask shows the first
four characters, the length and a fingerprint). Everything Bitrix24 told us is read-only here;
the only changes staff make go through `portals.operations`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from . import crypto, operations, selectors, services
from .models import PairState, Portal, PortalState, RenewalLog, RenewalOutcome, TokenPair

RECENT_RENEWALS = 20

# The admin index links to the dashboard (portals/templates/admin/portals/index.html). Django's own
# admin/index.html comes first in the template search (django.contrib.admin is listed before this
# app), so the site is pointed at a differently named template that extends it.
admin.site.index_template = "admin/portals/index.html"


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- how token health reads --------------------------------------------------------------------


def _short(moment: datetime | None) -> str:
    """A compact relative time for list columns: "in 42m", "3h ago", "12d ago" (full time on hover)."""
    if moment is None:
        return "—"
    seconds = (moment - timezone.now()).total_seconds()
    span = abs(seconds)
    if span < 60:
        return format_html(
            '<span title="{}">now</span>', timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")
        )
    if span < 3600:
        text = f"{int(span // 60)}m"
    elif span < 48 * 3600:
        text = f"{int(span // 3600)}h"
    else:
        text = f"{int(span // 86400)}d"
    text = f"in {text}" if seconds > 0 else f"{text} ago"
    return format_html(
        '<span title="{}">{}</span>', timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z"), text
    )


def days_left_html(refresh_issued_at: datetime | None, pair_state: str | None = None) -> str:
    """Days left before the refresh token lapses, coloured: red when lapsed or within a day,
    orange inside the renewal window (the sweep should be on it), green otherwise."""
    left = selectors.days_left(refresh_issued_at)
    if left is None:
        return "—"
    if pair_state and pair_state != PairState.ACTIVE:
        shorter: dict[str, str] = {PairState.DEAD: "dead", PairState.CREDENTIALS_REJECTED: "creds rejected"}
        short = shorter.get(pair_state, pair_state)
        return format_html(
            '<span style="color:#ba2121;font-weight:bold" title="token pair: {}">{} · {}</span>',
            PairState(pair_state).label,
            f"{left:.1f}",
            short,
        )
    elif left <= 1:
        colour, text = "#ba2121", "lapsed" if left <= 0 else f"{left:.1f}"
    elif left <= settings.BITRIX24_RENEW_MARGIN_DAYS:
        colour, text = "#c77700", f"{left:.1f}"
    else:
        colour, text = "#2e7d32", f"{left:.1f}"
    return format_html('<span style="color:{};font-weight:bold">{}</span>', colour, text)


_OUTCOME_COLOURS: dict[str, str] = {
    RenewalOutcome.RENEWED: "#2e7d32",
    RenewalOutcome.SKIPPED: "#666",
    RenewalOutcome.TRANSIENT: "#c77700",
    RenewalOutcome.REFUSED: "#ba2121",
}


def outcome_html(outcome: str | None, at: datetime | None) -> str:
    if not outcome:
        return "—"
    label = RenewalOutcome(outcome).label if outcome in RenewalOutcome.values else outcome
    return format_html(
        '<span style="color:{}">{}</span> <small>{}</small>',
        _OUTCOME_COLOURS.get(outcome, "#333"),
        label,
        _short(at) if at else "",
    )


class TokenHealthFilter(admin.SimpleListFilter):
    title = "token health"
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("due_soon", "Due soon (in the renewal window)"),
            ("lapsing", "Lapsing within 2 days"),
            ("failing", "Failing renewals"),
            ("no_pair", "No usable token pair"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Portal]) -> QuerySet[Portal] | None:
        value = self.value()
        if value == "due_soon":
            return selectors.due_soon(queryset)
        if value == "lapsing":
            return selectors.lapsing(queryset)
        if value == "failing":
            return selectors.failing(queryset)
        if value == "no_pair":
            return selectors.without_usable_pair(queryset)
        return queryset


# --- inlines on the portal page ------------------------------------------------------------------


class TokenPairInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = TokenPair
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "user_id",
        "is_background",
        "state",
        "masked_access_token",
        "access_expires_at",
        "masked_refresh_token",
        "refresh_issued_at",
        "days_left",
        "last_renewed_at",
        "consecutive_failures",
        "next_attempt_at",
        "last_error",
    )
    readonly_fields = fields
    ordering = ("-is_background", "user_id")

    @admin.display(description="access token")
    def masked_access_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.access_token)

    @admin.display(description="refresh token")
    def masked_refresh_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.refresh_token)

    @admin.display(description="days left")
    def days_left(self, obj: TokenPair) -> str:
        return days_left_html(obj.refresh_issued_at, obj.state)


class _RecentOnlyFormSet(BaseInlineFormSet):  # type: ignore[type-arg]
    """Only the latest rows: a portal renewed every three weeks for years has a long log."""

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_recent"):
            self._recent = super().get_queryset()[:RECENT_RENEWALS]
        return self._recent


class RenewalLogInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = RenewalLog
    formset = _RecentOnlyFormSet
    verbose_name_plural = f"recent renewals (latest {RECENT_RENEWALS}; the renewal log has them all)"
    extra = 0
    can_delete = False
    fields = (
        "created_at",
        "user_id",
        "trigger",
        "outcome",
        "duration_ms",
        "error",
        "old_fingerprint",
        "new_fingerprint",
    )
    readonly_fields = fields
    ordering = ("-created_at", "-pk")


# --- the portal ------------------------------------------------------------------------------------


OPERATIONS = {
    "renew": "Renew now",
    "verify": "Verify with app.info",
    "reinstall": "Mark as needing reinstall",
    "purge": "Purge data",
}


def _all_but(fieldsets: Any, *, editable: tuple[str, ...]) -> tuple[str, ...]:
    """Every field the fieldsets show, but the editable ones: the read-only list, derived."""
    return tuple(name for _, options in fieldsets for name in options["fields"] if name not in editable)


@admin.register(Portal)
class PortalAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "domain",
        "member_id",
        "status",
        "state",
        "last_launch",
        "access_expiry",
        "refresh_age",
        "refresh_days_left",
        "last_renewal",
        "failures",
    )
    list_filter = ("state", "app_status", TokenHealthFilter)
    search_fields = ("domain", "=member_id")
    list_per_page = 100
    inlines = [TokenPairInline, RenewalLogInline]
    actions = ["renew_now", "verify_with_app_info", "mark_needs_reinstall", "purge_data"]
    change_form_template = "admin/portals/portal/change_form.html"
    fieldsets = (
        (
            "Portal (as Bitrix24 reports it)",
            {
                "fields": (
                    "member_id",
                    "domain",
                    "protocol",
                    "oauth_server",
                    "app_status",
                    "app_version",
                    "scope",
                )
            },
        ),
        (
            "Installation",
            {
                "fields": (
                    "state",
                    "state_reason",
                    "payment_expired",
                    "installed_at",
                    "last_launch_at",
                    "uninstalled_at",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "REST limits (set by staff; empty: the defaults, 2/s and 50; Enterprise portals: 5/s and 250)",
            {"fields": ("rate_limit", "rate_burst")},
        ),
        (
            "Tokens",
            {
                "fields": (
                    "masked_application_token",
                    "access_expiry",
                    "refresh_age",
                    "refresh_days_left",
                    "last_renewal",
                    "failures",
                    "activity",
                )
            },
        ),
    )
    # Everything here comes from Bitrix24: staff read it, they do not edit it. The REST limits
    # are the one thing staff set.
    readonly_fields = _all_but(fieldsets, editable=("rate_limit", "rate_burst"))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Portal]:
        # The application token is only decrypted on the one page that masks it.
        return selectors.with_token_health(super().get_queryset(request)).defer("application_token")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A portal row is the memory of an installation; "purge data" is how an uninstalled
        # portal's data goes. Deleting the row would also lose the renewal log by cascade.
        return False

    # --- columns

    @admin.display(description="application token")
    def masked_application_token(self, obj: Portal) -> str:
        return crypto.mask(obj.application_token)

    @admin.display(description="app", ordering="app_status")
    def status(self, obj: Portal) -> str:
        """The L/F/D/T/P/S letter Bitrix24 uses; the name on hover."""
        if not obj.app_status:
            return "—"
        return format_html('<abbr title="{}">{}</abbr>', obj.get_app_status_display(), obj.app_status)

    @admin.display(description="last launch", ordering="last_launch_at")
    def last_launch(self, obj: Portal) -> str:
        return _short(obj.last_launch_at)

    @admin.display(description="access expires", ordering="bg_access_expires_at")
    def access_expiry(self, obj: Portal) -> str:
        moment = getattr(obj, "bg_access_expires_at", None)
        if moment is None:
            return "—"
        if moment <= timezone.now():
            return format_html("expired {}", _short(moment))
        return _short(moment)

    @admin.display(description="refresh age", ordering="-bg_refresh_issued_at")
    def refresh_age(self, obj: Portal) -> str:
        issued = getattr(obj, "bg_refresh_issued_at", None)
        if issued is None:
            return "—"
        return f"{(timezone.now() - issued).total_seconds() / 86400:.1f} d"

    @admin.display(description="days left", ordering="bg_refresh_issued_at")
    def refresh_days_left(self, obj: Portal) -> str:
        return days_left_html(getattr(obj, "bg_refresh_issued_at", None), getattr(obj, "bg_state", None))

    @admin.display(description="last renewal", ordering="last_renewal_at")
    def last_renewal(self, obj: Portal) -> str:
        return outcome_html(getattr(obj, "last_renewal_outcome", None), getattr(obj, "last_renewal_at", None))

    @admin.display(description="fails", ordering="bg_failures")
    def failures(self, obj: Portal) -> str:
        count = getattr(obj, "bg_failures", None)
        if count is None:
            return "—"
        if count:
            error = getattr(obj, "bg_last_error", "") or ""
            return format_html('<span style="color:#ba2121" title="{}">{}</span>', error, count)
        return "0"

    @admin.display(description="activity")
    def activity(self, obj: Portal) -> str:
        inbound = (
            reverse("admin:install_inboundrequest_changelist") + "?" + urlencode({"member_id": obj.member_id})
        )
        renewals = (
            reverse("admin:portals_renewallog_changelist") + "?" + urlencode({"portal__id__exact": obj.pk})
        )
        pairs = reverse("admin:portals_tokenpair_changelist") + "?" + urlencode({"portal__id__exact": obj.pk})
        return format_html(
            '<a href="{}">inbound requests</a> · <a href="{}">whole renewal log</a> · <a href="{}">token pairs</a>',
            inbound,
            renewals,
            pairs,
        )

    # --- the change page: read-only, with buttons for the operations

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Only the REST limits are editable here; everything else is read-only, operations have
        # their own URLs.
        context = {
            **(extra_context or {}),
            "show_save": True,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            "show_delete": False,
            "operations": OPERATIONS,
            "dashboard_url": reverse("admin_dashboard"),
        }
        return super().change_view(request, object_id, form_url, extra_context=context)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        return super().changelist_view(
            request, extra_context={**(extra_context or {}), "dashboard_url": reverse("admin_dashboard")}
        )

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<path:object_id>/operate/<str:operation>/",
                self.admin_site.admin_view(self.operate_view),
                name="portals_portal_operate",
            )
        ]
        return own + super().get_urls()

    def operate_view(self, request: HttpRequest, object_id: str, operation: str) -> HttpResponse:
        """A button on the portal page: POST runs the operation; purge asks for confirmation first."""
        if operation not in OPERATIONS:
            raise PermissionDenied
        portal = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not self.has_change_permission(request, portal):
            raise PermissionDenied
        back = reverse("admin:portals_portal_change", args=(portal.pk,))
        if operation == "purge" and request.POST.get("confirmed") != "yes":
            if request.method not in ("GET", "POST"):
                return HttpResponseNotAllowed(["GET", "POST"])
            return self._purge_confirmation(request, [portal], single=True)
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        runner: dict[str, Callable[[HttpRequest, QuerySet[Portal]], None]] = {
            "renew": self.renew_now,
            "verify": self.verify_with_app_info,
            "reinstall": self.mark_needs_reinstall,
            "purge": self._purge,
        }
        runner[operation](request, self.get_queryset(request).filter(pk=portal.pk))
        return HttpResponseRedirect(back)

    # --- actions (each one a call to portals.operations)

    @admin.action(description="Renew now (queued)", permissions=["change"])
    def renew_now(self, request: HttpRequest, queryset: QuerySet[Portal]) -> None:
        queued = portals = 0
        empty = []
        for portal in queryset:
            count = operations.queue_renewal(portal=portal)
            if count:
                queued += count
                portals += 1
            else:
                empty.append(portal.domain)
        if queued:
            self.message_user(
                request,
                f"Queued the renewal of {queued} token pair(s) on {portals} portal(s). A worker renews "
                "them in a moment; the renewal log shows the outcome.",
                messages.SUCCESS,
            )
        if empty:
            self.message_user(request, f"No token pair to renew on: {', '.join(empty)}.", messages.WARNING)

    @admin.action(description="Verify with app.info", permissions=["change"])
    def verify_with_app_info(self, request: HttpRequest, queryset: QuerySet[Portal]) -> None:
        for portal in queryset:
            try:
                info = operations.verify_portal(portal=portal)
            except (operations.OperationRefused, services.UpstreamUnavailable, ImproperlyConfigured) as exc:
                self.message_user(request, f"{portal.domain}: not verified: {exc}", messages.ERROR)
                continue
            status = Portal(app_status=info.status[:1]).get_app_status_display() or info.status or "unknown"
            installed = "installed" if info.installed else "NOT installed, per Bitrix24"
            self.message_user(
                request,
                f"{portal.domain}: verified with app.info: app {installed}, status {status}, "
                f"version {info.version or '?'}.",
                messages.SUCCESS if info.installed else messages.WARNING,
            )

    @admin.action(description="Mark as needing reinstall", permissions=["change"])
    def mark_needs_reinstall(self, request: HttpRequest, queryset: QuerySet[Portal]) -> None:
        reason = (request.POST.get("reason") or "").strip() or f"marked by staff ({request.user})"
        done = []
        for portal in queryset:
            try:
                operations.mark_needs_reinstall(portal=portal, reason=reason)
            except operations.OperationRefused as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            done.append(portal.domain)
        if done:
            self.message_user(request, f"Marked as needing a reinstall: {', '.join(done)}.", messages.SUCCESS)

    @admin.action(description="Purge data of uninstalled portals", permissions=["change"])
    def purge_data(self, request: HttpRequest, queryset: QuerySet[Portal]) -> TemplateResponse | None:
        if request.POST.get("confirmed") != "yes":
            return self._purge_confirmation(request, list(queryset), single=False)
        self._purge(request, queryset)
        return None

    def _purge(self, request: HttpRequest, queryset: QuerySet[Portal]) -> None:
        done = []
        for portal in queryset:
            try:
                operations.purge_portal(portal=portal)
            except operations.OperationRefused as exc:
                self.message_user(request, f"Not purged: {exc}", messages.WARNING)
                continue
            done.append(portal.domain)
        if done:
            self.message_user(
                request,
                f"Purged the tokens, renewal log and inbound requests of: {', '.join(done)}.",
                messages.SUCCESS,
            )

    def _purge_confirmation(
        self, request: HttpRequest, portals: list[Portal], *, single: bool
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": "Purge the data of uninstalled portals?",
            "opts": self.model._meta,
            "portals": portals,
            "purgeable": [p for p in portals if p.state == PortalState.UNINSTALLED],
            "refused": [p for p in portals if p.state != PortalState.UNINSTALLED],
            "single": single,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/portals/portal/purge_confirmation.html", context)


@admin.register(TokenPair)
class TokenPairAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every pair, for finding the failing ones across portals. Tokens masked on the detail page."""

    list_display = (
        "portal",
        "user_id",
        "is_background",
        "state",
        "access_expires_at",
        "refresh_issued_at",
        "days_left",
        "consecutive_failures",
        "last_renewed_at",
        "last_error",
    )
    list_filter = ("state", "is_background")
    search_fields = ("portal__domain", "=portal__member_id")
    list_select_related = ("portal",)
    fields = (
        "portal",
        "user_id",
        "is_background",
        "state",
        "masked_access_token",
        "access_expires_at",
        "masked_refresh_token",
        "refresh_issued_at",
        "days_left",
        "scope",
        "last_renewed_at",
        "consecutive_failures",
        "next_attempt_at",
        "last_error",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[TokenPair]:
        queryset = super().get_queryset(request)
        if request.resolver_match and request.resolver_match.url_name == "portals_tokenpair_changelist":
            # The list shows no token: don't decrypt any.
            queryset = queryset.defer("access_token", "refresh_token", "portal__application_token")
        return queryset

    @admin.display(description="access token")
    def masked_access_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.access_token)

    @admin.display(description="refresh token")
    def masked_refresh_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.refresh_token)

    @admin.display(description="days left", ordering="refresh_issued_at")
    def days_left(self, obj: TokenPair) -> str:
        return days_left_html(obj.refresh_issued_at, obj.state)


@admin.register(RenewalLog)
class RenewalLogAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every renewal attempt. Fingerprints only: a fingerprint tells two tokens apart, never reveals one."""

    list_display = ("created_at", "portal", "user_id", "trigger", "outcome", "duration_ms", "error")
    list_filter = ("outcome", "trigger", "created_at")
    search_fields = ("portal__domain", "=portal__member_id", "=old_fingerprint", "=new_fingerprint")
    list_select_related = ("portal",)
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[RenewalLog]:
        return super().get_queryset(request).defer("portal__application_token")
