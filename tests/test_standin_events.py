"""The stand-in's events: online deliveries to a handler, the offline queue, source keys, ONOFFLINEEVENT and
the page for raising events by hand. Real servers on loopback, driven with ``requests``; a tiny
``http.server`` plays the app's event handler. No Django."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from portals import phpform
from standin import FakePortal, StandIn
from standin.console import CONSOLE_PATH, FIRE_PATH
from standin.events import FEATURE_CONNECTOR, FEATURE_EXTENDED
from tests.samples import load_json

TIMEOUT = 5

# The event's keys on the wire, in order (api-reference/crm/deals/events/on-crm-deal-add.md), without the
# optional refresh token.
EVENT_KEYS = [
    "event",
    "event_handler_id",
    "data[FIELDS][ID]",
    "ts",
    "auth[access_token]",
    "auth[expires_in]",
    "auth[scope]",
    "auth[domain]",
    "auth[server_endpoint]",
    "auth[status]",
    "auth[client_endpoint]",
    "auth[member_id]",
    "auth[application_token]",
]


class Receiver:
    """An app's event handler on loopback: records every POST (raw body and when it came and was answered);
    answers ``status`` after ``delay`` seconds."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self.status = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                time.sleep(receiver.delay)
                # Recorded before the answer leaves: once the sender has its answer, the post is on record.
                with receiver._lock:
                    receiver.requests.append(
                        {
                            "path": self.path,
                            "content_type": self.headers.get("Content-Type"),
                            "pairs": parse_qsl(body, keep_blank_values=True),
                            "arrived": arrived,
                            "answered": time.monotonic(),
                        }
                    )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/events/"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The posts received so far, decoded (PHP-style keys nested again)."""
        with self._lock:
            decoded = [phpform.decode(request["pairs"]) for request in self.requests]
        return [event for event in decoded if name is None or event["event"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A stand-in of its own per test: tests here count deliveries and move its clock."""
    with StandIn() as running:
        yield running


@pytest.fixture(autouse=True)
def bitrix24_settings(standin: StandIn) -> StandIn:
    """Overrides the conftest's autouse fixture: no Django settings needed here."""
    return standin


@pytest.fixture
def portal(standin: StandIn) -> FakePortal:
    return standin.add_portal()


@pytest.fixture
def token(portal: FakePortal) -> str:
    """An administrator's access token (user 1), as the app holds from its install."""
    return str(portal.issue_tokens(1, admin=True)["access_token"])


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def rest(http: requests.Session, portal: FakePortal, method: str, **params: Any) -> requests.Response:
    return http.post(f"{portal.url}/rest/{method}.json", json=params, timeout=TIMEOUT)


def result(http: requests.Session, portal: FakePortal, method: str, **params: Any) -> Any:
    answer = rest(http, portal, method, **params)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


def error(answer: requests.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]


# ---- online events


def test_crm_deal_add_posts_the_documented_event_to_the_handler(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    assert result(http, portal, "event.bind", auth=token, event="ONCRMDEALADD", handler=receiver.url) is True
    deal_id = result(http, portal, "crm.deal.add", auth=token, fields={"TITLE": "Big one"})

    assert standin.wait_deliveries(TIMEOUT)
    [request] = receiver.requests
    assert request["path"] == "/events/"
    assert request["content_type"] == "application/x-www-form-urlencoded"
    assert [key for key, _ in request["pairs"]] == EVENT_KEYS
    event = phpform.decode(request["pairs"])
    documented = load_json("oncrmcontactadd-docs.json")
    # The docs' example of the same kind of event, less the refresh token events normally lack.
    assert set(event) == set(documented)
    assert set(event["auth"]) == set(documented["auth"]) - {"refresh_token"}
    assert event["event"] == "ONCRMDEALADD"
    assert event["data"] == {"FIELDS": {"ID": str(deal_id)}}
    assert event["event_handler_id"] == str(portal.events[0]["id"])
    assert abs(int(event["ts"]) - standin.now()) < 5  # when it was sent
    auth = event["auth"]
    assert auth["application_token"] == portal.application_token
    assert auth["member_id"] == portal.member_id
    assert auth["domain"] == portal.domain
    assert auth["client_endpoint"] == portal.url + "/rest/"
    assert auth["server_endpoint"] == standin.oauth_url + "/rest/"
    assert auth["expires_in"] == "3600"
    # The token is a real one of the user who made the change.
    assert result(http, portal, "profile", auth=auth["access_token"])["ID"] == "1"
    [delivery] = portal.deliveries
    assert (delivery["event"], delivery["handler"], delivery["status"]) == ("ONCRMDEALADD", receiver.url, 200)
    assert delivery["error"] is None and delivery["refused"] is False
    assert delivery["queued"] <= delivery["started"] <= delivery["finished"]


@pytest.mark.system
def test_the_rest_answer_does_not_wait_for_a_slow_handler(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    receiver.delay = 2.0
    result(http, portal, "event.bind", auth=token, event="ONCRMDEALADD", handler=receiver.url)
    started = time.monotonic()
    result(http, portal, "crm.deal.add", auth=token, fields={"TITLE": "Fast answer"})
    answered = time.monotonic()

    assert answered - started < 1.5
    assert standin.wait_deliveries(TIMEOUT)
    [request] = receiver.requests
    assert answered < request["answered"]
    assert request["answered"] - request["arrived"] >= 2.0
    [delivery] = portal.deliveries
    assert delivery["status"] == 200
    assert delivery["finished"] - delivery["started"] >= 2.0


@pytest.mark.system
def test_a_failed_delivery_is_not_retried_and_other_hosts_are_refused(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    receiver.status = 500
    result(http, portal, "event.bind", auth=token, event="ONCRMCONTACTADD", handler=receiver.url)
    result(
        http, portal, "event.bind", auth=token, event="ONCRMCONTACTADD", handler="https://app.example.com/ev/"
    )
    result(http, portal, "crm.contact.add", auth=token, fields={"NAME": "Ann"})

    assert standin.wait_deliveries(TIMEOUT)
    time.sleep(0.3)  # a retry would come now
    assert len(receiver.requests) == 1
    by_handler = {delivery["handler"]: delivery for delivery in portal.deliveries}
    assert by_handler[receiver.url]["status"] == 500
    refused = by_handler["https://app.example.com/ev/"]
    assert refused["refused"] is True and refused["status"] is None and refused["form"] == []
    assert "loopback" in refused["error"]


def test_every_write_of_a_batch_raises_its_event(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    portal.seed("crm.deal", 3)
    for event in ("ONCRMCONTACTADD", "ONCRMDEALUPDATE", "ONCRMDEALDELETE"):
        result(http, portal, "event.bind", auth=token, event=event, handler=receiver.url)
    answer = result(
        http,
        portal,
        "batch",
        auth=token,
        cmd={
            "a": "crm.contact.add?fields[NAME]=Ann",
            "b": "crm.contact.add?fields[NAME]=Bob",
            "c": "crm.deal.update?id=2&fields[TITLE]=Renamed",
            "d": "crm.deal.delete?id=3",
            "e": "crm.deal.update?id=99&fields[TITLE]=Nobody",  # fails: no event
        },
    )
    assert set(answer["result_error"]) == {"e"}

    assert standin.wait_deliveries(TIMEOUT)
    added = {event["data"]["FIELDS"]["ID"] for event in receiver.events("ONCRMCONTACTADD")}
    assert added == {str(answer["result"]["a"]), str(answer["result"]["b"])}
    assert [e["data"]["FIELDS"]["ID"] for e in receiver.events("ONCRMDEALUPDATE")] == ["2"]
    assert [e["data"]["FIELDS"]["ID"] for e in receiver.events("ONCRMDEALDELETE")] == ["3"]
    assert len(receiver.requests) == 4


def test_an_event_without_a_user_carries_no_token(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    result(http, portal, "event.bind", auth=token, event="ONCRMDEALUPDATE", handler=receiver.url)
    portal.fire("ONCRMDEALUPDATE", {"FIELDS": {"ID": "7"}}, user_id=0)
    portal.change("crm.deal", 8, "update", user_id=5, admin=False)

    assert standin.wait_deliveries(TIMEOUT)
    by_id = {event["data"]["FIELDS"]["ID"]: event for event in receiver.events()}
    assert "access_token" not in by_id["7"]["auth"]
    assert by_id["7"]["auth"]["application_token"] == portal.application_token
    assert result(http, portal, "profile", auth=by_id["8"]["auth"]["access_token"])["ID"] == "5"


# ---- bindings


def test_offline_bindings_in_event_get_and_unbind(
    http: requests.Session, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    assert (
        result(http, portal, "event.bind", auth=token, event="onCrmDealUpdate", event_type="offline") is True
    )
    assert result(
        http,
        portal,
        "event.bind",
        auth=token,
        event="ONCRMDEALUPDATE",
        event_type="offline",
        auth_connector="sync",
    )
    result(http, portal, "event.bind", auth=token, event="ONCRMDEALUPDATE", handler=receiver.url)

    again = rest(http, portal, "event.bind", auth=token, event="ONCRMDEALUPDATE", event_type="offline")
    assert error(again) == (400, "ERROR_CORE")
    assert "already binded" in again.json()["error_description"]
    assert [{k: v for k, v in binding.items() if k != "id"} for binding in portal.events] == [
        {"event": "ONCRMDEALUPDATE", "handler": "", "auth_type": "0", "offline": 1, "auth_connector": ""},
        {"event": "ONCRMDEALUPDATE", "handler": "", "auth_type": "0", "offline": 1, "auth_connector": "sync"},
        {"event": "ONCRMDEALUPDATE", "handler": receiver.url, "auth_type": "0", "offline": 0},
    ]
    # event-get.md: offline bindings show their source key, online ones their handler.
    assert result(http, portal, "event.get", auth=token) == [
        {"event": "ONCRMDEALUPDATE", "connector_id": "", "offline": 1},
        {"event": "ONCRMDEALUPDATE", "connector_id": "sync", "offline": 1},
        {"event": "ONCRMDEALUPDATE", "handler": receiver.url, "auth_type": "0", "offline": 0},
    ]

    unbound = result(http, portal, "event.unbind", auth=token, event="ONCRMDEALUPDATE", event_type="offline")
    assert unbound == {"count": 1}
    assert [(b["offline"], b.get("auth_connector")) for b in portal.events] == [(1, "sync"), (0, None)]
    unbound = result(
        http,
        portal,
        "event.unbind",
        auth=token,
        event="ONCRMDEALUPDATE",
        event_type="OFFLINE",
        auth_connector="sync",
    )
    assert unbound == {"count": 1}
    assert [binding["offline"] for binding in portal.events] == [0]


def test_binding_refusals(http: requests.Session, portal: FakePortal, token: str) -> None:
    employee = portal.issue_tokens(7, admin=False)["access_token"]
    offline = rest(http, portal, "event.bind", auth=employee, event="ONCRMDEALADD", event_type="offline")
    assert error(offline) == (403, "ACCESS_DENIED")
    queue_note = rest(http, portal, "event.bind", auth=token, event="ONOFFLINEEVENT", event_type="offline")
    assert error(queue_note) == (400, "ERROR_ARGUMENT")
    no_handler = rest(http, portal, "event.bind", auth=token, event="ONCRMDEALADD")
    assert error(no_handler) == (400, "ERROR_ARGUMENT")
    local = rest(
        http, portal, "event.bind", auth=token, event="ONCRMDEALADD", handler="http://localhost:8000/e/"
    )
    assert error(local) == (400, "ERROR_WRONG_HANDLER_URL")
    ftp = rest(http, portal, "event.bind", auth=token, event="ONCRMDEALADD", handler="ftp://app.example.com/")
    assert error(ftp) == (400, "ERROR_UNSUPPORTED_PROTOCOL")
    kind = rest(http, portal, "event.bind", auth=token, event="ONCRMDEALADD", event_type="sometimes")
    assert error(kind) == (400, "ERROR_ARGUMENT")
    portal.features[FEATURE_CONNECTOR] = False
    keyed = rest(
        http, portal, "event.bind", auth=token, event="ONCRMDEALADD", event_type="offline", auth_connector="k"
    )
    assert error(keyed) == (403, "WRONG_LICENSE")
    assert portal.events == []


# ---- the offline queue


def _bind_offline(http: requests.Session, portal: FakePortal, token: str, event: str, **extra: Any) -> None:
    assert result(http, portal, "event.bind", auth=token, event=event, event_type="offline", **extra) is True


def test_thirty_updates_of_ten_contacts_leave_ten_records(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str
) -> None:
    portal.seed("crm.contact", 10)
    _bind_offline(http, portal, token, "ONCRMCONTACTUPDATE")
    for round_ in range(3):
        for contact in range(1, 11):
            result(http, portal, "crm.contact.update", auth=token, id=contact, fields={"NAME": f"v{round_}"})
        last_round = standin.now()
        standin.advance(120)

    listed = rest(http, portal, "event.offline.list", auth=token).json()
    assert listed["total"] == 10
    assert "next" not in listed
    records = listed["result"]
    assert {record["EVENT_DATA"]["FIELDS"]["ID"] for record in records} == {str(n) for n in range(1, 11)}
    for record in records:
        assert record["EVENT_NAME"] == "ONCRMCONTACTUPDATE"
        assert record["EVENT_ADDITIONAL"] == {"user_id": "1"}
        assert re.fullmatch(r"[0-9a-f]{32}", record["MESSAGE_ID"])
        assert (record["PROCESS_ID"], record["ERROR"]) == ("", "0")
        # The time of the last change, not of the first.
        assert abs(_unix(record["TIMESTAMP_X"]) - last_round) < 5
    assert len({record["MESSAGE_ID"] for record in records}) == 10
    # Listing changed nothing: the same answer again, and get hands out all ten.
    assert rest(http, portal, "event.offline.list", auth=token).json()["result"] == records
    got = result(http, portal, "event.offline.get", auth=token)
    assert got["process_id"] is None
    assert sorted(event["ID"] for event in got["events"]) == sorted(record["ID"] for record in records)
    assert set(got["events"][0]) == {
        "ID",
        "TIMESTAMP_X",
        "EVENT_NAME",
        "EVENT_DATA",
        "EVENT_ADDITIONAL",
        "MESSAGE_ID",
    }
    # clear=1 (the default) deleted what it handed out.
    assert result(http, portal, "event.offline.get", auth=token)["events"] == []


def _unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def test_reserved_batches_are_hidden_from_other_callers_until_cleared(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    _bind_offline(http, portal, token, "ONCRMDEALUPDATE")
    for deal in range(1, 11):
        portal.change("crm.deal", deal)

    first = result(http, portal, "event.offline.get", auth=token, clear=0, limit=4)
    second = result(http, portal, "event.offline.get", auth=token, clear=0, limit=4)
    assert first["process_id"] and second["process_id"] and first["process_id"] != second["process_id"]
    first_ids = {event["ID"] for event in first["events"]}
    second_ids = {event["ID"] for event in second["events"]}
    assert len(first_ids) == len(second_ids) == 4 and not first_ids & second_ids
    listed = {record["ID"]: record["PROCESS_ID"] for record in portal.offline_queue()}
    assert [listed[i] for i in sorted(first_ids)] == [first["process_id"]] * 4

    # The batch is confirmed: gone. Part of the other one by MESSAGE_ID: only that record goes.
    assert result(http, portal, "event.offline.clear", auth=token, process_id=first["process_id"]) is True
    one = second["events"][0]
    result(
        http,
        portal,
        "event.offline.clear",
        auth=token,
        process_id=second["process_id"],
        message_id=[one["MESSAGE_ID"]],
    )
    remaining = {record["ID"] for record in portal.offline_queue()}
    assert remaining.isdisjoint(first_ids) and one["ID"] not in remaining and len(remaining) == 5
    # The rest of the second batch is still its own, handed out again under its process id.
    again = result(http, portal, "event.offline.get", auth=token, clear=0, process_id=second["process_id"])
    assert again["process_id"] == second["process_id"]
    assert {event["ID"] for event in again["events"]} == second_ids - {one["ID"]}
    # Only the two never reserved are free for anyone else.
    free = result(http, portal, "event.offline.get", auth=token)
    assert len(free["events"]) == 2 and free["process_id"] is None
    assert {record["ID"] for record in portal.offline_queue()} == second_ids - {one["ID"]}


def test_a_change_while_reserved_is_handed_out_again_after_the_clear(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str
) -> None:
    _bind_offline(http, portal, token, "ONCRMDEALUPDATE")
    portal.change("crm.deal", 1)
    batch = result(http, portal, "event.offline.get", auth=token, clear=0)
    standin.advance(5)
    portal.change("crm.deal", 1)  # changed again while the app works on the batch

    queue = portal.offline_queue()
    assert len(queue) == 2
    assert {record["MESSAGE_ID"] for record in queue} == {batch["events"][0]["MESSAGE_ID"]}
    assert sorted(record["PROCESS_ID"] for record in queue) == ["", batch["process_id"]]
    result(http, portal, "event.offline.clear", auth=token, process_id=batch["process_id"])
    later = result(http, portal, "event.offline.get", auth=token)["events"]
    assert [event["EVENT_DATA"]["FIELDS"]["ID"] for event in later] == ["1"]


def test_erroneous_records_leave_the_batch_and_come_only_with_error_1(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    _bind_offline(http, portal, token, "ONCRMLEADADD")
    for lead in (1, 2, 3):
        portal.change("crm.lead", lead, "add")
    batch = result(http, portal, "event.offline.get", auth=token, clear=0)
    failed = batch["events"][0]
    assert (
        result(
            http,
            portal,
            "event.offline.error",
            auth=token,
            process_id=batch["process_id"],
            message_id=[failed["MESSAGE_ID"]],
        )
        is True
    )
    marked = [record for record in portal.offline_queue() if record["ID"] == failed["ID"]]
    assert [(record["ERROR"], record["PROCESS_ID"]) for record in marked] == [("1", "")]

    result(http, portal, "event.offline.clear", auth=token, process_id=batch["process_id"])
    assert [record["ID"] for record in portal.offline_queue()] == [failed["ID"]]
    assert result(http, portal, "event.offline.get", auth=token, clear=0)["events"] == []
    retried = result(http, portal, "event.offline.get", auth=token, clear=0, error=1)
    assert [event["ID"] for event in retried["events"]] == [failed["ID"]]
    only_errors = result(http, portal, "event.offline.list", auth=token, filter={"ERROR": 1})
    assert [record["ID"] for record in only_errors] == [failed["ID"]]


def test_offline_get_filter_order_limit_and_list_pages(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    _bind_offline(http, portal, token, "ONCRMCONTACTUPDATE")
    _bind_offline(http, portal, token, "ONCRMDEALUPDATE")
    for contact in range(1, 61):
        portal.change("crm.contact", contact)
    portal.change("crm.deal", 1)

    first_page = rest(http, portal, "event.offline.list", auth=token, order={"ID": "DESC"}).json()
    assert (len(first_page["result"]), first_page["next"], first_page["total"]) == (50, 50, 61)
    assert first_page["result"][0]["EVENT_NAME"] == "ONCRMDEALUPDATE"
    second_page = rest(http, portal, "event.offline.list", auth=token, order={"ID": "DESC"}, start=50).json()
    assert len(second_page["result"]) == 11 and "next" not in second_page

    deals = result(
        http, portal, "event.offline.get", auth=token, clear=0, filter={"=EVENT_NAME": "ONCRMDEALUPDATE"}
    )
    assert [event["EVENT_NAME"] for event in deals["events"]] == ["ONCRMDEALUPDATE"]
    # limit: at most 50 a call whatever is asked.
    assert len(result(http, portal, "event.offline.get", auth=token, clear=0, limit=100)["events"]) == 50
    newest = result(http, portal, "event.offline.get", auth=token, clear=0, limit=2, order={"ID": "DESC"})
    assert [int(event["ID"]) for event in newest["events"]] == sorted(
        (int(event["ID"]) for event in newest["events"]), reverse=True
    )
    assert error(rest(http, portal, "event.offline.get", auth=token, limit=0)) == (400, "ERROR_ARGUMENT")
    assert error(rest(http, portal, "event.offline.get", auth=token, filter={"!ID": 1})) == (
        400,
        "ERROR_ARGUMENT",
    )
    assert error(rest(http, portal, "event.offline.get", auth=token, filter={"PROCESS_ID": ""})) == (
        400,
        "ERROR_ARGUMENT",
    )
    assert error(rest(http, portal, "event.offline.get", auth=token, order={"ID": "UP"})) == (
        400,
        "ERROR_ARGUMENT",
    )


def test_offline_methods_are_for_administrators_and_clear_0_needs_the_feature(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    employee = portal.issue_tokens(7, admin=False)["access_token"]
    for method in ("event.offline.get", "event.offline.list"):
        assert error(rest(http, portal, method, auth=employee)) == (403, "ACCESS_DENIED")
    assert result(http, portal, "feature.get", auth=token, CODE=FEATURE_EXTENDED) == {"value": "Y"}
    portal.features[FEATURE_EXTENDED] = False
    assert result(http, portal, "feature.get", auth=token, CODE=FEATURE_EXTENDED) == {"value": "N"}
    assert error(rest(http, portal, "event.offline.get", auth=token, clear=0)) == (403, "WRONG_LICENSE")
    assert result(http, portal, "event.offline.get", auth=token)["events"] == []


# ---- source keys (auth_connector)


def test_the_apps_own_writes_with_its_source_key_are_not_queued(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    portal.seed("crm.deal", 2)
    _bind_offline(http, portal, token, "ONCRMDEALUPDATE", auth_connector="sync")

    result(http, portal, "crm.deal.update", auth=token, id=1, fields={"TITLE": "mine"}, auth_connector="sync")
    result(
        http, portal, "batch", auth=token, cmd=["crm.deal.update?id=2&fields[TITLE]=mine&auth_connector=sync"]
    )
    assert result(http, portal, "event.offline.list", auth=token, auth_connector="sync") == []
    # A user's change, and the app's own without the key, do reach the queue.
    portal.change("crm.deal", 1, user_id=3)
    result(http, portal, "crm.deal.update", auth=token, id=2, fields={"TITLE": "no key"})
    queued = result(http, portal, "event.offline.list", auth=token, auth_connector="sync")
    assert sorted(record["EVENT_DATA"]["FIELDS"]["ID"] for record in queued) == ["1", "2"]
    # The queue is the key's own: without the key the methods see only events without a source.
    assert result(http, portal, "event.offline.get", auth=token)["events"] == []
    got = result(http, portal, "event.offline.get", auth=token, auth_connector="sync")
    assert len(got["events"]) == 2


def test_a_source_key_suppresses_only_its_own_queue(
    http: requests.Session, portal: FakePortal, token: str
) -> None:
    _bind_offline(http, portal, token, "ONCRMCONTACTADD", auth_connector="sync")
    _bind_offline(http, portal, token, "ONCRMCONTACTADD")
    result(http, portal, "crm.contact.add", auth=token, fields={"NAME": "Ann"}, auth_connector="sync")
    assert portal.offline_queue("sync") == []
    assert [record["EVENT_NAME"] for record in portal.offline_queue()] == ["ONCRMCONTACTADD"]


# ---- ONOFFLINEEVENT


def test_onofflineevent_announces_new_records_at_most_once_per_min_timeout(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    portal.seed("crm.contact", 3)
    _bind_offline(http, portal, token, "ONCRMCONTACTUPDATE")
    # Bound as the docs show it, options[minTimeout] in a form post.
    bind = http.post(
        f"{portal.url}/rest/event.bind.json",
        data=phpform.encode(
            {"auth": token, "event": "ONOFFLINEEVENT", "handler": receiver.url, "options": {"minTimeout": 60}}
        ),
        timeout=TIMEOUT,
    )
    assert bind.json()["result"] is True

    result(http, portal, "crm.contact.update", auth=token, id=1, fields={"NAME": "a"})
    assert standin.wait_deliveries(TIMEOUT)
    [note] = receiver.events("ONOFFLINEEVENT")
    assert "data" not in note  # on-offline-event.md: data arrives empty
    assert note["auth"]["application_token"] == portal.application_token
    assert note["event_handler_id"] == str(portal.events[1]["id"])

    result(http, portal, "crm.contact.update", auth=token, id=2, fields={"NAME": "b"})
    standin.advance(30)
    result(http, portal, "crm.contact.update", auth=token, id=3, fields={"NAME": "c"})
    assert standin.wait_deliveries(TIMEOUT)
    assert len(receiver.events("ONOFFLINEEVENT")) == 1
    standin.advance(31)
    result(http, portal, "crm.contact.update", auth=token, id=1, fields={"NAME": "d"})
    assert standin.wait_deliveries(TIMEOUT)
    assert len(receiver.events("ONOFFLINEEVENT")) == 2
    # A change nobody is subscribed to offline is not announced.
    result(http, portal, "crm.deal.add", auth=token, fields={"TITLE": "x"})
    standin.advance(61)
    assert standin.wait_deliveries(TIMEOUT)
    assert len(receiver.events("ONOFFLINEEVENT")) == 2


def test_min_timeout_0_announces_once_per_request(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    portal.seed("crm.contact", 5)
    _bind_offline(http, portal, token, "ONCRMCONTACTUPDATE")
    result(
        http,
        portal,
        "event.bind",
        auth=token,
        event="ONOFFLINEEVENT",
        handler=receiver.url,
        options={"minTimeout": 0},
    )
    commands = [f"crm.contact.update?id={n}&fields[NAME]=x" for n in range(1, 6)]
    result(http, portal, "batch", auth=token, cmd=commands)
    assert standin.wait_deliveries(TIMEOUT)
    assert len(receiver.events("ONOFFLINEEVENT")) == 1
    result(http, portal, "crm.contact.update", auth=token, id=1, fields={"NAME": "y"})
    assert standin.wait_deliveries(TIMEOUT)
    assert len(receiver.events("ONOFFLINEEVENT")) == 2


# ---- the page for raising events by hand


class _Forms(HTMLParser):
    """The forms of a page with their fields (inputs and selects, by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"action": values.get("action"), "method": values.get("method"), "fields": {}})
        elif tag in ("input", "select") and self.forms and values.get("name"):
            self.forms[-1]["fields"][values["name"]] = values.get("value") or ""


def _page_forms(http: requests.Session, portal: FakePortal) -> tuple[str, list[dict[str, Any]]]:
    page = http.get(portal.url + CONSOLE_PATH, timeout=TIMEOUT)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    parser = _Forms()
    parser.feed(page.text)
    return page.text, parser.forms


def test_the_page_lists_bindings_and_its_forms_change_items_and_raise_events(
    http: requests.Session, standin: StandIn, portal: FakePortal, token: str, receiver: Receiver
) -> None:
    result(http, portal, "event.bind", auth=token, event="ONCRMDEALADD", handler=receiver.url)
    _bind_offline(http, portal, token, "ONCRMCONTACTUPDATE", auth_connector="sync")
    portal.seed("crm.contact", 1)
    text, forms = _page_forms(http, portal)
    assert "ONCRMDEALADD" in text and receiver.url in text and "queue: sync" in text
    assert "Offline queue (0 records)" in text
    change, raise_ = forms
    assert change["method"] == raise_["method"] == "post"
    assert change["action"] == raise_["action"] == FIRE_PATH
    assert set(change["fields"]) == {"token", "kind", "entity", "action", "id", "title", "user_id"}

    added = http.post(
        portal.url + FIRE_PATH,
        data={**change["fields"], "entity": "crm.deal", "action": "add", "title": "From the page"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert added.status_code == 303
    assert urlsplit(added.headers["Location"]).path == CONSOLE_PATH
    assert [row["TITLE"] for row in portal.items["crm.deal"]] == ["From the page"]
    assert standin.wait_deliveries(TIMEOUT)
    assert [event["data"]["FIELDS"]["ID"] for event in receiver.events("ONCRMDEALADD")] == ["1"]
    shown = http.get(portal.url + added.headers["Location"], timeout=TIMEOUT).text
    assert "crm.deal 1: add by user 1" in shown

    fields = {**change["fields"], "entity": "crm.contact", "action": "update", "id": "1", "title": "Renamed"}
    http.post(portal.url + FIRE_PATH, data=fields, timeout=TIMEOUT)
    assert portal.items["crm.contact"][0]["NAME"] == "Renamed"
    assert [record["EVENT_NAME"] for record in portal.offline_queue("sync")] == ["ONCRMCONTACTUPDATE"]
    text, _ = _page_forms(http, portal)
    assert "Offline queue (1 record)" in text

    raised = http.post(
        portal.url + FIRE_PATH,
        data={**raise_["fields"], "event": "onCrmDealAdd", "id": "42", "user_id": "3"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert raised.status_code == 303
    assert standin.wait_deliveries(TIMEOUT)
    assert [event["data"]["FIELDS"]["ID"] for event in receiver.events("ONCRMDEALADD")] == ["1", "42"]


def test_the_fire_form_refuses_posts_without_the_pages_token_and_reports_mistakes(
    http: requests.Session, portal: FakePortal
) -> None:
    _, [change, _] = _page_forms(http, portal)
    forged = http.post(
        portal.url + FIRE_PATH,
        data={**change["fields"], "token": "guess", "entity": "crm.deal", "action": "add"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert forged.status_code == 403
    assert portal.items["crm.deal"] == []

    missing = http.post(
        portal.url + FIRE_PATH,
        data={**change["fields"], "entity": "crm.deal", "action": "update", "id": "5"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert missing.status_code == 303
    shown = http.get(portal.url + missing.headers["Location"], timeout=TIMEOUT).text
    assert "class=problem" in shown and "Not found" in shown


def test_the_console_says_why_nothing_was_bound_or_delivered(standin):
    """A new user's first look at /standin/ before the backend bound anything: the empty tables say why and
    what to do, not only that they are empty."""
    portal = standin.add_portal()
    page = requests.get(f"{portal.url}/standin/", timeout=10).text
    assert "No event is bound: the backend binds its handlers" in page
    assert "No event was delivered yet: a change here" in page and "BITRIX24_PUBLIC_URL" in page


def test_the_console_shows_each_deals_timeline(standin):
    """What an app writes on a deal's timeline (the example app's note) shows on /standin/, as the deal's
    page shows it in Bitrix24."""
    portal = standin.add_portal()
    token = portal.issue_tokens(1)["access_token"]

    def call(method, **params):
        answer = requests.post(f"{portal.url}/rest/{method}.json", json={**params, "auth": token}, timeout=10)
        return answer.json()["result"]

    deal = call("crm.deal.add", fields={"TITLE": "Kitchen renovation"})
    call(
        "crm.timeline.comment.add",
        fields={"ENTITY_ID": deal, "ENTITY_TYPE": "deal", "COMMENT": "Called back"},
    )
    page = requests.get(f"{portal.url}/standin/", timeout=10).text
    deals = page.split('id="deals"', 1)[1].split("</section>", 1)[0]
    assert "Kitchen renovation" in deals and "Called back" in deals and "<td>1</td>" in deals
