"""Tokens are encrypted at rest, rotate to a new key, and never reach logs or the admin in full."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from install.models import InboundRequest
from portals import crypto, masking
from portals.logging import RedactTokensFilter
from portals.models import Portal, TokenPair

pytestmark = pytest.mark.django_db(transaction=True)


def _raw(sql: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_database_holds_no_token_in_clear(backend, b24):
    tokens = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, tokens)
    employee = b24.issue_tokens(2, admin=False)
    backend.launch(b24, employee)

    secrets = [
        tokens["access_token"],
        tokens["refresh_token"],
        employee["access_token"],
        b24.application_token,
    ]
    rows = _raw("SELECT access_token, refresh_token FROM portals_tokenpair")
    rows += _raw("SELECT application_token, '' FROM portals_portal")
    rows += _raw("SELECT query, body FROM install_inboundrequest")
    assert len(rows) >= 3
    everything = repr(rows)
    for secret in secrets:
        assert secret not in everything
    # What is stored is Fernet ciphertext that decrypts to the token.
    stored = _raw("SELECT refresh_token FROM portals_tokenpair WHERE user_id = 1")[0][0]
    assert stored.startswith("gAAAAA")
    assert crypto.decrypt(stored) == tokens["refresh_token"]


def test_rotate_token_keys_re_encrypts_with_the_new_key(backend, b24, settings, capsys, own_redis_namespace):
    tokens = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, tokens)
    old_key = settings.BITRIX24_TOKEN_KEYS[0]
    new_key = Fernet.generate_key().decode()

    settings.BITRIX24_TOKEN_KEYS = [new_key, old_key]
    call_command("rotate_token_keys")
    assert "re-encrypted" in capsys.readouterr().out

    settings.BITRIX24_TOKEN_KEYS = [new_key]  # the old key is gone: everything must still read
    pair = TokenPair.objects.get(portal__member_id=b24.member_id)
    assert pair.refresh_token == tokens["refresh_token"]
    assert Portal.objects.get(member_id=b24.member_id).application_token == b24.application_token
    raw = _raw("SELECT refresh_token FROM portals_tokenpair")[0][0]
    assert Fernet(new_key.encode()).decrypt(raw.encode()).decode() == tokens["refresh_token"]


def test_a_removed_key_gives_a_clear_error(backend, b24, settings):
    backend.install_event(b24)
    settings.BITRIX24_TOKEN_KEYS = [Fernet.generate_key().decode()]
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="rotate_token_keys"):
        TokenPair.objects.get(portal__member_id=b24.member_id)


def test_no_token_appears_in_logs(backend, b24, standin, caplog):
    caplog.set_level(logging.DEBUG)
    tokens = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, tokens)
    employee = b24.issue_tokens(2, admin=False)
    backend.launch(b24, employee)
    backend.install_event(b24, {"access_token": "f" * 32, "refresh_token": "e" * 32})  # refused
    call_command("renew_tokens", "--force")
    standin.oauth_mode = "html"
    with pytest.raises(Exception):  # noqa: B017  (the command fails: the point is what it logged)
        call_command("renew_tokens", "--force")
    pair = TokenPair.objects.get(portal__member_id=b24.member_id, user_id=1)
    text = caplog.text
    assert text  # something was logged at all
    for secret in (
        tokens["access_token"],
        tokens["refresh_token"],
        employee["refresh_token"],
        pair.refresh_token,
        pair.access_token,
        b24.application_token,
        standin.client_secret,
    ):
        assert secret not in text


def test_the_log_filter_redacts_what_a_library_would_print():
    record = logging.LogRecord(
        "urllib3",
        logging.DEBUG,
        __file__,
        1,
        "GET /oauth/token/?grant_type=refresh_token&refresh_token=%s",
        ("a1b2c3d4e5f6a7b8",),
        None,
    )
    RedactTokensFilter().filter(record)
    message = record.getMessage()
    assert "a1b2c3d4e5f6a7b8" not in message
    assert f"refresh_token=<fp:{masking.fingerprint('a1b2c3d4e5f6a7b8')}>" in message


@pytest.mark.parametrize("key", ["AUTH_ID", "auth_id", "Refresh_Id", "REFRESH_ID"])
def test_the_development_servers_access_log_shows_no_token(key):
    """runserver logs each request line, query string included, on its own logger (django.server), which
    Django gives a handler without our filter: a launch opened by GET printed AUTH_ID and REFRESH_ID."""
    secret = "0123456789abcdef0123"
    record = logging.LogRecord(
        "django.server",
        logging.INFO,
        __file__,
        1,
        '"%s" %s %s',
        (f"GET /app/?{key}={secret}&x=1 HTTP/1.1", 200, 5),
        None,
    )
    handlers = logging.getLogger("django.server").handlers
    assert handlers and all(any(isinstance(f, RedactTokensFilter) for f in h.filters) for h in handlers)
    for handler in handlers:
        for log_filter in handler.filters:
            log_filter.filter(record)
    assert secret not in record.getMessage()


def test_admin_pages_show_tokens_masked(backend, b24, admin_client):
    tokens = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, tokens)
    portal = Portal.objects.get(member_id=b24.member_id)
    inbound = InboundRequest.objects.get(member_id=b24.member_id)
    pages = [
        "/admin/portals/portal/",
        f"/admin/portals/portal/{portal.pk}/change/",
        "/admin/install/inboundrequest/",
        f"/admin/install/inboundrequest/{inbound.pk}/change/",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        for secret in (tokens["access_token"], tokens["refresh_token"], b24.application_token):
            assert secret not in html, page
    detail = admin_client.get(f"/admin/portals/portal/{portal.pk}/change/").content.decode()
    assert masking.mask(tokens["refresh_token"]) in detail.replace("&hellip;", "…")
