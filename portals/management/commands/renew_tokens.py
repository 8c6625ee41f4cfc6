from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from portals import errors, renewal, selectors, stopping
from portals.masking import fingerprint
from portals.models import CommandRun, Portal, RenewalTrigger, TokenPair

COMMAND = "renew_tokens"


class Command(BaseCommand):
    help = (
        "Resolve renewals an earlier process left unfinished, then renew due token pairs now: all due "
        "ones, or one portal's (--portal); --force renews even if not due."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--portal", metavar="MEMBER_ID", help="only this portal's pairs")
        parser.add_argument("--force", action="store_true", help="renew even pairs that are not due")
        parser.add_argument(
            "--all-unacknowledged",
            action="store_true",
            help="exit 1 while any pair is lost and not acknowledged by staff (default: only pairs flagged "
            "lost since the previous run started)",
        )

    def _stop_now(self, signum: int) -> None:
        # Nothing is in flight: stopping here loses nothing.
        self.stderr.write(f"Stopped by {signal.Signals(signum).name}.")
        raise SystemExit(128 + signum)

    def handle(
        self,
        *args: Any,
        portal: str | None = None,
        force: bool = False,
        all_unacknowledged: bool = False,
        **options: Any,
    ) -> None:
        stopping.install_poller(self._stop_now)
        run = CommandRun.objects.create(command=COMMAND)
        previous = (
            CommandRun.objects.filter(command=COMMAND).exclude(pk=run.pk).order_by("-started_at").first()
        )
        exit_code = 1
        try:
            self._handle(portal, force, previous.started_at if previous else None, all_unacknowledged)
            exit_code = 0
        finally:
            CommandRun.objects.filter(pk=run.pk).update(finished_at=timezone.now(), exit_code=exit_code)
            stopping.uninstall_poller()

    def _flagged(self, since: datetime | None, all_unacknowledged: bool) -> int:
        """Pairs flagged lost by any process (the sweep, a resolver, a worker) since the previous run started,
        or, with --all-unacknowledged, every lost pair staff have not acknowledged: named, and counted."""
        lost = selectors.lost_pairs().select_related("portal")
        if all_unacknowledged:
            lost = lost.filter(lost_acknowledged_at__isnull=True)
        elif since is not None:
            lost = lost.filter(lost_at__gte=since)
        else:
            lost = lost.filter(lost_at__isnull=False, lost_acknowledged_at__isnull=True)
        flagged = list(lost.order_by("lost_at"))
        for pair in flagged:
            when = f"{pair.lost_at:%Y-%m-%d %H:%M:%S} UTC" if pair.lost_at else "before lost pairs were dated"
            self.stderr.write(
                f"LOST: {pair.portal.domain} ({pair.portal.member_id}) pair of user {pair.user_id}, flagged {when}: "
                f"{pair.last_error} (the portal needs a reinstall; acknowledge it in the admin)"
            )
        return len(flagged)

    def _handle(
        self, portal: str | None, force: bool, since: datetime | None = None, all_unacknowledged: bool = False
    ) -> None:
        target = None
        if portal:
            target = Portal.objects.filter(member_id=portal).first()
            if target is None:
                raise CommandError(f"No portal with member_id {portal!r}.")
        try:
            lost = self._resolve(target)
            renewed, skipped, failed, total, stopped = self._renew(target, force)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        flagged = self._flagged(since, all_unacknowledged)
        summary = f"{renewed} renewed, {skipped} skipped, {failed} failed, of {total}."
        if lost:
            summary += f" {lost} portal pair(s) found LOST in interrupted renewals: they need a reinstall."
        if flagged:
            which = "not acknowledged" if all_unacknowledged else "flagged since the previous run"
            summary += f" {flagged} pair(s) LOST, {which}."
        if stopped:
            raise CommandError(f"Stopped by a signal after the renewal in hand. {summary}")
        if failed or lost or flagged:
            raise CommandError(summary)
        self.stdout.write(self.style.SUCCESS(summary))

    def _resolve(self, target: Portal | None) -> int:
        """Renewals an earlier process left in flight (crash, kill): recovered, retried or lost."""
        lost = 0
        for attempt in list(renewal.unfinished_attempts(target)):
            result = renewal.resolve_attempt(attempt.pk, trigger=RenewalTrigger.COMMAND)
            if result is None:
                continue
            where = f"{attempt.portal.domain} pair {attempt.pair_id}"
            when = f"{attempt.started_at:%Y-%m-%d %H:%M:%S} UTC"
            if result.outcome == "lost":
                lost += 1
                self.stderr.write(f"unfinished renewal of {where} (from {when}): LOST: {result.detail}")
            elif result.outcome == "in_progress":
                self.stdout.write(
                    f"unfinished renewal of {where} (from {when}): still running, {result.detail}"
                )
            else:
                self.stdout.write(
                    f"unfinished renewal of {where} (from {when}): {result.outcome}"
                    + (f" ({result.detail})" if result.detail else "")
                )
        return lost

    def _renew(self, target: Portal | None, force: bool) -> tuple[int, int, int, int, bool]:
        if target is not None:
            pairs = TokenPair.objects.filter(portal=target)
            if not force:
                pairs = pairs.filter(pk__in=selectors.due_pairs().values("pk"))
        else:
            pairs = TokenPair.objects.all() if force else selectors.due_pairs()
        ids = list(pairs.order_by("pk").values_list("pk", flat=True))
        if not ids:
            self.stdout.write(
                "Nothing to renew" + ("" if force else " (no pair is due; --force renews anyway)") + "."
            )
            return 0, 0, 0, 0, False
        renewed = skipped = failed = 0
        total = len(ids)
        for index, pair_id in enumerate(ids, start=1):
            if stopping.stop_requested():
                return renewed, skipped, failed, total, True
            try:
                result = renewal.renew_pair(pair_id, trigger=RenewalTrigger.COMMAND, force=force)
            except TokenPair.DoesNotExist:
                skipped += 1
                continue
            except errors.RenewalFailed as exc:
                failed += 1
                kind = "will retry later" if exc.transient else "refused for good, needs reinstall"
                self.stderr.write(f"[{index}/{total}] pair {pair_id}: FAILED ({exc.code}, {kind})")
                continue
            pair = result.pair
            if not result.renewed:
                skipped += 1
                self.stdout.write(
                    f"[{index}/{total}] {pair.portal.domain} user {pair.user_id}: not needed any more"
                )
                continue
            renewed += 1
            self.stdout.write(
                f"[{index}/{total}] {pair.portal.domain} user {pair.user_id}: renewed "
                f"(refresh token fp {fingerprint(pair.refresh_token)})"
            )
        return renewed, skipped, failed, total, stopping.stop_requested()
