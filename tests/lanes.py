"""The two test lanes (a pytest plugin, loaded by conftest.py).

The *fast lane* (`bin/test`) starts no process and waits on no real time: a test in it that starts a
subprocess, forks, or sleeps longer than `SLEEP_LIMIT` seconds, in any thread, fails with the place
it did so. The *system lane* (`bin/test --all` adds it) is every test marked ``system``: real workers
and web processes, private database and Redis servers, fault proxies on real time, browsers, the
README walkthrough. A test joins it by the marker, or by asking for a fixture that starts processes
(`SYSTEM_FIXTURES`), so a new test that needs a real process cannot land in the fast lane by accident.

``--lane fast|system|all`` picks the lane; ``all`` (plain ``pytest``) runs both, the guard still
watching every test that is not marked ``system``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The longest real sleep a fast-lane test may make: a yield to another thread, not a wait on time.
SLEEP_LIMIT = 0.05

# Fixtures that start processes, private servers or browsers: a test that asks for one is a system test.
SYSTEM_FIXTURES = frozenset(
    {
        "private_postgres",
        "private_redis",
        "backend_process",
        "browser",
        "browser_page",
    }
)


# What the guard replaces, as they were when this plugin was loaded (before any test patched them).
_REAL = {
    (time, "sleep"): time.sleep,
    (subprocess.Popen, "_execute_child"): subprocess.Popen._execute_child,  # type: ignore[attr-defined]
    (os, "fork"): os.fork,
    (os, "posix_spawn"): os.posix_spawn,
    (os, "posix_spawnp"): os.posix_spawnp,
    (os, "system"): os.system,
}


def step_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this test the real functions back (for a test of the guard itself, which runs a guard of its own)."""
    for (owner, name), real in _REAL.items():
        monkeypatch.setattr(owner, name, real)


class LaneViolation(AssertionError):
    """A fast-lane test started a process or slept on real time."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lane",
        choices=("fast", "system", "all"),
        default="all",
        help="fast: no process, no real waiting (bin/test); system: the tests marked system; all: both",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "system: the system lane (real processes, private servers, browsers, real time); "
        "bin/test --all runs it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
    lane = config.getoption("--lane")
    if lane == "all":
        return
    keep, drop = [], []
    for item in items:
        in_system = item.get_closest_marker("system") is not None
        (keep if in_system == (lane == "system") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


class _Guard:
    """Records what a fast-lane test did that the lane forbids; raises where it happened."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.lock = threading.Lock()

    def violate(self, what: str) -> LaneViolation:
        where = "".join(traceback.format_stack(limit=8)[:-2])
        message = f"{what} in thread {threading.current_thread().name!r}\n{where}"
        with self.lock:
            self.violations.append(message)
        return LaneViolation(f"fast lane: {what} (mark the test `system`, or inject a clock)")


@pytest.fixture(autouse=True)
def _fast_lane_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("system") is not None:
        yield
        return
    guard = _Guard()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if seconds > SLEEP_LIMIT:
            raise guard.violate(f"time.sleep({seconds:g}) is longer than {SLEEP_LIMIT} s")
        real_sleep(seconds)

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise guard.violate(what)

        return refused

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("a subprocess was started"))
    monkeypatch.setattr(os, "fork", refuse("os.fork()"))
    monkeypatch.setattr(os, "posix_spawn", refuse("os.posix_spawn()"))
    monkeypatch.setattr(os, "posix_spawnp", refuse("os.posix_spawnp()"))
    monkeypatch.setattr(os, "system", refuse("os.system()"))
    yield
    if guard.violations:
        report = os.environ.get("BITRIX24_TEST_GUARD_REPORT")
        if report:
            # Survey mode (used to sort tests into lanes): note the test and let it pass or fail on its own.
            with open(report, "a", encoding="utf-8") as out:
                out.write(f"{request.node.nodeid}\t{guard.violations[0].splitlines()[0]}\n")
            return
        if request.node.stash.get(_CALL_FAILED, False):
            return  # the test failed already, with the violation or for its own reason: one report is enough
        pytest.fail(
            "fast lane: this test started a process or waited on real time; mark it `system` or inject "
            "a clock.\n" + "\n".join(guard.violations[:3]),
            pytrace=False,
        )
