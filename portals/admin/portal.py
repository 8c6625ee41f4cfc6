"""The portal list (token health at a glance) and the portal page (read-only, with its token pairs,
its latest renewals and the buttons for the operations)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from portals import masking, selectors
from portals.models import Portal, RenewalLog, TokenPair

from .actions import (
    BUTTONS,
    acknowledge_lost,
    approve_pending,
    confirm_uninstall,
    dismiss_uninstall,
    mark_needs_reinstall,
    operate,
    purge_data,
    renew_now,
    verify_with_app_info,
)
from .display import (
    MaskedPairTokensMixin,
    ReadOnlyMixin,
    days_left_html,
    failures_html,
    log_time,
    outcome_html,
    short_time,
)
from .filters import TokenHealthFilter
from .palette import PALETTE

RECENT_RENEWALS = 20


# --- inlines on the portal page ------------------------------------------------------------------


class TokenPairInline(MaskedPairTokensMixin, ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    """A row per pair, narrow enough for 1,280 px: times read as "in 59m" / "3d ago" (the full time on
    hover) instead of four-line dates, and the last error wraps in the last column."""

    model = TokenPair
    extra = 0
    can_delete = False
    show_change_link = True
    template = "admin/portals/portal/tabular_or_empty.html"
    empty_hint = "The install stores the first pair; each user who opens the app adds theirs."
    fields = (
        "user_id",
        "is_background",
        "state",
        "masked_access_token",
        "access_expires",
        "masked_refresh_token",
        "refresh_issued",
        "days_left",
        "last_renewed",
        "consecutive_failures",
        "next_attempt",
        "last_error",
    )
    readonly_fields = fields
    ordering = ("-is_background", "user_id")

    @admin.display(description="days left")
    def days_left(self, obj: TokenPair) -> str:
        return days_left_html(obj.refresh_issued_at, obj.state)

    @admin.display(description="access expires")
    def access_expires(self, obj: TokenPair) -> str:
        return short_time(obj.access_expires_at)

    @admin.display(description="refresh issued")
    def refresh_issued(self, obj: TokenPair) -> str:
        return short_time(obj.refresh_issued_at)

    @admin.display(description="last renewed")
    def last_renewed(self, obj: TokenPair) -> str:
        return short_time(obj.last_renewed_at)

    @admin.display(description="next attempt")
    def next_attempt(self, obj: TokenPair) -> str:
        return short_time(obj.next_attempt_at)


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
    template = "admin/portals/portal/tabular_or_empty.html"
    empty_hint = "Refresh tokens are renewed before they lapse, and on demand when an access token expires."
    fields = (
        "when",
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

    @admin.display(description="when")
    def when(self, obj: RenewalLog) -> str:
        return log_time(obj.created_at)


# --- the portal ------------------------------------------------------------------------------------


class PageFirstChangeList(ChangeList):
    """A page's portals are picked first (by id, in the list's order), and only those rows get the token
    health's subqueries: page 50 costs what page 1 does, in the same one query (a subquery picks the
    page). Ordering by a token-health column still computes that one column for every row."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        page = self.result_list
        if isinstance(page, QuerySet) and page.query.is_sliced:
            rows = Portal.objects.filter(pk__in=page.values("pk"))
            self.result_list = (
                selectors.with_token_health(rows).defer("application_token").order_by(*page.query.order_by)
            )


def _all_but(fieldsets: Any, *, editable: tuple[str, ...]) -> tuple[str, ...]:
    """Every field the fieldsets show, but the editable ones: the read-only list, derived."""
    return tuple(name for _, options in fieldsets for name in options["fields"] if name not in editable)


@admin.register(Portal)
class PortalAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "A portal appears when Bitrix24 installs the app on it (the install event or the install page); in development, bin/manage bitrix24_standin installs one."
    list_display = (
        "domain",
        "member",
        "status",
        "state",
        "last_launch",
        "access_expiry",
        "refresh_age",
        "refresh_days_left",
        "last_renewal",
        "failures",
    )
    list_filter = ("state", "app_status", "payment_expired", TokenHealthFilter)
    search_fields = ("domain", "=member_id")
    list_per_page = 100
    inlines = [TokenPairInline, RenewalLogInline]
    actions = [
        renew_now,
        verify_with_app_info,
        mark_needs_reinstall,
        approve_pending,
        confirm_uninstall,
        dismiss_uninstall,
        acknowledge_lost,
        purge_data,
    ]
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
                    "license",
                    "licence_days",
                    "licence_checked_at",
                    "installed_at",
                    "last_launch_at",
                    "uninstalled_at",
                    "uninstall_claimed_at",
                    "purge_at",
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

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return PageFirstChangeList

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
        return masking.mask(obj.application_token)

    @admin.display(description="member_id", ordering="member_id")
    def member(self, obj: Portal) -> str:
        """The first characters of the member_id, the whole of it on hover: 32 characters of hex took a
        sixth of the list's width. The search box finds a portal by its exact member_id."""
        return format_html('<span title="{}">{}…</span>', obj.member_id, obj.member_id[:8])

    @admin.display(description="app", ordering="app_status")
    def status(self, obj: Portal) -> str:
        """The L/F/D/T/P/S letter Bitrix24 uses; the name on hover."""
        if not obj.app_status:
            return "—"
        return format_html('<abbr title="{}">{}</abbr>', obj.get_app_status_display(), obj.app_status)

    @admin.display(description="last launch", ordering="last_launch_at")
    def last_launch(self, obj: Portal) -> str:
        return short_time(obj.last_launch_at)

    @admin.display(description="access expires", ordering="bg_access_expires_at")
    def access_expiry(self, obj: Portal) -> str:
        moment = getattr(obj, "bg_access_expires_at", None)
        if moment is None:
            return "—"
        if moment <= timezone.now():
            return format_html("expired {}", short_time(moment))
        return short_time(moment)

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
        return failures_html(getattr(obj, "bg_failures", None), getattr(obj, "bg_last_error", "") or "")

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
            "operations": BUTTONS,
            "palette": PALETTE,
            "dashboard_url": reverse("admin_dashboard"),
        }
        return super().change_view(request, object_id, form_url, extra_context=context)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> Any:
        # A page to look at an installation, with one small form (the REST limits): not "Change portal". The
        # object is the one change_view already read.
        if obj is not None:
            context["title"] = f"Portal {obj.domain}"
        return super().render_change_form(request, context, add, change, form_url, obj)

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
        return operate(self, request, object_id, operation)
