"""The Bitrix24 stand-in on its own: real servers on loopback, driven with ``requests``. No Django."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from portals import phpform
from standin import FakePortal, StandIn, payloads
from tests.samples import load_json, load_php_array, load_print_r, shape

TIMEOUT = 5


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A stand-in of its own per test (the conftest's is shared by the session): tests here flip its modes."""
    with StandIn() as running:
        yield running


@pytest.fixture(autouse=True)
def bitrix24_settings(standin: StandIn) -> StandIn:
    """Overrides the conftest's autouse fixture: the stand-in needs no Django settings, so this file also
    runs with ``-p no:django``."""
    return standin


@pytest.fixture
def portal(standin: StandIn) -> FakePortal:
    return standin.add_portal()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def refresh(http: requests.Session, standin: StandIn, token: str, **overrides: str) -> requests.Response:
    params = {
        "grant_type": "refresh_token",
        "client_id": standin.client_id,
        "client_secret": standin.client_secret,
        "refresh_token": token,
        **overrides,
    }
    return http.get(standin.oauth_url + "/oauth/token/", params=params, timeout=TIMEOUT)


def rest(http: requests.Session, portal: FakePortal, method: str, **params: Any) -> requests.Response:
    return http.post(f"{portal.url}/rest/{method}.json", json=params, timeout=TIMEOUT)


# ---- OAuth server: refresh


def test_refresh_answer_has_the_documented_shape(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens(user_id=7)
    answer = refresh(http, standin, tokens["refresh_token"])
    assert answer.status_code == 200
    body = answer.json()
    # Field for field the docs' answer, with the same JSON types.
    assert shape(body) == shape(load_json("refresh-response-docs.json"))
    assert list(body) == list(load_json("refresh-response-docs.json"))
    assert body["member_id"] == portal.member_id
    assert body["user_id"] == 7
    assert body["domain"] == standin.oauth_url.split("://")[1]
    assert body["server_endpoint"] == standin.oauth_url + "/rest/"
    assert body["client_endpoint"] == portal.url + "/rest/"
    assert body["expires"] == pytest.approx(standin.now() + 3600, abs=5)
    assert body["access_token"] != tokens["access_token"]
    assert body["refresh_token"] != tokens["refresh_token"]


def test_refresh_token_is_single_use(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    assert rest(http, portal, "profile", auth=tokens["access_token"]).status_code == 200

    fresh = refresh(http, standin, tokens["refresh_token"]).json()
    again = refresh(http, standin, tokens["refresh_token"])
    assert again.status_code == 400
    assert again.json() == {"error": "invalid_grant", "error_description": "Invalid grant"}

    old = rest(http, portal, "profile", auth=tokens["access_token"])
    assert old.status_code == 401
    assert old.json()["error"] in ("expired_token", "invalid_token")
    assert rest(http, portal, "profile", auth=fresh["access_token"]).status_code == 200
    assert standin.stats["refresh_ok"] == 1
    assert standin.stats["refresh_invalid_grant"] == 1


def test_refresh_with_a_wrong_secret_is_invalid_client(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens()
    answer = refresh(http, standin, tokens["refresh_token"], client_secret="wrong")
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"
    # A refused client does not spend the token.
    assert refresh(http, standin, tokens["refresh_token"]).status_code == 200


def test_refresh_by_post_and_unknown_token(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens()
    form = {
        "grant_type": "refresh_token",
        "client_id": standin.client_id,
        "client_secret": standin.client_secret,
        "refresh_token": tokens["refresh_token"],
    }
    assert http.post(standin.oauth_url + "/oauth/token/", data=form, timeout=TIMEOUT).status_code == 200
    assert refresh(http, standin, "no-such-token").json()["error"] == "invalid_grant"


def test_refresh_token_lapses_after_refresh_ttl(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens()
    standin.advance(standin.refresh_ttl + 1)
    assert refresh(http, standin, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_concurrent_refresh_of_one_token_has_exactly_one_winner(standin: StandIn, portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    barrier = threading.Barrier(8)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            barrier.wait()
            answer = refresh(session, standin, tokens["refresh_token"])
        with lock:
            statuses.append(answer.status_code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(statuses) == [200] + [400] * 7


def test_payment_required_refresh(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    portal.payment_required = True
    answer = refresh(http, standin, tokens["refresh_token"])
    assert answer.json() == {"error": "PAYMENT_REQUIRED", "error_description": "Payment required"}
    assert answer.json() == load_json("oauth-error-payment-required-docs.json")
    portal.payment_required = False
    assert refresh(http, standin, tokens["refresh_token"]).status_code == 200


def test_authorization_code_is_single_use_and_short_lived(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    form = {
        "grant_type": "authorization_code",
        "client_id": standin.client_id,
        "client_secret": standin.client_secret,
    }
    code = portal.issue_code(user_id=3)
    first = http.get(standin.oauth_url + "/oauth/token/", params={**form, "code": code}, timeout=TIMEOUT)
    assert first.status_code == 200
    assert first.json()["user_id"] == 3
    # The docs' authorization_code answer, plus expires and user_id as the newer refresh answer has them.
    documented = load_json("authcode-response-docs.json")
    assert shape({key: first.json()[key] for key in documented}) == shape(documented)
    assert set(first.json()) - set(documented) == {"expires", "user_id"}
    assert shape(first.json()) == shape(load_json("refresh-response-docs.json"))
    again = http.get(standin.oauth_url + "/oauth/token/", params={**form, "code": code}, timeout=TIMEOUT)
    assert again.json()["error"] == "invalid_grant"
    late = portal.issue_code()
    standin.advance(31)
    answer = http.get(standin.oauth_url + "/oauth/token/", params={**form, "code": late}, timeout=TIMEOUT)
    assert answer.json()["error"] == "invalid_grant"


# ---- OAuth server: app.info


def test_app_info_on_the_oauth_server_get_post_and_json(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens(user_id=5)
    url = standin.oauth_url + "/rest/app.info"
    answers = [
        http.get(url, params={"auth": tokens["access_token"]}, timeout=TIMEOUT),
        http.post(url, data={"auth": tokens["access_token"]}, timeout=TIMEOUT),
        http.post(url + ".json", json={"auth": tokens["access_token"]}, timeout=TIMEOUT),
    ]
    for answer in answers:
        assert answer.status_code == 200
        result = answer.json()["result"]
        assert result["client_id"] == standin.client_id
        assert result["user_id"] == 5
        install = result["install"]
        assert install["member_id"] == portal.member_id
        assert install["domain"] == portal.domain
        assert install["client_endpoint"] == portal.url + "/rest/"
        assert install["installed"] is True
        # An ISO date with its offset, as the official Python SDK reads it (datetime.fromisoformat).
        expires = datetime.fromisoformat(result["expires"])
        assert expires.utcoffset() is not None
        assert expires.timestamp() == pytest.approx(standin.now() + 3600, abs=5)
        assert "time" in answer.json()
    unknown = http.get(url, params={"auth": "nope"}, timeout=TIMEOUT)
    assert unknown.status_code == 401
    assert unknown.json()["error"] == "invalid_token"
    assert standin.stats["app_info"] == 4


def test_expired_token_after_an_hour(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    standin.advance(3601)
    info = http.get(
        standin.oauth_url + "/rest/app.info", params={"auth": tokens["access_token"]}, timeout=TIMEOUT
    )
    assert info.status_code == 401
    assert info.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }
    call = rest(http, portal, "profile", auth=tokens["access_token"])
    assert call.status_code == 401
    assert call.json()["error"] == "expired_token"
    # The refresh token outlives the access token.
    assert refresh(http, standin, tokens["refresh_token"]).status_code == 200


# ---- OAuth server: fault modes


@pytest.mark.system
def test_oauth_mode_html_500_down_and_slow(
    http: requests.Session, standin: StandIn, portal: FakePortal
) -> None:
    tokens = portal.issue_tokens()
    standin.oauth_mode = "html"
    answer = refresh(http, standin, tokens["refresh_token"])
    assert answer.status_code == 502
    assert answer.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        answer.json()

    standin.oauth_mode = "500"
    answer = http.get(
        standin.oauth_url + "/rest/app.info", params={"auth": tokens["access_token"]}, timeout=TIMEOUT
    )
    assert answer.status_code == 500
    assert answer.json()["error"] == "internal"

    standin.oauth_mode = "down"
    with pytest.raises(requests.ConnectionError):
        refresh(http, standin, tokens["refresh_token"])

    standin.oauth_mode = "slow"
    standin.slow_seconds = 0.6
    with pytest.raises(requests.Timeout):
        http.get(standin.oauth_url + "/rest/app.info", params={"auth": tokens["access_token"]}, timeout=0.2)

    standin.oauth_mode = "ok"
    # None of the faulted requests spent the refresh token.
    assert refresh(http, standin, tokens["refresh_token"]).status_code == 200


# ---- Portals


def test_portal_auth_errors(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    other = standin.add_portal()
    foreign = other.issue_tokens()["access_token"]
    missing = rest(http, portal, "profile")
    assert (missing.status_code, missing.json()["error"]) == (401, "NO_AUTH_FOUND")
    unknown = rest(http, portal, "profile", auth="nope")
    assert (unknown.status_code, unknown.json()["error"]) == (401, "invalid_token")
    crossed = rest(http, portal, "profile", auth=foreign)
    assert (crossed.status_code, crossed.json()["error"]) == (401, "invalid_token")
    token = portal.issue_tokens()["access_token"]
    nothing = rest(http, portal, "no.such.method", auth=token)
    assert nothing.json()["error"] == "ERROR_METHOD_NOT_FOUND"


def test_portal_app_info_profile_and_time(http: requests.Session, portal: FakePortal) -> None:
    portal.status = "P"
    token = portal.issue_tokens(user_id=9, admin=False)["access_token"]
    info = http.get(f"{portal.url}/rest/app.info", params={"auth": token}, timeout=TIMEOUT).json()
    assert info["result"]["STATUS"] == "P"
    assert info["result"]["INSTALLED"] is True
    documented = load_json("appinfo-portal-docs.json")
    assert list(info) == list(documented)
    assert shape(info["result"]) == shape(documented["result"])
    for key in ("start", "finish", "duration", "processing", "date_start", "date_finish", "operating"):
        assert key in info["time"]
    assert set(documented["time"]) < set(info["time"])
    # The time block as the newer pages print it, operating_reset_at included.
    assert shape(info["time"]) == shape(load_json("list-next-total-docs.json")["time"])
    profile = rest(http, portal, "profile", auth=token).json()["result"]
    assert (profile["ID"], profile["ADMIN"]) == ("9", False)
    assert isinstance(rest(http, portal, "server.time", auth=token).json()["result"], str)


def test_leaky_bucket_rejects_a_burst_over_the_limit(http: requests.Session, standin: StandIn) -> None:
    portal = standin.add_portal(rate=2.0, burst=50)
    token = portal.issue_tokens()["access_token"]
    answers = [
        http.get(f"{portal.url}/rest/server.time", params={"auth": token}, timeout=TIMEOUT) for _ in range(60)
    ]
    rejected = [a for a in answers if a.status_code == 503]
    assert rejected
    assert all(a.json()["error"] == "QUERY_LIMIT_EXCEEDED" for a in rejected)
    assert portal.bucket_stats["rejected"] == len(rejected)
    assert portal.bucket_stats["calls"] == 60 - len(rejected)
    assert portal.bucket_stats["max_level"] <= portal.burst
    standin.advance(30)  # the bucket drains by the stand-in clock
    assert (
        http.get(f"{portal.url}/rest/server.time", params={"auth": token}, timeout=TIMEOUT).status_code == 200
    )


def test_list_pages_of_fifty_with_next_and_total(http: requests.Session, portal: FakePortal) -> None:
    portal.seed("crm.contact", 120)
    token = portal.issue_tokens()["access_token"]
    seen: list[str] = []
    pages = []
    start: int | None = 0
    while start is not None:
        body = rest(http, portal, "crm.contact.list", auth=token, start=start).json()
        pages.append(body)
        seen += [row["ID"] for row in body["result"]]
        start = body.get("next")
    assert [len(p["result"]) for p in pages] == [50, 50, 20]
    documented = load_json("list-next-total-docs.json")
    assert set(pages[0]) == set(documented) == {"result", "next", "total", "time"}
    assert shape(pages[0]["time"]) == shape(documented["time"])
    assert set(pages[-1]) == set(documented) - {"next"}
    assert [p.get("next") for p in pages] == [50, 100, None]
    assert all(p["total"] == 120 for p in pages)
    assert seen == [str(i) for i in range(1, 121)]

    fast = http.get(
        f"{portal.url}/rest/crm.contact.list",
        params={"auth": token, "start": "-1", "filter[>ID]": "100", "order[ID]": "ASC"},
        timeout=TIMEOUT,
    ).json()
    assert [row["ID"] for row in fast["result"]] == [str(i) for i in range(101, 121)]
    assert "next" not in fast and "total" not in fast


@pytest.mark.system
def test_add_get_and_a_write_that_lands_after_the_client_gave_up(
    http: requests.Session, portal: FakePortal
) -> None:
    token = portal.issue_tokens()["access_token"]
    new_id = rest(http, portal, "crm.contact.add", auth=token, fields={"NAME": "Ann"}).json()["result"]
    got = rest(http, portal, "crm.contact.get", auth=token, id=new_id).json()["result"]
    assert got["NAME"] == "Ann"
    portal.write_delay = 0.5
    with pytest.raises(requests.Timeout):
        http.post(
            f"{portal.url}/rest/crm.contact.add",
            data=phpform.encode({"auth": token, "fields": {"NAME": "Bob"}}),
            timeout=0.2,
        )
    assert [row["NAME"] for row in portal.items["crm.contact"]] == ["Ann", "Bob"]


def test_batch_limits_errors_and_references(http: requests.Session, portal: FakePortal) -> None:
    portal.seed("crm.contact", 10)
    token = portal.issue_tokens()["access_token"]
    too_many = {f"c{i}": "server.time" for i in range(51)}
    answer = rest(http, portal, "batch", auth=token, cmd=too_many)
    assert answer.status_code == 400
    assert answer.json()["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"

    form = phpform.encode(
        {
            "auth": token,
            "halt": 0,
            "cmd": {
                "first": "crm.contact.list?start=0",
                "one": "crm.contact.get?id=$result[first][2][ID]",
                "bad": "no.such.method",
            },
        }
    )
    body = http.post(f"{portal.url}/rest/batch", data=form, timeout=TIMEOUT).json()["result"]
    assert set(body) == {"result", "result_error", "result_total", "result_next", "result_time"}
    documented = load_json("batch-result-error-docs.json")["result"]
    assert list(body) == list(documented)
    assert shape(body["result_error"]["bad"]) == shape(documented["result_error"]["get_user"])
    assert body["result"]["one"]["ID"] == "3"
    assert body["result_total"] == {"first": 10}
    assert body["result_error"]["bad"]["error"] == "ERROR_METHOD_NOT_FOUND"
    assert set(body["result_time"]) == {"first", "one"}

    halted = rest(http, portal, "batch", auth=token, halt=1, cmd=["no.such.method", "server.time"]).json()
    assert halted["result"]["result"] == []
    # Keys 0..n-1 come back as a JSON list, as PHP's json_encode renders such arrays.
    assert [e["error"] for e in halted["result"]["result_error"]] == ["ERROR_METHOD_NOT_FOUND"]


def test_operating_time_limit(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    token = portal.issue_tokens()["access_token"]
    portal.operating_limit = 0.01
    portal.rest_latency = 0.02
    assert rest(http, portal, "server.time", auth=token).status_code == 200
    blocked = rest(http, portal, "server.time", auth=token)
    assert (blocked.status_code, blocked.json()["error"]) == (429, "OPERATION_TIME_LIMIT")
    assert rest(http, portal, "profile", auth=token).status_code == 200  # counted per method
    standin.advance(601)
    assert rest(http, portal, "server.time", auth=token).status_code == 200


def test_events_bind_get_unbind(http: requests.Session, portal: FakePortal) -> None:
    token = portal.issue_tokens()["access_token"]
    binding = {"event": "onAppUninstall", "handler": "http://app.example/events/"}
    assert rest(http, portal, "event.bind", auth=token, **binding).json()["result"] is True
    duplicate = rest(http, portal, "event.bind", auth=token, **binding)
    assert duplicate.status_code == 400
    assert "already" in duplicate.json()["error_description"]
    listed = rest(http, portal, "event.get", auth=token).json()["result"]
    assert listed == [
        {"event": "ONAPPUNINSTALL", "handler": binding["handler"], "auth_type": "0", "offline": 0}
    ]
    assert rest(http, portal, "event.unbind", auth=token, **binding).json()["result"] == {"count": 1}
    assert portal.events == []


def test_rename_redirects_the_old_address(http: requests.Session, portal: FakePortal) -> None:
    token = portal.issue_tokens()["access_token"]
    old_url = portal.url
    new_domain = portal.rename()
    assert portal.domain == new_domain and portal.url == f"http://{new_domain}"
    answer = http.post(
        f"{old_url}/rest/crm.contact.add.json?x=1",
        data=phpform.encode({"auth": token, "fields": {"NAME": "Moved"}}),
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location == f"{portal.url}/rest/crm.contact.add.json?x=1"
    assert new_domain.split(":")[1] != old_url.rsplit(":", 1)[1]
    resent = http.post(
        location, data=phpform.encode({"auth": token, "fields": {"NAME": "Moved"}}), timeout=TIMEOUT
    )
    assert resent.status_code == 200
    assert portal.calls[-1][0] == "POST"
    assert portal.calls[-1][1] == "crm.contact.add"
    assert portal.calls[-1][2]["fields"] == {"NAME": "Moved"}


def test_uninstall_and_deleted(http: requests.Session, standin: StandIn, portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    portal.uninstall()
    assert portal.installed is False
    call = rest(http, portal, "profile", auth=tokens["access_token"])
    assert (call.status_code, call.json()["error"]) == (401, "invalid_token")
    assert refresh(http, standin, tokens["refresh_token"]).json()["error"] == "invalid_grant"

    gone = standin.add_portal()
    tokens = gone.issue_tokens()
    gone.deleted = True
    call = rest(http, gone, "profile", auth=tokens["access_token"])
    assert (call.status_code, call.json()["error"]) == (500, "PORTAL_DELETED")
    assert refresh(http, standin, tokens["refresh_token"]).json()["error"] == "invalid_grant"


# ---- Payloads


def test_install_event_payload(portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    pairs = payloads.onappinstall(portal, tokens)
    assert [key for key, _ in pairs] == [
        "event",
        "data[VERSION]",
        "data[LANGUAGE_ID]",
        "ts",
        "auth[access_token]",
        "auth[expires]",
        "auth[expires_in]",
        "auth[scope]",
        "auth[domain]",
        "auth[server_endpoint]",
        "auth[status]",
        "auth[client_endpoint]",
        "auth[member_id]",
        "auth[user_id]",
        "auth[refresh_token]",
        "auth[application_token]",
    ]
    # The docs' install event (settings/oauth/simple-way.md), with the two fields live portals add: when the
    # access token expires and who installed (requests captured from portals carry both).
    live_only = {"auth[expires]", "auth[user_id]"}
    assert [key for key, _ in pairs if key not in live_only] == [
        key for key, _ in load_php_array("onappinstall-docs-2025-phparray.txt")
    ]
    auth_fields = dict(pairs)
    assert auth_fields["auth[user_id]"] == "1"
    expected = portal.standin.now() + int(auth_fields["auth[expires_in]"])
    assert abs(int(auth_fields["auth[expires]"]) - expected) <= 2
    # The event page's version carries the same auth block, and more in data than the builder sends.
    documented = load_json("onappinstall-docs.json")
    decoded = phpform.decode(pairs)
    assert set(decoded) == set(documented)
    assert set(decoded["auth"]) == set(documented["auth"]) | {"expires", "user_id"}
    assert set(decoded["data"]) < set(documented["data"])
    auth = phpform.decode(pairs)["auth"]
    assert auth["domain"] == portal.domain
    assert auth["server_endpoint"] == portal.standin.oauth_url + "/rest/"
    assert auth["client_endpoint"] == portal.url + "/rest/"
    assert auth["application_token"] == portal.application_token


def _key_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """The nested keys of a decoded form or a JSON object (values dropped: forms carry only strings)."""
    return {key: _key_tree(value) if isinstance(value, dict) else None for key, value in tree.items()}


def test_other_event_payloads(portal: FakePortal) -> None:
    uninstall = phpform.decode(payloads.onappuninstall(portal, clean=True))
    assert uninstall["data"]["CLEAN"] == "1"
    assert "access_token" not in uninstall["auth"]
    assert uninstall["auth"]["application_token"] == portal.application_token
    payment = phpform.decode(payloads.onapppayment(portal))
    assert set(payment["auth"]) == {"domain", "server_endpoint", "client_endpoint", "member_id"}
    before = portal.application_token
    update = phpform.decode(payloads.onappupdate(portal, portal.issue_tokens()))
    assert update["auth"]["application_token"] == portal.application_token != before
    assert update["data"]["PREVIOUS_VERSION"] == "1" and update["data"]["VERSION"] == "2"
    # Each builder sends exactly the fields of the docs' page for its event.
    assert _key_tree(uninstall) == _key_tree(load_json("onappuninstall-docs.json"))
    assert _key_tree(payment) == _key_tree(load_json("onapppayment-docs.json"))
    documented_update = _key_tree(load_json("onappupdate-docs.json"))
    documented_update["auth"] |= {
        "expires": None,
        "user_id": None,
    }  # as live portals send (see the install's)
    assert _key_tree(update) == documented_update
    for name, built in (("onappuninstall", uninstall), ("onapppayment", payment), ("onappupdate", update)):
        assert built["event"] == load_json(f"{name}-docs.json")["event"]


def test_launch_payload(portal: FakePortal) -> None:
    tokens = portal.issue_tokens()
    query, body = payloads.launch(portal, tokens)
    assert set(query) == {"DOMAIN", "PROTOCOL", "LANG", "APP_SID"}
    assert query["PROTOCOL"] == "0" and query["DOMAIN"] == portal.domain
    assert body["AUTH_ID"] == tokens["access_token"] and body["REFRESH_ID"] == tokens["refresh_token"]
    assert body["PLACEMENT"] == "DEFAULT" and "PLACEMENT_OPTIONS" not in body
    assert body["SERVER_ENDPOINT"] == portal.standin.oauth_url + "/rest/"
    _, placed = payloads.launch(portal, tokens, placement="CRM_DEAL_DETAIL_TAB", options={"ID": "8061"})
    assert json.loads(placed["PLACEMENT_OPTIONS"]) == {"ID": "8061"}


@pytest.mark.parametrize(
    ("sample", "placement"),
    [("launch-default-docs.txt", "DEFAULT"), ("launch-placement-docs.txt", "CRM_DEAL_DETAIL_TAB")],
)
def test_launch_payload_has_the_documented_fields(portal: FakePortal, sample: str, placement: str) -> None:
    documented = load_print_r(sample)
    options = json.loads(documented["PLACEMENT_OPTIONS"]) if "PLACEMENT_OPTIONS" in documented else None
    query, body = payloads.launch(portal, portal.issue_tokens(), placement=placement, options=options)
    # The docs: DOMAIN, PROTOCOL, LANG and APP_SID in the query string, the rest in the body.
    assert set(query) | set(body) == set(documented)
    assert not set(query) & set(body)
    assert set(query) == {"DOMAIN", "PROTOCOL", "LANG", "APP_SID"}
    assert body["PLACEMENT"] == documented["PLACEMENT"]
    assert query["LANG"] == documented["LANG"]
    assert len(query["APP_SID"]) == len(documented["APP_SID"])


def test_placement_options_are_encoded_as_the_docs_show(portal: FakePortal) -> None:
    documented = load_print_r("launch-placement-docs.txt")["PLACEMENT_OPTIONS"]
    options = json.loads(documented)
    _, body = payloads.launch(portal, portal.issue_tokens(), placement="CRM_DEAL_DETAIL_TAB", options=options)
    assert json.loads(body["PLACEMENT_OPTIONS"]) == options
    # PHP's json_encode escapes "/" as "\/", as the docs show it.
    assert "\\/crm\\/deal\\/details\\/8061\\/" in documented
    assert "\\/crm\\/deal\\/details\\/8061\\/" in body["PLACEMENT_OPTIONS"]


# ---- phpform


def test_phpform_encode_and_decode() -> None:
    nested = {"auth": {"access_token": "x"}, "data": {"FIELDS": {"ID": "89"}}, "cmd": ["a?b=1", "c"]}
    pairs = phpform.encode(nested)
    assert pairs == [
        ("auth[access_token]", "x"),
        ("data[FIELDS][ID]", "89"),
        ("cmd[0]", "a?b=1"),
        ("cmd[1]", "c"),
    ]
    assert phpform.decode(pairs) == nested
    assert phpform.decode([("a[]", "1"), ("a[]", "2")]) == {"a": ["1", "2"]}
    assert phpform.decode([("a[b][c]", "1")]) == {"a": {"b": {"c": "1"}}}
    assert phpform.decode_query("filter%5B%3EID%5D=5&x=") == {"filter": {">ID": "5"}, "x": ""}


@pytest.mark.parametrize(
    "pairs",
    [
        [("a[b", "1")],
        [("a]", "1")],
        [("[a]", "1")],
        [("a[b]c", "1")],
        [("a", "1"), ("a[b]", "2")],
        [("a[b]", "2"), ("a", "1")],
    ],
)
def test_phpform_rejects_broken_nesting(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match=r"form key|empty"):
        phpform.decode(pairs)


_keys = st.text(alphabet="abcXYZ_09>!", min_size=1, max_size=4).filter(lambda k: not k.isdigit())
_trees = st.recursive(
    st.text(max_size=5),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.dictionaries(_keys, children, min_size=1, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=60, database=None, deadline=None)
@given(st.dictionaries(_keys, _trees, min_size=1, max_size=4))
def test_phpform_round_trip(nested: dict[str, Any]) -> None:
    assert phpform.decode(phpform.encode(nested)) == nested


def test_form_fields_are_read_and_written_as_php_does():
    """The stand-in's own PHP form handling (standin/form.py), not the product's: http_build_query out,
    $_POST in."""
    from standin import form

    pairs = form.encode(
        {"auth": {"member_id": "m"}, "data": {"FIELDS": {"ID": 7}}, "flag": True, "gone": None}
    )
    assert pairs == [("auth[member_id]", "m"), ("data[FIELDS][ID]", "7"), ("flag", "1")]
    assert form.decode(pairs) == {"auth": {"member_id": "m"}, "data": {"FIELDS": {"ID": "7"}}, "flag": "1"}
    parsed = form.decode_query("select[]=ID&select[]=TITLE&filter[>ID]=5&order[ID]=DESC&x=1&x=2")
    assert parsed == {"select": ["ID", "TITLE"], "filter": {">ID": "5"}, "order": {"ID": "DESC"}, "x": "2"}
    assert form.decode_query("ids[0]=a&ids[1]=b&map[1]=a") == {"ids": ["a", "b"], "map": {"1": "a"}}
    with pytest.raises(ValueError, match="deeper than 64"):
        form.decode_query("a" + "[b]" * 64 + "=1")


def test_the_stand_ins_modules_import_each_other_in_one_direction_even_for_type_hints() -> None:
    """A circle of imports, even one made only of annotations, would tie the stand-in's jobs back into one
    room; the import-linter contracts skip type-only imports, so this counts them."""
    import grimp

    graph = grimp.build_graph("standin", exclude_type_checking_imports=False)
    modules = sorted(graph.modules)
    circles = [
        (first, second)
        for first in modules
        for second in modules
        if first < second
        and graph.find_shortest_chain(first, second)
        and graph.find_shortest_chain(second, first)
    ]
    assert circles == []
    assert "standin.portal" in modules and "standin.records" in modules  # the graph is the real one
