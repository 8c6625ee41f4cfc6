"""A victim portal's event-to-handler latency alone, then beside 1 and 3 noisy portals with `--events`
(5,000) waiting events each: one app worker of concurrency `--concurrency` (4), handlers that make one REST
call to the stand-in. Then the victim's renewal-needing request (a staff call with its background pair, whose
access token has expired) alone and under the same load plus a sweep of `--sweep` (5,000) due pairs on the
custody worker. Prints each scenario's latencies (received → handled) and `ratio=` (with / alone), and the
request's status and time.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/noisy_neighbour.py

Needs PostgreSQL (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres) and Redis.
Starts, each in its own process group: an app worker, a custody worker (`--custody-concurrency`, 2), the web
(gunicorn, 2 processes) and the sweep's OAuth server (`--oauth-latency` on every call, 50 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from _scratch import ROOT, OAuthProcess, scratch, store_due_pairs, store_portal

BENCH = Path(__file__).resolve().parent


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _worker(queues: str, concurrency: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return _start(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queues),
            *(
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
            ),
        ],
        env,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000, help="waiting events per noisy portal")
    parser.add_argument("--noisy", default="1,3", help="numbers of noisy portals to try, comma-separated")
    parser.add_argument("--concurrency", type=int, default=4, help="the app worker's")
    parser.add_argument("--custody-concurrency", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5, help="victim events per scenario")
    parser.add_argument(
        "--sweep", type=int, default=5000, help="due pairs the sweep renews in the last scenario"
    )
    parser.add_argument(
        "--oauth-latency", type=float, default=0.05, help="seconds per call, the sweep's OAuth"
    )
    args = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        print("REDIS_URL is required (the broker and the rate governor)")
        return 2
    os.environ["BITRIX24_APPS"] = "_noisy_app"
    os.environ["BITRIX24_RENEW_PER_SWEEP"] = str(args.sweep)  # one sweep hands out every due pair
    sys.path.insert(0, str(BENCH))
    counts = [int(n) for n in args.noisy.split(",")]
    print(f"issuing {args.sweep} grants in the sweep's OAuth server …", flush=True)
    oauth = OAuthProcess(args.oauth_latency, args.sweep)
    children: list[subprocess.Popen[bytes]] = []
    with scratch(also_trust=(oauth.oauth_url,)) as standin:
        from django.contrib.auth.models import User
        from django.utils import timezone
        from rest_framework.authtoken.models import Token

        from config.celery import app
        from events.models import AppEvent, EventSource, EventState
        from events.tasks import handle_event_task
        from portals.models import RenewalLog, RenewalOutcome, TokenPair
        from portals.tasks import sweep_due_pairs

        fakes = [standin.add_portal() for _ in range(1 + max(counts))]
        for fake in fakes:
            fake.seed("crm.deal", 1)
        portals: list[Any] = [store_portal(standin, fake) for fake in fakes]
        victim, noisy = portals[0], portals[1:]
        staff = User.objects.create_superuser("bench", "bench@example.com", "bench-password")
        token = Token.objects.create(user=staff).key
        port = _free_port()
        base = os.environ["CELERY_QUEUE"]
        env = {
            **os.environ,
            "PYTHONPATH": f"{BENCH}:{ROOT}",
            "PORT": str(port),
            "WEB_CONCURRENCY": "2",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        }
        children.append(_worker(f"{base}.app", args.concurrency, env))
        children.append(_worker(f"{base}.custody.now,{base}.custody", args.custody_concurrency, env))
        children.append(
            _start([sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"], env)
        )
        serial = iter(range(10**9))

        def event(portal: object) -> AppEvent:
            n = next(serial)
            return AppEvent(
                portal=portal,
                event="ONCRMDEALADD",
                source=EventSource.ONLINE,
                dedup_key=f"bench|{n}",
                object_id="1",
                ids={"FIELDS.ID": "1"},
                received_at=timezone.now(),
                next_attempt_at=timezone.now() + timezone.timedelta(minutes=10),
            )

        def victim_latency() -> float:
            record = event(victim)
            record.save()
            handle_event_task.apply_async(args=(record.pk,))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = (
                    AppEvent.objects.filter(pk=record.pk, state=EventState.HANDLED)
                    .values_list("finished_at", flat=True)
                    .first()
                )
                if done:
                    return (done - record.received_at).total_seconds()
                time.sleep(0.02)
            return float("inf")

        def renewal_request() -> tuple[int, float, str]:
            """The victim's background access token expired: a staff call with it waits for its renewal
            on the custody worker. (status, seconds, error code)."""
            TokenPair.objects.filter(portal=victim).update(access_expires_at=timezone.now())
            started = time.monotonic()
            answer = requests.post(
                f"http://127.0.0.1:{port}/api/portals/{victim.member_id}/call/",
                json={"method": "profile"},
                headers={"Authorization": f"Token {token}"},
                timeout=120,
            )
            error = "" if answer.ok else answer.json().get("error", answer.text[:80])
            return answer.status_code, time.monotonic() - started, error

        failures = 0
        try:
            deadline = time.monotonic() + 60
            while True:  # the web and the workers are up
                try:
                    requests.get(f"http://127.0.0.1:{port}/livez", timeout=2)
                    break
                except requests.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            time.sleep(4)
            victim_latency()  # warm-up
            alone = [victim_latency() for _ in range(args.samples)]
            base_latency = statistics.median(alone)
            print(
                f"alone: median {base_latency * 1000:.0f} ms  ({', '.join(f'{x * 1000:.0f}' for x in alone)} ms)"
            )
            status, seconds, error = renewal_request()
            print(f"renewal-needing request alone: {status} {error} in {seconds:.2f} s", flush=True)
            failures += status != 200
            for k in counts:
                flood = [event(portal) for portal in noisy[:k] for _ in range(args.events)]
                AppEvent.objects.bulk_create(flood, batch_size=2000)
                ids = list(
                    AppEvent.objects.filter(portal__in=noisy[:k], state=EventState.QUEUED).values_list(
                        "pk", flat=True
                    )
                )
                started = time.monotonic()
                for pk in ids:
                    handle_event_task.apply_async(args=(pk,))
                print(
                    f"{k} noisy: {len(ids)} events queued with their tasks in {time.monotonic() - started:.1f} s",
                    flush=True,
                )
                time.sleep(2)  # the workers are busy with the flood
                with_noise = []
                for _ in range(args.samples):
                    with_noise.append(victim_latency())
                    time.sleep(0.5)
                median = statistics.median(with_noise)
                print(
                    f"{k} noisy: median {median * 1000:.0f} ms  ({', '.join(f'{x * 1000:.0f}' for x in with_noise)} ms); "
                    f"ratio={median / base_latency:.2f}",
                    flush=True,
                )
                if k == counts[-1] and args.sweep:
                    store_due_pairs(oauth.oauth_url, oauth.grants)
                    sweep_due_pairs()  # the beat's task: every due pair handed to the custody queue in batches
                    time.sleep(2)  # the custody worker is busy with the sweep
                    status, seconds, error = renewal_request()
                    renewed = RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count()
                    print(
                        f"renewal-needing request beside {k} noisy portals and a sweep of {args.sweep} pairs "
                        f"({renewed - 1} renewed so far): {status} {error} in {seconds:.2f} s",
                        flush=True,
                    )
                    failures += status != 200
                left = AppEvent.objects.filter(
                    portal__in=noisy[:k], state__in=(EventState.QUEUED, EventState.RUNNING)
                ).count()
                print(f"{k} noisy: noisy events still waiting {left}", flush=True)
                AppEvent.objects.filter(portal__in=noisy[:k]).update(state=EventState.DROPPED)
                app.control.purge()
        finally:
            for child in children:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(30)
            oauth.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
