"""The fault tools work end to end, and what /healthz answers while its database or broker is gone.

Every test runs on servers of its own (tests/faults.py): the shared PostgreSQL and Redis the
rest of the suite uses are never stopped. The backend is a real child process (runserver, as
bin/run runs it) with production settings, so what is measured is what a load balancer sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import redis
import requests

from tests.faults import BackendProcess, FaultProxy, PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.system

# docs/urls.md: /healthz answers 503 when the database or the broker does not answer. A load balancer
# gives up on a probe after a few seconds; an answer later than this counts as a hang.
HEALTH_DEADLINE = 5.0

# Loopback only: no HTTP(S)_PROXY from the environment may route these requests elsewhere.
http = requests.Session()
http.trust_env = False


# /healthz names the failing part to staff only: the probe logs in as staff once, while the database answers.
# The backend runs without DJANGO_DEBUG, so its cookies are Secure: over plain HTTP they are sent by hand.
_staff_sessions: dict[str, str] = {}
_PROBE_USER = (
    "from django.contrib.auth import get_user_model; "
    "get_user_model().objects.create_user('probe', password='probe-pw', is_staff=True)"
)


def _staff_session(backend: BackendProcess) -> str:
    session_id = _staff_sessions.get(backend.url)
    if session_id is None:
        backend.manage("shell", "-c", _PROBE_USER)
        login = backend.url + "/admin/login/"
        csrf = http.get(login, timeout=10).cookies["csrftoken"]
        answer = http.post(
            login,
            data={"username": "probe", "password": "probe-pw", "csrfmiddlewaretoken": csrf},
            cookies={"csrftoken": csrf},
            headers={"Referer": login},
            timeout=10,
            allow_redirects=False,
        )
        assert answer.status_code == 302, answer.text[:300]
        session_id = _staff_sessions[backend.url] = answer.cookies["sessionid"]
        http.cookies.clear()
    return session_id


def health(
    backend: BackendProcess, timeout: float = HEALTH_DEADLINE + 5
) -> tuple[int, dict[str, Any], float]:
    session_id = _staff_session(backend)
    started = time.monotonic()
    response = http.get(backend.url + "/healthz", cookies={"sessionid": session_id}, timeout=timeout)
    return response.status_code, response.json(), time.monotonic() - started


def assert_healthy(backend: BackendProcess) -> None:
    status, body, elapsed = health(backend)
    assert (status, body["status"]) == (200, "ok"), body
    assert body == {"status": "ok", "database": "postgresql", "broker": "redis", "keys": "ok"}
    assert elapsed < HEALTH_DEADLINE
    assert http.get(backend.url + "/healthz", timeout=HEALTH_DEADLINE).json() == {"status": "ok"}  # anonymous


def assert_unavailable(backend: BackendProcess, failing: str) -> dict[str, Any]:
    status, body, elapsed = health(backend)
    assert status == 503, (status, body)
    assert body["status"] == "unavailable"
    assert elapsed < HEALTH_DEADLINE, f"/healthz took {elapsed:.1f}s"
    if failing == "database":
        # Without the database nobody can be recognised as staff: the details are in the server log only.
        assert body == {"status": "unavailable"}, body
        return body
    healthy = {"database": "postgresql", "broker": "redis"}
    for part, value in healthy.items():
        if part == failing:
            assert body[part] != value and ": " in body[part], (
                body
            )  # names the error, e.g. "redis: ConnectionError"
        else:
            assert body[part] == value, body
    return body


def assert_degraded(backend: BackendProcess) -> None:
    """The database is away and the spool keeps deliveries for it: still ready for a load balancer."""
    started = time.monotonic()
    response = http.get(backend.url + "/healthz", timeout=HEALTH_DEADLINE + 5)
    assert (response.status_code, response.json()) == (200, {"status": "degraded"})
    assert time.monotonic() - started < HEALTH_DEADLINE


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


BackendFactory = Callable[..., BackendProcess]
ProxyFactory = Callable[..., FaultProxy]


# --- /healthz against private servers -------------------------------------------------------


def test_healthz_redis_stopped_then_restarted(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, backend_process: BackendFactory
) -> None:
    backend = backend_process(private_postgres.url, private_redis.url)
    assert_healthy(backend)

    private_redis.stop()
    body = assert_unavailable(backend, failing="broker")
    assert body["broker"] == "redis: ConnectionError"

    private_redis.start()  # same port: the backend's REDIS_URL is unchanged
    assert_healthy(backend)


def test_healthz_redis_lost_while_request_in_flight(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    fault_proxy: ProxyFactory,
    backend_process: BackendFactory,
) -> None:
    # The proxy holds the backend's Redis traffic for a second, so Redis can be stopped while
    # /healthz is inside its broker check.
    proxy = fault_proxy(private_redis)
    backend = backend_process(private_postgres.url, proxy.url_for(private_redis.url))
    assert_healthy(backend)
    accepted = proxy.accepted

    proxy.delay(1.0)
    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(assert_unavailable, backend, "broker")
        wait_until(lambda: proxy.accepted > accepted and proxy.open_connections > 0, timeout=5)
        private_redis.stop()
        probe.result(timeout=HEALTH_DEADLINE + 5)

    proxy.pass_through()
    private_redis.start()
    assert_healthy(backend)


def test_healthz_redis_not_answering(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    fault_proxy: ProxyFactory,
    backend_process: BackendFactory,
) -> None:
    """A broker that accepts connections and never answers: the probe's own 2 s timeouts bound it."""
    proxy = fault_proxy(private_redis)
    backend = backend_process(private_postgres.url, proxy.url_for(private_redis.url))
    assert_healthy(backend)

    proxy.blackhole()
    body = assert_unavailable(backend, failing="broker")
    assert body["broker"] == "redis: TimeoutError"

    proxy.pass_through()
    assert_healthy(backend)


def test_healthz_postgres_stopped_then_restarted(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, backend_process: BackendFactory
) -> None:
    backend = backend_process(private_postgres.url, private_redis.url)
    assert_healthy(backend)

    private_postgres.stop()
    assert_degraded(backend)

    private_postgres.start()
    assert_healthy(backend)


def test_healthz_postgres_stopped_with_the_spool_full_is_unavailable(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, backend_process: BackendFactory
) -> None:
    """Nowhere to keep a delivery: a load balancer must send Bitrix24's deliveries to another process."""
    backend = backend_process(private_postgres.url, private_redis.url, BITRIX24_SPOOL_MAX_BYTES="0")
    assert_healthy(backend)

    private_postgres.stop()
    assert_unavailable(backend, failing="database")
    event = http.post(
        backend.url + "/events/",
        data={"event": "ONAPPINSTALL", "auth[member_id]": "a" * 32, "auth[access_token]": "b" * 32},
        timeout=10,
    )
    assert event.status_code == 503 and event.headers["Retry-After"], event.text

    private_postgres.start()
    assert_healthy(backend)


def test_healthz_postgres_killed_then_restarted(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, backend_process: BackendFactory
) -> None:
    backend = backend_process(private_postgres.url, private_redis.url)
    assert_healthy(backend)

    private_postgres.kill()
    assert_degraded(backend)

    private_postgres.start()
    # It really was a crash: the restart had to recover.
    assert "not properly shut down" in private_postgres.log.read_text()
    assert_healthy(backend)


def test_healthz_postgres_not_answering(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    fault_proxy: ProxyFactory,
    backend_process: BackendFactory,
) -> None:
    proxy = fault_proxy(private_postgres)
    backend = backend_process(proxy.url_for(private_postgres.url), private_redis.url)
    assert_healthy(backend)

    proxy.blackhole()
    assert_degraded(backend)


def test_events_while_postgres_does_not_answer_wait_for_it_once_a_window_not_each(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    fault_proxy: ProxyFactory,
    backend_process: BackendFactory,
) -> None:
    """A database host that takes connections and never answers: each event on a connection of its own (as
    Bitrix24's queue servers post) waited the connect timeout (5 s) before it went to the spool. Now one
    failure makes the web process skip the database for portals.outage.RETRY_SECONDS; the first event
    after that window asks it again."""
    proxy = fault_proxy(private_postgres)
    backend = backend_process(proxy.url_for(private_postgres.url), private_redis.url)
    assert_healthy(backend)
    proxy.blackhole()

    def post(member_id: str) -> tuple[requests.Response, float]:
        # A connection of its own: a new server thread, with a database connection to make.
        with requests.Session() as fresh:
            fresh.trust_env = False
            started = time.monotonic()
            answer = fresh.post(
                backend.url + "/events/",
                data={"event": "ONAPPINSTALL", "auth[member_id]": member_id, "auth[access_token]": "b" * 32},
                timeout=30,
            )
            return answer, round(time.monotonic() - started, 2)

    waits = []
    for number in range(8):
        answer, waited = post(f"{number:032x}")
        waits.append(waited)
        assert (answer.status_code, answer.json()["result"]) == (200, "spooled"), answer.text
    print("seconds each event waited, the database not answering:", waits)
    # One runserver process: only its first event waits for the connect timeout.
    assert waits[0] >= 4.0 and all(wait < 2.0 for wait in waits[1:]), waits

    # The database back: once the window is over an event is handled with it again, not spooled.
    proxy.pass_through()
    deadline = time.monotonic() + 30
    for number in range(100, 1000):
        answer, waited = post(f"{number:032x}")
        if answer.status_code not in (429, 503) and answer.json().get("result") != "spooled":
            break
        assert time.monotonic() < deadline, "the database was not asked again"
        time.sleep(0.5)
    print("after the window the database answered:", answer.status_code, answer.text[:100])


# --- The proxy in front of Redis and PostgreSQL ---------------------------------------------


def test_proxy_modes_with_redis(private_redis: PrivateRedis, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(private_redis)
    client = redis.Redis.from_url(
        proxy.url_for(private_redis.url), socket_connect_timeout=1.5, socket_timeout=1.5
    )
    assert client.set("key", "value")
    assert client.get("key") == b"value"

    # delay: the request and the answer each wait 0.3 s.
    proxy.delay(0.3)
    started = time.monotonic()
    assert client.ping()
    assert 0.6 <= time.monotonic() - started < 1.5

    # blackhole: nothing comes back; the client's own timeout ends the wait.
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert 1.4 <= time.monotonic() - started < 3

    # pass: the client drops the timed-out connection and reconnects.
    accepted = proxy.accepted
    proxy.pass_through()
    assert client.get("key") == b"value"
    assert proxy.accepted == accepted + 1

    # cut: the open connection is reset, and so is every new one.
    proxy.cut()
    assert proxy.open_connections == 0
    with pytest.raises(redis.ConnectionError, match=r"reset|closed"):
        client.ping()
    with pytest.raises(redis.ConnectionError):
        client.ping()

    proxy.pass_through()
    assert client.get("key") == b"value"


def test_proxy_modes_with_postgres(private_postgres: PrivatePostgres, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(private_postgres)
    url = proxy.url_for(private_postgres.url)
    with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

        proxy.delay(0.2)
        started = time.monotonic()
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert 0.4 <= time.monotonic() - started < 2

        proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 3")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)

    # blackhole: the TCP connection opens but the server never answers the startup packet.
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    assert 1.5 <= time.monotonic() - started < 5

    proxy.pass_through()
    with psycopg.connect(url, connect_timeout=2) as conn:
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_proxy_close_stops_its_threads(private_redis: PrivateRedis) -> None:
    proxy = FaultProxy(private_redis.host, private_redis.port)
    clients = [redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=2) for _ in range(3)]
    for client in clients:
        assert client.ping()
    assert proxy.open_connections == 3
    # Threads blocked on a silent connection must stop too.
    proxy.blackhole()
    proxy.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(f"FaultProxy:{proxy.port}")]
    for client in clients:
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()
