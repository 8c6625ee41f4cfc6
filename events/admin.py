"""The app's events for staff: what came in, what its handlers did, and "run again" for what failed.

Read-only apart from the actions: a row is evidence of what a portal sent and what happened to it.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from portals.admin.display import ReadOnlyMixin

from . import tasks
from .models import AppEvent, OfflineQueue


@admin.action(description="Run again (failed or dropped events)", permissions=["change"])
def run_again(
    modeladmin: admin.ModelAdmin[AppEvent], request: HttpRequest, queryset: QuerySet[AppEvent]
) -> None:
    count = tasks.run_again(list(queryset.values_list("pk", flat=True)))
    skipped = queryset.count() - count
    modeladmin.message_user(request, f"{count} event(s) queued to run again.", messages.SUCCESS)
    if skipped:
        modeladmin.message_user(
            request,
            f"{skipped} event(s) left alone: only failed or dropped events run again.",
            messages.WARNING,
        )


@admin.register(AppEvent)
class AppEventAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Events the app's handlers are bound to arrive here once a portal raises them."
    list_display = (
        "received_at",
        "portal",
        "event",
        "object_id",
        "source",
        "state",
        "attempts",
        "last_error",
    )
    list_filter = ("state", "source", "event")
    search_fields = ("portal__domain", "=portal__member_id", "=object_id", "=event")
    list_select_related = ("portal",)
    date_hierarchy = "received_at"
    actions = [run_again]
    fields = (
        "portal",
        "event",
        "source",
        "object_id",
        "ids",
        "user_id",
        "occurred_at",
        "received_at",
        "state",
        "attempts",
        "runnable_at",
        "next_attempt_at",
        "done_handlers",
        "last_error",
        "error_traceback",
        "finished_at",
        "dedup_key",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[AppEvent]:
        return super().get_queryset(request).defer("portal__application_token", "traceback")

    def has_change_permission(self, request: HttpRequest, obj: AppEvent | None = None) -> bool:
        # "Run again" is the only change, and needs the change right; the row itself stays as it came in.
        return obj is None and admin.ModelAdmin.has_change_permission(self, request)

    @admin.display(description="traceback")
    def error_traceback(self, obj: AppEvent) -> str:
        if not obj.traceback:
            return "—"
        return format_html('<pre style="white-space: pre-wrap; max-width: 100%">{}</pre>', obj.traceback)


@admin.register(OfflineQueue)
class OfflineQueueAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    # Said under an empty list (config/templates/admin/change_list.html).
    empty_hint = "Portals whose offline events the backend collects appear here."
    list_display = ("portal", "wanted_at", "pulled_at", "pulled", "process_id", "last_error")
    search_fields = ("portal__domain", "=portal__member_id")
    list_select_related = ("portal",)
    readonly_fields = (
        "portal",
        "process_id",
        "wanted_at",
        "queued_at",
        "lease_until",
        "pulled_at",
        "pulled",
        "last_error",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[OfflineQueue]:
        return super().get_queryset(request).defer("portal__application_token")
