"""The licence comes from the portal's own app.info, read with a token at hand: a launch on the stand-in
writes the status, the plan and whether payment expired, staff see them, and nothing refreshes a token
for it."""

from __future__ import annotations

import pytest
from django.urls import reverse

from portals import licence
from portals.models import Portal, TokenPair

pytestmark = pytest.mark.django_db(transaction=True)


def _licence_reads(portal) -> int:
    return sum(1 for _, method, _ in portal.calls if method == "app.info")


def test_a_launch_writes_the_licence_the_portal_reports_and_staff_see_it(
    backend, b24, installed_portal, admin_client
):
    b24.status, b24.payment_required = "T", True  # a trial whose payment ran out
    expected = b24._app_info()["LICENSE"]
    assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 200
    portal = Portal.objects.get(pk=installed_portal.pk)
    assert (portal.app_status, portal.payment_expired, portal.license) == ("T", True, expected)
    assert portal.licence_checked_at is not None

    # Within the hour a launch asks nobody about it.
    reads = _licence_reads(b24)
    assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 200
    assert _licence_reads(b24) == reads

    page = admin_client.get(reverse("admin:portals_portal_change", args=[portal.pk])).content.decode()
    assert expected in page and "Trial" in page
    dashboard = admin_client.get(reverse("admin_dashboard")).content.decode()
    assert 'id="dash-licences"' in dashboard and "Payment expired" in dashboard


def test_the_licence_is_never_a_reason_to_refresh_a_token(b24, installed_portal, standin):
    """ONAPPPAYMENT's check with an expired stored token: nothing is read, and no refresh is made for it."""
    from datetime import timedelta

    from django.utils import timezone

    from portals import services

    TokenPair.objects.filter(portal=installed_portal).update(
        access_expires_at=timezone.now() - timedelta(minutes=1)
    )
    refreshes = standin.stats["refresh_ok"]
    assert services.check_app_status(portal=installed_portal) is None
    assert standin.stats["refresh_ok"] == refreshes
    assert _licence_reads(b24) == 0


def test_an_answer_without_the_fields_is_unknown_not_guessed():
    assert licence.Licence.from_answer(
        {"STATUS": "X", "PAYMENT_EXPIRED": "maybe", "DAYS": "soon"}
    ) == licence.Licence(status="", license="", payment_expired=None, days=None)
    assert licence.Licence.from_answer(
        {"STATUS": "p", "PAYMENT_EXPIRED": "N", "DAYS": 12, "LICENSE": "ru_pro"}
    ) == (licence.Licence(status="P", license="ru_pro", payment_expired=False, days=12))


def test_a_busy_portal_is_not_waited_for_to_read_the_licence(b24, installed_portal):
    """Beside a launch the licence is a nicety: with the portal's bucket full it is left for the next token."""
    from portals import governor

    limit = governor.limit_for(installed_portal)
    governor.governor().fill(governor.bucket_key(b24.member_id), limit)  # the portal said its bucket is full
    token = b24.issue_tokens(1, admin=True)["access_token"]
    assert licence.read(installed_portal, access_token=token) is None  # and no sleep (the fast lane's guard)
    assert _licence_reads(b24) == 0
    assert Portal.objects.get(pk=installed_portal.pk).licence_checked_at is None
