"""Benchmark: the server's CPU for a repeat launch of the app, beside `/healthz` and a trivial view.

    .venv/bin/python bench/launch_cost.py --requests 300

One gunicorn process (one sync worker) on a scratch PostgreSQL database, the stand-in in this process.
An installed portal and a user whose pair is stored; the launch is posted once (app.info verifies its
AUTH_ID), then `--requests` times more: a reload with the same AUTH_ID, as a portal does. Each kind of
request is sent the same number of times, one after the other, and the CPU time the server's processes
used meanwhile (user + system, from /proc) is divided by the count. Ends with
`ratio=<launch CPU / healthz CPU>`. Not a test: compare the figures within one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import requests
from _scratch import ROOT, group_cpu_seconds, scratch, store_portal


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with scratch() as standin:
        from standin import payloads as bx

        fake = standin.add_portal()
        store_portal(standin, fake, refresh_age_days=1, state="installed")
        tokens = fake.issue_tokens(1)
        port = free_port()
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"),
                *("--workers", "1", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"),
            ],
            cwd=ROOT,
            env={**os.environ, "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DJANGO_SECURE_COOKIES": "0"},
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.trust_env = False
        query, body = bx.launch(fake, tokens)
        headers = {"Accept": "text/html"}

        def launch() -> requests.Response:
            return http.post(f"{base}/app/", params=query, data=body, headers=headers, timeout=30)

        kinds = {
            "healthz": lambda: http.get(f"{base}/healthz", timeout=30),
            "trivial view (/)": lambda: http.get(f"{base}/", timeout=30),
            "repeat launch": launch,
        }
        try:
            for _ in range(100):
                try:
                    if http.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            first = launch()
            assert first.status_code == 200, first.text[:500]
            app_info = standin.stats["app_info"]
            for request in kinds.values():  # warm every path once
                assert request().status_code == 200
            cost: dict[str, float] = {}
            wall: dict[str, float] = {}
            for name, request in kinds.items():
                cpu, started = group_cpu_seconds(server.pid), time.monotonic()
                for _ in range(args.requests):
                    response = request()
                    assert response.status_code == 200, (name, response.status_code)
                wall[name] = (time.monotonic() - started) / args.requests
                cost[name] = (group_cpu_seconds(server.pid) - cpu) / args.requests
            outbound = standin.stats["app_info"] - app_info
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        print()
        print(f"one gunicorn sync worker, {args.requests} requests of each kind, PostgreSQL")
        for name in kinds:
            print(
                f"{name:<20} server CPU {cost[name] * 1000:6.2f} ms/request "
                f"({cost[name] / cost['healthz']:.2f} x healthz), wall {wall[name] * 1000:6.2f} ms"
            )
        print(f"app.info calls during the repeat launches: {outbound}")
        print(f"ratio={cost['repeat launch'] / cost['healthz']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
