"""Where a request comes from: the address the budgets of unverified requests count by.

A request's source is its peer address, or, when the peer is one of the proxies in FORWARDED_ALLOW_IPS, the
right-most `X-Forwarded-For` address that is not such a proxy: addresses left of it were written by the
client and prove nothing. IPv6 sources count by their /64 (one host is given a whole /64). The same rule in
every process (gunicorn's own setting of that name covers only gunicorn's view of the scheme), in the admin's
login throttle too (AXES_CLIENT_IP_CALLABLE).

Written here rather than taken from django-ipware: its proxy handling trusts a count or prefixes of proxies,
not "the right-most address that is not a listed proxy", which is the contract's rule.

A middleware (portals.middleware.RequestSource) sets the source for the request; code below the views reads
it with `current()` (empty outside a request: a worker's own calls are not budgeted).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_current: ContextVar[str] = ContextVar("request_source", default="")


@lru_cache(maxsize=8)
def _proxies(listed: tuple[str, ...]) -> tuple[Network, ...] | None:
    """The networks of FORWARDED_ALLOW_IPS; None for "*" (every peer is a proxy: development only)."""
    if "*" in listed:
        return None
    return tuple(ipaddress.ip_network(item, strict=False) for item in listed if item)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_proxy(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: tuple[Network, ...] | None
) -> bool:
    return proxies is None or any(address in network for network in proxies)


def _name(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def source_of(meta: Mapping[str, Any]) -> str:
    """The source of a request from its META (REMOTE_ADDR, HTTP_X_FORWARDED_FOR): its client address, an
    IPv6 one as its /64."""
    address = _client(meta)
    return "unknown" if address is None else _name(address)


def _client(meta: Mapping[str, Any]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    proxies = _proxies(tuple(settings.FORWARDED_ALLOW_IPS))
    peer = _address(str(meta.get("REMOTE_ADDR") or ""))
    if peer is None or not _is_proxy(peer, proxies):
        return peer
    hops = [hop for hop in str(meta.get("HTTP_X_FORWARDED_FOR") or "").split(",") if hop.strip()]
    chosen = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # garbage in the chain: the last good address before it stands
        chosen = address
        if not _is_proxy(address, proxies):
            break
    return chosen


def current() -> str:
    """The source of the request being handled; empty outside a request."""
    return _current.get()


@contextmanager
def using(source: str) -> Iterator[None]:
    token = _current.set(source)
    try:
        yield
    finally:
        _current.reset(token)


def axes_client_ip(request: Any) -> str | None:
    """django-axes' client address (AXES_CLIENT_IP_CALLABLE): the same client as the budgets' (the address
    itself: axes keeps it in an address field)."""
    address = _client(request.META)
    return None if address is None else str(address)
