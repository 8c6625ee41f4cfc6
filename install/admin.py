from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import InboundRequest


@admin.register(InboundRequest)
class InboundRequestAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What came in and why it was refused. Bodies are stored redacted; nothing here is editable."""

    list_display = ("created_at", "kind", "event", "member_id", "domain", "status", "http_status", "error")
    list_filter = ("kind", "status", "event")
    search_fields = ("member_id", "domain", "event")
    readonly_fields = [f.name for f in InboundRequest._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
