"""Admin logins are throttled (django-axes): repeated wrong passwords for one username from one address
lock that pair out; other logins, and the API's token authentication, are unaffected."""

from __future__ import annotations

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/?next=/admin/"


def _login(client: Client, username: str, password: str):
    return client.post(LOGIN, {"username": username, "password": password})


def test_thirty_wrong_passwords_lock_the_login_out(client, settings):
    user = UserFactory(staff=True, superuser=True)
    answers = [_login(client, user.username, f"wrong-{n}").status_code for n in range(30)]
    # Django answers a wrong password with the form again (200) until the limit; then axes refuses.
    assert answers[: settings.AXES_FAILURE_LIMIT - 1] == [200] * (settings.AXES_FAILURE_LIMIT - 1)
    assert set(answers[settings.AXES_FAILURE_LIMIT :]) == {429}
    locked = _login(client, user.username, f"pw-{user.username}")
    assert locked.status_code == 429  # the right password too, while locked out
    assert "_auth_user_id" not in client.session

    # Another address, or another username from this address, is not locked out.
    elsewhere = Client(REMOTE_ADDR="10.1.2.3")
    assert _login(elsewhere, user.username, f"pw-{user.username}").status_code == 302
    other = UserFactory(staff=True)
    assert _login(Client(), other.username, f"pw-{other.username}").status_code == 302


def test_the_lockout_ends_after_the_cool_off(client, settings, time_machine):
    time_machine.move_to(timezone.now(), tick=True)
    user = UserFactory(staff=True)
    for n in range(settings.AXES_FAILURE_LIMIT):
        _login(client, user.username, f"wrong-{n}")
    assert _login(client, user.username, f"pw-{user.username}").status_code == 429
    time_machine.shift(settings.AXES_COOLOFF_TIME.total_seconds() + 60)
    assert _login(client, user.username, f"pw-{user.username}").status_code == 302


def test_a_correct_login_still_works_and_the_api_token_is_unaffected(client):
    user = UserFactory(staff=True, permissions=["portals.view_portal"])
    assert _login(client, user.username, f"pw-{user.username}").status_code == 302
    token = Token.objects.create(user=user)
    api = Client(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert api.get("/api/health/").status_code in (200, 503)
    assert api.get("/api/portals/").status_code == 200
    assert Client(HTTP_AUTHORIZATION="Token wrong").get("/api/portals/").status_code == 401


def test_healthz_tells_details_only_to_staff(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    client.force_login(UserFactory(staff=False))
    assert client.get("/healthz").json() == {"status": "ok"}
    client.force_login(UserFactory(staff=True))
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert set(body) == {"status", "database", "broker", "keys"}
