"""Benchmark: many processes calling one portal through the shared rate governor.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/rate_governor.py --calls 500 --processes 4

The stand-in portal enforces Bitrix24's leaky bucket (default 2 requests/s, burst 50). Every process
calls `server.time` through PortalClient. Printed side by side: the rate achieved after the burst and
the rate allowed, and what the portal refused (QUERY_LIMIT_EXCEEDED answers). Needs REDIS_URL: without
Redis the governor is per process and the processes would overrun the bucket (which is the point of
the shared one). Uses a scratch PostgreSQL database like bench/renew_sweep.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _scratch import ROOT, scratch, store_portal

CALLER = """
import sys, time
import django
django.setup()
from portals.client import PortalClient
from portals.models import Portal
api = PortalClient(Portal.objects.get(member_id=sys.argv[1]))
count, start_at = int(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
for _ in range(count):
    api.call("server.time")
print(time.time())
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="calls in all")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="the portal's drain rate, requests/s")
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        print("REDIS_URL is not set: the governor would be per process. Set it (see the docstring).")
        return 2
    with scratch() as standin:
        fake = standin.add_portal(rate=args.rate, burst=args.burst)
        store_portal(standin, fake, rate_limit=args.rate, rate_burst=args.burst)
        per_process = args.calls // args.processes
        total = per_process * args.processes
        start_at = time.time() + 5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CALLER, fake.member_id, str(per_process), str(start_at)],
                cwd=ROOT,
                env=dict(os.environ),
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.processes)
        ]
        outputs = [p.communicate()[0] for p in procs]
        codes = [p.returncode for p in procs]
        finished = [float(out.split()[-1]) for out in outputs if out.strip()]
        wall = (max(finished) if finished else time.time()) - start_at
        steady = max(total - args.burst, 1)
        achieved = steady / wall
        minimum = steady / args.rate
        print()
        print(
            f"calls                 {total} from {args.processes} processes ({'all ok' if codes == [0] * len(codes) else codes})"
        )
        print(f"portal limit          {args.rate:g}/s, burst {args.burst}")
        print(f"refused by the portal {fake.bucket_stats['rejected']} (QUERY_LIMIT_EXCEEDED)")
        print(f"highest bucket level  {fake.bucket_stats['max_level']:.1f} of {args.burst}")
        print(f"wall time             {wall:8.2f} s   (least possible {minimum:.2f} s)")
        print(f"rate after the burst  {achieved:8.3f}/s (allowed {args.rate:g}/s)")
        print(f"achieved / allowed    {achieved / args.rate:8.1%}")
        return 0 if codes == [0] * len(codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
