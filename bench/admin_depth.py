"""Benchmark: the staff portal list at depth: page 1 and page 50 of 10,000 portals.

    .venv/bin/python bench/admin_depth.py --portals 10000

A scratch PostgreSQL database with N portals, each with a background pair and three renewal-log rows
(ANALYZEd). A superuser's requests through Django's test client in this process: each page is asked
once to warm, then timed three times (min and median) with its SQL queries counted. Ends with
`ratio=<page 50 / page 1>` (min times). Not a test: compare the figures within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

from _scratch import scratch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--portals", type=int, default=10000)
    parser.add_argument("--page", type=int, default=50)
    args = parser.parse_args()
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
    with scratch():
        from django.contrib.auth.models import User
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext
        from django.utils import timezone

        from portals.models import Portal, RenewalLog, TokenPair

        now = timezone.now()
        print(f"storing {args.portals} portals …", flush=True)
        Portal.objects.bulk_create(
            [
                Portal(
                    member_id=f"{i:032x}",
                    domain=f"p{i:05d}.bitrix24.com",
                    oauth_server="https://oauth.bitrix.info",
                )
                for i in range(args.portals)
            ],
            batch_size=2000,
        )
        ids = list(Portal.objects.values_list("pk", flat=True))
        TokenPair.objects.bulk_create(
            [
                TokenPair(
                    portal_id=pk,
                    user_id=1,
                    is_background=True,
                    access_token="a" * 32,
                    refresh_token="r" * 32,
                    access_expires_at=now + timedelta(hours=1),
                    refresh_issued_at=now - timedelta(days=pk % 28),
                )
                for pk in ids
            ],
            batch_size=2000,
        )
        RenewalLog.objects.bulk_create(
            [
                RenewalLog(
                    portal_id=pk,
                    user_id=1,
                    trigger="beat",
                    outcome="renewed",
                    created_at=now - timedelta(days=d * 21 + pk % 5),
                )
                for pk in ids
                for d in range(3)
            ],
            batch_size=5000,
        )
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        staff = User.objects.create_superuser("bench", "bench@example.com", "x")
        client = Client()
        client.force_login(staff)
        timings: dict[int, tuple[float, float, int]] = {}
        for page in (1, args.page):
            url = "/admin/portals/portal/" + (f"?p={page}" if page > 1 else "")
            assert client.get(url).status_code == 200
            runs = []
            for _ in range(3):
                with CaptureQueriesContext(connection) as captured:
                    started = time.perf_counter()
                    response = client.get(url)
                    runs.append(time.perf_counter() - started)
                assert (
                    response.status_code == 200 and response.content.count(b'name="_selected_action"') == 100
                )
            timings[page] = (min(runs), statistics.median(runs), len(captured))
        print()
        print(f"portal list, {args.portals} portals, 100 a page, PostgreSQL")
        for page, (best, median, queries) in timings.items():
            print(
                f"page {page:<3} min {best * 1000:7.1f} ms, median {median * 1000:7.1f} ms, {queries} queries"
            )
        print(f"ratio={timings[args.page][0] / timings[1][0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
