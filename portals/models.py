from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from .fields import EncryptedTextField


class AppStatus(models.TextChoices):
    LOCAL = "L", "Local"
    FREE = "F", "Free"
    DEMO = "D", "Demo"
    TRIAL = "T", "Trial"
    PAID = "P", "Paid"
    SUBSCRIPTION = "S", "Subscription"


class PortalState(models.TextChoices):
    INSTALLED = "installed", "Installed"
    # First seen through a user who is not a portal admin: anyone could have sent that install. Waits
    # for an admin's install, launch or update, or for staff to approve it.
    PENDING = "pending", "Pending approval"
    NEEDS_REINSTALL = "needs_reinstall", "Needs reinstall"
    UNINSTALLED = "uninstalled", "Uninstalled"


class ReinstallCause(models.TextChoices):
    TOKENS = "tokens", "Its tokens were refused or lost"
    CONFIRMING = "confirming", "A new background pair is being confirmed"
    STAFF = "staff", "Staff marked it"


class StateOutsideLifecycle(RuntimeError):
    """A portal's state was changed outside portals.lifecycle, the one module that moves portals."""


# Open only inside a transition of portals.lifecycle (per thread and task: a context variable).
_state_door: ContextVar[bool] = ContextVar("portal_state_door", default=False)


@contextmanager
def state_door() -> Iterator[None]:
    """For portals.lifecycle alone: lets its transition write Portal.state."""
    token = _state_door.set(True)
    try:
        yield
    finally:
        _state_door.reset(token)


def _refuse_state_change() -> None:
    if not _state_door.get():
        raise StateOutsideLifecycle(
            "Portal.state changes only through portals.lifecycle (one named transition per change)"
        )


class PortalQuerySet(models.QuerySet["Portal"]):
    def update(self, **kwargs: Any) -> int:
        if "state" in kwargs:
            _refuse_state_change()
        return super().update(**kwargs)

    def bulk_update(self, objs: Any, fields: Any, batch_size: int | None = None) -> int:
        if "state" in fields:
            _refuse_state_change()
        return super().bulk_update(objs, fields, batch_size=batch_size)


class Portal(models.Model):
    member_id = models.CharField(
        max_length=64,
        unique=True,
        help_text="Bitrix24's stable identifier of the portal; never changes, even when the portal is renamed.",
    )
    domain = models.CharField(
        max_length=255,
        help_text="The portal's current host (and port, if any), as confirmed by app.info; updated on rename.",
    )
    protocol = models.CharField(
        max_length=5,
        default="https",
        help_text="Scheme of the portal's address: https, or http for local and some on-premise portals.",
    )
    oauth_server = models.URLField(
        help_text="Base URL of the OAuth server this portal's tokens belong to (one of BITRIX24_OAUTH_SERVERS).",
    )
    app_status = models.CharField(
        max_length=1,
        choices=AppStatus.choices,
        blank=True,
        help_text="The app's licence status on this portal (L/F/D/T/P/S), as the portal's own app.info last said.",
    )
    state = models.CharField(
        max_length=20,
        choices=PortalState.choices,
        default=PortalState.INSTALLED,
        db_index=True,
        help_text="Where the installation stands: installed, needs a reinstall by the customer, or uninstalled.",
    )
    state_reason = models.CharField(
        max_length=255,
        blank=True,
        help_text="Why the portal is in its state when that is not 'installed' (for example the OAuth error).",
    )
    reinstall_cause = models.CharField(
        max_length=16,
        choices=ReinstallCause.choices,
        blank=True,
        help_text=(
            "Who decided the portal needs a reinstall: its tokens (a working background pair clears it) or "
            "staff (only staff or a reinstall clear it)."
        ),
    )
    application_token = EncryptedTextField(
        blank=True,
        default="",
        help_text="Secret Bitrix24 sends with events to prove they come from it (encrypted at rest).",
    )
    pending_application_token = EncryptedTextField(
        blank=True,
        default="",
        help_text=(
            "The application token of a first install that no admin confirmed yet (encrypted); it becomes the "
            "application token only when staff approve the portal."
        ),
    )
    install_generation = models.PositiveIntegerField(
        default=0,
        help_text=(
            "Counts confirmed uninstalls: a launch or install whose verification began before one does not "
            "store its tokens."
        ),
    )
    scope = models.CharField(
        max_length=1000, blank=True, help_text="Scopes granted to the app on this portal, comma-separated."
    )
    app_version = models.CharField(
        max_length=32,
        blank=True,
        help_text="Version of the app installed on the portal, from install/update events.",
    )
    payment_expired = models.BooleanField(
        null=True,
        blank=True,
        help_text="Whether the app's paid period has run out (PAYMENT_EXPIRED), per the portal's app.info.",
    )
    license = models.CharField(
        max_length=64,
        blank=True,
        default="",
        # In the database too: processes of the previous release insert rows without it during an upgrade.
        db_default="",
        help_text="The portal's Bitrix24 plan as its app.info names it (LICENSE, e.g. de_ent10000).",
    )
    licence_days = models.IntegerField(
        null=True,
        blank=True,
        help_text="Days left of the app's trial or paid period (DAYS), when the portal's app.info says.",
    )
    licence_checked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the portal's app.info was last read (status, licence, payment); a launch reads it "
        "again after an hour.",
    )
    rate_limit = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1)],
        help_text="REST requests per second this portal allows (Enterprise: 5); empty: BITRIX24_RATE_LIMIT.",
    )
    rate_burst = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="REST requests this portal's bucket holds (Enterprise: 250); empty: BITRIX24_RATE_BURST.",
    )
    bindings_fingerprint = models.CharField(
        max_length=32,
        blank=True,
        help_text="Fingerprint of the event bindings last applied on the portal; the sweep syncs a "
        "portal whose fingerprint differs from the wanted one (portals.bindings).",
    )
    bindings_synced_at = models.DateTimeField(
        null=True, blank=True, help_text="When the portal's event bindings were last synced."
    )
    installed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the app was (last) installed on the portal."
    )
    last_launch_at = models.DateTimeField(
        null=True, blank=True, help_text="When a user last opened the app in the portal."
    )
    uninstalled_at = models.DateTimeField(null=True, blank=True, help_text="When the app was uninstalled.")
    uninstall_claimed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When an ONAPPUNINSTALL not yet proven arrived (its claim is open or held); cleared when it is "
        "confirmed or dismissed. Nothing users see changes meanwhile.",
    )
    purge_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="An uninstall with CLEAN=1: when the portal's data is purged (BITRIX24_PURGE_DELAY_DAYS after "
        "it); a reinstall or a verified request before then cancels it.",
    )
    created_at = models.DateTimeField(
        auto_now_add=True, help_text="When this backend first heard of the portal."
    )
    updated_at = models.DateTimeField(auto_now=True, help_text="When this row last changed.")

    objects = PortalQuerySet.as_manager()

    class Meta:
        ordering = ["domain"]
        # The staff API checks these (view_portal is Django's own): staff without them are refused.
        permissions = [
            ("renew_portal", "Can queue token renewals of a portal (staff API)"),
            ("call_portal", "Can call Bitrix24's read methods with a portal's background pair (staff API)"),
            ("call_any_method", "Can call any Bitrix24 method, writes and event.bind included (staff API)"),
        ]

    def __str__(self) -> str:
        return f"{self.domain} ({self.member_id})"

    def __setattr__(self, name: str, value: Any) -> None:
        # The first value (a new row, a row read from the database) and a reload are not changes; any
        # other change of state must come through portals.lifecycle.
        changing = name == "state" and "state" in self.__dict__ and self.__dict__["state"] != value
        if changing and not self.__dict__.get("_reloading"):
            _refuse_state_change()
        super().__setattr__(name, value)

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_reloading"] = True
        try:
            super().refresh_from_db(*args, **kwargs)
        finally:
            self.__dict__.pop("_reloading", None)

    @property
    def base_url(self) -> str:
        return f"{self.protocol}://{self.domain}"

    @property
    def origin(self) -> str:
        return self.base_url


class PairState(models.TextChoices):
    ACTIVE = "active", "Active"
    # The OAuth server refused the refresh token for good (invalid_grant, PAYMENT_REQUIRED,
    # portal deleted): only a reinstall or a fresh launch by that user brings the pair back.
    DEAD = "dead", "Dead (needs reinstall)"
    # invalid_client: the app's credentials were refused. The refresh token was not consumed,
    # so fixing BITRIX24_CLIENT_SECRET and renewing again brings the pair back.
    CREDENTIALS_REJECTED = "credentials_rejected", "App credentials rejected"
    # A renewal was interrupted (crash, kill) after its request may have reached the OAuth server,
    # and the refresh token was refused when the interrupted attempt was resolved: the server had
    # used it, and the new pair it handed out never arrived. Only a reinstall brings it back.
    LOST = "lost", "Lost in an interrupted renewal"


def renewal_due_before(now=None):  # type: ignore[no-untyped-def]
    """Pairs whose refresh token was issued before this moment are due for proactive renewal."""
    now = now or timezone.now()
    keep = settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS - settings.BITRIX24_RENEW_MARGIN_DAYS
    return now - timedelta(days=max(keep, 0))


class TokenPair(models.Model):
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="token_pairs", help_text="Portal the pair belongs to."
    )
    user_id = models.PositiveBigIntegerField(
        help_text="Bitrix24 user the tokens act as (from app.info or the OAuth server's answer)."
    )
    is_background = models.BooleanField(
        default=False,
        help_text=(
            "The pair background work uses (the installer's or one an admin chose). "
            "A launch by another user never takes this mark."
        ),
    )
    access_token = EncryptedTextField(help_text="Access token (encrypted at rest); lives about an hour.")
    refresh_token = EncryptedTextField(help_text="Refresh token (encrypted at rest); single-use.")
    access_expires_at = models.DateTimeField(help_text="When the access token expires.")
    refresh_issued_at = models.DateTimeField(
        help_text="When the current refresh token was issued; it lapses BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS later."
    )
    scope = models.CharField(max_length=1000, blank=True, help_text="Scopes of the tokens, comma-separated.")
    state = models.CharField(
        max_length=24,
        choices=PairState.choices,
        default=PairState.ACTIVE,
        db_index=True,
        help_text="Active, or refused for good by the OAuth server (then renewals stop).",
    )
    last_renewed_at = models.DateTimeField(null=True, blank=True, help_text="When the pair was last renewed.")
    lost_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the pair was flagged lost (in a renewal interrupted after its answer).",
    )
    lost_acknowledged_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When staff acknowledged that it was lost (`renew_tokens --all-unacknowledged` stops naming it).",
    )
    refresh_ours = models.BooleanField(
        default=False,
        db_default=False,  # processes of the previous release insert rows without it during an upgrade
        help_text="The refresh token came from a renewal of ours, so no one else has seen it: Bitrix24 refusing "
        "it proves the app is gone. Not so for one a frame, an install or an event handed over.",
    )
    access_ours = models.BooleanField(
        default=False,
        db_default=False,  # processes of the previous release insert rows without it during an upgrade
        help_text="The access token came from a renewal of ours (not a launch's, which the frame may refresh "
        "away): app.info refusing it proves the app is gone.",
    )
    last_error = models.CharField(max_length=500, blank=True, help_text="The last renewal error, if any.")
    consecutive_failures = models.PositiveIntegerField(
        default=0, help_text="Renewal attempts that failed in a row; reset by a success."
    )
    next_attempt_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="After a transient failure, the earliest time to try again; while handed to a batch, its lease.",
    )
    batch = models.ForeignKey(
        "RenewalBatch",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="pairs",
        help_text="The renewal batch it is handed to, until that batch renews or releases it.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the pair was first stored.")
    updated_at = models.DateTimeField(auto_now=True, help_text="When this row last changed.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["portal", "user_id"], name="one_pair_per_portal_user"),
            models.UniqueConstraint(
                fields=["portal"],
                condition=models.Q(is_background=True),
                name="one_background_pair_per_portal",
            ),
        ]
        indexes = [models.Index(fields=["state", "refresh_issued_at"], name="pair_due_idx")]

    def __str__(self) -> str:
        return f"user {self.user_id} on {self.portal_id}"

    @property
    def refresh_expires_at(self):  # type: ignore[no-untyped-def]
        return self.refresh_issued_at + timedelta(days=settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS)

    @property
    def refresh_days_left(self) -> float:
        return (self.refresh_expires_at - timezone.now()).total_seconds() / 86400


class RenewalTrigger(models.TextChoices):
    BEAT = "beat", "Scheduled sweep"
    ON_DEMAND = "on_demand", "On demand"
    STAFF = "staff", "Staff"
    COMMAND = "command", "Command"


class RenewalBatch(models.Model):
    """Pairs the renewal sweep handed to one worker task, with a short lease (portals.batches).

    The broker's message is not the only record of handed-out work: each pair handed out points here and
    is held until the lease ends. A task that stops early or loses its database hands the rest back or
    releases it, saying why; a batch whose lease ended unfinished (its message lost with Redis, its worker
    killed) is released by the beat tick every minute, so no pair stays held past the lease and a minute.
    """

    trigger = models.CharField(
        max_length=16, choices=RenewalTrigger.choices, help_text="What asked for the renewals."
    )
    size = models.PositiveIntegerField(help_text="Pairs handed out in it.")
    created_at = models.DateTimeField(default=timezone.now, help_text="When it was handed out.")
    started_at = models.DateTimeField(null=True, blank=True, help_text="When a worker took it.")
    lease_expires_at = models.DateTimeField(
        db_index=True,
        help_text="Its pairs are held until then: BITRIX24_RENEW_BATCH_LEASE_SECONDS after the hand-out while "
        "queued, the task's time limit once a worker took it.",
    )
    finished_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When it ended: done, handed back or released."
    )
    released = models.PositiveIntegerField(
        default=0, help_text="Pairs given back to the sweep without being renewed."
    )
    cause = models.CharField(max_length=300, blank=True, help_text="Why pairs were released, when they were.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"batch {self.pk} of {self.size} ({'finished' if self.finished_at else 'open'})"


class RenewalOutcome(models.TextChoices):
    RENEWED = "renewed", "Renewed"
    SKIPPED = "skipped", "Not needed (already renewed)"
    TRANSIENT = "transient", "Failed, will retry"
    REFUSED = "refused", "Refused for good"


class RenewalLog(models.Model):
    pair = models.ForeignKey(
        TokenPair,
        on_delete=models.SET_NULL,
        null=True,
        related_name="renewals",
        help_text="The pair renewed (empty once the pair is deleted).",
    )
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="renewals", help_text="Portal of the pair."
    )
    user_id = models.PositiveBigIntegerField(help_text="Bitrix24 user of the pair.")
    trigger = models.CharField(
        max_length=16, choices=RenewalTrigger.choices, help_text="What asked for the renewal."
    )
    outcome = models.CharField(
        max_length=16, choices=RenewalOutcome.choices, help_text="How the attempt ended."
    )
    error = models.CharField(max_length=500, blank=True, help_text="The error, when the attempt failed.")
    duration_ms = models.PositiveIntegerField(
        default=0, help_text="Time spent on the attempt, in milliseconds."
    )
    old_fingerprint = models.CharField(
        max_length=16, blank=True, help_text="Fingerprint of the refresh token before (never the token)."
    )
    new_fingerprint = models.CharField(
        max_length=16, blank=True, help_text="Fingerprint of the refresh token after (never the token)."
    )
    created_at = models.DateTimeField(
        default=timezone.now, db_index=True, help_text="When the attempt was made."
    )

    class Meta:
        ordering = ["-created_at"]
        # A portal's latest renewals (the portal list's "last renewal", the portal page's recent ones).
        indexes = [models.Index(fields=["portal", "-created_at"], name="renewal_log_portal_time")]

    def __str__(self) -> str:
        return f"{self.outcome} {self.created_at:%Y-%m-%d %H:%M:%S}"


class AttemptState(models.TextChoices):
    IN_FLIGHT = "in_flight", "In flight"
    STORED = "stored", "New pair stored"
    FAILED = "failed", "Failed (nothing rotated)"
    RECOVERED = "recovered", "Interrupted; new pair recovered from the second copy"
    INTERRUPTED = "interrupted", "Interrupted; resolved by trying the old token again"


class RenewalAttempt(models.Model):
    """The journal of refreshes: written and committed before the request leaves the process.

    A refresh that is interrupted (crash, kill, lost database) leaves its attempt `in_flight`; the
    next renewal of that pair, `renew_tokens` or the beat sweep resolves it (see
    `portals.renewal`), instead of the pair looking healthy until its refresh token is refused.
    """

    pair = models.ForeignKey(
        TokenPair, on_delete=models.CASCADE, related_name="attempts", help_text="The pair being renewed."
    )
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="renewal_attempts", help_text="Portal of the pair."
    )
    trigger = models.CharField(
        max_length=16, choices=RenewalTrigger.choices, help_text="What asked for the renewal."
    )
    state = models.CharField(
        max_length=16,
        choices=AttemptState.choices,
        default=AttemptState.IN_FLIGHT,
        db_index=True,
        help_text="In flight until the new pair is stored or the failure recorded.",
    )
    old_fingerprint = models.CharField(
        max_length=16, help_text="Fingerprint of the refresh token sent (never the token)."
    )
    holder_host = models.CharField(
        max_length=255, help_text="Host name of the process that sent the refresh."
    )
    holder_pid = models.PositiveIntegerField(help_text="Process id of the process that sent the refresh.")
    holder_start = models.CharField(
        max_length=64,
        blank=True,
        help_text="Boot id and start time of that process: a reused process id does not pass for the holder.",
    )
    lease_expires_at = models.DateTimeField(
        help_text="After this the holder is presumed dead, alive or not: longer than any refresh can take."
    )
    started_at = models.DateTimeField(default=timezone.now, help_text="When the attempt was journaled.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the attempt was resolved.")
    note = models.CharField(max_length=500, blank=True, help_text="How the attempt ended, when not plainly.")

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            # The lease: one refresh of a pair at a time, without a lock held across the HTTP call.
            models.UniqueConstraint(
                fields=["pair"],
                condition=models.Q(state="in_flight"),
                name="one_attempt_in_flight_per_pair",
            )
        ]

    def __str__(self) -> str:
        return f"{self.state} {self.started_at:%Y-%m-%d %H:%M:%S}"


class WantedKind(models.TextChoices):
    BIND_EVENTS = "bind_events", "Bind the app's events"
    RENEW_PAIR = "renew_pair", "Renew a token pair"
    CONFIRM_UNINSTALL = "confirm_uninstall", "Confirm an uninstall with Bitrix24"
    CHECK_STATUS = "check_status", "Check the app's status with Bitrix24"


class WantedAction(models.Model):
    """Work that must happen, recorded before any task is queued for it.

    A broker message is never the only record of work: if publishing fails (Redis away) or the task
    is lost (a killed worker, a purged queue), the beat sweep finds the action still open and queues
    it again. Done once `done_at` is set.
    """

    kind = models.CharField(max_length=24, choices=WantedKind.choices, help_text="What must be done.")
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="wanted_actions", help_text="The portal concerned."
    )
    pair = models.ForeignKey(
        TokenPair,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="wanted_actions",
        help_text="The token pair concerned (renewals).",
    )
    force = models.BooleanField(
        default=False,
        help_text="Renew even if the pair is not due (staff); for an uninstall: delete the portal's data too.",
    )
    trigger = models.CharField(
        max_length=16,
        choices=RenewalTrigger.choices,
        default=RenewalTrigger.STAFF,
        help_text="Who asked for it.",
    )
    requested_at = models.DateTimeField(default=timezone.now, help_text="When it was asked for.")
    attempts = models.PositiveIntegerField(default=0, help_text="Times a task tried to carry it out.")
    last_error = models.CharField(max_length=500, blank=True, help_text="Why the last try failed.")
    next_attempt_at = models.DateTimeField(
        null=True,
        blank=True,
        db_index=True,
        help_text="When the sweep may queue it again (after a failure, or while a queued task is pending).",
    )
    done_at = models.DateTimeField(null=True, blank=True, db_index=True, help_text="When it was done.")
    generation = models.PositiveIntegerField(
        default=0,
        help_text="Bumped when the same work is asked for again while open: a run that started before "
        "does not close it.",
    )
    note = models.CharField(max_length=500, blank=True, help_text="How it ended, when not plainly.")
    held_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="An uninstall claim without proof from Bitrix24: when it was held for staff (the evidence is "
        "in the last error). Nothing is deleted until staff confirm it; a verified request dismisses it.",
    )
    refreshed = models.BooleanField(
        default=False,
        db_default=False,  # processes of the previous release insert rows without it during an upgrade
        help_text="An uninstall claim: it has refreshed the background pair once (a claim causes one refresh "
        "at most).",
    )

    class Meta:
        ordering = ["-requested_at"]
        constraints = [
            # Asking twice for the same open work is one action, not two.
            models.UniqueConstraint(
                fields=["kind", "portal"],
                condition=models.Q(done_at__isnull=True, pair__isnull=True),
                name="one_open_portal_action",
            ),
            models.UniqueConstraint(
                fields=["kind", "pair"],
                condition=models.Q(done_at__isnull=True, pair__isnull=False),
                name="one_open_pair_action",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {'done' if self.done_at else 'open'}"


class StaffCall(models.Model):
    """The audit of Bitrix24 calls staff made through the API with a portal's background pair: who, on which
    portal, which method (a batch's commands too), and whether it was let through."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The staff user (empty once the user is deleted; the username stays).",
    )
    username = models.CharField(max_length=150, help_text="The staff user's username at the time.")
    portal = models.ForeignKey(
        Portal, on_delete=models.CASCADE, related_name="staff_calls", help_text="The portal called."
    )
    method = models.CharField(max_length=100, help_text="The method asked for (e.g. crm.deal.list, batch).")
    commands = models.CharField(
        max_length=500, blank=True, help_text="A batch's methods, comma-separated (cut at 500 characters)."
    )
    allowed = models.BooleanField(
        help_text="Let through: a read method, or the user may call any method. Refused calls are kept too."
    )
    called_at = models.DateTimeField(default=timezone.now, db_index=True, help_text="When it was asked for.")

    class Meta:
        ordering = ["-called_at"]
        verbose_name = "staff call"

    def __str__(self) -> str:
        return f"{self.username} {self.method} on {self.portal_id}"


class CommandRun(models.Model):
    """A run of a management command that reports on what happened since its previous run (renew_tokens:
    pairs flagged lost meanwhile, by whichever process)."""

    command = models.CharField(max_length=64, db_index=True, help_text="The command's name.")
    started_at = models.DateTimeField(default=timezone.now, help_text="When the run started.")
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When it ended (empty: still running, or killed)."
    )
    exit_code = models.IntegerField(null=True, blank=True, help_text="What it exited with.")

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.command} at {self.started_at:%Y-%m-%d %H:%M:%S}"


class SchedulerLease(models.Model):
    """Which beat sends the scheduled tasks (portals.beat): a second beat started by mistake, or on another
    machine, waits while the holder keeps renewing its lease, and takes over once the lease runs out."""

    name = models.CharField(max_length=32, primary_key=True, help_text="The lease's name (one: beat).")
    holder = models.CharField(max_length=300, help_text="host|pid|start of the beat process holding it.")
    until = models.DateTimeField(help_text="The lease ends then unless its holder renews it.")

    class Meta:
        verbose_name = "scheduler lease"

    def __str__(self) -> str:
        return f"{self.name}: {self.holder} until {self.until:%H:%M:%S}"
