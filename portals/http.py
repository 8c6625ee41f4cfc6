"""The one place every outbound HTTP request passes.

It knows which hosts may be called (configured OAuth servers, portal domains matching
BITRIX24_PORTAL_DOMAINS), the timeouts, and never follows redirects by itself: a redirect is the
caller's decision (a renamed portal must get its POST re-sent, not turned into a GET).
"""

from __future__ import annotations

import ipaddress
import threading
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings

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
