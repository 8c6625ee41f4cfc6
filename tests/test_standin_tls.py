"""The stand-in over HTTPS with its local certificate authority, and the backend talking to it with certificate
checks on (BITRIX24_CA_BUNDLE) and plain HTTP refused."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from install.tasks import apply_deferred_task
from portals.client import PortalClient
from portals.models import Portal, TokenPair
from standin import StandIn
from standin import payloads as bx


@pytest.fixture
def tls_standin(tmp_path: Path) -> Iterator[StandIn]:
    with StandIn(client_id="app.tls", client_secret="tls-secret", tls_dir=tmp_path / "tls") as server:
        yield server


def _trusting(ca: Path) -> requests.Session:
    http = requests.Session()
    http.trust_env = False  # the machine's REQUESTS_CA_BUNDLE would win over `verify` otherwise
    http.verify = str(ca)
    return http


def test_the_stand_in_serves_https_that_only_its_authority_vouches_for(
    tls_standin: StandIn, tmp_path: Path
) -> None:
    portal = tls_standin.add_portal()
    assert tls_standin.oauth_url.startswith("https://127.0.0.1:") and portal.url.startswith("https://")
    ca = tmp_path / "tls" / "ca.pem"
    tokens = portal.issue_tokens()
    assert tokens["client_endpoint"].startswith("https://") and tokens["server_endpoint"].startswith(
        "https://"
    )

    http = _trusting(ca)
    profile = http.get(portal.url + "/rest/profile", params={"auth": tokens["access_token"]}, timeout=10)
    assert profile.status_code == 200 and profile.json()["result"]["ID"] == "1"
    refreshed = http.post(
        tls_standin.oauth_url + "/oauth/token/",
        data={
            "grant_type": "refresh_token",
            "client_id": "app.tls",
            "client_secret": "tls-secret",
            "refresh_token": tokens["refresh_token"],
        },
        timeout=10,
    )
    assert refreshed.status_code == 200 and refreshed.json()["client_endpoint"] == portal.url + "/rest/"

    untrusting = requests.Session()
    untrusting.trust_env = False  # the system's authorities only
    with pytest.raises(requests.exceptions.SSLError):
        untrusting.get(portal.url + "/rest/server.time", timeout=10)
    # A plain-HTTP client gets no answer from a TLS port (and the server keeps serving).
    with pytest.raises(requests.exceptions.ConnectionError):
        untrusting.get(portal.url.replace("https://", "http://") + "/rest/server.time", timeout=10)
    fresh = refreshed.json()["access_token"]
    assert http.get(portal.url + "/rest/profile", params={"auth": fresh}, timeout=10).ok

    # The launch says so, as a portal does (PROTOCOL 1), and the app's frame is named with it.
    query, _ = bx.launch(portal, portal.issue_tokens())
    assert query["PROTOCOL"] == "1"


def test_the_authority_is_made_once_and_its_key_stays_private(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    with StandIn(tls_dir=directory):
        first = (directory / "ca.pem").read_bytes()
        first_server = (directory / "server.pem").read_bytes()
    with StandIn(tls_dir=directory) as again:
        portal = again.add_portal()
        # Trust given to the authority survives a restart; the server's own certificate is new.
        assert (directory / "ca.pem").read_bytes() == first
        assert (directory / "server.pem").read_bytes() != first_server
        http = _trusting(directory / "ca.pem")
        assert http.get(portal.url + "/rest/server.time", timeout=10).status_code == 401  # reached, no token
    for private in ("ca.key", "server.key"):
        assert stat.S_IMODE((directory / private).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in (directory / "ca.pem").read_bytes()


def test_the_backend_installs_renews_and_calls_over_https_with_plain_http_refused(
    backend: Any, settings: Any, tls_standin: StandIn, tmp_path: Path
) -> None:
    settings.BITRIX24_OAUTH_SERVERS = [tls_standin.oauth_url]
    settings.BITRIX24_CLIENT_ID, settings.BITRIX24_CLIENT_SECRET = "app.tls", "tls-secret"
    settings.BITRIX24_ALLOW_HTTP = False  # as in production: https only
    settings.BITRIX24_CA_BUNDLE = str(tmp_path / "tls" / "ca.pem")
    b24 = tls_standin.add_portal()

    answer = backend.install_event(b24)
    assert answer.status_code == 200, answer.text  # verified through the OAuth server's app.info, over TLS
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.oauth_server == tls_standin.oauth_url
    api = PortalClient(portal)
    assert api.call("profile")["ID"] == "1"
    before = tls_standin.stats["refresh_ok"]
    tls_standin.advance(3601)  # the access token has expired: the client renews it over TLS and carries on
    assert api.call("server.time")
    assert tls_standin.stats["refresh_ok"] == before + 1
    assert TokenPair.objects.get(portal=portal).access_token == api._pair.access_token

    # Without the authority the backend trusts the system's only: the stand-in's certificate is refused, so
    # the install cannot be verified. It is kept, not lost, and applied once the authority is trusted again.
    settings.BITRIX24_CA_BUNDLE = ""
    other = tls_standin.add_portal()
    kept = backend.install_event(other)
    assert kept.json()["result"] == "deferred", kept.text
    assert not Portal.objects.filter(member_id=other.member_id).exists()
    settings.BITRIX24_CA_BUNDLE = str(tmp_path / "tls" / "ca.pem")
    assert apply_deferred_task() == 1
    assert Portal.objects.get(member_id=other.member_id).domain == other.domain
