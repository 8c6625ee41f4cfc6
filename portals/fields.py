from __future__ import annotations

from typing import Any

from django.db import models

from . import crypto


class EncryptedTextField(models.TextField):
    """A text column holding Fernet ciphertext; Python sees the clear text.

    Written for this project rather than taken from a library: the maintained encrypted-field
    packages derive their keys from SECRET_KEY and salts, while the contract asks for raw Fernet
    keys in BITRIX24_TOKEN_KEYS with "first encrypts, all decrypt" rotation.
    Not searchable or orderable by value, by design.
    """

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return crypto.encrypt(str(value))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None or value == "":
            return value
        return crypto.decrypt(value)
