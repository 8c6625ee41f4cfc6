"""The written-out statements of launches and renewals (portals.statements) store, read and lock what the
ORM would."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from install.models import InboundKind, InboundRequest, InboundStatus
from portals import pairs, renewal, statements
from portals.models import PairState, Portal, PortalState, RenewalTrigger, TokenPair
from tests.factories import PortalFactory, TokenPairFactory

pytestmark = pytest.mark.django_db


def test_update_writes_the_named_fields_through_the_fields_and_sets_auto_now():
    pair = TokenPairFactory(portal=PortalFactory())
    before = pair.updated_at
    expires = timezone.now() + timedelta(minutes=42)
    pair.access_token = "a-new-access-token"
    pair.access_expires_at = expires
    pair.scope = "not written"

    with CaptureQueriesContext(connection) as captured:
        written = statements.update(pair, ["access_token", "access_expires_at", "updated_at"])

    assert written == 1
    assert len(captured.captured_queries) == 1
    assert "a-new-access-token" not in captured.captured_queries[0]["sql"]  # encrypted by its field
    stored = TokenPair.objects.get(pk=pair.pk)
    assert stored.access_token == "a-new-access-token"
    assert stored.access_expires_at == expires
    assert stored.updated_at > before
    assert stored.scope != "not written"


def test_update_writes_nothing_where_the_condition_does_not_hold():
    pair = TokenPairFactory(portal=PortalFactory(), state=PairState.DEAD)
    pair.access_token = "should-not-land"

    assert statements.update(pair, ["access_token"], state=PairState.ACTIVE) == 0
    assert TokenPair.objects.get(pk=pair.pk).access_token != "should-not-land"


def test_insert_stores_the_row_as_save_would_and_sets_its_key():
    row = InboundRequest(
        kind=InboundKind.LAUNCH, headers={"user-agent": "тест"}, body={"AUTH_ID": "<redacted>"}
    )

    statements.insert(row)

    assert row.pk is not None and not row._state.adding
    stored = InboundRequest.objects.get(pk=row.pk)
    assert (stored.kind, stored.status) == (InboundKind.LAUNCH, InboundStatus.RECEIVED)
    assert stored.headers == {"user-agent": "тест"} and stored.body == {"AUTH_ID": "<redacted>"}
    assert stored.created_at is not None and stored.created_at == row.created_at
    assert statements.insert(InboundRequest(kind=InboundKind.EVENT)) is None
    assert InboundRequest.objects.count() == 2


def test_fetch_one_reads_the_named_fields_defers_the_rest_and_keeps_extra_columns():
    portal = PortalFactory(state=PortalState.INSTALLED, application_token="secret-app-token")
    names = ["id", "member_id", "state", "installed_at"]
    sql = (
        f"SELECT {', '.join(statements.column(Portal, n) for n in names)}, 41 + 1 AS answer"
        f" FROM {statements.table(Portal)} WHERE {statements.column(Portal, 'member_id')} = %s"
    )

    read = statements.fetch_one(Portal, sql, [portal.member_id], names)

    assert read is not None
    assert (read.pk, read.member_id, read.state) == (portal.pk, portal.member_id, PortalState.INSTALLED)
    assert read.installed_at == portal.installed_at  # an aware datetime on either database
    assert read.answer == 42
    assert "application_token" in read.get_deferred_fields()
    assert read.application_token == "secret-app-token"  # read (and decrypted) when asked for
    assert statements.fetch_one(Portal, sql, ["no-such-member"], names) is None


def test_fetch_one_wants_the_fields_in_the_models_order():
    with pytest.raises(ValueError, match="model's order"):
        statements.fetch_one(Portal, "SELECT 1", [], ["state", "member_id"])


def test_the_sweeps_locked_read_gives_what_the_orm_gives():
    pair = TokenPairFactory(portal=PortalFactory(state=PortalState.NEEDS_REINSTALL), issued_days_ago=25)
    full = TokenPair.objects.select_related("portal").get(pk=pair.pk)

    with transaction.atomic():
        narrow = renewal._locked(pair.pk, RenewalTrigger.BEAT)

    for name in ("pk", "portal_id", "user_id", "is_background", "refresh_token", "access_expires_at"):
        assert getattr(narrow, name) == getattr(full, name), name
    for name in ("refresh_issued_at", "state", "consecutive_failures", "last_error"):
        assert getattr(narrow, name) == getattr(full, name), name
    for name in ("pk", "member_id", "oauth_server", "state", "reinstall_cause"):
        assert getattr(narrow.portal, name) == getattr(full.portal, name), name
    assert "access_token" in narrow.get_deferred_fields()
    assert narrow.access_token == full.access_token  # read when asked for, decrypted
    with pytest.raises(TokenPair.DoesNotExist), transaction.atomic():
        renewal._locked(pair.pk + 1000, RenewalTrigger.BEAT)


@pytest.mark.django_db(transaction=True)
def test_the_launch_and_sweep_reads_lock_only_their_own_row():
    """Held by one connection, a renewal locks its portal (no key update: a launch's update of the portal
    waits, a row that only points to it does not) and then its pair, the order every writer takes them in;
    the launch's read locks the portal (not its pairs)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite locks the whole database for a write")
    pair = TokenPairFactory(portal=PortalFactory())
    pair_table, portal_table = statements.table(TokenPair), statements.table(Portal)
    locked: dict[str, bool] = {}

    def try_lock(name: str, sql: str, pk: int) -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, [pk])
            locked[name] = False
        except OperationalError:
            locked[name] = True  # NOWAIT: the row is held
        finally:
            connection.close()

    def other(name: str, sql: str, pk: int) -> None:
        thread = threading.Thread(target=try_lock, args=(name, sql, pk))
        thread.start()
        thread.join(10)

    pair_nowait = f"SELECT 1 FROM {pair_table} WHERE id = %s FOR UPDATE NOWAIT"
    portal_nowait = f"SELECT 1 FROM {portal_table} WHERE id = %s FOR UPDATE NOWAIT"
    portal_key_share = f"SELECT 1 FROM {portal_table} WHERE id = %s FOR KEY SHARE NOWAIT"
    with transaction.atomic():
        renewal._locked(pair.pk, RenewalTrigger.BEAT)
        other("pair, in a renewal", pair_nowait, pair.pk)
        other("portal, in a renewal", portal_nowait, pair.portal_id)
        other("portal's key, in a renewal", portal_key_share, pair.portal_id)
    with transaction.atomic():
        assert pairs.launch_portal(pair.portal.member_id, pair.user_id) is not None
        other("portal, in a launch", portal_nowait, pair.portal_id)
        other("pair, in a launch", pair_nowait, pair.pk)

    assert locked == {
        "pair, in a renewal": True,
        "portal, in a renewal": True,
        "portal's key, in a renewal": False,
        "portal, in a launch": True,
        "pair, in a launch": False,
    }
