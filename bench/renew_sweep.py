"""Benchmark: a beat sweep renewing N portals through a real Celery worker against the stand-in.

    .venv/bin/python bench/renew_sweep.py --portals 2000 --latency 0.05 --concurrency 8
    .venv/bin/python bench/renew_sweep.py --portals 100000 --latency 0 --concurrency 8 --no-floor

Uses a scratch PostgreSQL database (on BENCH_DATABASE_URL's server, default
postgres://postgres@127.0.0.1:5432) and REDIS_URL as the broker when set (the filesystem broker
otherwise); starts the stand-in's OAuth server in its own process with the given latency on every
call, stores N portals whose refresh tokens are due, starts `celery worker` and first measures the
floor: tasks that only make the same OAuth calls, in the same batches (no database, no encryption).
Then renews `--warmup` pairs, so that every pool process has renewed (its memory before that is printed
too), stores the N due pairs, runs the sweep in this process (its CPU time is measured) and waits until
every pair is renewed, sampling the worker's memory (every process of its group). Prints the wall times beside the ideal
N x latency / concurrency, and ends with `ratio=<sweep wall / ideal>` (without latency: against the
floor). Not a test: the figures depend on the machine; compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _scratch import ROOT, OAuthProcess, group_cpu_seconds, scratch, store_due_pairs


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in a process group, in MiB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--portals", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every OAuth call")
    parser.add_argument("--concurrency", type=int, default=8, help="worker processes")
    parser.add_argument("--no-floor", action="store_true", help="skip the no-op floor")
    parser.add_argument(
        "--warmup",
        type=int,
        default=400,
        help="pairs renewed before the measured sweep, so every pool process has renewed once",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    n = args.portals
    os.environ["BITRIX24_RENEW_PER_SWEEP"] = str(max(n, args.warmup))  # one sweep hands out every due pair
    floor_n = 0 if args.no_floor else n
    warm_n = args.warmup
    print(f"issuing {warm_n + n + floor_n} grants in the OAuth server's process …", flush=True)
    oauth = OAuthProcess(args.latency, warm_n + n + floor_n)

    with scratch(oauth=oauth):
        from django.conf import settings

        from config.celery import app
        from portals.models import RenewalLog, RenewalOutcome, TokenPair
        from portals.selectors import due_pairs
        from portals.tasks import sweep_due_pairs

        grants = oauth.grants[warm_n : warm_n + n]
        spare = oauth.grants[warm_n + n :]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}"}
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "_floor", "worker"),
                *("--concurrency", str(args.concurrency), "--pool", "prefork", "--loglevel", "WARNING"),
                *("--without-gossip", "--without-mingle"),
            ],
            cwd=ROOT / "bench",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        batch = settings.BITRIX24_RENEW_BATCH
        floor_wall = None
        try:
            time.sleep(6)  # every worker process is up before the clock starts
            if floor_n:
                before = oauth.stats["refresh_ok"]
                started = time.monotonic()
                tokens = [g["refresh_token"] for g in spare]
                for i in range(0, len(tokens), batch):
                    app.send_task("bench.floor", args=(oauth.oauth_url, tokens[i : i + batch]))
                while (
                    oauth.stats["refresh_ok"] - before < floor_n and time.monotonic() - started < args.timeout
                ):
                    time.sleep(0.2)
                floor_wall = time.monotonic() - started
            rss_cold = group_rss_mib(worker.pid)
            if warm_n:
                print(f"warming up: renewing {warm_n} pairs …", flush=True)
                store_due_pairs(oauth.oauth_url, oauth.grants[:warm_n])
                warm_before = oauth.stats["refresh_ok"]
                sweep_due_pairs()
                while oauth.stats["refresh_ok"] - warm_before < warm_n:
                    time.sleep(0.2)
                while RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count() < warm_n:
                    time.sleep(0.2)
            print(f"storing {n} portals whose refresh tokens are due …", flush=True)
            store_due_pairs(oauth.oauth_url, grants)
            warm_renewed = RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count()
            worker_cpu = group_cpu_seconds(worker.pid)
            rss_before = group_rss_mib(worker.pid)
            rss_peak = rss_before
            ok_before = oauth.stats["refresh_ok"]
            started = time.monotonic()
            cpu = time.process_time()
            sweep_due_pairs()  # the beat's task, run here: its CPU is this process's
            sweep_cpu = time.process_time() - cpu
            sweep_wall = time.monotonic() - started
            done = 0
            while time.monotonic() - started < args.timeout and done < n:
                time.sleep(0.5)
                rss_peak = max(rss_peak, group_rss_mib(worker.pid))
                done = oauth.stats["refresh_ok"] - ok_before
            while (
                RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count() - warm_renewed < done
                and time.monotonic() - started < args.timeout
            ):
                time.sleep(0.2)  # the last answers' stores
            wall = time.monotonic() - started
            worker_cpu = group_cpu_seconds(worker.pid) - worker_cpu
            renewed = RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count() - warm_renewed
            left = due_pairs().count() + TokenPair.objects.filter(last_renewed_at__isnull=True).count()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
            app.control.purge()
        stats = oauth.stats
        ideal = n * args.latency / args.concurrency
        broker = "redis" if os.environ.get("REDIS_URL") else "filesystem"
        print()
        print(
            f"worker                  prefork, concurrency {args.concurrency}, prefetch 1, acks late, broker {broker}"
        )
        print(f"batches                 {batch} pairs a task; OAuth server in its own process")
        print(f"OAuth latency           {args.latency * 1000:.0f} ms per call")
        print(f"portals renewed         {renewed} of {n}; left unrenewed {left}")
        print(
            f"refresh ok / invalid    {stats['refresh_ok'] - floor_n - warm_n} / {stats['refresh_invalid_grant']}"
        )
        print(f"sweep run               {sweep_wall:8.2f} s wall, {sweep_cpu:.2f} s CPU (this process)")
        print(
            f"worker RSS              {rss_before:8.1f} MiB before, {rss_peak:.1f} MiB peak (+{rss_peak - rss_before:.1f})"
            + (f"; {rss_cold:.1f} MiB before the {warm_n} warm-up renewals" if warm_n else "")
        )
        print(
            f"worker CPU              {worker_cpu:8.2f} s, {worker_cpu / max(renewed, 1) * 1000:.1f} ms per renewal"
        )
        print(f"load average            {os.getloadavg()[0]:.2f} (2 cores here; others' work counts too)")
        print(f"ideal N x latency / c   {ideal:8.2f} s")
        if floor_wall is not None:
            print(
                f"no-op floor             {floor_wall:8.2f} s"
                + (f"  ({floor_wall / ideal:.2f} x ideal)" if ideal else "")
            )
        print(f"sweep wall time         {wall:8.2f} s" + (f"  ({wall / ideal:.2f} x ideal)" if ideal else ""))
        print(f"renewals per second     {renewed / wall:8.1f}")
        reference = ideal or floor_wall
        print(f"ratio={wall / reference:.2f}" if reference else "ratio=n/a")
        return 0 if renewed >= n and left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
