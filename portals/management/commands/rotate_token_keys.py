from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import connection, transaction

from portals import crypto, journal
from portals.models import Portal, TokenPair


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored token with the first key of BITRIX24_TOKEN_KEYS. Put the new key first, "
        "run this, then drop the old key."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        # Raw ciphertext is read and written with .values()/.update() so that nothing is decrypted
        # into model instances and re-saved with unrelated side effects (auto_now, signals).
        done = 0
        for model, fields in (
            (TokenPair, ("access_token", "refresh_token")),
            (Portal, ("application_token", "pending_application_token")),
        ):
            table = model._meta.db_table
            ids = list(model.objects.values_list("pk", flat=True))
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                with transaction.atomic(), connection.cursor() as cursor:
                    cols = ", ".join(fields)
                    placeholders = ", ".join(["%s"] * len(batch))
                    cursor.execute(
                        f"SELECT id, {cols} FROM {table} WHERE id IN ({placeholders}) FOR UPDATE"
                        if connection.vendor == "postgresql"
                        else f"SELECT id, {cols} FROM {table} WHERE id IN ({placeholders})",
                        batch,
                    )
                    rows = cursor.fetchall()
                    for row in rows:
                        values = [crypto.rotate(v) if v else v for v in row[1:]]
                        sets = ", ".join(f"{f} = %s" for f in fields)
                        cursor.execute(f"UPDATE {table} SET {sets} WHERE id = %s", [*values, row[0]])
                    done += len(rows)
            self.stdout.write(f"{model.__name__}: {len(ids)} row(s) re-encrypted")
        copies = journal.rotate_copies(crypto.rotate)
        if copies:
            self.stdout.write(f"Second copies of renewals: {copies} re-encrypted")
        self.stdout.write(self.style.SUCCESS(f"Done: {done} row(s) now encrypted with the first key."))
