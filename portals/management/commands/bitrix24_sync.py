from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections, connection

from portals import bindings
from portals.models import Portal, PortalState


class Command(BaseCommand):
    help = (
        "Make every installed portal's event bindings the wanted ones (ONAPPUNINSTALL, BITRIX24_EVENTS, "
        "the app's registered handlers, online and offline): bind what is missing, unbind this "
        "deployment's handlers no longer wanted. Each portal within its own REST rate limit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--portal", metavar="MEMBER_ID", help="only this portal")
        parser.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        parser.add_argument(
            "--unbind-offline",
            action="store_true",
            help="also unbind offline bindings no longer wanted (they are the app's as a whole, not only "
            "this deployment's: left bound unless asked)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=4,
            help="portals synced at once (each portal's calls still keep to its own rate limit; default 4)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not bindings.handler_url():
            raise CommandError("BITRIX24_PUBLIC_URL is not set: there is no handler URL to bind.")
        portals = Portal.objects.exclude(state=PortalState.UNINSTALLED).order_by("pk")
        if options["portal"]:
            portals = portals.filter(member_id=options["portal"])
            if not portals.exists():
                raise CommandError(f"No installed portal with member_id {options['portal']!r}.")
        else:
            portals = portals.filter(state=PortalState.INSTALLED)
        wanted = sorted(bindings.wanted_bindings())
        self.stdout.write(f"Wanted bindings ({len(wanted)}):")
        for binding in wanted:
            self.stdout.write(f"  {binding}")
        ids = list(portals.values_list("pk", flat=True))
        total = len(ids)
        verb = "Checking" if options["dry_run"] else "Syncing"
        self.stdout.write(f"{verb} {total} portal(s) with {max(1, options['workers'])} worker(s)…")
        counts = {"bound": 0, "unbound": 0, "failed": 0, "changed": 0}
        done = 0
        lock = threading.Lock()
        started = time.monotonic()

        def sync(portal_id: int) -> tuple[str, str, bool]:
            close_old_connections()
            try:
                portal = Portal.objects.get(pk=portal_id)
                try:
                    result = bindings.sync_bindings(
                        portal=portal, dry_run=options["dry_run"], unbind_offline=options["unbind_offline"]
                    )
                except Exception as exc:  # one portal's failure is reported, not fatal
                    with lock:
                        counts["failed"] += 1
                    return portal.domain, f"FAILED: {type(exc).__name__}: {exc}", False
                with lock:
                    counts["bound"] += len(result.bound)
                    counts["unbound"] += len(result.unbound)
                    counts["changed"] += int(result.changed)
                details = result.summary()
                if result.changed:
                    changes = [f"+{b}" for b in result.bound] + [f"-{b}" for b in result.unbound]
                    details += " (" + "; ".join(changes) + ")"
                return portal.domain, details, True
            finally:
                connection.close()

        with ThreadPoolExecutor(max_workers=max(1, options["workers"])) as pool:
            futures = [pool.submit(sync, portal_id) for portal_id in ids]
            for future in as_completed(futures):
                domain, details, ok = future.result()
                done += 1
                line = f"[{done:>{len(str(total))}}/{total}] {domain}: {details}"
                self.stdout.write(line if ok else self.style.ERROR(line))
        would = "would be " if options["dry_run"] else ""
        summary = (
            f"{total} portal(s) in {time.monotonic() - started:.1f} s: {counts['changed']} changed, "
            f"{counts['bound']} binding(s) {would}bound, {counts['unbound']} {would}unbound, "
            f"{counts['failed']} failed."
        )
        if settings.BITRIX24_AUTH_CONNECTOR:
            summary += f" Offline bindings carry the connector {settings.BITRIX24_AUTH_CONNECTOR!r}."
        if counts["failed"]:
            raise CommandError(summary)
        self.stdout.write(self.style.SUCCESS(summary))
