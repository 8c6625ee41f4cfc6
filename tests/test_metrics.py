"""Operators' view: /metrics adds up the counters of the web and worker processes and reads portal gauges
from the database, for a scraper with the bearer token only; JSON logs and the error tracker redact tokens.

The main test runs the product as separate processes on one metrics folder of its own: a web process
(`backend_process`) and a Celery worker (`celery_worker`). A renewal is done by the worker, a forged launch
and an install event are posted to the web, an app event is stored by the web and handled by the worker,
and the web's /metrics shows each of them counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from config.celery import app as celery_app
from portals import governor, metrics, phpform, tasks
from portals.masking import fingerprint
from portals.models import PairState, PortalState, RenewalAttempt, RenewalLog, RenewalOutcome, RenewalTrigger
from standin import payloads as bx
from tests.factories import PortalFactory, TokenPairFactory
from tests.processes import celery_worker

ROOT = Path(__file__).resolve().parent.parent
METRICS_TOKEN = "metrics-token-for-tests-0123456789"
TRUST = (
    "BITRIX24_OAUTH_SERVERS",
    "BITRIX24_PORTAL_DOMAINS",
    "BITRIX24_ALLOW_HTTP",
    "BITRIX24_CLIENT_ID",
    "BITRIX24_CLIENT_SECRET",
    "BITRIX24_OAUTH_ATTEMPTS",
    "BITRIX24_OAUTH_BACKOFF",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _wait(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _own(name: str, **labels: str) -> float:
    """This process's own count (the shared folder's total includes other processes and earlier tests)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the web and the worker, counted together ------------------------------------------------------


@pytest.mark.system
@pytest.mark.django_db(transaction=True)
def test_worker_renewal_refused_launch_and_event_are_counted_in_the_webs_scrape(
    standin, b24, installed_portal, child_env, backend_process, tmp_path
):
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = child_env(standin)
    web = backend_process(
        env["DATABASE_URL"],
        env.get("REDIS_URL", ""),
        migrate=False,
        PROMETHEUS_MULTIPROC_DIR=str(folder),
        # The test app's event handlers, in the web (installed as an app author installs theirs) and the worker.
        BITRIX24_APPS="tests.eventapp",
        B24_TEST_EVENTAPP_DIR=str(tmp_path),
        BITRIX24_METRICS_TOKEN=METRICS_TOKEN,
        BITRIX24_TOKEN_KEYS=os.environ["BITRIX24_TOKEN_KEYS"],  # it reads the pairs this test stored
        **{key: env[key] for key in TRUST},
    )
    http = requests.Session()
    http.trust_env = False

    def scrape(authorization: str | None = f"Bearer {METRICS_TOKEN}") -> requests.Response:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return http.get(f"{web.url}/metrics", headers=headers, timeout=30)

    def counted() -> Samples:
        response = scrape()
        assert response.status_code == 200, response.text
        return _samples(response.text)

    # Only the bearer token opens it.
    assert scrape(None).status_code == 401
    assert scrape("Bearer not-the-token").status_code == 401
    assert scrape(f"Token {METRICS_TOKEN}").status_code == 401
    assert scrape(None).headers["WWW-Authenticate"].startswith("Bearer")
    first = counted()
    assert _value(first, "bitrix24_renewals_total", trigger="staff", outcome="renewed") == 0
    assert _value(first, "bitrix24_metrics_database_up") == 1
    assert _value(first, "bitrix24_portals", state="installed") == 1

    # A renewal done by a Celery worker: another process, counting into the same folder.
    pair = installed_portal.token_pairs.get(user_id=1)
    celery_app.control.purge()  # tasks earlier tests queued with no worker to run them
    with celery_worker(
        {**env, "PROMETHEUS_MULTIPROC_DIR": str(folder), "B24_TEST_EVENTAPP_DIR": str(tmp_path)}
    ):
        assert tasks.queue_renewals([pair.pk], trigger=RenewalTrigger.STAFF, force=True) == 1
        _wait(
            lambda: RenewalLog.objects.filter(pair=pair, outcome=RenewalOutcome.RENEWED).exists(),
            "the worker's renewal",
        )
        _wait(
            lambda: _value(counted(), "bitrix24_renewals_total", trigger="staff", outcome="renewed") == 1,
            "the renewal in the web's scrape",
        )
    # An app event: stored by the web, its handler (tests/eventapp) run by a worker on the web's broker.
    app_event = http.post(f"{web.url}/events/", data=_company_added(b24), timeout=30)
    assert app_event.json()["result"] == "queued", app_event.text
    broker = {key: web.env[key] for key in ("CELERY_QUEUE", "DJANGO_VAR_DIR")}
    with celery_worker(
        {**env, **broker, "PROMETHEUS_MULTIPROC_DIR": str(folder), "B24_TEST_EVENTAPP_DIR": str(tmp_path)}
    ):
        _wait(
            lambda: _value(
                counted(), "bitrix24_events_handled_total", event="ONCRMCOMPANYADD", outcome="handled"
            )
            == 1,
            "the handled event in the web's scrape",
        )
    holder = RenewalAttempt.objects.get(pair=pair).holder_pid
    assert holder not in (os.getpid(), web.proc.pid)
    assert (folder / f"counter_{holder}.db").exists()  # the worker's pool process counted it

    # A launch with a forged AUTH_ID: refused by the stand-in's app.info, counted by the web.
    query, body = bx.launch(b24, {"access_token": "f" * 32, "refresh_token": "e" * 32})
    refused = http.post(f"{web.url}/app/", params=query, data=body, timeout=30)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_token"

    # An event Bitrix24 sends, through the event path (/events/): ONAPPINSTALL, verified and handled.
    event = http.post(
        f"{web.url}/events/", data=bx.onappinstall(b24, b24.issue_tokens(1, admin=True)), timeout=30
    )
    assert event.status_code == 200, event.text
    assert event.json()["event"] == "ONAPPINSTALL"

    last = counted()
    assert _value(last, "bitrix24_renewals_total", trigger="staff", outcome="renewed") == 1
    assert _value(last, "bitrix24_inbound_requests_total", kind="launch", status="rejected") == 1
    assert (
        _value(last, "bitrix24_verification_refusals_total", refusal="not_accepted", code="invalid_token")
        == 1
    )
    # The app event and ONAPPINSTALL.
    assert _value(last, "bitrix24_inbound_requests_total", kind="event", status="accepted") == 2
    assert _value(last, "bitrix24_events_handled_total", event="ONCRMCOMPANYADD", outcome="handled") == 1
    assert _value(last, "bitrix24_inbound_requests_total", kind="launch", status="accepted") == 0
    assert (folder / f"counter_{web.proc.pid}.db").exists()
    assert _value(last, "bitrix24_portals", state="installed") == 1


def _company_added(b24) -> list[tuple[str, str]]:
    return phpform.encode(
        {
            "event": "ONCRMCOMPANYADD",
            "data": {"FIELDS": {"ID": "7"}},
            "ts": "1724695689",
            "auth": {
                "domain": b24.domain,
                "member_id": b24.member_id,
                "application_token": b24.application_token,
            },
        }
    )


# --- the endpoint -------------------------------------------------------------------------------------


def _get(client, token: str | None = METRICS_TOKEN):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.get("/metrics", **headers)


def test_without_a_metrics_token_there_is_no_endpoint(client, db, settings):
    settings.BITRIX24_METRICS_TOKEN = ""
    assert _get(client).status_code == 404
    assert _get(client, "").status_code == 404
    settings.BITRIX24_METRICS_TOKEN = METRICS_TOKEN
    assert _get(client, None).status_code == 401
    assert _get(client, METRICS_TOKEN + "x").status_code == 401
    assert _get(client, "ünïcode").status_code == 401
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}").status_code == 405
    answer = _get(client)
    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain")
    openmetrics = client.get(
        "/metrics", HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}", HTTP_ACCEPT="application/openmetrics-text"
    )
    assert openmetrics["Content-Type"].startswith("application/openmetrics-text")


def test_portal_gauges_are_read_from_the_database(client, db, settings):
    settings.BITRIX24_METRICS_TOKEN = METRICS_TOKEN
    PortalFactory(state=PortalState.PENDING)
    PortalFactory(needs_reinstall=True)
    PortalFactory.create_batch(2)
    TokenPairFactory(portal__needs_reinstall=True, state=PairState.LOST)
    samples = _samples(_get(client).content.decode())
    assert _value(samples, "bitrix24_portals", state="installed") == 2
    assert _value(samples, "bitrix24_portals", state="pending") == 1
    assert _value(samples, "bitrix24_portals", state="needs_reinstall") == 2
    assert _value(samples, "bitrix24_portals", state="uninstalled") == 0
    assert _value(samples, "bitrix24_portals_flagged", flag="lost") == 1
    assert _value(samples, "bitrix24_metrics_database_up") == 1


def test_without_the_folder_a_process_reports_its_own_counts(client, db, settings, monkeypatch):
    settings.BITRIX24_METRICS_TOKEN = METRICS_TOKEN
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV)
    assert not metrics.multiprocess()
    metrics.inbound("event", "accepted")
    samples = _samples(_get(client).content.decode())
    assert _value(samples, "bitrix24_inbound_requests_total", kind="event", status="accepted") == _own(
        "bitrix24_inbound_requests_total", kind="event", status="accepted"
    )
    assert any(name == "python_info" for name, _ in samples)  # the in-process registry's own collectors


def test_the_suite_counts_into_the_shared_folder():
    # Set by the settings before prometheus_client was imported (see config/settings.py).
    assert metrics.multiprocess()
    assert Path(os.environ[metrics.MULTIPROC_DIR_ENV]).is_dir()


# --- counters counted in this process ---------------------------------------------------------------


def test_governor_waits_are_counted():
    waits, seconds = _own("bitrix24_governor_waits_total"), _own("bitrix24_governor_wait_seconds_total")
    local = governor.LocalGovernor()
    limit = governor.Limit(rate=50, burst=1)  # one call at a time, 20 ms apart
    assert local.acquire("b24:bucket:metrics-test", limit) == 0
    waited = local.acquire("b24:bucket:metrics-test", limit)
    assert waited > 0
    assert _own("bitrix24_governor_waits_total") == waits + 1
    assert _own("bitrix24_governor_wait_seconds_total") == pytest.approx(seconds + waited)


def test_event_handled_counts_by_event_and_outcome():
    def count(event: str, outcome: str) -> float:
        return _own("bitrix24_events_handled_total", event=event, outcome=outcome)

    before = (count("ONCRMDEALADD", "handled"), count("ONCRMDEALADD", "retry"), count("(invalid)", "other"))
    metrics.event_handled("ONCRMDEALADD", "handled")
    metrics.event_handled("onCrmDealAdd", "retry")
    metrics.event_handled("<script>", "exploded")
    after = (count("ONCRMDEALADD", "handled"), count("ONCRMDEALADD", "retry"), count("(invalid)", "other"))
    assert after == tuple(value + 1 for value in before)


def test_counting_never_fails_the_work_it_counts(monkeypatch, caplog):
    class Broken:
        def labels(self, **labels: str) -> None:
            raise OSError("the metrics folder is gone")

    monkeypatch.setattr(metrics, "RENEWALS", Broken())
    metrics.renewal("beat", "renewed")  # no exception
    assert "Could not count renewal" in caplog.text


# --- logs and the error tracker ---------------------------------------------------------------------

TOKEN = "s3cr3tT0kenValue0123456789abcdef"


def _python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.system
def test_json_log_format_writes_json_lines_without_tokens():
    result = _python(
        f"""
        import logging
        import django

        django.setup()
        log = logging.getLogger("portals.renewal")
        log.warning("refresh refused for refresh_token=%s", {TOKEN!r})
        log.info("launch", extra={{"url": "https://portal.example/app/?AUTH_ID={TOKEN}"}})
        try:
            raise ValueError("bad grant access_token={TOKEN}")
        except ValueError:
            log.exception("renewal failed")
        """,
        DJANGO_LOG_FORMAT="json",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert [line["message"] for line in lines][-3:] == [
        f"refresh refused for refresh_token=<fp:{fingerprint(TOKEN)}>",
        "launch",
        "renewal failed",
    ]
    assert {"time", "level", "logger", "pid"} <= set(lines[-1])
    assert lines[-1]["level"] == "ERROR" and lines[-1]["logger"] == "portals.renewal"
    assert "ValueError: bad grant access_token=<fp:" in lines[-1]["exc_info"]
    assert lines[-2]["url"] == f"https://portal.example/app/?AUTH_ID=<fp:{fingerprint(TOKEN)}>"
    assert TOKEN not in result.stderr


@pytest.mark.system
def test_an_unknown_log_format_is_refused():
    result = _python("import django; django.setup()", DJANGO_LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "DJANGO_LOG_FORMAT='xml' is not plain or json" in result.stderr


@pytest.mark.system
def test_sentry_dsn_starts_the_error_tracker_and_what_it_sends_is_redacted():
    # The settings start the tracker; its transport is replaced before, so nothing leaves the process.
    result = _python(
        f"""
        import json
        import logging

        import django
        import sentry_sdk
        import sentry_sdk.client
        from sentry_sdk.transport import Transport

        sent = []

        class Capture(Transport):
            def capture_envelope(self, envelope):
                sent.extend(item.payload.json for item in envelope.items if item.payload.json)

        sentry_sdk.client.make_transport = Capture
        django.setup()

        from portals.logging import redact_event

        log = logging.getLogger("portals.renewal")
        log.warning("first try with refresh_token=%s", {TOKEN!r})
        try:
            raise RuntimeError("refused: refresh_token={TOKEN}")
        except RuntimeError:
            sentry_sdk.capture_exception()
        log.error("renewal failed: AUTH_ID=%s", {TOKEN!r})
        with sentry_sdk.new_scope() as scope:
            scope.set_extra("headers", {{"X-Bitrix24-Auth": {TOKEN!r}, "Accept": "text/html"}})
            sentry_sdk.capture_message("with a header")
        sentry_sdk.flush()
        client = sentry_sdk.get_client()
        print(json.dumps({{
            "active": client.is_active(),
            "dsn": str(client.dsn),
            "transport": type(client.transport).__name__,
            "pii": client.options["send_default_pii"],
            "bodies": client.options["max_request_body_size"],
            "locals": client.options["include_local_variables"],
            "before_send": client.options["before_send"] is redact_event,
            "integrations": sorted(client.integrations),
            "events": [event for event in sent if event.get("event_id")],
        }}, default=str))
        """,
        SENTRY_DSN="http://key@127.0.0.1:9/1",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["active"] and report["dsn"] == "http://key@127.0.0.1:9/1"
    assert report["transport"] == "Capture"
    assert report["pii"] is False and report["bodies"] == "never" and report["locals"] is False
    assert report["before_send"]
    assert {"django", "celery"} <= set(report["integrations"])
    events = report["events"]
    assert len(events) == 3
    text = json.dumps(events)
    assert TOKEN not in text
    assert f"<fp:{fingerprint(TOKEN)}>" in text
    exception = events[0]["exception"]["values"][-1]
    assert exception["value"] == f"refused: refresh_token=<fp:{fingerprint(TOKEN)}>"
    logged = events[1]["logentry"]
    assert (
        logged["formatted"] == f"renewal failed: AUTH_ID=<fp:{fingerprint(TOKEN)}>" and not logged["params"]
    )
    assert events[2]["extra"]["headers"]["X-Bitrix24-Auth"] == f"<fp:{fingerprint(TOKEN)}>"
    assert events[2]["extra"]["headers"]["Accept"] == "text/html"


@pytest.mark.system
def test_without_sentry_dsn_no_tracker_runs():
    result = _python(
        """
        import django, sentry_sdk
        django.setup()
        print(sentry_sdk.get_client().is_active())
        """,
        SENTRY_DSN="",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_custody_lag_and_uninstall_claims_are_gauges(client, db, settings):
    from datetime import timedelta

    from django.utils import timezone

    from portals.models import AttemptState, RenewalAttempt, WantedAction, WantedKind

    settings.BITRIX24_METRICS_TOKEN = METRICS_TOKEN
    samples = _samples(_get(client).content.decode())
    assert _value(samples, "bitrix24_custody_lag_seconds", what="oldest_due_pair") == 0
    assert _value(samples, "bitrix24_uninstall_claims", state="held") == 0

    overdue = TokenPairFactory(issued_days_ago=25)  # due for the sweep for days already
    RenewalAttempt.objects.create(
        pair=overdue,
        portal_id=overdue.portal_id,
        trigger="beat",
        state=AttemptState.IN_FLIGHT,
        old_fingerprint="x",
        holder_host="gone.example",
        holder_pid=1,
        holder_start="",
        started_at=timezone.now() - timedelta(minutes=10),
        lease_expires_at=timezone.now() - timedelta(minutes=5),
    )
    WantedAction.objects.create(
        kind=WantedKind.CONFIRM_UNINSTALL, portal=overdue.portal, held_at=timezone.now()
    )
    samples = _samples(_get(client).content.decode())
    assert _value(samples, "bitrix24_custody_lag_seconds", what="oldest_due_pair") > 86400
    assert 590 < _value(samples, "bitrix24_custody_lag_seconds", what="oldest_unresolved_attempt") < 700
    assert _value(samples, "bitrix24_uninstall_claims", state="held") == 1
    assert _value(samples, "bitrix24_uninstall_claims", state="open") == 0
