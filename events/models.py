"""The app's events, kept durably from the moment they are accepted until their handlers have run.

An event is stored before it is answered (online) or before it is cleared from the portal's queue
(offline); a task runs its handlers; a failure leaves it with a time for its next attempt, which the
beat sweep honours even when no task was ever queued (a broker away, a worker killed). Delivery to
handlers is at least once: each record has a deduplication key, so the same delivery posted twice, or
an offline record fetched twice, is stored and handled once.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from portals.models import Portal


class EventSource(models.TextChoices):
    ONLINE = "online", "Online (posted to /events/)"
    OFFLINE = "offline", "Offline (pulled from the portal's queue)"


class EventState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    HANDLED = "handled", "Handled"
    FAILED = "failed", "Failed (retries exhausted)"
    DROPPED = "dropped", "Dropped"


class AppEvent(models.Model):
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="app_events", help_text="The portal it came from."
    )
    event = models.CharField(max_length=64, help_text="Bitrix24 event name, e.g. ONCRMDEALADD.")
    source = models.CharField(max_length=8, choices=EventSource.choices, help_text="How it arrived.")
    dedup_key = models.CharField(
        max_length=200,
        help_text="Unique per portal: online, event|object id|ts; offline, the queue record's name, id, "
        "message id and time. The same delivery twice is stored once.",
    )
    object_id = models.CharField(
        max_length=64, blank=True, help_text="The object's id (data[FIELDS][ID]), when the event names one."
    )
    ids = models.JSONField(
        default=dict,
        blank=True,
        help_text="The identifiers the event carried (short scalar values only; the rest is not kept).",
    )
    user_id = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The Bitrix24 user who caused the event, when it says."
    )
    occurred_at = models.DateTimeField(
        null=True, blank=True, help_text="When Bitrix24 says it happened (ts, or the queue record's time)."
    )
    state = models.CharField(
        max_length=8,
        choices=EventState.choices,
        default=EventState.QUEUED,
        help_text="Queued, running, handled, failed after the last retry, or dropped (no handler, portal gone).",
    )
    attempts = models.PositiveIntegerField(default=0, help_text="Times its handlers were started.")
    next_attempt_at = models.DateTimeField(
        default=timezone.now,
        help_text="Queued: when the sweep may start it (again) if no task has. Running: when its "
        "worker is presumed dead.",
    )
    runnable_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Queued: the earliest a worker may start it (a retry's time, or when the portal's rate limit "
        "frees a slot); empty: at once.",
    )
    done_handlers = models.JSONField(
        default=list, blank=True, help_text="Handlers that have run successfully (a retry skips them)."
    )
    last_error = models.CharField(max_length=500, blank=True, help_text="The last handler failure.")
    traceback = models.TextField(blank=True, help_text="Traceback of the last handler failure.")
    sender = models.CharField(
        max_length=64,
        blank=True,
        default="",
        db_default="",  # processes of the previous release insert rows without it during an upgrade
        help_text="Where an online event came from (portals.sources): a portal's per-minute budget is kept per "
        "sender, so an employee's flood from their own address cannot spend Bitrix24's.",
    )
    received_at = models.DateTimeField(default=timezone.now, help_text="When this backend stored it.")
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was handled, failed for good or dropped."
    )

    class Meta:
        ordering = ["-received_at"]
        verbose_name = "app event"
        constraints = [
            models.UniqueConstraint(fields=["portal", "dedup_key"], name="one_event_per_delivery"),
        ]
        indexes = [
            # The sweep: what is due to start again.
            models.Index(fields=["state", "next_attempt_at"], name="app_event_due"),
            # The per-portal rate and the admin's list by portal.
            models.Index(fields=["portal", "received_at"], name="app_event_portal_time"),
            # The per-sender budget.
            models.Index(fields=["portal", "sender", "received_at"], name="app_event_sender_time"),
            # The per-portal backlog, and what each portal has running (fair dispatch).
            models.Index(fields=["portal", "state"], name="app_event_portal_state"),
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.object_id} {self.state}".strip()


class OfflineQueue(models.Model):
    """Our side of one portal's offline event queue: whether it should be pulled, and what a pull in
    progress has fetched, so that a pull killed after the portal handed records out finds them again
    (`event.offline.list`; see events.offline)."""

    portal = models.OneToOneField(
        Portal, on_delete=models.CASCADE, related_name="offline_queue", help_text="The portal."
    )
    process_id = models.CharField(
        max_length=64,
        blank=True,
        help_text="Process id the portal reserved the last fetched records under, until they are stored "
        "and cleared (empty: nothing outstanding).",
    )
    fetching_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set before event.offline.get is sent, cleared once its records are stored and cleared: "
        "a pull that finds it set recovers what the portal reserved for the interrupted one.",
    )
    wanted_at = models.DateTimeField(
        null=True, blank=True, help_text="When a notification (ONOFFLINEEVENT) asked for a pull not yet done."
    )
    queued_at = models.DateTimeField(null=True, blank=True, help_text="When a pull task was last queued.")
    lease_until = models.DateTimeField(
        null=True, blank=True, help_text="A pull is running until then (one at a time per portal)."
    )
    holder = models.CharField(
        max_length=300,
        blank=True,
        help_text="host|pid|start of the process running the pull: a pull whose process is proven gone "
        "(killed) does not keep the portal's queue for the rest of its lease.",
    )
    pulled_at = models.DateTimeField(null=True, blank=True, help_text="When a pull last finished.")
    pulled = models.PositiveIntegerField(default=0, help_text="Records stored by pulls, in all.")
    last_error = models.CharField(max_length=500, blank=True, help_text="Why the last pull failed.")

    class Meta:
        verbose_name = "offline event queue"

    def __str__(self) -> str:
        return f"offline queue of {self.portal_id}"


class HandlerPace(models.Model):
    """When a portal's next handler may start, set when one met the portal's REST rate limit: workers
    then take other portals' events instead of claiming this one's only to find no slot (one row per
    portal, not a time on each of its waiting events: a flood of 5,000 would mean 5,000 writes)."""

    portal = models.OneToOneField(
        Portal,
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="handler_pace",
        help_text="The portal.",
    )
    runnable_at = models.DateTimeField(
        help_text="No handler of this portal is started before then: its rate limit has no slot sooner."
    )

    class Meta:
        verbose_name = "handler pace"

    def __str__(self) -> str:
        return f"handlers of {self.portal_id} from {self.runnable_at:%H:%M:%S}"
