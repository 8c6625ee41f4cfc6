"""Widgets on the Bitrix24 stand-in: placement.bind / .get / .unbind over real HTTP, the portal page that
opens a placement, the console's list of widgets, and the JS library (``/api/v1/``) in a real browser.

No Django: like tests/test_standin.py, this file brings its own stand-in."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from portals import phpform
from standin import FakePortal, StandIn
from standin.server import APP_FRAME_PATH, APP_FRAME_SELECTOR, BX24_JS_PATH

TIMEOUT = 5
APP = "http://127.0.0.1:8000/widgets/deal/"
LANG_ALL = {
    "en": {"TITLE": "Orders", "DESCRIPTION": "Orders of the deal", "GROUP_NAME": "Shop"},
    "de": {"TITLE": "Aufträge", "DESCRIPTION": "Aufträge des Deals", "GROUP_NAME": "Laden"},
}


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as running:
        yield running


@pytest.fixture(autouse=True)
def bitrix24_settings(standin: StandIn) -> StandIn:
    """Overrides the conftest's autouse fixture: no Django settings are needed here."""
    return standin


@pytest.fixture
def portal(standin: StandIn) -> FakePortal:
    return standin.add_portal()


def rest(portal: FakePortal, method: str, token: str, **params: Any) -> requests.Response:
    return requests.post(f"{portal.url}/rest/{method}.json", json={**params, "auth": token}, timeout=TIMEOUT)


def admin_token(portal: FakePortal) -> str:
    return str(portal.issue_tokens(1, admin=True)["access_token"])


def bind(
    portal: FakePortal, token: str, placement: str = "CRM_DEAL_DETAIL_TAB", handler: str = APP, **extra: Any
):
    return rest(portal, "placement.bind", token, PLACEMENT=placement, HANDLER=handler, **extra)


# ---- placement.bind / placement.get / placement.unbind


def test_bind_get_and_unbind_with_titles_in_every_language(portal: FakePortal) -> None:
    token = admin_token(portal)
    answer = bind(portal, token, TITLE="Orders", DESCRIPTION="Orders of the deal", LANG_ALL=LANG_ALL)
    assert answer.status_code == 200
    assert answer.json()["result"] is True
    assert (
        bind(portal, token, "LEFT_MENU", "http://127.0.0.1:8000/app/", TITLE="Shop").json()["result"] is True
    )

    listed = rest(portal, "placement.get", token).json()["result"]
    # placement-get.md's shape: options and an absent langAll come as PHP's empty array.
    assert listed == [
        {
            "placement": "CRM_DEAL_DETAIL_TAB",
            "userId": 0,
            "handler": APP,
            "options": [],
            "title": "Orders",
            "description": "Orders of the deal",
            "langAll": LANG_ALL,
        },
        {
            "placement": "LEFT_MENU",
            "userId": 0,
            "handler": "http://127.0.0.1:8000/app/",
            "options": [],
            "title": "Shop",
            "description": "",
            "langAll": [],
        },
    ]

    # The same widget again: the answer apps look for "already binded" in; nothing is added.
    again = bind(portal, token, TITLE="Orders again")
    assert again.status_code == 400
    assert again.json() == {
        "error": "ERROR_CORE",
        "error_description": "Unable to set placement handler: Handler already binded",
    }
    # Another handler for the same placement is a second widget.
    assert bind(portal, token, handler=APP + "?second=1").json()["result"] is True
    assert len(rest(portal, "placement.get", token).json()["result"]) == 3

    # placement-unbind.md counts each removed handler twice (found, then removed).
    one = rest(portal, "placement.unbind", token, PLACEMENT="CRM_DEAL_DETAIL_TAB", HANDLER=APP)
    assert one.json()["result"] == {"count": 2}
    gone = rest(portal, "placement.unbind", token, PLACEMENT="CRM_DEAL_DETAIL_TAB", HANDLER=APP)
    assert gone.json()["result"] == {"count": 0}
    rest_of_it = rest(portal, "placement.unbind", token, PLACEMENT="LEFT_MENU")  # no HANDLER: all of them
    assert rest_of_it.json()["result"] == {"count": 2}
    assert [b["handler"] for b in rest(portal, "placement.get", token).json()["result"]] == [
        APP + "?second=1"
    ]


def test_bind_takes_form_encoded_parameters_in_any_case(portal: FakePortal) -> None:
    token = admin_token(portal)
    form = phpform.encode(
        {
            "auth": token,
            "placement": "crm_contact_detail_tab",
            "handler": APP,
            "title": "Orders",
            "LANG_ALL": {"de": {"TITLE": "Aufträge"}},
            "OPTIONS": {"errorHandlerUrl": "http://127.0.0.1:8000/error/"},
        }
    )
    answer = requests.post(f"{portal.url}/rest/placement.bind", data=form, timeout=TIMEOUT)
    assert answer.json()["result"] is True
    [binding] = rest(portal, "placement.get", token).json()["result"]
    assert binding["placement"] == "CRM_CONTACT_DETAIL_TAB"
    assert binding["langAll"] == {"de": {"TITLE": "Aufträge", "DESCRIPTION": "", "GROUP_NAME": ""}}
    assert binding["options"] == {"errorHandlerUrl": "http://127.0.0.1:8000/error/"}


@pytest.mark.parametrize(
    ("params", "status", "error", "description"),
    [
        ({"HANDLER": APP}, 400, "ERROR_ARGUMENT", "Argument 'PLACEMENT' is null or empty"),
        ({"PLACEMENT": "CRM_DEAL_DETAIL_TAB"}, 400, "ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty"),
        (
            {"PLACEMENT": "CRM_DEAL_DETAIL_TABS", "HANDLER": APP},
            400,
            "ERROR_PLACEMENT_NOT_FOUND",
            "Placement not found",
        ),
        ({"PLACEMENT": "DEFAULT", "HANDLER": APP}, 400, "ERROR_PLACEMENT_NOT_FOUND", "Placement not found"),
        (
            {"PLACEMENT": "CRM_DEAL_DETAIL_TAB", "HANDLER": "https://example.com/tab/"},
            400,
            "ERROR_WRONG_HANDLER_URL",
            "Wrong handler URL",
        ),
        (
            {"PLACEMENT": "CRM_DEAL_DETAIL_TAB", "HANDLER": "ftp://127.0.0.1/tab/"},
            400,
            "ERROR_UNSUPPORTED_PROTOCOL",
            "Unsupported handler protocol",
        ),
    ],
)
def test_bind_refuses_what_the_docs_refuse(
    portal: FakePortal, params: dict[str, str], status: int, error: str, description: str
) -> None:
    token = admin_token(portal)
    answer = rest(portal, "placement.bind", token, **params)
    assert answer.status_code == status
    body = answer.json()
    assert (body["error"], body["error_description"]) == (error, description)
    if error == "ERROR_ARGUMENT":
        assert body["argument"] in ("PLACEMENT", "HANDLER")  # placement-bind.md names the field
    assert rest(portal, "placement.get", token).json()["result"] == []


def test_only_an_administrator_binds_lists_or_unbinds(portal: FakePortal) -> None:
    assert bind(portal, admin_token(portal)).json()["result"] is True
    employee = str(portal.issue_tokens(7, admin=False)["access_token"])
    for method, params in (
        ("placement.bind", {"PLACEMENT": "LEFT_MENU", "HANDLER": APP}),
        ("placement.get", {}),
        ("placement.unbind", {"PLACEMENT": "CRM_DEAL_DETAIL_TAB"}),
    ):
        answer = rest(portal, method, employee, **params)
        assert answer.status_code == 403, method
        assert answer.json() == {"error": "ACCESS_DENIED", "error_description": "Access denied!"}
    assert len(portal.placements) == 1


def test_placement_methods_need_the_placement_scope_and_crm_widgets_the_crm_scope(standin: StandIn) -> None:
    without = standin.add_portal(scope="crm,user")
    token = admin_token(without)
    for method in ("placement.bind", "placement.get", "placement.unbind", "placement.list"):
        answer = rest(without, method, token, PLACEMENT="LEFT_MENU", HANDLER=APP)
        assert answer.status_code == 403, method
        assert answer.json()["error"] == "insufficient_scope"

    no_crm = standin.add_portal(scope="user,placement")
    token = admin_token(no_crm)
    refused = bind(no_crm, token)
    assert refused.json()["error"] == "ERROR_PLACEMENT_NOT_FOUND"
    assert bind(no_crm, token, "LEFT_MENU").json()["result"] is True
    codes = rest(no_crm, "placement.list", token).json()["result"]
    assert "LEFT_MENU" in codes and "CRM_DEAL_DETAIL_TAB" not in codes


def test_bindings_go_with_the_app(portal: FakePortal) -> None:
    assert bind(portal, admin_token(portal)).json()["result"] is True
    portal.install_finished = True
    portal.uninstall()
    portal.install()
    assert rest(portal, "placement.get", admin_token(portal)).json()["result"] == []
    assert portal.install_finished is False


# ---- the portal page that opens a widget


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.inputs: dict[str, str] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append(values)
        elif tag == "input" and values.get("type") == "hidden":
            self.inputs[str(values["name"])] = str(values["value"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_frame_page_posts_placement_and_its_options(portal: FakePortal) -> None:
    response = requests.get(
        f"{portal.url}{APP_FRAME_PATH}",
        params={"handler": APP, "placement": "CRM_DEAL_DETAIL_TAB", "options": '{"ID":"8"}', "lang": "de"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    page = _parse(response.text)
    [form] = page.forms
    sid = parse_qs(urlsplit(str(form["action"])).query)["APP_SID"][0]
    assert form["target"] == f"{portal.domain}|0|{sid}"  # DOMAIN|PROTOCOL|APP_SID, as the JS SDK reads it
    assert parse_qs(urlsplit(str(form["action"])).query)["LANG"] == ["de"]
    assert page.inputs["PLACEMENT"] == "CRM_DEAL_DETAIL_TAB"
    assert page.inputs["PLACEMENT_OPTIONS"] == '{"ID": "8"}'
    assert json.loads(page.inputs["PLACEMENT_OPTIONS"]) == {"ID": "8"}

    # The Python API says the same; a URL in the options is escaped as PHP's json_encode does.
    html = portal.app_frame_page(APP, placement="REST_APP_URI", options={"back": "/crm/"})
    assert _parse(html).inputs["PLACEMENT_OPTIONS"] == '{"back": "\\/crm\\/"}'
    # Without options there is no PLACEMENT_OPTIONS (left-menu.md).
    assert "PLACEMENT_OPTIONS" not in _parse(portal.app_frame_page(APP, placement="LEFT_MENU")).inputs

    bad = requests.get(
        f"{portal.url}{APP_FRAME_PATH}", params={"handler": APP, "options": "[1, 2]"}, timeout=TIMEOUT
    )
    assert bad.status_code == 400
    assert "options must be a JSON object" in bad.text


def test_a_bound_widget_opens_by_its_placement_and_shows_to_employees_after_install_finish(
    portal: FakePortal,
) -> None:
    def open_tab(**params: str) -> requests.Response:
        query = {"placement": "CRM_DEAL_DETAIL_TAB", "id": "3", **params}
        return requests.get(f"{portal.url}{APP_FRAME_PATH}", params=query, timeout=TIMEOUT)

    nothing = open_tab()
    assert nothing.status_code == 400
    assert "no handler is bound to CRM_DEAL_DETAIL_TAB" in nothing.text

    assert bind(portal, admin_token(portal)).json()["result"] is True
    opened = open_tab()
    assert opened.status_code == 200
    page = _parse(opened.text)
    assert str(page.forms[0]["action"]).startswith(APP + "?")
    assert page.inputs["PLACEMENT"] == "CRM_DEAL_DETAIL_TAB"
    assert json.loads(page.inputs["PLACEMENT_OPTIONS"]) == {"ID": "3"}

    # placement-bind.md: until the install is complete only administrators see the widget.
    employee = open_tab(user_id="7", admin="0")
    assert employee.status_code == 400
    assert "administrators only until the app calls BX24.installFinish()" in employee.text
    portal.install_finished = True
    assert open_tab(user_id="7", admin="0").status_code == 200


def test_console_lists_widgets_in_the_portals_language_with_a_form_to_open_each(portal: FakePortal) -> None:
    token = admin_token(portal)
    bind(portal, token, TITLE="Orders", LANG_ALL=LANG_ALL)
    bind(portal, token, "LEFT_MENU", "http://127.0.0.1:8000/app/", TITLE="Shop")
    portal.language_id = "de"

    page = _parse(requests.get(f"{portal.url}/standin/", timeout=TIMEOUT).text)
    text = " ".join(page.text)
    assert "Widgets (2)" in text
    assert "Aufträge" in text and "Orders" not in text  # the German title, for a German portal
    assert "Shop" in text  # no LANG_ALL: TITLE
    assert "installFinish not called yet" in text
    opens = [form for form in page.forms if form.get("action") == APP_FRAME_PATH]
    assert len(opens) == 2 and all(form["method"] == "get" for form in opens)

    # What the deal tab's form sends: the portal page of that widget for deal 5.
    query = {"placement": "CRM_DEAL_DETAIL_TAB", "handler": APP, "id": "5", "user_id": "1", "lang": "de"}
    opened = _parse(requests.get(f"{portal.url}{APP_FRAME_PATH}", params=query, timeout=TIMEOUT).text)
    assert json.loads(opened.inputs["PLACEMENT_OPTIONS"]) == {"ID": "5"}


# ---- the JS library and REST from the browser


def test_library_is_served_and_rest_answers_local_origins_only(portal: FakePortal) -> None:
    script = requests.get(f"{portal.url}{BX24_JS_PATH}", timeout=TIMEOUT)
    assert script.status_code == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "BX24" in script.text

    origin = "http://127.0.0.1:8000"
    preflight = requests.options(
        f"{portal.url}/rest/crm.deal.get.json",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        timeout=TIMEOUT,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    token = admin_token(portal)
    local = requests.post(
        f"{portal.url}/rest/profile.json", data={"auth": token}, headers={"Origin": origin}, timeout=TIMEOUT
    )
    assert local.headers["Access-Control-Allow-Origin"] == origin
    foreign = requests.post(
        f"{portal.url}/rest/profile.json",
        data={"auth": token},
        headers={"Origin": "https://evil.example"},
        timeout=TIMEOUT,
    )
    assert foreign.status_code == 200
    assert "Access-Control-Allow-Origin" not in foreign.headers


def test_frame_reports_need_the_pages_own_secret(portal: FakePortal) -> None:
    answer = requests.post(
        f"{portal.url}/standin/frame",
        data={"sid": "x", "secret": "y", "command": "installFinish"},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 403
    assert portal.install_finished is False


_APP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Deal tab</title></head>
<body>
<p id="placement">…</p><p id="auth">…</p><p id="deal">…</p><p id="missing">…</p><p id="finished">…</p>
<script src="{library}"></script>
<script>
BX24.init(function () {{
  var info = BX24.placement.info();
  document.getElementById("placement").textContent = info.placement + " deal " + info.options.ID;
  var auth = BX24.getAuth();
  document.getElementById("auth").textContent =
    "member " + auth.member_id + (auth.expires_in > Date.now() ? " valid" : " expired");
  BX24.callMethod("crm.deal.get", {{id: info.options.ID}}, function (result) {{
    document.getElementById("deal").textContent =
      result.error() ? "error " + result.error() : "Deal: " + result.data().TITLE;
    BX24.callMethod("crm.deal.get", {{id: "999"}}, function (missing) {{
      document.getElementById("missing").textContent = "error " + missing.error();
      BX24.installFinish();
      document.getElementById("finished").textContent = "install finished";
    }});
  }});
}});
</script>
</body></html>
"""


class _LocalApp:
    """An app on its own loopback origin: answers the portal's POST (and GET) with a page that uses the
    portal's JS library; remembers the forms it was posted."""

    def __init__(self, library: str, page: str = _APP_PAGE) -> None:
        body = page.format(library=library).encode()
        posted = self.posted = []

        class Handler(BaseHTTPRequestHandler):
            def _page(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._page()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                posted.append({k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()})
                self._page()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deal-tab/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def chromium_page(*flags: str) -> Iterator[Any]:
    """A page of Debian's Chromium with the browser tests' flags and ``flags``; skipped without a browser
    (failed under CI)."""
    import os

    from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS, TIMEOUT_MS, _missing

    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(f"no browser on this machine: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_FLAGS, *flags])
        try:
            context = chromium.new_context(viewport={"width": 1200, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
        finally:
            chromium.close()


@pytest.fixture
def browser_page() -> Iterator[Any]:
    with chromium_page() as page:
        yield page


def test_an_app_in_a_deal_tab_reads_the_deal_through_the_js_library(
    browser_page: Any, portal: FakePortal, tmp_path: Any
) -> None:
    from playwright.sync_api import expect

    deal = portal.edit("crm.deal", "add", fields={"TITLE": "Kitchen renovation"})
    app = _LocalApp(portal.url + BX24_JS_PATH)
    try:
        assert bind(portal, admin_token(portal), handler=app.url, TITLE="Orders").json()["result"] is True
        browser_page.goto(
            f"{portal.url}{APP_FRAME_PATH}?placement=CRM_DEAL_DETAIL_TAB&options={quote(json.dumps({'ID': deal}))}"
        )
        frame = browser_page.frame_locator(APP_FRAME_SELECTOR)
        expect(frame.locator("#placement")).to_have_text(f"CRM_DEAL_DETAIL_TAB deal {deal}")
        expect(frame.locator("#auth")).to_have_text(f"member {portal.member_id} valid")
        expect(frame.locator("#deal")).to_have_text("Deal: Kitchen renovation")
        expect(frame.locator("#missing")).to_have_text("error Not found")  # crm-deal-get.md: an empty code
        # The portal page shows that the app finished its install, and the portal knows.
        expect(browser_page.locator("#standin-status")).to_have_text("installFinish called")
        browser_page.screenshot(path=str(tmp_path / "deal-tab.png"), full_page=True)
        assert portal.install_finished is True
        [finished] = portal.frame_messages
        assert (finished["command"], finished["placement"], finished["user_id"]) == (
            "installFinish",
            "CRM_DEAL_DETAIL_TAB",
            1,
        )
        # What the app was posted: the widget's context, as detail-tab.md shows it.
        [launch] = app.posted
        assert (launch["PLACEMENT"], json.loads(launch["PLACEMENT_OPTIONS"])) == (
            "CRM_DEAL_DETAIL_TAB",
            {"ID": deal},
        )
        # The REST calls came from the browser, with the frame's token, to the portal.
        assert [
            (method, params.get("id")) for _, method, params in portal.calls if method == "crm.deal.get"
        ] == [
            ("crm.deal.get", deal),
            ("crm.deal.get", "999"),
        ]
        # The console shows it too.
        console = requests.get(f"{portal.url}/standin/", timeout=TIMEOUT).text
        assert "installFinish called" in console
    finally:
        app.close()


_MORE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>More of BX24</title></head>
<body>
<pre id="out">…</pre>
<script src="{library}"></script>
<script>
BX24.init(function () {{
  var out = {{}};
  BX24.callBatch({{deal: ["crm.deal.get", {{id: "{deal}"}}], me: ["user.current", {{}}], bad: ["crm.deal.get", {{id: 999}}]}},
    function (results) {{
      out.batch = [results.deal.data().TITLE, results.me.data().ID, String(results.bad.error())];
      BX24.appOption.set("colour", "teal", function () {{
        BX24.userOption.set("compact", "Y", function () {{
          out.options = [BX24.appOption.get("colour"), BX24.userOption.get("compact")];
          BX24.selectUser(function (user) {{
            out.user = user.id;
            BX24.placement.call("reloadData", {{}}, function (answer) {{
              out.placementCall = answer.called;
              document.getElementById("out").textContent = JSON.stringify(out);
              BX24.closeApplication();
            }});
          }});
        }});
      }});
    }});
}});
</script>
</body></html>
"""


def test_the_shipped_library_batches_keeps_options_picks_a_user_and_closes(
    browser_page: Any, portal: FakePortal
) -> None:
    """BX24.callBatch, appOption/userOption, selectUser, placement.call and closeApplication, as the docs
    describe them, against the portal page."""
    from playwright.sync_api import expect

    deal = portal.edit("crm.deal", "add", fields={"TITLE": "Kitchen renovation"})
    app = _LocalApp(portal.url + BX24_JS_PATH, page=_MORE_PAGE.replace("{deal}", str(deal)))
    try:
        assert bind(portal, admin_token(portal), handler=app.url, TITLE="Orders").json()["result"] is True
        browser_page.goto(
            f"{portal.url}{APP_FRAME_PATH}?placement=CRM_DEAL_DETAIL_TAB&options={quote(json.dumps({'ID': deal}))}"
        )
        frame = browser_page.frame_locator(APP_FRAME_SELECTOR)
        frame.locator("#out").filter(has_text="{").wait_for()
        result = json.loads(frame.locator("#out").text_content() or "{}")
        expect(browser_page.locator("#standin-status")).to_have_text("closeApplication called")
    finally:
        app.close()
    assert result == {
        "batch": ["Kitchen renovation", "1", "Not found"],
        "options": ["teal", "Y"],
        "user": "1",
        "placementCall": "reloadData",
    }
