"""The stand-in's portal page (the app opened in a frame, as a portal does) and the
`bitrix24_standin` command that sets it up for trying the app by hand."""

from __future__ import annotations

import io
import re
import socket
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
from django.core.management import call_command

from portals.models import Portal, TokenPair
from standin import payloads as bx
from standin.server import APP_FRAME_PATH

TIMEOUT = 5


class _Page(HTMLParser):
    """The form, its hidden inputs and the iframes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.inputs: dict[str, str] = {}
        self.iframes: list[dict[str, Any]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append(values)
        elif tag == "input" and values.get("type") == "hidden":
            self.inputs[str(values["name"])] = str(values["value"])
        elif tag == "iframe":
            self.iframes.append(values)
        elif tag == "script":
            self.scripts += 1


def _frame_page(portal, handler: str, **params: str) -> requests.Response:
    query = "&".join([f"handler={quote(handler, safe='')}", *(f"{k}={v}" for k, v in params.items())])
    return requests.get(f"{portal.url}{APP_FRAME_PATH}?{query}", timeout=TIMEOUT)


def test_portal_page_posts_a_fresh_launch_into_its_own_iframe(b24, standin):
    response = _frame_page(b24, "http://127.0.0.1:8000/app/", user_id="5", placement="CRM_DEAL_DETAIL_TAB")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = _Page()
    page.feed(response.text)
    [form] = page.forms
    [frame] = page.iframes
    assert form["method"] == "post"
    action = urlsplit(str(form["action"]))
    assert (action.scheme, action.netloc, action.path) == ("http", "127.0.0.1:8000", "/app/")
    query = {key: values[0] for key, values in parse_qs(action.query).items()}
    # The frame's name is what the official JS SDK reads: DOMAIN|PROTOCOL|APP_SID.
    assert form["target"] == frame["name"] == f"{b24.domain}|0|{query['APP_SID']}"
    # Exactly the fields payloads.launch builds, split between query string and body the same way.
    expected_query, expected_body = bx.launch(b24, b24.issue_tokens(5), placement="CRM_DEAL_DETAIL_TAB")
    assert set(query) == set(expected_query)
    assert query["DOMAIN"] == b24.domain and query["PROTOCOL"] == "0"
    assert set(page.inputs) == set(expected_body)
    assert page.inputs["member_id"] == b24.member_id
    assert page.inputs["PLACEMENT"] == "CRM_DEAL_DETAIL_TAB"
    assert page.scripts == 1  # the auto-submit
    # The tokens are fresh and live, for that user.
    info = requests.get(
        f"{standin.oauth_url}/rest/app.info", params={"auth": page.inputs["AUTH_ID"]}, timeout=TIMEOUT
    ).json()
    assert info["result"]["user_id"] == 5
    assert info["result"]["install"]["member_id"] == b24.member_id


@pytest.mark.parametrize(
    "handler", ["http://localhost:8000/app/", "http://[::1]:8000/app/", "http://127.0.0.2/app/"]
)
def test_portal_page_accepts_loopback_handlers(b24, handler):
    assert _frame_page(b24, handler).status_code == 200


@pytest.mark.parametrize(
    "handler",
    [
        "",
        "http://example.com/app/",
        "https://10.0.0.1/app/",
        "http://169.254.169.254/",
        "http://127.0.0.1.example.com/app/",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "//127.0.0.1/app/",
    ],
)
def test_portal_page_refuses_handlers_that_are_not_loopback(b24, standin, handler):
    issued = standin.stats.get("refresh_ok", 0), len(standin._access)
    response = _frame_page(b24, handler)
    assert response.status_code == 400
    assert "<form" not in response.text
    assert (standin.stats.get("refresh_ok", 0), len(standin._access)) == issued  # no token handed out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.django_db(transaction=True)
def test_bitrix24_standin_command_installs_a_portal_and_prints_how_to_open_it(live_server, settings):
    oauth_port, portal_port = _free_port(), _free_port()
    # The backend trusts the command's OAuth server, as bin/run's defaults do for its fixed ports.
    settings.BITRIX24_OAUTH_SERVERS = [f"http://127.0.0.1:{oauth_port}"]
    texts = []
    for _ in range(2):  # run again on the same ports: a restart, which must install again as it is
        out = io.StringIO()
        call_command(
            "bitrix24_standin",
            backend=live_server.url,
            oauth_port=oauth_port,
            portal_port=portal_port,
            wait=30,
            exit_after_install=True,
            stdout=out,
        )
        texts.append(out.getvalue())

    text = texts[0]
    assert "export " not in text  # trusted already: nothing to set
    portal = Portal.objects.get()  # the second run reinstalled the same portal (its member_id is stable)
    assert portal.domain == f"127.0.0.1:{portal_port}"
    assert TokenPair.objects.get(portal=portal).is_background
    for text in texts:
        assert f"member_id {portal.member_id}" in text
        assert (
            f"http://{portal.domain}{APP_FRAME_PATH}?handler={quote(live_server.url + '/app/', safe='')}"
            in text
        )
        assert f"{live_server.url}/admin/portals/portal/" in text


@pytest.mark.system
@pytest.mark.django_db(transaction=True)
def test_bitrix24_standin_command_gives_up_with_the_reason(live_server, settings):
    from django.core.management import CommandError

    # The backend does not trust this stand-in's OAuth server (left at the session stand-in's).
    out = io.StringIO()
    with pytest.raises(CommandError, match="did not accept the install: the backend answered 401"):
        call_command(
            "bitrix24_standin", backend=live_server.url, oauth_port=0, portal_port=0, wait=0.5, stdout=out
        )
    text = out.getvalue()
    # It said what the backend needs to trust it.
    assert "do not trust it yet (BITRIX24_OAUTH_SERVERS does not name http://127.0.0.1:" in text
    match = re.search(r"export BITRIX24_OAUTH_SERVERS=(http://127\.0\.0\.1:\d+)", text)
    assert match and match.group(1) not in settings.BITRIX24_OAUTH_SERVERS
    for line in (
        "export BITRIX24_ALLOW_HTTP=1",
        f"export BITRIX24_CLIENT_ID={settings.BITRIX24_CLIENT_ID}",
        f"export BITRIX24_CLIENT_SECRET={settings.BITRIX24_CLIENT_SECRET}",
    ):
        assert line in text
    assert "It does not trust this stand-in" in text


def test_bitrix24_standin_command_says_when_its_ports_are_taken():
    from django.core.management import CommandError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError, match="is it running already, in another terminal"):
            call_command("bitrix24_standin", oauth_port=port, portal_port=0, stdout=io.StringIO())


def test_a_refused_install_names_the_settings_the_backend_needs():
    """`bitrix24_standin --backend …` against a backend started with settings of its own: the refusal says
    which settings make it trust the stand-in (it said "see the settings above", with nothing above)."""
    import requests

    from portals.management.commands.bitrix24_standin import _refusal

    refused = requests.Response()
    refused.status_code = 401
    refused._content = b'{"error": "invalid_token", "error_description": "app.info refused the token"}'
    message = _refusal(refused, "BITRIX24_OAUTH_SERVERS=http://127.0.0.1:8001 BITRIX24_ALLOW_HTTP=1")
    assert message == (
        "the backend answered 401 invalid_token: app.info refused the token. It does not trust this stand-in: "
        "start it with BITRIX24_OAUTH_SERVERS=http://127.0.0.1:8001 BITRIX24_ALLOW_HTTP=1."
    )


@pytest.mark.system
@pytest.mark.django_db(transaction=True)
def test_bitrix24_standin_command_over_https_names_the_authority_and_installs_once_it_is_trusted(
    live_server, settings, tmp_path
):
    """`bitrix24_standin --https`: Bitrix24's scheme, with a local authority under DJANGO_VAR_DIR. A backend
    that does not trust the authority yet keeps the install for later and the command says what to set;
    trusted (BITRIX24_CA_BUNDLE, no plain HTTP allowed), the install goes through."""
    from django.core.management import CommandError

    settings.VAR_DIR = tmp_path
    settings.BITRIX24_ALLOW_HTTP = False
    oauth_port, portal_port = _free_port(), _free_port()
    settings.BITRIX24_OAUTH_SERVERS = [f"https://127.0.0.1:{oauth_port}"]
    options = {
        "backend": live_server.url,
        "oauth_port": oauth_port,
        "portal_port": portal_port,
        "https": True,
    }
    out = io.StringIO()
    with pytest.raises(CommandError, match="kept the install for later"):
        call_command("bitrix24_standin", wait=1, exit_after_install=True, stdout=out, **options)
    ca = tmp_path / "standin" / "tls" / "ca.pem"
    assert f"export BITRIX24_CA_BUNDLE={ca}" in out.getvalue()
    assert "BITRIX24_ALLOW_HTTP" not in out.getvalue()  # HTTPS needs no plain HTTP

    settings.BITRIX24_CA_BUNDLE = str(ca)  # the authority is kept: the next run's certificate chains to it
    out = io.StringIO()
    call_command("bitrix24_standin", wait=30, exit_after_install=True, stdout=out, **options)
    text = out.getvalue()
    assert "export " not in text
    portal = Portal.objects.get(domain=f"127.0.0.1:{portal_port}")
    assert portal.oauth_server == f"https://127.0.0.1:{oauth_port}"
    assert f"https://{portal.domain}{APP_FRAME_PATH}?handler=" in text
