"""Real processes of the product for tests: a Celery worker as a process manager runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings as django_settings

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def celery_worker(
    env: dict[str, str], concurrency: int = 1, queues: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """`celery worker` (prefork) in its own process group, on the broker `env` names, serving `queues`
    (kinds of config/routing.py, e.g. "custody.now"; all when empty); killed with its pool afterwards if
    the test did not stop it. Its output is printed, so a failing test shows it."""
    base = env.get("CELERY_QUEUE") or django_settings.CELERY_TASK_DEFAULT_QUEUE
    serve = ("-Q", ",".join(f"{base}.{kind}" for kind in queues)) if queues else ()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "--concurrency", str(concurrency)),
            *("--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", *serve),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        print(proc.communicate(timeout=60)[0][-4000:])
