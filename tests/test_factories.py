"""The factories store what the app itself would: tokens encrypted through the model fields, and for a
stand-in portal, rows that match it and tokens it really issued."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from django.db import connection
from django.utils import timezone

from portals import crypto
from portals.models import PairState, PortalState, TokenPair
from tests.factories import PortalFactory, RenewalLogFactory, TokenPairFactory, UserFactory


@pytest.mark.django_db
def test_tokens_are_stored_encrypted_through_the_model_fields():
    pair = TokenPairFactory()
    with connection.cursor() as cursor:
        cursor.execute("SELECT access_token, refresh_token FROM portals_tokenpair WHERE id = %s", [pair.pk])
        raw_access, raw_refresh = cursor.fetchone()
        cursor.execute("SELECT application_token FROM portals_portal WHERE id = %s", [pair.portal_id])
        (raw_application,) = cursor.fetchone()
    for raw, clear in (
        (raw_access, pair.access_token),
        (raw_refresh, pair.refresh_token),
        (raw_application, pair.portal.application_token),
    ):
        assert raw.startswith("gAAAAA") and clear not in raw
        assert crypto.decrypt(raw) == clear
    assert TokenPair.objects.get(pk=pair.pk).refresh_token == pair.refresh_token


@pytest.mark.django_db
def test_a_stand_in_portal_is_stored_as_its_install_leaves_it(standin, b24):
    portal = PortalFactory.for_standin(b24, users=(1, 7), pair__issued_days_ago=3)
    assert (portal.member_id, portal.domain, portal.protocol) == (b24.member_id, b24.domain, "http")
    assert portal.oauth_server == standin.oauth_url
    assert portal.application_token == b24.application_token
    assert (portal.state, portal.app_status) == (PortalState.INSTALLED, b24.status)
    pairs = list(portal.token_pairs.order_by("user_id"))
    assert [(p.user_id, p.is_background, p.state) for p in pairs] == [
        (1, True, PairState.ACTIVE),
        (7, False, PairState.ACTIVE),
    ]
    for pair in pairs:
        age = timezone.now() - pair.refresh_issued_at
        assert timedelta(days=3) <= age < timedelta(days=3, minutes=1)
        assert pair.access_expires_at - timezone.now() > timedelta(minutes=59)
    for pair in pairs:
        info = requests.get(
            f"{standin.oauth_url}/rest/app.info", params={"auth": pair.access_token}, timeout=5
        )
        assert info.status_code == 200
        assert info.json()["result"]["user_id"] == pair.user_id
        assert info.json()["result"]["install"]["member_id"] == b24.member_id


@pytest.mark.django_db
def test_renewal_log_and_user_factories():
    pair = TokenPairFactory(user_id=7)
    log = RenewalLogFactory(pair=pair)
    assert (log.portal, log.user_id) == (pair.portal, 7)
    staff = UserFactory(staff=True)
    assert staff.is_staff and not staff.is_superuser
    assert staff.check_password(f"pw-{staff.username}")
