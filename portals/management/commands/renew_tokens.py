from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from portals import errors, renewal, selectors
from portals.masking import fingerprint
from portals.models import Portal, RenewalTrigger, TokenPair


class Command(BaseCommand):
    help = (
        "Renew due token pairs now: all due ones, or one portal's (--portal); --force renews even if not due."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--portal", metavar="MEMBER_ID", help="only this portal's pairs")
        parser.add_argument("--force", action="store_true", help="renew even pairs that are not due")

    def handle(self, *args: Any, portal: str | None = None, force: bool = False, **options: Any) -> None:
        if portal:
            target = Portal.objects.filter(member_id=portal).first()
            if target is None:
                raise CommandError(f"No portal with member_id {portal!r}.")
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
            return
        renewed = skipped = failed = 0
        total = len(ids)
        for index, pair_id in enumerate(ids, start=1):
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
            except ImproperlyConfigured as exc:
                raise CommandError(str(exc)) from exc
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
        summary = f"{renewed} renewed, {skipped} skipped, {failed} failed, of {total}."
        if failed:
            raise CommandError(summary)
        self.stdout.write(self.style.SUCCESS(summary))
