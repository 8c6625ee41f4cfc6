"""Token keys are checked at start: a malformed BITRIX24_TOKEN_KEYS, or keys that cannot decrypt the
stored tokens, is reported by `manage.py check` and by /healthz; answers say "not configured" (503), and
only staff learn which setting."""

from __future__ import annotations

import os
from urllib.parse import urlencode

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from tests.factories import PortalFactory, TokenPairFactory, UserFactory

MALFORMED = ["not-a-fernet-key"]


@pytest.fixture
def other_key() -> list[str]:
    return [Fernet.generate_key().decode()]


def _check_errors() -> str:
    with pytest.raises(SystemCheckError) as raised:
        call_command("check")
    return str(raised.value)


@pytest.mark.django_db
def test_check_reports_a_malformed_key(settings):
    call_command("check")  # the suite's key is fine
    settings.BITRIX24_TOKEN_KEYS = MALFORMED
    errors = _check_errors()
    assert "portals.E001" in errors and "BITRIX24_TOKEN_KEYS" in errors


@pytest.mark.django_db
def test_check_reports_keys_that_cannot_decrypt_a_stored_token(settings, other_key):
    settings.BITRIX24_TOKEN_KEYS = other_key
    call_command("check")  # nothing stored yet: any well-formed key will do
    settings.BITRIX24_TOKEN_KEYS = [Fernet.generate_key().decode()]
    TokenPairFactory()  # encrypted with that key
    settings.BITRIX24_TOKEN_KEYS = other_key
    assert "cannot decrypt the stored tokens" in _check_errors()
    settings.BITRIX24_TOKEN_KEYS = [*other_key, Fernet.generate_key().decode()]
    assert "portals.E001" in _check_errors()


@pytest.mark.django_db
def test_makemigrations_does_not_depend_on_the_keys(settings):
    settings.BITRIX24_TOKEN_KEYS = MALFORMED
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
def test_healthz_is_unavailable_with_bad_keys_and_tells_only_staff(client, settings, other_key):
    TokenPairFactory()
    assert client.get("/healthz").json() == {"status": "ok"}
    settings.BITRIX24_TOKEN_KEYS = other_key
    response = client.get("/healthz")
    assert response.status_code == 503 and response["Retry-After"]
    assert response.json() == {"status": "unavailable"}
    settings.BITRIX24_TOKEN_KEYS = MALFORMED
    assert client.get("/healthz").json() == {"status": "unavailable"}
    client.force_login(UserFactory(staff=True))
    body = client.get("/healthz").json()
    assert body["status"] == "unavailable" and "BITRIX24_TOKEN_KEYS" in body["keys"]
    assert body["database"] and body["broker"]


@pytest.mark.django_db(transaction=True)
def test_staff_api_answers_503_naming_the_setting(client, settings, other_key):
    portal = TokenPairFactory().portal
    staff = UserFactory(staff=True, permissions=["portals.view_portal"])
    client.force_login(staff)
    assert client.get(f"/api/portals/{portal.member_id}/").status_code == 200
    settings.BITRIX24_TOKEN_KEYS = other_key
    response = client.get(f"/api/portals/{portal.member_id}/")
    assert response.status_code == 503, response.content
    assert response.json()["error"] == "not_configured"
    assert "BITRIX24_TOKEN_KEYS" in response.json()["error_description"]
    health = client.get("/api/health/")
    assert health.status_code == 503 and "BITRIX24_TOKEN_KEYS" in health.json()["keys"]
    settings.BITRIX24_TOKEN_KEYS = MALFORMED
    response = client.get(f"/api/portals/{portal.member_id}/")
    assert response.status_code == 503 and "BITRIX24_TOKEN_KEYS" in response.json()["error_description"]


@pytest.mark.django_db(transaction=True)
def test_staff_admin_pages_answer_503_naming_the_setting(admin_client, settings, other_key):
    portal = TokenPairFactory().portal
    settings.BITRIX24_TOKEN_KEYS = other_key
    response = admin_client.get(f"/admin/portals/portal/{portal.pk}/change/")
    assert response.status_code == 503
    assert "BITRIX24_TOKEN_KEYS" in response.json()["error_description"]


@pytest.mark.django_db(transaction=True)
def test_public_answers_say_only_not_configured(client, settings, other_key):
    portal = PortalFactory()
    settings.BITRIX24_TOKEN_KEYS = other_key
    body = {
        "event": "ONCRMDEALADD",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": "a" * 32,
    }
    response = client.generic(
        "POST", "/events/", urlencode(body), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 503
    assert response.json() == {
        "error": "not_configured",
        "error_description": "the backend is not configured",
    }


def test_livez_answers_while_the_database_is_away(client, settings, monkeypatch, tmp_path):
    """Liveness asks nothing: with the database (and the token keys) unusable, /livez still says ok, so a
    process manager does not restart every web process for an outage elsewhere; /healthz (readiness) says
    degraded while the spool can keep deliveries for the database, unavailable once it cannot."""
    from django.db import connection
    from django.db.utils import OperationalError

    def refuse(*args, **kwargs):
        raise OperationalError("the database is away")

    monkeypatch.setattr(connection, "ensure_connection", refuse)
    monkeypatch.setattr(connection, "cursor", refuse)
    settings.VAR_DIR = tmp_path
    assert client.get("/livez").json() == {"status": "ok"}
    assert (client.get("/healthz").status_code, client.get("/healthz").json()) == (
        200,
        {"status": "degraded"},
    )
    settings.BITRIX24_SPOOL_MAX_BYTES = 0
    assert client.get("/healthz").status_code == 503
    assert client.get("/livez").json() == {"status": "ok"}


@pytest.mark.needs_redis("the check asks the Redis at REDIS_URL")
@pytest.mark.parametrize(
    "config, ids",
    [
        ({"appendonly": "no", "save": "", "maxmemory-policy": "noeviction"}, ["portals.W003"]),
        ({"appendonly": "yes", "save": "", "maxmemory-policy": "noeviction"}, []),
        ({"appendonly": "no", "save": "3600 1", "maxmemory-policy": "allkeys-lru"}, ["portals.W004"]),
    ],
)
def test_check_deploy_warns_about_a_redis_that_keeps_nothing_or_evicts(config, ids, monkeypatch):
    """`check --deploy` on this machine's Redis (CI's keeps nothing on disk, on purpose): what Redis answers
    to CONFIG GET decides the warnings."""
    import redis

    from portals import checks

    real = redis.Redis.config_get
    assert real(redis.Redis.from_url(os.environ["REDIS_URL"]), "appendonly")  # it answers CONFIG GET
    monkeypatch.setattr(redis.Redis, "config_get", lambda self, name: {name: config[name]})
    assert [message.id for message in checks.redis_keeps_what_it_holds()] == ids
