"""Benchmark: a beat sweep renewing N portals through a real Celery worker against the stand-in.

    .venv/bin/python bench/renew_sweep.py --portals 2000 --latency 0.05 --concurrency 8

Uses a scratch PostgreSQL database (on BENCH_DATABASE_URL's server, default
postgres://postgres@127.0.0.1:5432) and REDIS_URL as the broker when set (the filesystem broker
otherwise); starts the Bitrix24 stand-in with the given latency on every OAuth call, stores N portals
whose refresh tokens are due, starts `celery worker`, runs the sweep and waits until every pair is
renewed. Prints the sweep's wall time beside the ideal N x latency / concurrency. Not a test: the
figures depend on the machine; compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import timedelta

from _scratch import ROOT, scratch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--portals", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every OAuth call")
    parser.add_argument("--concurrency", type=int, default=8, help="worker processes")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    os.environ["BITRIX24_RENEW_SPREAD_SECONDS"] = "0"  # measure throughput, not the spread

    with scratch(oauth_latency=args.latency) as standin:
        from django.utils import timezone

        from config.celery import app
        from portals.models import Portal, RenewalLog, RenewalOutcome, TokenPair
        from portals.tasks import sweep_due_pairs

        print(f"storing {args.portals} portals whose refresh tokens are due …", flush=True)
        now = timezone.now()
        fakes = [standin.add_portal() for _ in range(args.portals)]
        Portal.objects.bulk_create(
            [
                Portal(
                    member_id=f.member_id, domain=f.domain, protocol="http", oauth_server=standin.oauth_url
                )
                for f in fakes
            ],
            batch_size=500,
        )
        ids = dict(Portal.objects.values_list("member_id", "pk"))
        pairs = []
        for fake in fakes:
            tokens = fake.issue_tokens(1)
            pairs.append(
                TokenPair(
                    portal_id=ids[fake.member_id],
                    user_id=1,
                    is_background=True,
                    access_token=tokens["access_token"],
                    refresh_token=tokens["refresh_token"],
                    access_expires_at=now + timedelta(hours=1),
                    refresh_issued_at=now - timedelta(days=25),
                )
            )
        TokenPair.objects.bulk_create(pairs, batch_size=500)
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker"),
                *("--concurrency", str(args.concurrency), "--pool", "prefork", "--loglevel", "WARNING"),
                *("--without-gossip", "--without-mingle"),
            ],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(5)  # every worker process is up before the clock starts
            ok_before = standin.stats["refresh_ok"]
            started = time.monotonic()
            sweep_due_pairs.delay()
            done = 0
            while time.monotonic() - started < args.timeout and done < args.portals:
                time.sleep(0.2)
                done = RenewalLog.objects.filter(outcome=RenewalOutcome.RENEWED).count()
            wall = time.monotonic() - started
        finally:
            worker.terminate()
            worker.wait(30)
            app.control.purge()
        ideal = args.portals * args.latency / args.concurrency
        broker = "redis" if os.environ.get("REDIS_URL") else "filesystem"
        print()
        print(f"portals renewed         {done} of {args.portals}")
        print(
            f"refresh ok / invalid    {standin.stats['refresh_ok'] - ok_before} / {standin.stats['refresh_invalid_grant']}"
        )
        print(
            f"worker                  prefork, concurrency {args.concurrency}, prefetch 1, acks late, broker {broker}"
        )
        print(f"OAuth latency           {args.latency * 1000:.0f} ms per call")
        print(f"sweep wall time         {wall:8.2f} s")
        print(f"ideal N x latency / c   {ideal:8.2f} s")
        print(f"ideal / wall            {ideal / wall:8.0%}")
        print(f"renewals per second     {done / wall:8.1f}")
        return 0 if done >= args.portals else 1


if __name__ == "__main__":
    raise SystemExit(main())
