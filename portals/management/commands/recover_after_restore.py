from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from portals import journal, renewal
from portals.models import PairState, TokenPair


class Command(BaseCommand):
    help = (
        "Run after restoring the database from a backup: puts back each pair's latest renewal answer the "
        "backup is older than (refresh tokens are single-use: the restored ones were used since), from the "
        "copies kept for BITRIX24_RENEWAL_COPY_DAYS in Redis and this host's DJANGO_VAR_DIR, and names the "
        "pairs that can no longer be trusted. Exits 1 when it names any."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--restored-at",
            metavar="WHEN",
            help="the time the backup was taken (ISO 8601, UTC when no offset): a restore point older than "
            "BITRIX24_RENEWAL_COPY_DAYS cannot be fully recovered, and the command says which pairs may be hit",
        )

    def handle(self, *args: Any, restored_at: str | None = None, **options: Any) -> None:
        point = self._point(restored_at)
        copies = journal.kept_copies()
        counts = {"restored": 0, "current": 0, "newer": 0, "gone": 0}
        untrusted: list[str] = []
        for pair_id, copy in sorted(copies.items()):
            if copy.grant is None:
                untrusted.append(self._name(pair_id, f"its kept renewal copy cannot be read ({copy.error})"))
                continue
            outcome = renewal.restore_from_copy(copy)
            counts[outcome] += 1
            if outcome == "restored":
                self.stdout.write(
                    f"Pair {pair_id}: restored from the copy kept at {self._when(copy.kept_at)}."
                )
        if point is not None:
            untrusted += self._uncovered(point, copies)
        self.stdout.write(
            f"{len(copies)} kept copy(ies): {counts['restored']} pair(s) restored, {counts['current']} already "
            f"current, {counts['newer']} with newer tokens since, {counts['gone']} not in this database."
        )
        if untrusted:
            self.stdout.write(f"{len(untrusted)} pair(s) can no longer be trusted:")
            for line in untrusted:
                self.stdout.write(f"  {line}")
            self.stdout.write(
                "Their refresh tokens were most likely used after the backup: an admin's launch of the app, or "
                "a reinstall, gives them new tokens. Run `manage.py renew_tokens --force` to find out now."
            )
            raise CommandError(f"{len(untrusted)} pair(s) can no longer be trusted", returncode=1)
        self.stdout.write(
            self.style.SUCCESS("Every pair renewed since the backup holds its latest tokens again.")
        )

    def _point(self, text: str | None) -> datetime | None:
        if not text:
            return None
        point = parse_datetime(text)
        if point is None:
            raise CommandError(f"--restored-at: {text!r} is not an ISO 8601 time (e.g. 2026-12-05T03:00:00Z)")
        return point if timezone.is_aware(point) else timezone.make_aware(point, UTC)

    def _uncovered(self, point: datetime, copies: dict[int, journal.KeptCopy]) -> list[str]:
        """Pairs that may have been renewed between the restore point and the oldest copy still kept."""
        kept_since = timezone.now() - timedelta(days=settings.BITRIX24_RENEWAL_COPY_DAYS)
        if point >= kept_since:
            return []
        self.stdout.write(
            f"The backup is older than BITRIX24_RENEWAL_COPY_DAYS ({settings.BITRIX24_RENEWAL_COPY_DAYS:g}): a pair "
            f"renewed between {point:%Y-%m-%d %H:%M} and {kept_since:%Y-%m-%d %H:%M} UTC left no copy."
        )
        lifetime = timedelta(
            days=settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS - settings.BITRIX24_RENEW_MARGIN_DAYS
        )
        # Due (so maybe renewed) before copies were kept, and not put back from a copy.
        suspects = TokenPair.objects.filter(refresh_issued_at__lt=kept_since - lifetime).exclude(
            pk__in=list(copies)
        )
        return [
            self._name(pair.pk, f"due since {pair.refresh_issued_at + lifetime:%Y-%m-%d}, no copy kept")
            for pair in suspects.select_related("portal")
            if pair.state == PairState.ACTIVE
        ]

    @staticmethod
    def _name(pair_id: int, why: str) -> str:
        pair = TokenPair.objects.select_related("portal").filter(pk=pair_id).first()
        who = (
            f"portal {pair.portal.member_id} ({pair.portal.domain}), user {pair.user_id}"
            if pair
            else "not in this database"
        )
        return f"pair {pair_id}, {who}: {why}"

    @staticmethod
    def _when(stamp: float | None) -> str:
        return f"{datetime.fromtimestamp(stamp or 0, tz=UTC):%Y-%m-%d %H:%M:%S} UTC"
