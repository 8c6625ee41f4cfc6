"""The stand-in's OAuth server alone, in its own process: a benchmark's renewals do not compete with it
for the benchmark process's interpreter, and no portal servers are started (a refresh needs none).

    python bench/_oauth.py --latency 0.05 --grants 2000 --out grants.jsonl

Prints the server's URL on its first line once it listens, after writing one JSON line per grant to
`--out` (member_id, domain, access_token, refresh_token). Then reads commands on stdin: `stats` prints
the server's counters as one JSON line; end of input stops it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from standin.server import FakePortal, StandIn


class _NoServer:
    def __init__(self, port: int) -> None:
        self.port = port

    def stop(self) -> None:
        pass


class HeadlessPortal(FakePortal):
    """A portal the OAuth server knows, without an HTTP server of its own (never called here)."""

    _next_port = 20000

    def _start_server(self, port: int = 0) -> Any:
        HeadlessPortal._next_port += 1
        return _NoServer(HeadlessPortal._next_port)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--grants", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--client-id", default="app.bench")
    parser.add_argument("--client-secret", default="bench-secret")
    args = parser.parse_args()
    standin = StandIn(args.client_id, args.client_secret, oauth_latency=args.latency).start()
    if args.out:
        with open(args.out, "w") as out:
            for _ in range(args.grants):
                member_id = secrets.token_hex(16)
                portal = HeadlessPortal(
                    standin,
                    member_id=member_id,
                    rate=2.0,
                    burst=50,
                    scope="crm,user",
                    status="F",
                    license_family="ent",
                )
                standin._portals[member_id] = portal
                tokens = portal.issue_tokens(1)
                out.write(
                    json.dumps(
                        {
                            "member_id": member_id,
                            "domain": portal.domain,
                            "access_token": tokens["access_token"],
                            "refresh_token": tokens["refresh_token"],
                        }
                    )
                    + "\n"
                )
    print(standin.oauth_url, flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(dict(standin.stats)), flush=True)
    standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
