"""The one place every outbound HTTP request passes.

It knows which hosts may be called (configured OAuth servers, portal domains matching
BITRIX24_PORTAL_DOMAINS), the timeouts, and never follows redirects by itself: a redirect is the
caller's decision (a renamed portal must get its POST re-sent, not turned into a GET).

A host admitted only by a wildcard pattern is resolved here, every address it resolves to must be a
public one, and the connection goes to the address that was checked: a name under `*.bitrix24.com`
whose DNS points at 10.0.0.5 or 169.254.169.254 is refused before a byte is sent, and a DNS answer
that changes between the check and the connect (rebinding) is never seen by the connection.

It also holds the retry policies, one per kind of call, so that what may be sent twice is decided
here and nowhere else: a failure the server never saw is always retried; one it may have carried
out only where doing it twice is harmless.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
import socket
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError
from urllib3.util.connection import allowed_gai_family

from . import clock, stopping

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs  # the stubs' names for what requests builds

USER_AGENT = "bitrix24-django-backend/1.0"

_local = threading.local()


class HostNotAllowed(Exception):
    """An outbound request to a host outside the allowlist was refused before it was sent."""


class UnresolvedHost(requests.ConnectionError):
    """A host a wildcard pattern admits could not be resolved. Nothing was sent: a ConnectionError,
    so that callers retry it like the failed lookup inside requests it replaces."""


@dataclass(frozen=True)
class Destination:
    """Where a URL that passed the check may be sent.

    `address` is the IP the connection must go to: the one whose check passed. None when the host is
    trusted as written (a configured OAuth server, a portal pattern naming the host exactly) and is
    left to the ordinary resolver.
    """

    host: str
    address: str | None = None


# Cloud metadata services, named although the ranges below cover them, so that the refusal says what
# the address is: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba Cloud.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


_REFUSED_KINDS = (
    ("is_loopback", "a loopback address"),
    ("is_unspecified", "the unspecified address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_private", "a private address"),
    ("is_reserved", "a reserved address"),
)


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a portal reached through a wildcard pattern may not be at `ip`; None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for flag, what in _REFUSED_KINDS:
        if getattr(ip, flag):
            return what
    # What the flags above miss and no portal on the internet can be: shared address space
    # (100.64.0.0/10, carrier NAT and some clouds' internal services), 6to4/Teredo relays' own ranges …
    if not ip.is_global:
        return "not a globally routable address"
    return None


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


class _Match(enum.Enum):
    EXACT = "a pattern names the host exactly"
    WILDCARD = "only a wildcard pattern admits the host"


def _is_wildcard(pattern_host: str) -> bool:
    return any(ch in pattern_host for ch in "*?[")


def _portal_match(domain: str) -> _Match | None:
    """How `domain` (host[:port]) matches BITRIX24_PORTAL_DOMAINS, if it does. An exact match wins:
    a host the operator named is trusted as written, one a wildcard admits is resolved and checked."""
    try:
        domain = normalize_domain(domain)
    except ValueError:
        return None
    host, port = _split_host(domain)
    found: _Match | None = None
    for pattern in settings.BITRIX24_PORTAL_DOMAINS:
        p_host, p_port = _split_host(pattern)
        if p_port and not fnmatchcase(port, p_port):
            continue
        if not p_port and port:
            continue
        if not _is_wildcard(p_host):
            if p_host.rstrip(".") == host:
                return _Match.EXACT
            continue
        if not _is_ip_or_local(host) and fnmatchcase(host, p_host):
            found = _Match.WILDCARD
    return found


def portal_domain_allowed(domain: str) -> bool:
    """Whether `domain` (host[:port]) matches BITRIX24_PORTAL_DOMAINS, as a string.

    IP literals and localhost pass only a pattern that names them exactly (a wildcard never
    matches them): `*` must not turn 169.254.169.254 into a portal. Where a name admitted by a
    wildcard actually points is checked when a request is sent (check_url).
    """
    return _portal_match(domain) is not None


def oauth_server_allowed(base_url: str) -> bool:
    return base_url.rstrip("/") in settings.BITRIX24_OAUTH_SERVERS


def _public_address(host: str, port: int) -> str:
    """Resolve `host` once and return the address to connect to, after checking every address it
    resolves to. Any non-public one refuses the host: a DNS answer mixing a public and a private
    address would otherwise reach the private one on the next lookup, or through a retry.

    No cache of our own: the connection is pinned to the address checked here, so a cache could only
    make us slower to follow a portal's move, and the system resolver caches already.
    """
    try:
        # The family urllib3 itself would ask for (IPv6 only where this machine has it), so the pinned
        # address is one this machine can reach.
        infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise UnresolvedHost(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        text = str(info[4][0])
        try:
            ip = ipaddress.ip_address(text)
        except ValueError as exc:
            raise HostNotAllowed(f"{host!r} resolves to {text!r}, which is not an IP address") from exc
        reason = _refusal(ip)
        if reason is not None:
            raise HostNotAllowed(
                f"{host!r} resolves to {ip}, {reason}: a host admitted by a wildcard pattern of "
                "BITRIX24_PORTAL_DOMAINS must resolve to public addresses only"
            )
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise UnresolvedHost(f"cannot resolve {host!r}: no address")
    # The resolver's preferred address. One address per request: a connection that fails on it is a
    # NOT_SENT failure, which every retry policy sends again.
    return addresses[0]


def check_url(url: str) -> Destination:
    """Where `url` may be sent; HostNotAllowed unless it points at a configured OAuth server or an
    allowed portal whose addresses (for a wildcard match) are public. A failed lookup raises
    UnresolvedHost, a requests.ConnectionError."""
    parts = urlsplit(url)
    allowed_schemes = {"https", "http"} if settings.BITRIX24_ALLOW_HTTP else {"https"}
    if parts.scheme not in allowed_schemes:
        raise HostNotAllowed(f"scheme {parts.scheme!r} is not allowed for outbound requests")
    host = (parts.hostname or "").rstrip(".")
    origin = f"{parts.scheme}://{parts.netloc}"
    if any(origin == server or url.startswith(server + "/") for server in settings.BITRIX24_OAUTH_SERVERS):
        return Destination(host)  # configured by the operator: trusted as written
    match = _portal_match(parts.netloc)
    if match is _Match.EXACT:
        return Destination(host)
    if match is _Match.WILDCARD:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Destination(host, _public_address(host, port))
    raise HostNotAllowed(f"{parts.netloc!r} is neither a configured OAuth server nor a portal domain")


# The checked Destination rides on the PreparedRequest from send() to the adapter: requests hands the
# same object to the adapter, and nothing else carries per-request data that far.
_DESTINATION = "_b24_destination"


class _CheckedAdapter(HTTPAdapter):
    """Sends a request only to the Destination check_url gave it.

    For a pinned address the urllib3 pool is opened on that IP, while the URL keeps the name: the Host
    header is set from the name, and for https `server_hostname` (SNI) and `assert_hostname` (the
    certificate check) are the name too, so TLS verifies the portal, not the IP. urllib3 connects to an
    IP literal without asking DNS, so no second lookup can return another address. Pools are keyed by
    the IP (and for https the name), so keep-alive reuse never crosses to an address that was not
    checked for this request.
    """

    @staticmethod
    def _destination(request: requests.PreparedRequest) -> Destination:
        destination = getattr(request, _DESTINATION, None)
        if not isinstance(destination, Destination):
            # Only send() attaches one: a request that skipped the allowlist goes nowhere.
            raise HostNotAllowed("outbound requests must go through portals.http.send")
        return destination

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: str | tuple[str, str] | None = None
    ) -> tuple[_HostParams, _PoolKwargs]:
        # requests documents this hook for changing the pool a request is sent on.
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        destination = self._destination(request)
        if destination.address is not None:
            host_params["host"] = destination.address
            # urllib3's TLS keywords (dropped for plain-http pools), which the stubs' TypedDict lacks.
            tls = cast("dict[str, Any]", pool_kwargs)
            tls["server_hostname"] = destination.host
            tls["assert_hostname"] = destination.host
        return host_params, pool_kwargs

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        destination = self._destination(request)
        if destination.address is not None:
            # http.client would name the IP it connects to; the portal must see its own name.
            parts = urlsplit(request.url or "")
            default_port = 443 if parts.scheme == "https" else 80
            port = parts.port
            request.headers["Host"] = (
                destination.host if port in (None, default_port) else f"{destination.host}:{port}"
            )
        return super().send(request, *args, **kwargs)


def session() -> requests.Session:
    """One session per thread: requests.Session is not documented as thread-safe."""
    sess: requests.Session | None = getattr(_local, "session", None)
    if sess is None:
        sess = requests.Session()
        sess.headers["User-Agent"] = USER_AGENT
        # Proxies from the environment would send portal traffic (and tokens) elsewhere.
        sess.trust_env = False
        adapter = _CheckedAdapter()
        sess.mount("https://", adapter)
        sess.mount("http://", adapter)
        _local.session = sess
    return sess


def send(method: str, url: str, **kwargs: Any) -> requests.Response:
    """Send one request after the allowlist check, to the address that was checked. Redirects are
    never followed here. `kwargs`: what requests.Request takes (params, data, json, headers …), and
    `timeout`."""
    destination = check_url(url)
    timeout = kwargs.pop("timeout", settings.BITRIX24_HTTP_TIMEOUT)
    kwargs.pop("allow_redirects", None)
    sess = session()
    prepared = sess.prepare_request(requests.Request(method.upper(), url, **kwargs))
    setattr(prepared, _DESTINATION, destination)
    # The session ignores the environment's CA variables (trust_env is off): BITRIX24_CA_BUNDLE, or the
    # system's authorities.
    verify: bool | str = settings.BITRIX24_CA_BUNDLE or True
    return sess.send(prepared, timeout=timeout, allow_redirects=False, verify=verify)


# --- retry policies -------------------------------------------------------------------------------


class Failure(enum.Enum):
    """How an attempt failed, as far as sending it again is concerned."""

    NOT_SENT = "never reached the server"  # refused connection, connect timeout, unknown host
    NOT_RUN = "refused before it ran"  # QUERY_LIMIT_EXCEEDED, OVERLOAD_LIMIT
    NO_ANSWER = "sent without an answer"  # read timeout, connection dropped mid-request
    BAD_ANSWER = "answered with an error page"  # 5xx, an HTML page from a proxy


def failure_of(exc: requests.RequestException) -> Failure:
    """Whether a request that raised may have reached the server."""
    if isinstance(exc, (requests.ConnectTimeout, UnresolvedHost)):
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
        return clock.backoff(retry, base=self.base, cap=self.cap)

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
        clock.sleep(self.policy.backoff.delay(self.made))
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
