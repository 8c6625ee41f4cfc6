"""Hosts a wildcard pattern admits are resolved before use, over real sockets.

There is no network here, so `socket.getaddrinfo` is replaced in these tests only: a made-up name under a
wildcard pattern resolves to whatever the test says, and every other name (127.0.0.1 …) as usual.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from portals import http
from standin.tls import LocalCA

NAME = "shop.portal.test"


class FakeDNS:
    """getaddrinfo for made-up names: each lookup of a name takes the next answer (the last repeats)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: list[str] = []
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def set(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, *args: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return self.real(host, port, family, type, *args)
        self.lookups.append(name)
        queue = self.answers[name]
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        out = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
        return out

    def of(self, name: str) -> int:
        return self.lookups.count(name)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    return FakeDNS(monkeypatch)


@pytest.fixture
def wildcard(settings: Any) -> None:
    settings.BITRIX24_PORTAL_DOMAINS = ["127.0.0.1:*", "*.portal.test:*"]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that records connections without answering them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def _connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        self.server.seen.append({"host": self.headers.get("Host", ""), "body": body})  # type: ignore[attr-defined]
        payload = json.dumps({"result": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serve(context: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def recorder() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 that answers JSON and records each request's Host header and body."""
    with _serve() as server:
        yield server


def _loopback_plays_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """No public address is reachable here, so 127.0.0.1 (and only it) stands in for one; 127.0.0.2 and
    every other loopback address stay refused."""
    real = http._refusal

    def refusal(ip: Any) -> str | None:
        return None if str(ip) == "127.0.0.1" else real(ip)

    monkeypatch.setattr(http, "_refusal", refusal)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.0.0.5"],
        ["169.254.169.254"],
        ["100.100.100.200"],
        ["fd00:ec2::254"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["0.0.0.0"],
        ["224.0.0.251"],
        ["192.168.1.10"],
        ["240.0.0.1"],
        ["93.184.215.14", "127.0.0.1"],  # one bad address in the answer is enough
    ],
)
def test_a_wildcard_name_resolving_to_a_non_public_address_is_refused_before_a_byte_is_sent(
    wildcard, dns, listener, addresses
):
    port = listener.getsockname()[1]
    dns.set(NAME, addresses)
    with pytest.raises(http.HostNotAllowed, match="must resolve to public addresses only"):
        http.send("POST", f"http://{NAME}:{port}/rest/profile.json", json={"auth": "secret-token"})
    assert dns.of(NAME) == 1
    assert _connections(listener) == 0


@pytest.mark.parametrize("name", ["vm", "metadata.google.internal"])
def test_a_bare_wildcard_does_not_make_internal_names_portals(settings, dns, listener, name):
    settings.BITRIX24_PORTAL_DOMAINS = ["*"]
    dns.set(name, ["169.254.169.254"] if "metadata" in name else ["10.1.2.3"])
    with pytest.raises(http.HostNotAllowed):
        http.send("GET", f"https://{name}/")
    assert dns.of(name) == 1


def test_a_name_that_does_not_resolve_was_not_sent_and_may_be_retried(wildcard, dns):
    dns.set(NAME)  # no answer: NXDOMAIN
    with pytest.raises(http.UnresolvedHost) as failure:
        http.send("GET", f"https://{NAME}/rest/profile.json")
    assert isinstance(failure.value, requests.ConnectionError)
    assert http.failure_of(failure.value) is http.Failure.NOT_SENT


def test_exact_patterns_and_oauth_servers_are_trusted_as_written(settings, dns, recorder, standin):
    settings.BITRIX24_PORTAL_DOMAINS = ["127.0.0.1:*", "portal.example.test", "*.portal.test"]
    # Named exactly: no lookup of ours (the name would resolve to a private address).
    dns.set("portal.example.test", ["10.0.0.5"])
    assert http.check_url("https://portal.example.test/rest/") == http.Destination("portal.example.test")
    assert http.check_url(standin.oauth_url + "/rest/app.info").address is None
    assert http.check_url(f"http://127.0.0.1:{recorder.server_port}/").address is None
    assert dns.lookups == []
    answer = http.send("GET", f"http://127.0.0.1:{recorder.server_port}/x")
    assert answer.json() == {"result": "ok"}


def test_requests_that_skip_the_check_go_nowhere(recorder):
    with pytest.raises(http.HostNotAllowed, match="must go through"):
        http.session().get(f"http://127.0.0.1:{recorder.server_port}/")
    assert recorder.seen == []  # type: ignore[attr-defined]


# --- the connection goes to the checked address -------------------------------------------------


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(
    wildcard, dns, recorder, monkeypatch
):
    _loopback_plays_public(monkeypatch)
    port = recorder.server_port
    # A rebinding DNS: the first answer is the public one, every later answer a loopback address that
    # the check refuses. A second lookup inside requests or urllib3 would connect to 127.0.0.2, where
    # nothing listens: the answer proves the connection used the first.
    dns.set(NAME, ["127.0.0.1"], ["127.0.0.2"])
    answer = http.send("POST", f"http://{NAME}:{port}/rest/profile.json", json={"auth": "t"})
    assert answer.json() == {"result": "ok"}
    assert dns.of(NAME) == 1
    assert recorder.seen == [{"host": f"{NAME}:{port}", "body": '{"auth": "t"}'}]  # type: ignore[attr-defined]
    # The next request looks the name up again and checks the new answer: a kept-alive connection to
    # the old address does not carry it past the check.
    with pytest.raises(http.HostNotAllowed, match=r"127\.0\.0\.2"):
        http.send("POST", f"http://{NAME}:{port}/rest/profile.json", json={"auth": "t"})
    assert dns.of(NAME) == 2
    assert len(recorder.seen) == 1  # type: ignore[attr-defined]


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `name` (and 127.0.0.1, which must not be what is checked) signed by
    it: (ca.pem, cert.pem, key.pem). The stand-in's local authority makes them."""
    authority = LocalCA(tmp_path / "ca")
    key, cert = authority.server_certificate(name)
    return authority.ca_path, cert, key


@pytest.mark.parametrize("certified", [NAME, "other.portal.test"])
def test_https_to_a_pinned_address_verifies_the_name_not_the_ip(
    wildcard, dns, monkeypatch, tmp_path, certified, settings
):
    _loopback_plays_public(monkeypatch)
    ca, cert, key = _certificate(tmp_path, certified)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni: list[str | None] = []
    context.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    settings.BITRIX24_CA_BUNDLE = str(ca)  # the one certificate authority trusted for Bitrix24's hosts
    dns.set(NAME, ["127.0.0.1"])
    with _serve(context) as server:
        url = f"https://{NAME}:{server.server_port}/rest/profile.json"
        if certified == NAME:
            assert http.send("GET", url).json() == {"result": "ok"}
            assert server.seen == [{"host": f"{NAME}:{server.server_port}", "body": ""}]  # type: ignore[attr-defined]
        else:
            # The certificate is checked against the name the URL gave, never waved through for the IP.
            with pytest.raises(requests.exceptions.SSLError):
                http.send("GET", url)
            assert server.seen == []  # type: ignore[attr-defined]
        assert sni and sni[0] == NAME  # SNI names the portal, not 127.0.0.1
        assert dns.of(NAME) == 1


# --- a portal's redirect ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "169.254.169.254"])
def test_a_redirect_to_a_name_that_resolves_privately_gets_no_token(
    installed_portal, standin, wildcard, dns, redirector, listener, address
):
    from portals import client
    from portals.models import Portal

    server, handler = redirector
    port = listener.getsockname()[1]
    dns.set(NAME, [address])
    handler.location = f"http://{NAME}:{port}/rest/crm.contact.add.json"
    Portal.objects.filter(pk=installed_portal.pk).update(domain=f"127.0.0.1:{server.server_port}")
    installed_portal.refresh_from_db()
    app_info_before = standin.stats["app_info"]
    with pytest.raises(client.RestError) as failure:
        client.PortalClient(installed_portal).call("crm.contact.add", {"fields": {"NAME": "x"}})
    assert failure.value.code == "bad_redirect"
    assert "must resolve to public addresses only" in str(failure.value)
    assert handler.hits == 1
    assert _connections(listener) == 0  # nothing, let alone the token, went to the new name
    assert standin.stats["app_info"] == app_info_before  # refused before anyone was asked
    installed_portal.refresh_from_db()
    assert installed_portal.domain == f"127.0.0.1:{server.server_port}"
