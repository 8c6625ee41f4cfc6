"""bin/run for real: a stop (Ctrl-C, SIGTERM) waits for the token refresh in flight, then ends every
process quietly within the grace period; and gunicorn's timeouts follow the settings they derive from.

bin/run starts supervisord (config/supervisord.conf) on the test database and the test's broker (the
same DJANGO_VAR_DIR for the filesystem broker, or REDIS_URL and CELERY_QUEUE), with the stand-in as
Bitrix24 and the production OAuth read timeout (60 s), so its grace period is the production one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import requests

from config import celery_app, timeouts
from portals import journal
from portals.models import AttemptState, RenewalAttempt, TokenPair
from portals.tasks import renew_pair_task

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 90  # docs/tokens.md: 5 s connect + 60 s OAuth read timeout + 25 s to store and exit
STARTUP_SECONDS = 240  # bin/setup may have to install requirements.txt into .venv first


def _wait(condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"bin/run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses


def _descendants(root: int) -> dict[int, str]:
    """Every process below `root`, with its identity (so that a reused pid is never mistaken for it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        start = journal.process_start(pid)
        if start is not None:
            found[pid] = start
        todo.extend(children.get(pid, []))
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if journal.process_start(pid) == start]


class Run:
    """bin/run as a terminal runs it: in a process group of its own, output collected as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = int(env["PORT"])
        self.proc = subprocess.Popen(
            ["bin/run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.seen: dict[int, str] = {}  # every process bin/run started, for the cleanup
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def output_when_done(self, timeout: float = 15) -> str:
        """The whole output once every process that held the pipe has ended: the last lines supervisord
        prints as it exits may still be in the pipe when the processes are gone."""
        self._reader.join(timeout)
        return self.output

    def processes(self) -> dict[int, str]:
        found = _descendants(self.proc.pid)
        self.seen.update(found)
        return found

    def healthy(self) -> bool:
        self.processes()
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILL whatever is left: bin/run's group and each program's (supervisord makes one per program)."""
        for pid in _alive(self.seen):
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


@contextmanager
def _bin_run(standin, child_env) -> Iterator[Run]:
    env = {
        **child_env(standin),
        "PORT": str(_free_port()),
        "CELERY_CONCURRENCY": "2",
        # The production figure, so that the grace period is the production one (tests.settings' is 5 s).
        "BITRIX24_OAUTH_READ_TIMEOUT": "60",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DJANGO_DEBUG", None)  # bin/run turns it on, as for anyone who runs it
    env.pop("BITRIX24_CONNECT_TIMEOUT", None)
    celery_app.control.purge()  # tasks earlier tests queued with no worker to run them
    run = Run(env)
    try:
        _wait(run.healthy, STARTUP_SECONDS, "/healthz to answer 200", run.proc)
        yield run
    finally:
        run.kill()
        print(run.output[-8000:])  # shown when a test fails


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_of_bin_run_finishes_the_refresh_in_flight_and_ends_every_process(
    signum, installed_portal, b24, standin, child_env
):
    pair = installed_portal.token_pairs.get(user_id=1)
    old_refresh = pair.refresh_token
    with _bin_run(standin, child_env) as run:
        standin.oauth_latency = 8.0
        requests_before = standin.stats["oauth_requests"]
        renew_pair_task.apply_async(args=(pair.pk, "staff", True))
        _wait(
            lambda: RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).exists(),
            60,
            "the journaled attempt",
            run.proc,
        )
        _wait(lambda: standin.stats["oauth_requests"] > requests_before, 30, "the refresh request", run.proc)
        processes = run.processes()
        assert len(processes) >= 5, processes  # web, beat, the two workers and their pool processes

        os.killpg(run.proc.pid, signum)  # as the terminal does on Ctrl-C: to bin/run's process group
        stopped = time.monotonic()
        run.proc.wait(timeout=GRACE_SECONDS + 30)
        _wait(lambda: not _alive(processes), 10, "every process bin/run started to end")
        took = time.monotonic() - stopped
        output = run.output_when_done()
        print(f"{signal.Signals(signum).name}: every process ended {took:.1f} s after the signal")

    assert took < GRACE_SECONDS, output
    assert run.proc.returncode == 0, output
    assert "Traceback" not in output
    # The worker's pool process got the stop while refreshing, held it and started no retry.
    assert "SIGINT received: finishing the token refresh in flight first" in output
    assert standin.stats["oauth_requests"] == requests_before + 1
    for worker in ("worker-custody", "worker-app"):
        assert re.search(rf"stopped: {worker} \(exit status \d+\)", output), output  # not killed
    pair = TokenPair.objects.get(pk=pair.pk)
    assert pair.refresh_token != old_refresh
    assert pair.refresh_token in standin._refresh  # the stored pair is the live one
    assert RenewalAttempt.objects.get(pair=pair).state == AttemptState.STORED


def _gunicorn_settings(**env: str) -> dict[str, str]:
    """The settings gunicorn itself reads from config/gunicorn.py under this environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BITRIX24_", "GUNICORN_"))}
    environment.update(env)
    printed = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "--print-config", "config.wsgi"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    return dict(
        (name.strip(), value.strip())
        for name, value in (line.split("=", 1) for line in printed.stdout.splitlines() if "=" in line)
    )


def test_gunicorn_timeouts_follow_the_token_wait_and_the_oauth_timeouts():
    default = _gunicorn_settings(PORT="8123", WEB_CONCURRENCY="3")
    assert default["bind"] == "['0.0.0.0:8123']"
    assert default["workers"] == "3"
    assert default["worker_class"] == "sync"
    assert int(default["timeout"]) == timeouts.WEB_TOKEN_WAIT_DEFAULT + 20 == 30
    assert int(default["graceful_timeout"]) == GRACE_SECONDS

    longer = _gunicorn_settings(BITRIX24_WEB_TOKEN_WAIT_SECONDS="45", BITRIX24_OAUTH_READ_TIMEOUT="30")
    assert int(longer["timeout"]) == 65  # the wait, then the request's own work
    assert int(longer["graceful_timeout"]) == 5 + 30 + 25  # one OAuth attempt, then storing
    assert int(longer["workers"]) >= 3  # 2 × cores + 1 without WEB_CONCURRENCY
