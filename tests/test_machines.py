"""The product on two machines sharing PostgreSQL and Redis (tests/machines.py: network namespaces on a
bridge, each machine's processes in PID and UTS namespaces of their own). Both machines have the same host
name, as containers with host networking on two hosts do.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from standin import FakePortal, StandIn
from standin import payloads as bx
from tests import machines
from tests.faults import PrivatePostgres, PrivateRedis
from tests.processes import seed_pairs

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture
def network() -> Iterator[machines.Network]:
    reason = machines.missing_reason()
    if reason:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} (CI is set: the multi-machine tests must run here)")
        pytest.skip(reason)
    with machines.Network() as net:
        yield net


@pytest.fixture
def shared(network: machines.Network) -> Iterator[tuple[PrivatePostgres, PrivateRedis, StandIn]]:
    """PostgreSQL, Redis and the stand-in on the bridge, where every machine reaches them."""
    with (
        PrivatePostgres(also_listen=network.gateway) as postgres,
        PrivateRedis(also_listen=network.gateway) as redis_server,
        StandIn(client_id="app.test", client_secret="test-secret", host=network.gateway) as standin,
    ):
        yield postgres, redis_server, standin


def _env(
    child_env: Any,
    standin: StandIn,
    postgres: PrivatePostgres,
    redis_server: PrivateRedis,
    tmp: Path,
    host: str,
) -> dict[str, str]:
    gateway = standin.host
    env = child_env(standin)
    env.update(
        DATABASE_URL=f"postgres://postgres@{gateway}:{postgres.port}/{postgres.dbname}",
        REDIS_URL=f"redis://{gateway}:{redis_server.port}/0",
        CELERY_QUEUE=f"machines-{tmp.name}"[:50],
        BITRIX24_PORTAL_DOMAINS=f"{gateway}:*",
        DJANGO_VAR_DIR=str(tmp / host),  # each machine its own disk
        DATABASE_CONN_MAX_AGE="0",
        BITRIX24_OAUTH_ATTEMPTS="1",
        BITRIX24_CONNECT_TIMEOUT="1",
        BITRIX24_OAUTH_READ_TIMEOUT="6",
        BITRIX24_STORE_RETRY_SECONDS="5",
        NO_PROXY="*",
    )
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(key, None)
    return env


def _attempts(postgres: PrivatePostgres) -> list[tuple[str, Any, str]]:
    with psycopg.connect(postgres.url) as conn:
        return list(
            conn.execute("SELECT state, lease_expires_at, note FROM portals_renewalattempt ORDER BY id")
        )


def test_a_machine_killed_whole_mid_refresh_is_resolved_by_its_lease_alone(
    shared, network, child_env, tmp_path
):
    """Machine A renews a pair and dies whole (every process at once) while its refresh is in flight.
    Machine B, with the same host name, never takes A's live attempt for a dead one (A's process ids mean
    nothing on B), and resolves it once the lease has ended: the pair is flagged lost with its cause
    (the OAuth server used the token), and renew_tokens exits 1 naming it."""
    postgres, redis_server, standin = shared
    a, b = network.host("a", hostname="app"), network.host("b", hostname="app")
    loopback = {
        **_env(child_env, standin, postgres, redis_server, tmp_path, "seed"),
        "DATABASE_URL": postgres.url,
    }
    seed_pairs(standin, 1, loopback)
    env_a = _env(child_env, standin, postgres, redis_server, tmp_path, "a")
    env_b = _env(child_env, standin, postgres, redis_server, tmp_path, "b")

    standin.oauth_latency = 4.0  # the refresh is in flight for 4 s
    before = standin.stats["oauth_requests"]
    a.spawn([PYTHON, "manage.py", "renew_tokens", "--force"], env=env_a, cwd=ROOT, log=tmp_path / "a.log")
    deadline = time.monotonic() + 60
    while not (standin.stats["oauth_requests"] > before and _attempts(postgres)):
        assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()
        time.sleep(0.05)

    alive = b.run([PYTHON, "manage.py", "renew_tokens", "--force"], env=env_b, cwd=ROOT)
    print("B while A renews:", alive.stdout, alive.stderr)
    assert [state for state, *_ in _attempts(postgres)] == ["in_flight"]
    assert standin.stats["oauth_requests"] == before + 1  # B sent nothing

    a.kill_all()  # a power cut: every process of machine A at once
    killed = time.monotonic()
    dead = b.run([PYTHON, "manage.py", "renew_tokens", "--force"], env=env_b, cwd=ROOT)
    assert [state for state, *_ in _attempts(postgres)] == ["in_flight"], dead.stdout + dead.stderr
    ((_, lease, _),) = _attempts(postgres)
    time.sleep(max(0.0, lease.timestamp() - time.time()) + 1)

    resolved = b.run([PYTHON, "manage.py", "renew_tokens", "--force"], env=env_b, cwd=ROOT)
    took = time.monotonic() - killed
    print(f"B after A's lease ({took:.1f} s after the kill):", resolved.stdout, resolved.stderr)
    attempts = _attempts(postgres)
    assert attempts[0][0] == "interrupted", attempts
    assert resolved.returncode == 1
    with psycopg.connect(postgres.url) as conn:
        ((state, error),) = conn.execute("SELECT state, last_error FROM portals_tokenpair")
    assert state in ("lost", "dead") and error, (state, error)  # flagged, with its cause: never silent


def _web(host: machines.Host, env: dict[str, str], log: Path) -> Any:
    return host.spawn(
        [
            PYTHON,
            "-m",
            "gunicorn",
            "-c",
            "config/gunicorn.py",
            "--bind",
            f"{host.address}:8000",
            "--workers",
            "2",
            "config.wsgi",
        ],
        env={**env, "DJANGO_ALLOWED_HOSTS": "*"},
        cwd=ROOT,
        log=log,
    )


def _wait_up(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    http = requests.Session()
    http.trust_env = False
    while True:
        try:
            if http.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or still loading the application
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.2)


def test_web_restarted_one_machine_at_a_time_loses_no_launch_and_no_event(
    shared, network, child_env, tmp_path
):
    """Both machines run the web (gunicorn) and a worker; a round-robin client (as a load balancer that
    tries the next backend when one refuses the connection) sends launches and events without pause while
    each machine's web is stopped politely (SIGTERM) and started again, one after the other. No request
    fails, and every event is handled exactly once by one of the machines' workers."""
    postgres, redis_server, standin = shared
    a, b = network.host("a", hostname="app"), network.host("b", hostname="app")
    handled = tmp_path / "handled"
    handled.mkdir()
    envs = {}
    for host in (a, b):
        envs[host.netns] = {
            **_env(child_env, standin, postgres, redis_server, tmp_path, host.netns),
            "B24_TEST_EVENTAPP_DIR": str(handled),
            "B24_TEST_MACHINE": host.netns,
        }
    fake: FakePortal = standin.add_portal()
    tokens = fake.issue_tokens(1, admin=True)
    migrate = a.run([PYTHON, "manage.py", "migrate", "-v0"], env=envs[a.netns], cwd=ROOT)
    assert migrate.returncode == 0, migrate.stderr
    webs = {host.netns: _web(host, envs[host.netns], tmp_path / f"web-{host.netns}.log") for host in (a, b)}
    for host in (a, b):
        queue = envs[host.netns]["CELERY_QUEUE"]
        # Both kinds of worker on each machine, as production runs them (docs/production.md).
        for kind, queues in (
            ("custody", f"{queue}.custody.now,{queue}.custody,{queue}"),
            ("app", f"{queue}.app"),
        ):
            host.spawn(
                [
                    *(PYTHON, "-m", "celery", "-A", "config", "worker", "--concurrency", "1", "-Q", queues),
                    *("--without-gossip", "--without-mingle", "-n", f"{kind}@{host.netns}"),
                ],
                env=envs[host.netns],
                cwd=ROOT,
                log=tmp_path / f"worker-{kind}-{host.netns}.log",
            )
        _wait_up(f"http://{host.address}:8000")
    urls = [f"http://{host.address}:8000" for host in (a, b)]
    http = requests.Session()
    http.trust_env = False
    install = http.post(urls[0] + "/events/", data=bx.onappinstall(fake, tokens), timeout=30)
    assert install.status_code == 200, install.text

    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def client() -> None:
        turn, number = 0, 0
        while not stop.is_set():
            number += 1
            params: dict[str, Any] = {}
            if number % 2:
                method = "/app/"
                params, data = bx.launch(fake, fake.issue_tokens(1, admin=True))
            else:
                method, data = (
                    "/events/",
                    {
                        "event": "ONCRMCOMPANYADD",
                        "data[FIELDS][ID]": str(number),
                        "ts": str(number),
                        "auth[member_id]": fake.member_id,
                        "auth[domain]": fake.domain,
                        "auth[application_token]": fake.application_token,
                    },
                )
            for attempt in range(len(urls)):
                url = urls[(turn + attempt) % len(urls)]
                try:
                    answer = http.post(url + method, params=params, data=data, timeout=30)
                except requests.ConnectionError:
                    continue  # refused: this backend is restarting, the next one gets it
                except requests.Timeout:
                    results.append((method, -1))  # no answer in 30 s: it may have been handled, a failure
                    break
                results.append((method, answer.status_code))
                break
            else:
                results.append((method, 0))
            turn += 1

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(2)
        for host in (a, b):
            web = webs[host.netns]
            # SIGTERM to gunicorn's master (the machine's first process, under `unshare`): it stops
            # accepting and finishes the requests it has.
            master = int(Path(f"/proc/{web.pid}/task/{web.pid}/children").read_text().split()[0])
            os.kill(master, signal.SIGTERM)
            web.wait(timeout=60)
            time.sleep(1)  # requests flow to the other machine alone
            webs[host.netns] = _web(host, envs[host.netns], tmp_path / f"web-{host.netns}.log")
            _wait_up(f"http://{host.address}:8000")
            time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=60)
    statuses = sorted({(m, s) for m, s in results})
    events = sum(1 for m, _ in results if m == "/events/")
    print(f"{len(results)} requests during two restarts: {statuses}")
    assert results and all(status == 200 for _, status in results), statuses

    path = handled / "handled.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= events:
            break
        time.sleep(0.5)
    ids = sorted(int(line["id"]) for line in lines)
    assert len(ids) == events and len(set(ids)) == events  # each event handled, once
    by_machine = {machine: sum(1 for line in lines if line["machine"] == machine) for machine in envs}
    print("events handled per machine:", by_machine)
