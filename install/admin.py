from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from portals.models import Portal

from .models import InboundRequest


@admin.register(InboundRequest)
class InboundRequestAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What came in and why it was refused. Bodies are stored redacted (tokens replaced by
    fingerprints before the row is written); nothing here is editable or deletable.

    The portal page links here filtered by member_id (?member_id=…): a local-field lookup the
    admin accepts without a list filter for it.
    """

    list_display = (
        "created_at",
        "kind",
        "event",
        "member_id",
        "portal_link",
        "domain",
        "status",
        "http_status",
        "error",
    )
    list_filter = ("kind", "status", "event", "created_at")
    search_fields = ("=member_id", "domain", "event")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in InboundRequest._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[InboundRequest]:
        # The claimed member_id, when it names a known portal, links to it: one subquery, not a query a row.
        known = Portal.objects.filter(member_id=OuterRef("member_id")).values("pk")[:1]
        return super().get_queryset(request).annotate(portal_pk=Subquery(known))

    @admin.display(description="portal")
    def portal_link(self, obj: InboundRequest) -> str:
        pk = getattr(obj, "portal_pk", None)
        if pk is None:
            return "—"
        return format_html('<a href="{}">open</a>', reverse("admin:portals_portal_change", args=(pk,)))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The log is evidence; an uninstalled portal's rows go with "purge data" on the portal.
        return False
