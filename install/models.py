from __future__ import annotations

from django.db import models
from django.utils import timezone

from portals.fields import EncryptedTextField


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
    source = models.CharField(
        max_length=64,
        blank=True,
        default="",
        db_default="",  # processes of the previous release insert rows without it during an upgrade
        db_index=True,
        help_text="Where it came from as the budgets count it: the client behind the proxies in "
        "FORWARDED_ALLOW_IPS, an IPv6 client by its /64.",
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


class DeferredEvent(models.Model):
    """An event kept to be handled later (install.deferred): an ONAPPINSTALL or ONAPPUPDATE that could not be
    verified when it came (its source over the budget of refused verifications, or Bitrix24's OAuth server
    unreachable), or any event that came while the database was away and waited in the spool
    (portals.spool). Never dropped for a budget; handled by a worker, the events of one portal in Bitrix24's
    `ts` order. Bounded per source and per portal."""

    event = models.CharField(max_length=64, help_text="The event's name, e.g. ONAPPINSTALL or ONCRMDEALADD.")
    member_id = models.CharField(max_length=64, db_index=True, help_text="The portal it claims to come from.")
    source = models.CharField(max_length=64, help_text="Where it came from (portals.sources).")
    ts = models.BigIntegerField(
        null=True, blank=True, help_text="Bitrix24's ts: one portal's are applied in its order."
    )
    payload = EncryptedTextField(
        help_text="The event's auth and data fields it needs, tokens included: encrypted. At most 1 KB for an "
        "event nothing proved yet, BITRIX24_SPOOL_MAX_ENTRY_BYTES for one its application token admitted."
    )
    spool_key = models.CharField(
        max_length=100,
        null=True,
        blank=True,
        unique=True,
        help_text="Its key in the spool when it came while the database was away: moved in once, never twice.",
    )
    reason = models.CharField(max_length=200, help_text="Why it was not handled when it came.")
    received_at = models.DateTimeField(default=timezone.now, help_text="When it came.")
    expires_at = models.DateTimeField(
        help_text="When it is dropped if not handled yet: an install's access token expiry, a week for other events."
    )
    next_attempt_at = models.DateTimeField(
        default=timezone.now, db_index=True, help_text="When a worker tries it next."
    )
    attempts = models.PositiveIntegerField(
        default=0, help_text="Times a worker tried to verify and apply it."
    )
    done_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When it was applied or dropped."
    )
    outcome = models.CharField(max_length=300, blank=True, help_text="Applied, refused (why) or expired.")

    class Meta:
        ordering = ["-received_at"]
        verbose_name = "deferred event"

    def __str__(self) -> str:
        return f"{self.event} {self.member_id} {'done' if self.done_at else 'pending'}"
