from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from portals.models import Portal

from .inbound import INVALID_EVENT
from .models import DeferredEvent, InboundRequest

HANDLED_EVENTS = ("ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE", "ONAPPPAYMENT")
OTHER = "_other"


class EventFilter(admin.SimpleListFilter):
    """Choices from a fixed list (the handled events, BITRIX24_EVENTS, "other", "(invalid)"), never from
    stored values: anyone can post event names, and 3,000 junk ones made a 479 KB filter page."""

    title = "event"
    parameter_name = "event"

    def _known(self) -> list[str]:
        return list(dict.fromkeys([*HANDLED_EVENTS, *settings.BITRIX24_EVENTS]))

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            *((name, name) for name in self._known()),
            (OTHER, "other events"),
            (INVALID_EVENT, "invalid name"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[InboundRequest]) -> QuerySet[InboundRequest]:
        value = self.value()
        if not value:
            return queryset
        if value == OTHER:
            return queryset.exclude(Q(event__in=[*self._known(), INVALID_EVENT]) | Q(event=""))
        return queryset.filter(event=value)


@admin.register(InboundRequest)
class InboundRequestAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What came in and why it was refused. Bodies are stored redacted (tokens replaced by
    fingerprints before the row is written); nothing here is editable. Staff may delete rows (one, or a
    selection with the delete action): the log is evidence, but junk posted by anyone is not worth
    keeping until the retention period (INBOUND_LOG_RETENTION_DAYS) takes it.

    The portal page links here filtered by member_id (?member_id=…): a local-field lookup the
    admin accepts without a list filter for it.
    """

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Every install, launch and event Bitrix24 sends is logged here."

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
    list_filter = ("kind", "status", "valid", "processed", EventFilter, "created_at")
    search_fields = ("=member_id", "domain", "event", "=source")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in InboundRequest._meta.fields]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        """Above the list: the sources that sent the most requests that did not prove themselves in the last
        day (search a source with its exact value to list its requests)."""
        since = timezone.now() - timedelta(days=1)
        unproven = (
            InboundRequest.objects.filter(created_at__gte=since)
            .exclude(valid=True)
            .exclude(source="")
            .values("source")
            .annotate(requests=Count("pk"), refused=Count("pk", filter=Q(valid=False)))
            .order_by("-requests")[:10]
        )
        return super().changelist_view(request, {**(extra_context or {}), "unproven_sources": list(unproven)})

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

    # No has_delete_permission override: Django's own (the model's delete permission; superusers always)
    # decides, and the list's delete action follows from it.


@admin.register(DeferredEvent)
class DeferredEventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Events kept to be handled later (install.deferred): read-only; the payload (tokens) is never shown."""

    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Deliveries that could not be verified or stored at once (the OAuth server or the database away) wait here."

    class Media:
        css = {
            "all": ("portals/admin-lists.css",)
        }  # fits 1,280 px, as the other logs (portals.admin.display)

    list_display = ("received_at", "event", "member_id", "source", "ts", "attempts", "done_at", "outcome")
    list_filter = ("event", ("done_at", admin.EmptyFieldListFilter))
    search_fields = ("=member_id", "source")
    exclude = ("payload",)
    readonly_fields = (
        "event",
        "member_id",
        "source",
        "ts",
        "reason",
        "received_at",
        "expires_at",
        "next_attempt_at",
        "attempts",
        "done_at",
        "outcome",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeferredEvent]:
        return super().get_queryset(request).defer("payload")
