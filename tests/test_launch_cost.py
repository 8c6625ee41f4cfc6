"""What a launch costs: the SQL statements and outbound calls of a repeat launch, counted and listed."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from install.models import InboundRequest, InboundStatus
from portals.models import TokenPair
from standin import payloads as bx

pytestmark = pytest.mark.django_db(transaction=True)

TRANSACTION_CONTROL = re.compile(r"^(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE SAVEPOINT)\b", re.IGNORECASE)

# A repeat launch: an installed portal, a user who already has a working pair, an AUTH_ID verified
# seconds ago (its verdict in the shared cache).
REPEAT_LAUNCH = [
    'INSERT INTO "install_inboundrequest"',  # the request, described, before anything is trusted
    'SELECT "install_generation" FROM "portals_portal"',  # read before verifying (an uninstall meanwhile)
    'SELECT p."id" FROM "portals_portal"',  # the portal, locked, with whether it has a background pair and the user's
    'UPDATE "portals_portal"',  # last launch
    'UPDATE "portals_tokenpair"',  # the launch's access token (the refresh token stays)
    'UPDATE "install_inboundrequest"',  # the outcome
]


def _statements(captured: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if not TRANSACTION_CONTROL.match(q["sql"])]


def _shape(sql: str) -> str:
    """The statement's verb and table (a SELECT's first column and table)."""
    found = re.match(r'SELECT (\S+?),? .*?FROM ("[^"]+")', sql) or re.match(
        r'(INSERT INTO|UPDATE|DELETE FROM) ("[^"]+")', sql
    )
    if found is None:
        return sql[:60]
    return f"SELECT {found[1]} FROM {found[2]}" if sql.startswith("SELECT") else " ".join(found.groups())


def _launch(client, b24, tokens):
    query, body = bx.launch(b24, tokens)
    return client.post(
        f"/app/?{urlencode(query)}",
        data=urlencode(body),
        content_type="application/x-www-form-urlencoded",
        HTTP_ACCEPT="text/html",
    )


def _outbound(standin, b24) -> int:
    """Requests the backend sent: to the OAuth server (app.info, token) and to the portal (REST)."""
    return standin.stats["oauth_requests"] + b24.bucket_stats["calls"]


def _cost(client, standin, b24, tokens) -> tuple[list[str], int]:
    before = _outbound(standin, b24)
    with CaptureQueriesContext(connection) as captured:
        response = _launch(client, b24, tokens)
    assert response.status_code == 200, response.content[:500]
    return _statements(captured), _outbound(standin, b24) - before


def test_a_repeat_launch_costs_six_statements_and_no_outbound_call(client, standin, installed_portal, b24):
    tokens = b24.issue_tokens(1, admin=True)
    _launch(client, b24, tokens)  # the first launch with this AUTH_ID verifies it
    pair = installed_portal.token_pairs.get(user_id=1)
    refresh = pair.refresh_token

    statements, outbound = _cost(client, standin, b24, tokens)  # a reload seconds later

    assert [_shape(sql) for sql in statements] == REPEAT_LAUNCH, "\n".join(statements)
    assert outbound == 0  # the verdict came from the cache; no profile, no app.info
    row = InboundRequest.objects.latest("pk")
    assert (row.status, row.http_status, row.member_id) == (InboundStatus.ACCEPTED, 200, b24.member_id)
    assert row.body["AUTH_ID"].startswith("<redacted")
    pair.refresh_from_db()
    assert pair.access_token == tokens["access_token"]
    assert pair.refresh_token == refresh  # a launch's REFRESH_ID never replaces a working one


def test_what_other_launches_cost(client, standin, installed_portal, b24, capsys):
    """Not a bound: the figures, printed (docs/benchmarks.md). A new AUTH_ID asks app.info once; a user
    without a pair gets one; a portal without a background pair asks `profile` once, outside the lock."""
    _launch(client, b24, b24.issue_tokens(1, admin=True))
    new_token, new_token_calls = _cost(client, standin, b24, b24.issue_tokens(1, admin=True))
    new_user, new_user_calls = _cost(client, standin, b24, b24.issue_tokens(7, admin=False))
    TokenPair.objects.filter(portal=installed_portal).update(is_background=False)
    no_background, no_background_calls = _cost(client, standin, b24, b24.issue_tokens(3, admin=True))
    assert TokenPair.objects.get(portal=installed_portal, user_id=3).is_background
    with capsys.disabled():
        for name, statements, calls in (
            ("new AUTH_ID", new_token, new_token_calls),
            ("a user's first launch", new_user, new_user_calls),
            ("no background pair, an admin", no_background, no_background_calls),
        ):
            print(f"\n{name}: {len(statements)} statements, {calls} outbound call(s)")
            for sql in statements:
                print("   ", _shape(sql))
    assert len(new_token) == len(REPEAT_LAUNCH) and new_token_calls == 1
