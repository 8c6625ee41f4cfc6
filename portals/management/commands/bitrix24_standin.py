"""`manage.py bitrix24_standin --backend http://127.0.0.1:8000`: a fake Bitrix24 portal for trying the
app by hand. Starts the stand-in (OAuth server and one portal) with this backend's client id and
secret, prints the settings the backend needs to trust it, installs the app on the portal (posts
its ONAPPINSTALL to the backend, again and again until the backend accepts it) and prints the
portal page to open in a browser, where the app opens in the portal's frame as it would in Bitrix24.
Runs until Ctrl-C; the portal and its tokens live as long as the command."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from portals.standin import StandIn
from portals.standin import payloads as bx
from portals.standin.server import APP_FRAME_PATH

DEFAULT_CLIENT_ID = "app.standin"
DEFAULT_CLIENT_SECRET = "standin-secret"  # noqa: S105 - the stand-in's published development secret


class Command(BaseCommand):
    help = "Run a fake Bitrix24 portal on loopback, install the app on it and print the page to open it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--backend", default="http://127.0.0.1:8000", help="this backend's base URL")
        parser.add_argument("--oauth-port", type=int, default=0, help="OAuth server port (default: any free)")
        parser.add_argument("--portal-port", type=int, default=0, help="portal port (default: any free)")
        parser.add_argument(
            "--user-id", type=int, default=1, help="the Bitrix24 user who installs and opens the app"
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=0,
            help="give up installing after this many seconds (default: keep trying until Ctrl-C)",
        )
        parser.add_argument(
            "--exit-after-install", action="store_true", help="stop once installed (for scripts and tests)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        backend = str(options["backend"]).rstrip("/")
        if urlsplit(backend).scheme not in ("http", "https"):
            raise CommandError(f"--backend must be an http(s) URL, not {backend!r}")
        client_id = settings.BITRIX24_CLIENT_ID or DEFAULT_CLIENT_ID
        secret = settings.BITRIX24_CLIENT_SECRET or DEFAULT_CLIENT_SECRET
        with StandIn(client_id, secret, oauth_port=options["oauth_port"]) as standin:
            portal = standin.add_portal(port=options["portal_port"])
            self.stdout.write("Bitrix24 stand-in running. Start the backend with these settings:\n")
            for name, value in (
                ("BITRIX24_OAUTH_SERVERS", standin.oauth_url),
                ("BITRIX24_PORTAL_DOMAINS", "127.0.0.1:*"),
                ("BITRIX24_ALLOW_HTTP", "1"),
                ("BITRIX24_CLIENT_ID", client_id),
                ("BITRIX24_CLIENT_SECRET", secret),
            ):
                self.stdout.write(f"  export {name}={value}")
            self.stdout.write(f"\nPortal {portal.domain} (member_id {portal.member_id}).")
            self.stdout.flush()
            self._install(backend, portal, options["user_id"], options["wait"])
            page = f"{portal.url}{APP_FRAME_PATH}?handler={quote(backend + '/app/', safe='')}"
            page += f"&user_id={options['user_id']}"
            self.stdout.write(self.style.SUCCESS(f"Installed on {backend}."))
            self.stdout.write(f"Open the app as the portal shows it:\n  {page}")
            self.stdout.flush()
            if options["exit_after_install"]:
                return
            self.stdout.write("Ctrl-C stops the stand-in.")
            self.stdout.flush()
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                self.stdout.write("\nStopped.")

    def _install(self, backend: str, portal: Any, user_id: int, wait: float) -> None:
        """Post ONAPPINSTALL until the backend accepts it: it may not be started (or configured) yet."""
        deadline = time.monotonic() + wait if wait > 0 else None
        last = ""
        while True:
            tokens = portal.issue_tokens(user_id, admin=True)
            try:
                response = requests.post(
                    f"{backend}/events/",
                    data=bx.onappinstall(portal, tokens),
                    timeout=30,
                    allow_redirects=False,
                )
                if response.status_code == 200:
                    return
                problem = f"the backend answered {response.status_code}: {response.text[:300]}"
            except requests.RequestException as exc:
                problem = f"the backend is not reachable yet ({type(exc).__name__})"
            if problem != last:
                self.stdout.write(f"Installing: {problem}; retrying every 2 s …")
                self.stdout.flush()
                last = problem
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(f"the backend did not accept the install: {problem}")
            time.sleep(2)
