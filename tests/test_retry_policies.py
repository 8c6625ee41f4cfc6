"""The chokepoint's retry policies, counted where the requests land: the stand-in.

test_renewal.py already counts the refresh policy's attempts against a failing OAuth server, and
test_client.py covers REST timeouts (reads re-sent, writes not, idempotent writes re-sent); this file
covers the rest: inbound verification, error pages and dropped connections on REST calls, refused
connections, and the query-limit policy.
"""

from __future__ import annotations

import socket
import time

import pytest

from portals import client, http, oauth
from portals.client import PortalClient
from portals.models import Portal

pytestmark = pytest.mark.django_db(transaction=True)

MAYBE_CARRIED_OUT = (http.Failure.NO_ANSWER, http.Failure.BAD_ANSWER)


@pytest.fixture
def installed(installed_portal):
    """The portal as its install leaves it (from the factory: no REST call has touched its bucket)."""
    return installed_portal


def _point_at(portal: Portal, host_port: str) -> None:
    Portal.objects.filter(pk=portal.pk).update(domain=host_port)
    portal.refresh_from_db()


def _sent(standin, before: int) -> int:
    return standin.stats["oauth_requests"] - before


# --- the policies ---------------------------------------------------------------------------------


def test_policies_take_their_numbers_from_the_settings(settings):
    settings.BITRIX24_OAUTH_ATTEMPTS = 3
    settings.BITRIX24_OAUTH_BACKOFF = 0.5
    settings.BITRIX24_OAUTH_TIMEOUT = (1.0, 2.0)
    settings.BITRIX24_HTTP_TIMEOUT = (1.5, 7.0)
    settings.BITRIX24_QUERY_LIMIT_RETRIES = 4
    settings.BITRIX24_VERIFY_READ_TIMEOUT = 3.0

    policy = http.refresh_policy()
    assert (policy.attempts, policy.timeout, policy.backoff.base) == (3, (1.0, 2.0), 0.5)
    # A token we were handed is asked about once, with its own read timeout: anyone can send one.
    assert (http.verify_policy().attempts, http.verify_policy().timeout) == (1, (1.0, 3.0))
    for policy in (http.rest_read_policy(), http.rest_write_policy()):
        assert policy.timeout == (1.5, 7.0)
    assert http.query_limit_policy().attempts == 5
    # Three attempts of 1 + 2 s, and the two backoffs at their ceilings (0.5 s, then 1 s).
    assert oauth.worst_case_seconds() == 3 * 3.0 + 0.5 + 1.0


def test_only_writes_refuse_to_resend_what_may_have_been_carried_out():
    resending = (http.refresh_policy(), http.verify_policy(), http.rest_read_policy())
    every_policy = (*resending, http.rest_write_policy(), http.query_limit_policy())
    assert all(policy.retries(http.Failure.NOT_SENT) for policy in every_policy)
    assert all(policy.retries(failure) for policy in resending for failure in MAYBE_CARRIED_OUT)
    assert not any(http.rest_write_policy().retries(failure) for failure in MAYBE_CARRIED_OUT)
    assert http.query_limit_policy().retries(http.Failure.NOT_RUN)


def test_backoff_is_full_jitter_under_its_cap():
    backoff = http.Backoff(base=1.0, cap=3.0)
    assert [backoff.ceiling(n) for n in range(1, 5)] == [1.0, 2.0, 3.0, 3.0]
    delays = [backoff.delay(4) for _ in range(200)]
    assert all(0 <= d <= 3.0 for d in delays)
    assert min(delays) < 1.0  # full jitter reaches down towards zero, not just below the ceiling


# --- inbound verification (app.info on the OAuth server) --------------------------------------------


@pytest.mark.parametrize("mode", ["down", "500", "html"])
def test_verification_is_asked_once_whatever_the_trouble(standin, b24, settings, mode):
    """A forged request while the OAuth server has trouble must not buy several calls (nor minutes)."""
    settings.BITRIX24_OAUTH_ATTEMPTS = 3
    token = b24.issue_tokens(1)["access_token"]
    standin.oauth_mode = mode
    before = standin.stats["oauth_requests"]
    with pytest.raises(oauth.OAuthUnavailable):
        oauth.app_info(standin.oauth_url, token)
    assert _sent(standin, before) == 1


@pytest.mark.system
def test_verification_that_times_out_gives_up_after_its_read_timeout(standin, b24, settings):
    settings.BITRIX24_OAUTH_ATTEMPTS = 2
    settings.BITRIX24_VERIFY_READ_TIMEOUT = 0.2
    standin.oauth_mode = "slow"
    standin.slow_seconds = 0.5
    token = b24.issue_tokens(1)["access_token"]
    before = standin.stats["oauth_requests"]
    started = time.monotonic()
    with pytest.raises(oauth.OAuthUnavailable):
        oauth.app_info(standin.oauth_url, token)
    assert _sent(standin, before) == 1
    assert time.monotonic() - started < 0.5


def test_a_refused_token_is_asked_about_once(standin, settings):
    settings.BITRIX24_OAUTH_ATTEMPTS = 3
    before = standin.stats["oauth_requests"]
    with pytest.raises(oauth.InvalidToken):
        oauth.app_info(standin.oauth_url, "forged-token")
    assert _sent(standin, before) == 1


# --- REST calls -----------------------------------------------------------------------------------
# A portal "moved" onto the OAuth stand-in's address gets its faults: "html" answers 502 with an HTML
# page, "down" drops the connection once the request is in.


@pytest.mark.parametrize(("mode", "error"), [("html", client.NotJSON), ("down", client.TransportError)])
def test_a_read_is_resent_after_an_error_page_or_a_dropped_connection(
    installed, standin, mode, error, fake_clock
):
    _point_at(installed, standin.oauth_domain)
    standin.oauth_mode = mode
    before = standin.stats["oauth_requests"]
    with pytest.raises(error):
        PortalClient(installed).call("crm.contact.get", {"id": 1})
    assert _sent(standin, before) == 3
    assert len(fake_clock.slept) == 2  # a backoff before each re-send, on the injected clock


@pytest.mark.parametrize(("mode", "error"), [("html", client.NotJSON), ("down", client.TransportError)])
def test_a_write_is_not_resent_after_an_error_page_or_a_dropped_connection(installed, standin, mode, error):
    _point_at(installed, standin.oauth_domain)
    standin.oauth_mode = mode
    before = standin.stats["oauth_requests"]
    with pytest.raises(error) as failure:
        PortalClient(installed).call("crm.contact.add", {"fields": {"NAME": "Once"}})
    assert _sent(standin, before) == 1
    if isinstance(failure.value, client.TransportError):
        assert failure.value.maybe_sent
        assert "not re-sent" in str(failure.value)


def test_a_batch_is_resent_only_when_every_command_reads(installed, standin, fake_clock):
    _point_at(installed, standin.oauth_domain)
    standin.oauth_mode = "html"
    reads = {"a": ("crm.contact.get", {"id": 1}), "b": ("profile", {})}
    before = standin.stats["oauth_requests"]
    with pytest.raises(client.NotJSON):
        PortalClient(installed).batch(reads)
    assert _sent(standin, before) == 3
    before = standin.stats["oauth_requests"]
    with pytest.raises(client.NotJSON):
        PortalClient(installed).batch({**reads, "w": ("crm.contact.add", {"fields": {"NAME": "x"}})})
    assert _sent(standin, before) == 1


def test_a_write_whose_connection_was_refused_is_sent_again(installed, monkeypatch, fake_clock):
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _point_at(installed, f"127.0.0.1:{port}")
    tries = []
    real_send = http.send

    def counting_send(*args, **kwargs):
        tries.append(args[1])
        return real_send(*args, **kwargs)

    monkeypatch.setattr(http, "send", counting_send)
    with pytest.raises(client.TransportError) as failure:
        PortalClient(installed).call("crm.contact.add", {"fields": {"NAME": "x"}})
    assert len(tries) == 3
    assert not failure.value.maybe_sent
    assert "not re-sent" not in str(failure.value)


def test_a_write_refused_for_the_rate_limit_is_resent_until_the_policy_gives_up(
    installed, b24, settings, fake_clock
):
    settings.BITRIX24_QUERY_LIMIT_RETRIES = 2
    # We believe in a roomy bucket; the portal's holds one request and barely drains.
    Portal.objects.filter(pk=installed.pk).update(rate_limit=50.0, rate_burst=4)
    installed.refresh_from_db()
    b24.rate, b24.burst = 0.001, 1
    api = PortalClient(installed)
    assert api.call("server.time")
    with pytest.raises(client.QueryLimitExceeded):
        api.call("crm.contact.add", {"fields": {"NAME": "Never"}})
    assert len([c for c in b24.calls if c[1] == "crm.contact.add"]) == 3  # first send and two re-sends
    assert b24.items["crm.contact"] == []  # refused before it ran, every time


def test_deferred_work_backs_off_by_the_one_rule(settings):
    """One doubling rule (portals.clock.backoff) for a failing renewal, a wanted action and an app event."""
    from datetime import timedelta

    from events.services import retry_delay
    from portals import clock

    assert [clock.backoff(n, base=60, cap=6 * 3600) for n in (0, 1, 2, 3, 9, 10)] == [
        60,
        60,
        120,
        240,
        15360,
        21600,
    ]
    settings.BITRIX24_EVENT_RETRY_SECONDS = 30
    assert [retry_delay(n) for n in (1, 2, 3)] == [timedelta(seconds=s) for s in (30, 60, 120)]
    assert http.Backoff(base=0.5, cap=4.0).ceiling(4) == 4.0


@pytest.mark.django_db
def test_a_wanted_action_that_keeps_failing_the_same_way_warns_once(
    installed_portal, settings, caplog, fake_clock
):
    """The stand-in stopped while developing (or a portal down for hours): the bindings sync fails at every
    retry; the log says so once, then quietly (INFO) while the action backs off."""
    import logging

    from portals.models import Portal, WantedAction, WantedKind
    from portals.tasks import carry_out_task
    from tests.faults import free_port

    settings.BITRIX24_PUBLIC_URL = "http://127.0.0.1:8000"
    Portal.objects.filter(pk=installed_portal.pk).update(domain=f"127.0.0.1:{free_port()}")  # nothing listens
    action = WantedAction.objects.create(portal=installed_portal, kind=WantedKind.BIND_EVENTS)
    caplog.set_level(logging.INFO, logger="portals.tasks")
    for _ in range(3):
        assert carry_out_task.apply(args=(action.pk,)).get().startswith("failed: ")
    said = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("Wanted bind_events")
    ]
    assert [level for level, _ in said] == ["WARNING", "INFO", "INFO"], said
    action.refresh_from_db()
    assert action.attempts == 3 and action.done_at is None and action.next_attempt_at is not None
