"""Fixtures: the Bitrix24 stand-in on loopback, settings pointing at it, and helpers to post to
the backend over real sockets (pytest-django's live_server)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings as django_settings
from django.db import connection

from portals import clock, registry
from standin import FakePortal, StandIn
from standin import payloads as bx
from tests.eventapp import bitrix24 as eventapp
from tests.faults import (
    BackendProcess,
    FaultProxy,
    PrivatePostgres,
    PrivateRedis,
    postgres_missing_reason,
    redis_missing_reason,
)

# The fast and the system lane, and the guard that keeps the fast lane fast (tests/lanes.py).
pytest_plugins = ["tests.lanes"]


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    with StandIn(client_id="app.test", client_secret="test-secret") as server:
        yield server


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's test database, and before it is dropped, no session left on it: a machine killed whole
    (tests/test_machines.py) leaves its connections open on the server until TCP gives up, and the database
    could not be dropped then; on a shared server every run left one behind. A connection of its own: the
    test that ends the session may have no database access."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    import psycopg

    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as own:
        own.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture
def own_redis_namespace(settings: Any) -> Iterator[str]:
    """Keys of this test's own in Redis (the renewal copies kept for `recover_after_restore`, the spool), gone
    after it: a command that reads every kept copy must not meet another test's, or a previous run's, whose
    pair ids the recreated test database hands out again."""
    namespace = f"test-{secrets.token_hex(4)}"
    settings.CELERY_TASK_DEFAULT_QUEUE = namespace
    yield namespace
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        for key in [*client.scan_iter(match=f"{namespace}:*"), *client.scan_iter(match=f"{{{namespace}:*")]:
            client.delete(key)


@pytest.fixture(autouse=True)
def no_outage_carried_over() -> None:
    """A test that made the database fail must not leave the next one skipping it (portals.outage)."""
    from django.apps import apps

    if apps.ready:
        from portals import outage

        outage.database_answered()


@pytest.fixture(autouse=True)
def bitrix24_settings(settings: Any, standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """Trust the stand-in's OAuth server and its loopback portals, and nothing else. Each test's requests
    come from 127.0.0.1: each test gets budgets of its own for them (portals.verification.BUDGET_KEYS)."""
    from django.apps import apps

    if apps.ready:  # test_standin.py also runs without Django
        from portals import verification

        monkeypatch.setattr(verification, "BUDGET_KEYS", f"b24-test-{secrets.token_hex(4)}")
    settings.BITRIX24_OAUTH_SERVERS = [standin.oauth_url]
    settings.BITRIX24_PORTAL_DOMAINS = ["127.0.0.1:*"]
    settings.BITRIX24_ALLOW_HTTP = True
    settings.BITRIX24_CLIENT_ID = standin.client_id
    settings.BITRIX24_CLIENT_SECRET = standin.client_secret
    standin.oauth_mode = "ok"
    standin.oauth_latency = 0.0
    standin.slow_seconds = 5.0
    standin.release.clear()
    return standin


@pytest.fixture
def b24(standin: StandIn) -> FakePortal:
    """A fresh portal on the stand-in, with the app installed."""
    return standin.add_portal()


@pytest.fixture
def installed_portal(db: None, b24: FakePortal) -> Any:
    """b24 as its install leaves it in the database: the portal row and the installing admin's (user 1)
    background pair, with tokens the stand-in issued. Tests of the install itself post the event instead."""
    # Imported here: the models need Django, and test_standin.py also runs without it (-p no:django).
    from tests.factories import PortalFactory

    return PortalFactory.for_standin(b24)


@pytest.fixture
def fresh_minute() -> Iterator[None]:
    """The test starts at the beginning of a minute (the clock then runs on as usual): the budgets of
    unverified requests count per minute, and a test that crossed into the next one would see them reset."""
    import datetime as dt

    import time_machine

    start = dt.datetime.now(dt.UTC).replace(second=1, microsecond=0) + dt.timedelta(minutes=1)
    with time_machine.travel(start, tick=True):
        yield


@pytest.fixture
def fake_clock() -> Iterator[clock.FakeClock]:
    """The product's waits (backoffs, the rate governor, the sweep's budget) on a clock that moves only when
    slept on: retries happen at once, and the test reads what was slept in `fake_clock.slept`."""
    with clock.using(clock.FakeClock()) as fake:
        assert isinstance(fake, clock.FakeClock)
        yield fake


@pytest.fixture
def staff_user(db: None) -> Any:
    """A staff user (no permissions of its own); password ``pw-<username>``."""
    from tests.factories import UserFactory

    return UserFactory(staff=True)


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test app's handlers (tests/eventapp/bitrix24.py) registered; yields the folder they report to
    (and are steered by)."""
    monkeypatch.setenv("B24_TEST_EVENTAPP_DIR", str(tmp_path))
    with registry.replaced(eventapp.register):
        yield tmp_path


class Backend:
    """The backend as Bitrix24 sees it: a base URL to post forms to."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        return self.http.post(self.url + path, **kwargs)

    def install_event(self, portal: FakePortal, tokens: dict[str, Any] | None = None) -> requests.Response:
        return self.post(
            "/events/", data=bx.onappinstall(portal, tokens or portal.issue_tokens(1, admin=True))
        )

    def launch(self, portal: FakePortal, tokens: dict[str, Any], **kwargs: Any) -> requests.Response:
        query, body = bx.launch(portal, tokens, **kwargs)
        return self.post("/app/", params=query, data=body)

    def install_frame(self, portal: FakePortal, tokens: dict[str, Any]) -> requests.Response:
        query, body = bx.launch(portal, tokens)
        return self.post("/install/", params=query, data=body)


def _child_env(standin: StandIn) -> dict[str, str]:
    """Environment for a child process (a worker, a second renewer) that uses the test database and
    trusts the stand-in, as the test process does."""
    settings_dict = connection.settings_dict
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BITRIX24_OAUTH_SERVERS=standin.oauth_url,
        BITRIX24_PORTAL_DOMAINS="127.0.0.1:*",
        BITRIX24_ALLOW_HTTP="1",
        BITRIX24_CLIENT_ID=standin.client_id,
        BITRIX24_CLIENT_SECRET=standin.client_secret,
        BITRIX24_OAUTH_ATTEMPTS="2",
        BITRIX24_OAUTH_BACKOFF="0.01",
        DJANGO_VAR_DIR=str(django_settings.VAR_DIR),
    )
    if connection.vendor == "postgresql":
        env["DATABASE_URL"] = (
            f"postgres://{settings_dict['USER']}:{settings_dict.get('PASSWORD') or ''}@{settings_dict['HOST']}:"
            f"{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}"
        )
    else:
        env["DATABASE_URL"] = f"sqlite:///{settings_dict['NAME']}"
    return env


@pytest.fixture
def child_env() -> Callable[[StandIn], dict[str, str]]:
    return _child_env


@pytest.fixture
def backend(live_server: Any, transactional_db: None) -> Iterator[Backend]:
    client = Backend(live_server.url)
    yield client
    # Close keep-alive connections, so that no server thread holds a database session at teardown.
    client.http.close()


@pytest.fixture
def redirector() -> Iterator[Any]:
    """A server on loopback that answers every request with a 302 to a chosen Location."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        location = ""
        hits = 0

        def _answer(self) -> None:
            Handler.hits += 1
            self.send_response(302)
            self.send_header("Location", Handler.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, Handler
    server.shutdown()
    server.server_close()


# --- tests that only mean something on PostgreSQL or with Redis -----------------------------------
# The suite runs twice in CI: on PostgreSQL + Redis, and on the embedded defaults (SQLite, the
# filesystem broker). A test marked needs_postgres / needs_redis is skipped with its reason in the
# second pass; BITRIX24_TEST_REQUIRE=postgres,redis (the first pass) turns such a skip into a failure,
# so a CI that lost its services cannot pass by skipping.
def _available(service: str) -> bool:
    if service == "postgres":
        return django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    return bool(django_settings.REDIS_URL)


def pytest_runtest_setup(item: pytest.Item) -> None:
    required = {s.strip() for s in os.environ.get("BITRIX24_TEST_REQUIRE", "").split(",") if s.strip()}
    for service in ("postgres", "redis"):
        marker = item.get_closest_marker(f"needs_{service}")
        if marker is None or _available(service):
            continue
        reason = marker.args[0] if marker.args else f"needs {service}"
        if service in required:
            pytest.fail(f"BITRIX24_TEST_REQUIRE names {service}, which is not configured: {reason}")
        pytest.skip(f"needs {service}: {reason}")


# --- Fault tools (tests/faults.py) ------------------------------------------------------------


def _unavailable(reason: str) -> None:
    """Skip on a machine without the binaries; under CI a skip would hide lost coverage, so fail."""
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI is set: fault tests must run here, not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running PostgreSQL cluster of this test's own (url: a DATABASE_URL), removed afterwards."""
    reason = postgres_missing_reason()
    if reason:
        _unavailable(reason)
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A running redis-server of this test's own (url: a REDIS_URL), stopped afterwards."""
    reason = redis_missing_reason()
    if reason:
        _unavailable(reason)
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: `fault_proxy(target)` starts a FaultProxy in front of a URL, a (host, port) pair or
    a private server; every proxy it made is closed after the test."""
    proxies: list[FaultProxy] = []

    def make(target: Any) -> FaultProxy:
        if isinstance(target, str):
            proxy = FaultProxy.for_url(target)
        elif isinstance(target, tuple):
            proxy = FaultProxy(*target)
        else:
            proxy = FaultProxy(target.host, target.port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def backend_process(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
    """Factory: `backend_process(database_url, redis_url)` migrates that database and starts the
    web process on it as a child; every one it started is stopped after the test."""
    started: list[BackendProcess] = []

    def make(database_url: str, redis_url: str, migrate: bool = True, **env: str) -> BackendProcess:
        backend = BackendProcess(database_url, redis_url, tmp_path / f"backend-{len(started)}", **env)
        started.append(backend)
        if migrate:
            backend.migrate()
        return backend.start()

    yield make
    for backend in started:
        backend.stop()


@pytest.fixture
def renewal_worker(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Renewals that web requests hand to a worker run in a thread of the test process, as a Celery
    worker would run them (the request waits for the result, see portals.renewal.renewed). Yields the
    ids of the pairs handed over."""
    import threading

    from django.db import connection as db_connection

    from portals import renewal
    from portals.tasks import renew_pair_task

    handed: list[int] = []

    def queue(pair_id: int, rejected_fingerprint: str = "") -> bool:
        handed.append(pair_id)

        def work() -> None:
            try:
                renew_pair_task.apply(args=(pair_id, "on_demand", False, rejected_fingerprint))
            finally:
                db_connection.close()

        threading.Thread(target=work, daemon=True).start()
        return True

    monkeypatch.setattr(renewal, "_queue", queue)
    return handed


@pytest.fixture
def wanted_worker() -> Callable[[], list[str]]:
    """`run()` carries out every open wanted action once, in this process, as a Celery worker would
    (uninstall confirmations, status checks, bindings, staff renewals); returns the task results."""
    from portals.models import WantedAction
    from portals.tasks import carry_out_task

    def run() -> list[str]:
        ids = list(WantedAction.objects.filter(done_at=None).order_by("pk").values_list("pk", flat=True))
        return [carry_out_task.apply(args=(pk,)).get() for pk in ids]

    return run
