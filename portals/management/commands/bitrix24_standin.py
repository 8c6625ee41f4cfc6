"""`bin/manage bitrix24_standin`: a fake Bitrix24 portal for trying the app by hand.

Starts the stand-in (OAuth server and one portal) with this backend's client id and secret, on fixed
ports (BITRIX24_STANDIN_OAUTH_PORT, BITRIX24_STANDIN_PORTAL_PORT: 8001 and 8002), which bin/run's
backend trusts by default. Installs the app on the portal (posts its ONAPPINSTALL to the backend, again
and again until the backend accepts it, saying why it does not), then prints what to open next: the
portal page where the app opens in the portal's frame as it would in Bitrix24, and the admin.

The portal keeps its member_id from one run to the next (it is derived from its port): running the
command again reinstalls the same portal, with new tokens, instead of a second portal on the same address.
Runs until Ctrl-C; the portal's tokens live as long as the command.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from portals import verification
from standin import FakePortal, StandIn
from standin import payloads as bx
from standin.server import APP_FRAME_PATH

DEFAULT_CLIENT_ID = "app.standin"
DEFAULT_CLIENT_SECRET = "standin-secret"  # noqa: S105 - the stand-in's published development secret
RETRY_SECONDS = 2


def member_id_for(port: int) -> str:
    """A stable member_id for the stand-in portal on `port`: the same portal on every run."""
    return hashlib.sha256(f"bitrix24 stand-in portal on port {port}".encode()).hexdigest()[:32]


class Command(BaseCommand):
    help = "Run a fake Bitrix24 portal on loopback, install the app on it and print the page to open it."
    # The stand-in needs no database and no token keys: a fresh checkout can run it before anything else.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--backend",
            default=f"http://127.0.0.1:{os.environ.get('PORT') or 8000}",
            help="this backend's base URL (default: bin/run's, http://127.0.0.1:$PORT)",
        )
        parser.add_argument(
            "--oauth-port",
            type=int,
            default=settings.BITRIX24_STANDIN_OAUTH_PORT,
            help="OAuth server port (default: BITRIX24_STANDIN_OAUTH_PORT, %(default)s; 0: any free port)",
        )
        parser.add_argument(
            "--portal-port",
            type=int,
            default=settings.BITRIX24_STANDIN_PORTAL_PORT,
            help="portal port (default: BITRIX24_STANDIN_PORTAL_PORT, %(default)s; 0: any free port)",
        )
        parser.add_argument(
            "--member-id", default="", help="the portal's member_id (default: one derived from its port)"
        )
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
        parser.add_argument(
            "--https",
            action=argparse.BooleanOptionalAction,
            default=settings.BITRIX24_STANDIN_HTTPS,
            help="serve HTTPS with a local certificate authority kept under DJANGO_VAR_DIR/standin/tls "
            "(default: BITRIX24_STANDIN_HTTPS, %(default)s); the backend trusts it through BITRIX24_CA_BUNDLE",
        )
        parser.add_argument(
            "--access-ttl",
            type=int,
            default=3600,
            help="seconds the stand-in's access tokens live (Bitrix24: 3600); shorter, to watch renewals happen",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        backend = str(options["backend"]).rstrip("/")
        if urlsplit(backend).scheme not in ("http", "https"):
            raise CommandError(f"--backend must be an http(s) URL, not {backend!r}")
        client_id = settings.BITRIX24_CLIENT_ID or DEFAULT_CLIENT_ID
        secret = settings.BITRIX24_CLIENT_SECRET or DEFAULT_CLIENT_SECRET
        if options["access_ttl"] < 60:
            raise CommandError("--access-ttl must be at least 60 seconds")
        standin = StandIn(
            client_id,
            secret,
            oauth_port=options["oauth_port"],
            access_ttl=options["access_ttl"],
            tls_dir=Path(settings.VAR_DIR) / "standin" / "tls" if options["https"] else None,
        )
        try:
            standin.start()
            port = options["portal_port"]
            member_id = options["member_id"] or (member_id_for(port) if port else "")
            portal = standin.add_portal(port=port, member_id=member_id or None)
        except OSError as exc:
            standin.stop()
            raise CommandError(
                f"the stand-in cannot listen on its ports ({exc.strerror or exc}): is it running already, in "
                "another terminal? Stop that one (Ctrl-C), or give other ports with --oauth-port and "
                "--portal-port (bin/run's backend trusts the ports BITRIX24_STANDIN_OAUTH_PORT and "
                "BITRIX24_STANDIN_PORTAL_PORT name)."
            ) from exc
        try:
            self._run(standin, portal, backend, client_id, secret, options)
        except KeyboardInterrupt:
            self.stdout.write("\nStopped.")
        finally:
            standin.stop()

    def _run(
        self,
        standin: StandIn,
        portal: FakePortal,
        backend: str,
        client_id: str,
        secret: str,
        options: dict[str, Any],
    ) -> None:
        self.stdout.write(
            f"Bitrix24 stand-in: OAuth server {standin.oauth_url}, portal {portal.url} "
            f"(member_id {portal.member_id}, client_id {client_id})."
        )
        # What the backend needs to trust this stand-in, named in every refusal of the install: the backend may
        # be another process (--backend), started with settings of its own.
        trust = self._trust(standin, portal, client_id, secret)
        self._trust_settings = (
            " ".join(f"{name}={value}" for name, value in trust)
            + " (bin/run sets them itself while BITRIX24_CLIENT_ID is unset"
            + (", with BITRIX24_STANDIN_HTTPS=1)" if standin.tls else ")")
        )
        missing = self._untrusted(standin, portal, client_id)
        if missing:
            self.stdout.write(
                "This backend's settings do not trust it yet (" + "; ".join(missing) + "). Start the "
                "backend with these (bin/run sets them itself while BITRIX24_CLIENT_ID is unset):"
            )
            for name, value in trust:
                self.stdout.write(f"  export {name}={value}")
        self.stdout.write(f"Installing the app on {backend} …")
        self.stdout.flush()
        self._install(backend, portal, options["user_id"], options["wait"])
        page = f"{portal.url}{APP_FRAME_PATH}?handler={quote(backend + '/app/', safe='')}"
        page += f"&user_id={options['user_id']}"
        self.stdout.write(self.style.SUCCESS(f"Installed: {backend} accepted the portal's ONAPPINSTALL."))
        self.stdout.write(
            "\nNext:\n"
            f"  1. Open the app as the portal shows it (a form posts fresh tokens into the portal's frame):\n"
            f"     {page}\n"
            f"  2. See the portal, its token pairs and the requests it sent in the admin:\n"
            f"     {backend}/admin/portals/portal/\n"
            "     (no admin login yet? bin/manage createsuperuser)\n"
            f"  3. See the portal as Bitrix24 shows it: what it sent, its bindings, forms to change a deal:\n"
            f"     {portal.url}/standin/\n"
            "  4. Call the portal's REST API yourself (an inbound webhook of user 1; fast_bitrix24 and b24pysdk\n"
            "     take it as they take a real portal's):\n"
            f"     {portal.add_webhook(options['user_id'])}"
        )
        self.stdout.flush()
        if options["exit_after_install"]:
            return
        self.stdout.write(
            "\nCtrl-C stops the stand-in. Running this command again reinstalls the same portal, with new tokens."
        )
        self.stdout.flush()
        while True:
            time.sleep(3600)

    @staticmethod
    def _trust(standin: StandIn, portal: FakePortal, client_id: str, secret: str) -> list[tuple[str, str]]:
        """The settings with which a backend trusts this stand-in."""
        trust = [
            ("BITRIX24_OAUTH_SERVERS", standin.oauth_url),
            ("BITRIX24_PORTAL_DOMAINS", portal.domain),
        ]
        if standin.tls is not None:
            trust.append(("BITRIX24_CA_BUNDLE", str(standin.tls.ca_path)))
        else:
            trust.append(("BITRIX24_ALLOW_HTTP", "1"))
        return [*trust, ("BITRIX24_CLIENT_ID", client_id), ("BITRIX24_CLIENT_SECRET", secret)]

    def _untrusted(self, standin: StandIn, portal: FakePortal, client_id: str) -> list[str]:
        """What, in the settings this command runs with, keeps the backend from trusting the stand-in.

        bin/manage runs with bin/run's settings, so this is what bin/run's backend sees too."""
        missing = []
        if standin.oauth_url not in settings.BITRIX24_OAUTH_SERVERS:
            missing.append(f"BITRIX24_OAUTH_SERVERS does not name {standin.oauth_url}")
        if not verification.is_portal_domain(portal.domain):
            missing.append(f"BITRIX24_PORTAL_DOMAINS does not admit {portal.domain}")
        if standin.tls is None and not settings.BITRIX24_ALLOW_HTTP:
            missing.append("BITRIX24_ALLOW_HTTP is off")
        if standin.tls is not None and not _same_file(settings.BITRIX24_CA_BUNDLE, standin.tls.ca_path):
            missing.append(f"BITRIX24_CA_BUNDLE does not name {standin.tls.ca_path}")
        if client_id != settings.BITRIX24_CLIENT_ID:
            missing.append("BITRIX24_CLIENT_ID is not set")
        return missing

    def _install(self, backend: str, portal: FakePortal, user_id: int, wait: float) -> None:
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
                if response.status_code == 200 and _body(response).get("result") != "deferred":
                    return
                if response.status_code == 200:
                    # Taken and kept, not applied: the backend could not ask this stand-in's OAuth server.
                    problem = (
                        "the backend kept the install for later: it cannot ask the stand-in's OAuth server "
                        f"(does it trust it? {self._trust_settings})."
                    )
                else:
                    problem = _refusal(response, self._trust_settings)
            except requests.RequestException as exc:
                problem = f"{backend} does not answer yet ({type(exc).__name__}): is bin/run running?"
            if problem != last:
                self.stdout.write(f"  {problem} Trying again every {RETRY_SECONDS} s …")
                self.stdout.flush()
                last = problem
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(f"the backend did not accept the install: {problem}")
            time.sleep(RETRY_SECONDS)


def _body(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _same_file(configured: str, path: Path) -> bool:
    try:
        return bool(configured) and Path(configured).resolve() == path.resolve()
    except OSError:
        return False


def _refusal(response: requests.Response, trust: str = "") -> str:
    """The backend's refusal of the install, with what usually causes it."""
    try:
        body = response.json()
        code, description = str(body.get("error", "")), str(body.get("error_description", ""))
    except ValueError:
        code, description = "", response.text[:200]
    said = f"the backend answered {response.status_code} {code}: {description}".rstrip(": ")
    if code == "not_configured":
        return f"{said}. Its BITRIX24_CLIENT_ID / BITRIX24_CLIENT_SECRET are missing, or its token keys fail."
    if response.status_code == 503:
        return f"{said}. It cannot reach the OAuth server it trusts: not this stand-in's?"
    if response.status_code in (401, 403):
        return (
            f"{said}. It does not trust this stand-in: start it with {trust or 'the settings printed above'}."
        )
    return f"{said}."
