"""The one place every outbound HTTP request passes.

It knows which hosts may be called (configured OAuth servers, portal domains matching
BITRIX24_PORTAL_DOMAINS), the timeouts, and never follows redirects by itself: a redirect is the
caller's decision (a renamed portal must get its POST re-sent, not turned into a GET).

It also holds the retry policies, one per kind of call, so that what may be sent twice is decided
here and nowhere else: a failure the server never saw is always retried; one it may have carried
out only where doing it twice is harmless.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from urllib3.exceptions import NewConnectionError

from . import stopping

USER_AGENT = "bitrix24-django-backend/1.0"

_local = threading.local()


class HostNotAllowed(Exception):
    """An outbound request to a host outside the allowlist was refused before it was sent."""


def _split_host(netloc: str) -> tuple[str, str]:
    """`host[:port]` → (host lowercased, port or '')."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):  # [v6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = netloc.partition(":")
    return host, port


def _is_ip_or_local(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # Resolvers also read "127.1", "2130706433" and "0x7f000001" as addresses: no top-level
        # domain is numeric, so a numeric last label means an address in disguise.
        last = host.rsplit(".", 1)[-1]
        return last.isdigit() or last.startswith("0x")
    return True


def normalize_domain(domain: str) -> str:
    """Lowercase, strip a trailing dot; raises ValueError on anything that is not host[:port]."""
    domain = domain.strip().lower().rstrip(".")
    if not domain or len(domain) > 255:
        raise ValueError("domain is empty or too long")
    split = urlsplit(f"//{domain}")
    if split.netloc != domain or split.path or split.query or split.fragment or "@" in domain:
        raise ValueError("domain must be a bare host name, optionally with :port")
    try:
        port = split.port
    except ValueError as exc:
        raise ValueError("domain has an invalid port") from exc
    if port is not None and not (0 < port < 65536):
        raise ValueError("domain has an invalid port")
    host = split.hostname or ""
    if not host or any(not (ch.isalnum() or ch in "-.") for ch in host):
        raise ValueError("domain has characters a host name cannot have")
    return domain


def portal_domain_allowed(domain: str) -> bool:
    """Whether `domain` (host[:port]) matches BITRIX24_PORTAL_DOMAINS.

    IP literals and localhost pass only a pattern that names them exactly (a wildcard never
    matches them): `*` must not turn 169.254.169.254 into a portal.
    """
    try:
        domain = normalize_domain(domain)
    except ValueError:
        return False
    host, port = _split_host(domain)
    for pattern in settings.BITRIX24_PORTAL_DOMAINS:
        p_host, p_port = _split_host(pattern)
        if p_port and not fnmatchcase(port, p_port):
            continue
        if not p_port and port:
            continue
        if _is_ip_or_local(host):
            if p_host == host:
                return True
            continue
        if fnmatchcase(host, p_host):
            return True
    return False


def oauth_server_allowed(base_url: str) -> bool:
    return base_url.rstrip("/") in settings.BITRIX24_OAUTH_SERVERS


def check_url(url: str) -> None:
    """Raise HostNotAllowed unless `url` points at a configured OAuth server or an allowed portal."""
    parts = urlsplit(url)
    allowed_schemes = {"https", "http"} if settings.BITRIX24_ALLOW_HTTP else {"https"}
    if parts.scheme not in allowed_schemes:
        raise HostNotAllowed(f"scheme {parts.scheme!r} is not allowed for outbound requests")
    origin = f"{parts.scheme}://{parts.netloc}"
    if any(origin == server or url.startswith(server + "/") for server in settings.BITRIX24_OAUTH_SERVERS):
        return
    if portal_domain_allowed(parts.netloc):
        return
    raise HostNotAllowed(f"{parts.netloc!r} is neither a configured OAuth server nor a portal domain")


def session() -> requests.Session:
    """One session per thread: requests.Session is not documented as thread-safe."""
    sess: requests.Session | None = getattr(_local, "session", None)
    if sess is None:
        sess = requests.Session()
        sess.headers["User-Agent"] = USER_AGENT
        # Proxies from the environment would send portal traffic (and tokens) elsewhere.
        sess.trust_env = False
        _local.session = sess
    return sess


def send(method: str, url: str, **kwargs: Any) -> requests.Response:
    """Send one request after the allowlist check. Redirects are never followed here."""
    check_url(url)
    kwargs.setdefault("timeout", settings.BITRIX24_HTTP_TIMEOUT)
    kwargs["allow_redirects"] = False
    return session().request(method, url, **kwargs)


# --- retry policies -------------------------------------------------------------------------------


class Failure(enum.Enum):
    """How an attempt failed, as far as sending it again is concerned."""

    NOT_SENT = "never reached the server"  # refused connection, connect timeout, unknown host
    NOT_RUN = "refused before it ran"  # QUERY_LIMIT_EXCEEDED, OVERLOAD_LIMIT
    NO_ANSWER = "sent without an answer"  # read timeout, connection dropped mid-request
    BAD_ANSWER = "answered with an error page"  # 5xx, an HTML page from a proxy


def failure_of(exc: requests.RequestException) -> Failure:
    """Whether a request that raised may have reached the server."""
    if isinstance(exc, requests.ConnectTimeout):
        return Failure.NOT_SENT
    # requests wraps a refused connection (and a failed DNS lookup) as ConnectionError(MaxRetryError);
    # only the reason inside tells it apart from a connection dropped after the request went out.
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError):
        return Failure.NOT_SENT
    return Failure.NO_ANSWER


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min(cap, base·2ⁿ⁻¹)], so
    that many callers that failed together do not come back together."""

    base: float
    cap: float = math.inf

    def ceiling(self, retry: int) -> float:
        return min(self.cap, self.base * 2 ** (retry - 1))

    def delay(self, retry: int) -> float:
        return random.uniform(0, self.ceiling(retry))


@dataclass(frozen=True)
class RetryPolicy:
    name: str
    attempts: int
    backoff: Backoff
    timeout: tuple[float, float]  # (connect, read) seconds
    retry_on: frozenset[Failure]

    def retries(self, failure: Failure) -> bool:
        # A request the server never saw cannot have been carried out: sending it again is always safe.
        return failure is Failure.NOT_SENT or failure in self.retry_on

    def worst_case_seconds(self) -> float:
        """The longest a call may take with every attempt timing out and every backoff at its ceiling."""
        connect, read = self.timeout
        return self.attempts * (connect + read) + sum(
            self.backoff.ceiling(n) for n in range(1, self.attempts)
        )


class Attempts:
    """One call's attempts under a policy; share it across the steps of a call so they share the budget."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.made = 1

    def retry_or_raise(self, failure: Failure, error: Exception) -> None:
        """Sleep before the next attempt, or raise `error` when the policy gives up on this failure."""
        if not self.policy.retries(failure) or self.made >= self.policy.attempts:
            raise error
        if stopping.stop_requested():
            # The process is stopping: finish what is in hand, start nothing new.
            raise error
        time.sleep(self.policy.backoff.delay(self.made))
        self.made += 1


_MAYBE_CARRIED_OUT = frozenset({Failure.NO_ANSWER, Failure.BAD_ANSWER})

# Three sends of a REST call at most: someone is usually waiting for it, and a portal still failing after
# two backoffs is better reported than waited for.
_REST_ATTEMPTS = 3
_REST_BACKOFF = Backoff(base=0.5, cap=4.0)


def _oauth_policy(name: str) -> RetryPolicy:
    return RetryPolicy(
        name=name,
        attempts=max(1, settings.BITRIX24_OAUTH_ATTEMPTS),
        backoff=Backoff(settings.BITRIX24_OAUTH_BACKOFF, cap=30.0),
        timeout=settings.BITRIX24_OAUTH_TIMEOUT,
        retry_on=_MAYBE_CARRIED_OUT,
    )


def refresh_policy() -> RetryPolicy:
    """Refreshing a token pair. A timeout does not prove the server rotated the pair, so it is retried;
    when the server did, the retry is refused with invalid_grant and the caller names the lost answer."""
    return _oauth_policy("token refresh")


def verify_policy() -> RetryPolicy:
    """app.info about a token we were handed (inbound requests, API calls, staff checks): one attempt
    with a short read timeout. Whoever sent the request is waiting, and anyone can send one: a forged
    request must not buy several calls to the OAuth server, nor minutes of a web worker. A request that
    meets trouble answers 503 and is sent again by its sender (Bitrix24, or the app page)."""
    return RetryPolicy(
        name="inbound verification",
        attempts=1,
        backoff=Backoff(settings.BITRIX24_OAUTH_BACKOFF, cap=30.0),
        timeout=(settings.BITRIX24_OAUTH_TIMEOUT[0], settings.BITRIX24_VERIFY_READ_TIMEOUT),
        retry_on=_MAYBE_CARRIED_OUT,
    )


def rest_read_policy() -> RetryPolicy:
    """A REST call that reads, or a write the caller declared idempotent: doing it twice is harmless."""
    return RetryPolicy(
        name="REST read",
        attempts=_REST_ATTEMPTS,
        backoff=_REST_BACKOFF,
        timeout=settings.BITRIX24_HTTP_TIMEOUT,
        retry_on=_MAYBE_CARRIED_OUT,
    )


def rest_write_policy() -> RetryPolicy:
    """A REST call that writes: after a timeout or an error page Bitrix24 may have carried it out, and
    a second send would add a second contact, deal or task."""
    return RetryPolicy(
        name="REST write",
        attempts=_REST_ATTEMPTS,
        backoff=_REST_BACKOFF,
        timeout=settings.BITRIX24_HTTP_TIMEOUT,
        retry_on=frozenset(),
    )


def query_limit_policy() -> RetryPolicy:
    """A REST call the portal refused for its rate limit. It did not run, so reads and writes alike are
    sent again; the backoff is on top of the wait for the shared bucket to drain."""
    return RetryPolicy(
        name="REST query limit",
        attempts=1 + max(0, settings.BITRIX24_QUERY_LIMIT_RETRIES),
        backoff=Backoff(base=0.5, cap=8.0),
        timeout=settings.BITRIX24_HTTP_TIMEOUT,
        retry_on=frozenset({Failure.NOT_RUN}),
    )
