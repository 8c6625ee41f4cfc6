"""Domain errors that callers above the renewal service catch (views, the API, tasks, commands).

They live apart from the modules that raise them so that callers need not import those modules'
internals, and they carry no HTTP: portals.answers maps each to its answer, for every surface.
"""

from __future__ import annotations


class NoUsablePair(Exception):
    """The portal has no active token pair to act with (not installed, or it needs a reinstall)."""


class PortalBusy(Exception):
    """The portal's REST rate limit has no slot for `wait` seconds, longer than the caller may wait: the
    work goes back with its time instead of sleeping in a worker (portals.governor.waiting_at_most)."""

    def __init__(self, message: str, *, wait: float) -> None:
        super().__init__(message)
        self.wait = wait


class TooManyEvents(Exception):
    """The portal delivered more events than it may (per minute, or waiting at once): not stored."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RenewalFailed(Exception):
    """A renewal did not produce a new pair."""

    def __init__(self, message: str, *, transient: bool, code: str, lost: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code
        # The pair was lost in an interrupted renewal: the portal needs a reinstall.
        self.lost = lost


class RenewalPending(RenewalFailed):
    """A web request waited its budget (BITRIX24_WEB_TOKEN_WAIT_SECONDS) for a worker to renew the
    token, or could not queue the renewal: ask again shortly (503 with Retry-After)."""

    retry_after = 15

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True, code="renewal_pending")
