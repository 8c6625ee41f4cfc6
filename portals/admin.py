"""Staff's view of installations. Tokens are never shown in full nor editable."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from . import crypto
from .models import Portal, RenewalLog, TokenPair


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TokenPairInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = TokenPair
    extra = 0
    can_delete = False
    fields = (
        "user_id",
        "is_background",
        "state",
        "masked_access_token",
        "access_expires_at",
        "masked_refresh_token",
        "refresh_issued_at",
        "last_renewed_at",
        "consecutive_failures",
        "last_error",
    )
    readonly_fields = fields

    @admin.display(description="access token")
    def masked_access_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.access_token)

    @admin.display(description="refresh token")
    def masked_refresh_token(self, obj: TokenPair) -> str:
        return crypto.mask(obj.refresh_token)


@admin.register(Portal)
class PortalAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("domain", "member_id", "app_status", "state", "last_launch_at", "installed_at")
    list_filter = ("state", "app_status")
    search_fields = ("domain", "member_id")
    inlines = [TokenPairInline]
    # Everything here comes from Bitrix24: staff read it, they do not edit it.
    readonly_fields = (
        "member_id",
        "domain",
        "protocol",
        "oauth_server",
        "app_status",
        "state",
        "state_reason",
        "masked_application_token",
        "scope",
        "app_version",
        "payment_expired",
        "installed_at",
        "last_launch_at",
        "uninstalled_at",
        "created_at",
        "updated_at",
    )
    exclude = ("application_token",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="application token")
    def masked_application_token(self, obj: Portal) -> str:
        return crypto.mask(obj.application_token)


@admin.register(RenewalLog)
class RenewalLogAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created_at", "portal", "user_id", "trigger", "outcome", "duration_ms", "error")
    list_filter = ("outcome", "trigger")
    search_fields = ("portal__domain", "portal__member_id")
    list_select_related = ("portal",)
