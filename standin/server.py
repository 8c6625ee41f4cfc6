"""A fake Bitrix24 — the OAuth server and any number of portals — as real local HTTP servers.

Tests start a :class:`StandIn` on loopback and drive the backend against it over real sockets; a developer
can run it to try the app without a portal (:func:`main`, for a management command). It copies what
Bitrix24's documentation (repository ``bitrix24/b24restdocs``) says the real services do, and the fault
modes the SDK issue trackers report; each such place names its page. Where the docs are silent the choice
made here is marked "not documented".

Standard library only, no Django: the stand-in must run in a bare interpreter and in any test process.

Clocks: token expiry, the refresh-token lifetime, authorization codes, the leaky bucket and the
operating-time window are all judged by :meth:`StandIn.now` (``time.time()`` plus an offset moved by
:meth:`StandIn.advance`), so a test can jump an hour ahead without sleeping. The ``duration`` reported for a
method is real elapsed time. So are the offline queue's ``TIMESTAMP_X`` and ONOFFLINEEVENT's ``minTimeout``.

Events: ``crm.{contact,company,deal,lead}.{add,update,delete}`` (also inside ``batch``) raise their events.
Online bindings get a form-encoded POST from a background courier after the REST answer
(:meth:`StandIn.wait_deliveries`, ``FakePortal.deliveries``); offline bindings fill the portal's offline
queue (``event.offline.*``, see ``events.py``). :meth:`FakePortal.change` and :meth:`FakePortal.fire`
raise events from a test; ``GET /standin/`` on a portal does it for a person (``console.py``).

Widgets: ``placement.bind`` / ``.get`` / ``.unbind`` / ``.list`` keep ``FakePortal.placements``
(``placements.py``). ``GET /app-frame/`` is the portal page that opens the app or a bound widget
(:meth:`FakePortal.app_frame_page`, :meth:`FakePortal.open_placement`); ``GET /api/v1/`` serves a small
BX24.js (``static/bx24.js``) that talks to that page over postMessage (``static/frame.js``) and calls REST
from the app's origin (REST answers CORS for loopback origins). ``BX24.installFinish()`` sets
``FakePortal.install_finished``.
"""

from __future__ import annotations

import argparse
import json
import time

from . import console
from .common import APP_FRAME_ID, APP_FRAME_PATH, APP_FRAME_SELECTOR, BX24_JS_PATH, FRAME_REPORT_PATH
from .oauth import StandIn
from .portal import FakePortal

__all__ = [
    "APP_FRAME_ID",
    "APP_FRAME_PATH",
    "APP_FRAME_SELECTOR",
    "BX24_JS_PATH",
    "FRAME_REPORT_PATH",
    "FakePortal",
    "StandIn",
]


# --------------------------------------------------------------------------------------------------------
# Running it by hand


def main(argv: list[str] | None = None) -> int:
    """Start a stand-in with seeded portals and print what an app needs to talk to it; Ctrl-C stops it."""
    parser = argparse.ArgumentParser(description="Run the Bitrix24 stand-in on loopback.")
    parser.add_argument("--client-id", default="app.standin")
    parser.add_argument("--client-secret", default="standin-secret")
    parser.add_argument("--portals", type=int, default=1)
    parser.add_argument(
        "--access-ttl",
        type=int,
        default=3600,
        help="seconds an access token lives (Bitrix24: 3600); shorter, to see renewals without waiting an hour",
    )
    parser.add_argument("--seed", type=int, default=120, help="crm.contact items per portal")
    # Fixed ports let a backend keep trusting the stand-in across restarts (bin/run trusts 8001 and 8002).
    parser.add_argument("--oauth-port", type=int, default=0, help="OAuth server port (default: any free)")
    parser.add_argument(
        "--portal-port",
        type=int,
        default=0,
        help="the first portal's port, the next ones' follow (default: any free)",
    )
    parser.add_argument(
        "--https",
        action="store_true",
        help="serve HTTPS, as Bitrix24 does, with a certificate of a local authority (see --tls-dir)",
    )
    parser.add_argument(
        "--tls-dir",
        default="var/standin/tls",
        help="where the local authority is made once and kept; trust its ca.pem (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    with StandIn(
        args.client_id,
        args.client_secret,
        oauth_port=args.oauth_port,
        access_ttl=args.access_ttl,
        tls_dir=args.tls_dir if args.https else None,
    ) as standin:
        print(f"OAuth server: {standin.oauth_url}  (client_id={standin.client_id})")
        if standin.tls is not None:
            ca = standin.tls.ca_path.resolve()
            print(
                f"HTTPS: trust {ca} (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, BITRIX24_CA_BUNDLE)"
            )
        for index in range(args.portals):
            portal = standin.add_portal(port=args.portal_port + index if args.portal_port else 0)
            portal.seed("crm.contact", args.seed)
            tokens = portal.issue_tokens()
            print(f"portal {portal.url}  member_id={portal.member_id}")
            print(f"  application_token={portal.application_token}")
            print(f"  tokens={json.dumps(tokens)}")
            print(f"  events and widgets by hand: {portal.url}{console.CONSOLE_PATH}")
            print(f"  JS library for app pages: {portal.url}{BX24_JS_PATH}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
