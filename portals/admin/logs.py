"""The token pairs and the renewal log across portals: read-only, for finding what fails."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from portals.models import RenewalAttempt, RenewalLog, StaffCall, TokenPair, WantedAction

from .display import MaskedPairTokensMixin, ReadOnlyMixin, days_left_html


@admin.register(TokenPair)
class TokenPairAdmin(MaskedPairTokensMixin, ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every pair, for finding the failing ones across portals. Tokens masked on the detail page."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "A portal's install stores its first pair; each user who opens the app adds theirs."

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

    @admin.display(description="days left", ordering="refresh_issued_at")
    def days_left(self, obj: TokenPair) -> str:
        return days_left_html(obj.refresh_issued_at, obj.state)


@admin.register(RenewalLog)
class RenewalLogAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every renewal attempt. Fingerprints only: a fingerprint tells two tokens apart, never reveals one."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Each token renewal, on demand or by the beat, writes a line here."

    list_display = ("created_at", "portal", "user_id", "trigger", "outcome", "duration_ms", "error")
    list_filter = ("outcome", "trigger", "created_at")
    search_fields = ("portal__domain", "=portal__member_id", "=old_fingerprint", "=new_fingerprint")
    list_select_related = ("portal",)
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[RenewalLog]:
        return super().get_queryset(request).defer("portal__application_token")


@admin.register(RenewalAttempt)
class RenewalAttemptAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The renewal journal: who held each refresh and how it ended (fingerprints only, no tokens)."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "A renewal in flight is recorded here before the OAuth server is asked."

    list_display = ("started_at", "portal", "pair", "trigger", "state", "holder_host", "holder_pid", "note")
    list_filter = ("state", "trigger")
    search_fields = ("portal__domain", "=portal__member_id")
    list_select_related = ("portal", "pair")
    date_hierarchy = "started_at"


@admin.register(WantedAction)
class WantedActionAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Work recorded before it is queued (bindings, staff renewals, uninstall confirmations, status
    checks): what is still open, how often it was tried, and why it failed."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Nothing is waiting to be retried: work that fails (a renewal, binding events, confirming an uninstall) is kept here until it succeeds."

    list_display = (
        "requested_at",
        "portal",
        "kind",
        "trigger",
        "attempts",
        "next_attempt_at",
        "done_at",
        "held_for",
        "last_error",
        "note",
    )
    # "Held: not empty" lists the uninstall claims waiting for staff, with their age and evidence (the
    # last error); staff confirm or dismiss them on the portal's page.
    list_filter = ("kind", ("done_at", admin.EmptyFieldListFilter), ("held_at", admin.EmptyFieldListFilter))

    @admin.display(description="held for", ordering="held_at")
    def held_for(self, obj: WantedAction) -> str:
        if obj.held_at is None or obj.done_at is not None:
            return "—"
        hours = (timezone.now() - obj.held_at).total_seconds() / 3600
        return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"

    search_fields = ("portal__domain", "=portal__member_id")
    list_select_related = ("portal",)


@admin.register(StaffCall)
class StaffCallAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The audit of Bitrix24 calls staff made through the API with a portal's pair: who, which portal,
    which method, and whether it was let through (refused writes are kept too)."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Operations staff run from a portal's page are recorded here."

    list_display = ("called_at", "username", "portal", "method", "commands", "allowed")
    list_filter = ("allowed",)
    search_fields = ("username", "method", "portal__domain", "=portal__member_id")
    list_select_related = ("portal",)
    date_hierarchy = "called_at"
