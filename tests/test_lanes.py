"""The fast lane's guard (tests/lanes.py), tried on planted tests in a pytest run of their own (in this
process: pytester's in-process run starts nothing)."""

from __future__ import annotations

import pytest

from tests import lanes

pytest_plugins = ["pytester"]

PLANTED = """
import subprocess
import threading
import time

import pytest


def test_sleeps():
    time.sleep(0.2)


def test_starts_a_process():
    subprocess.run(["true"], check=True)


def test_sleeps_in_a_thread_whose_error_nobody_sees():
    worker = threading.Thread(target=lambda: time.sleep(1))
    worker.start()
    worker.join()


def test_yields_briefly():
    time.sleep(0.01)


@pytest.mark.system
def test_marked_system_may_wait():
    time.sleep(0.06)
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str) -> pytest.RunResult:
    # This test's own guard steps aside: the planted run's guard is the one under test, and the planted
    # system test must see the real functions.
    lanes.step_aside(monkeypatch)
    pytester.makepyfile(test_planted=PLANTED)
    return pytester.runpytest_inprocess("-p", "tests.lanes", "-p", "no:django", "-q", *args)


def test_the_fast_lane_fails_a_test_that_sleeps_or_starts_a_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, "--lane", "fast")
    outcomes = result.parseoutcomes()
    # The thread's test passes its call and errors at teardown, so pytest counts it as passed and as an error.
    assert (outcomes.get("failed"), outcomes.get("errors"), outcomes.get("passed")) == (2, 1, 2)
    result.stdout.fnmatch_lines(
        [
            "*time.sleep(0.2) is longer than 0.05 s*",
            "*a subprocess was started*",
        ]
    )
    # The thread's sleep raised in the thread, where nobody looked: the guard still fails the test, naming it.
    assert "ERROR test_planted.py::test_sleeps_in_a_thread_whose_error_nobody_sees" in result.stdout.str()
    assert "deselected" in result.stdout.str()  # the system test is not in the fast lane


def test_the_system_lane_runs_only_system_tests_unguarded(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, "--lane", "system")
    assert result.parseoutcomes().get("passed") == 1
    assert result.parseoutcomes().get("deselected") == 4
