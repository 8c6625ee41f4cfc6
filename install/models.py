from __future__ import annotations

from django.db import models


class InboundKind(models.TextChoices):
    INSTALL = "install", "Install frame"
    LAUNCH = "launch", "App launch"
    EVENT = "event", "Event"


class InboundStatus(models.TextChoices):
    RECEIVED = "received", "Received (processing)"
    ACCEPTED = "accepted", "Accepted"
    REJECTED = "rejected", "Rejected"
    FAILED = "failed", "Failed"


class InboundRequest(models.Model):
    """Every request Bitrix24 (or anyone) posts to the install, launch and event URLs.

    Written before anything is verified or processed, redacted (no token in clear), and updated
    with the outcome: staff see what came in and why it was refused.
    """

    kind = models.CharField(
        max_length=16, choices=InboundKind.choices, help_text="Which endpoint received it."
    )
    event = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        help_text='Event name, for events; "(invalid)" when the claimed name does not look like one.',
    )
    member_id = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        help_text="Portal the request claims to come from (unverified).",
    )
    domain = models.CharField(max_length=255, blank=True, help_text="Domain the request claims (unverified).")
    remote_addr = models.GenericIPAddressField(
        null=True, blank=True, help_text="Client address as seen by Django."
    )
    headers = models.JSONField(default=dict, blank=True, help_text="Selected request headers.")
    query = models.JSONField(default=dict, blank=True, help_text="Query string, parsed, tokens redacted.")
    body = models.JSONField(default=dict, blank=True, help_text="Body, parsed, tokens redacted.")
    status = models.CharField(
        max_length=16,
        choices=InboundStatus.choices,
        default=InboundStatus.RECEIVED,
        db_index=True,
        help_text="Outcome of processing, in one word (from valid, processed and whose failure it was).",
    )
    valid = models.BooleanField(
        null=True,
        blank=True,
        help_text=(
            "Whether the request proved to come from Bitrix24 (its token confirmed by app.info, or its "
            "application token matched); empty while unknown, or when it failed before that was decided."
        ),
    )
    processed = models.BooleanField(
        default=False,
        # In the database too: processes of the previous release insert rows without it during an upgrade.
        db_default=False,
        help_text="Whether the backend carried out what the request asked (its handler finished).",
    )
    traceback = models.TextField(
        blank=True,
        default="",
        db_default="",
        help_text="For a failure of the backend's own (not the caller's): where it failed, redacted, at most 8 KB.",
    )
    http_status = models.PositiveSmallIntegerField(null=True, blank=True, help_text="HTTP status answered.")
    error = models.CharField(max_length=500, blank=True, help_text="Why it was rejected or failed.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When it arrived.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When processing ended.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "inbound request"

    def __str__(self) -> str:
        return f"{self.kind} {self.event or ''} {self.member_id} {self.status}".strip()
