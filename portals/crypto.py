"""Tokens at rest: Fernet with key rotation (fingerprints and masks: `portals.masking`).

The keys are raw Fernet keys from BITRIX24_TOKEN_KEYS: the first encrypts, all decrypt, so a
new key is put first, `rotate_token_keys` re-encrypts every row, and the old key is dropped.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@lru_cache(maxsize=8)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise ImproperlyConfigured("BITRIX24_TOKEN_KEYS holds no key")
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(
            "BITRIX24_TOKEN_KEYS must be comma-separated Fernet keys (32 url-safe base64-encoded bytes each)"
        ) from exc


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.BITRIX24_TOKEN_KEYS))


def encrypt(value: str) -> str:
    return fernet().encrypt(value.encode()).decode()


def decrypt(value: str) -> str:
    try:
        return fernet().decrypt(value.encode()).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured(
            "A stored token cannot be decrypted with BITRIX24_TOKEN_KEYS: was a key removed before "
            "`manage.py rotate_token_keys` re-encrypted the rows?"
        ) from exc


def rotate(value: str) -> str:
    """Re-encrypt with the first key (no-op cost for rows already on it is one decrypt)."""
    return fernet().rotate(value.encode()).decode()
