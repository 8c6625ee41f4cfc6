"""A victim portal's event-to-handler latency alone, then beside 1 and 3 noisy portals with `--events`
(5,000) waiting events each: one app worker of concurrency `--concurrency` (4), handlers that make one REST
call to the stand-in. Prints each scenario's latencies (received → handled) and `ratio=` (with / alone).

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/noisy_neighbour.py

Needs PostgreSQL (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres) and Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _scratch import ROOT, scratch, store_portal

BENCH = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000, help="waiting events per noisy portal")
    parser.add_argument("--noisy", default="1,3", help="numbers of noisy portals to try, comma-separated")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--samples", type=int, default=5, help="victim events per scenario")
    args = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        print("REDIS_URL is required (the broker and the rate governor)")
        return 2
    os.environ["BITRIX24_APPS"] = "_noisy_app"
    sys.path.insert(0, str(BENCH))
    with scratch() as standin:
        from django.utils import timezone

        from config.celery import app
        from events.models import AppEvent, EventSource, EventState
        from events.tasks import handle_event_task

        fakes = [standin.add_portal() for _ in range(1 + max(int(n) for n in args.noisy.split(",")))]
        for fake in fakes:
            fake.seed("crm.deal", 1)
        portals = [store_portal(standin, fake) for fake in fakes]
        victim, noisy = portals[0], portals[1:]
        env = {**os.environ, "PYTHONPATH": f"{BENCH}:{ROOT}"}
        queue = f"{os.environ['CELERY_QUEUE']}.app"
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                queue,
                "--concurrency",
                str(args.concurrency),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
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

        try:
            time.sleep(6)  # the worker and its pool are up
            victim_latency()  # warm-up
            alone = [victim_latency() for _ in range(args.samples)]
            base = statistics.median(alone)
            print(f"alone: median {base * 1000:.0f} ms  ({', '.join(f'{x * 1000:.0f}' for x in alone)} ms)")
            for k in [int(n) for n in args.noisy.split(",")]:
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
                left = AppEvent.objects.filter(
                    portal__in=noisy[:k], state__in=(EventState.QUEUED, EventState.RUNNING)
                ).count()
                median = statistics.median(with_noise)
                print(
                    f"{k} noisy: median {median * 1000:.0f} ms  ({', '.join(f'{x * 1000:.0f}' for x in with_noise)} ms); "
                    f"noisy events still waiting {left}; ratio={median / base:.2f}",
                    flush=True,
                )
                AppEvent.objects.filter(portal__in=noisy[:k]).update(state=EventState.DROPPED)
                app.control.purge()
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
