"""Where deliveries wait while the database cannot take them, and the application tokens that admit them.

Bitrix24 delivers an event once: an `/events/` delivery answered 503 is gone. While the database is away,
a delivery that can be admitted without it (install.deferred decides which) is kept here, encrypted,
and moved into the database when it returns (one drain: install.deferred).

Where: Redis when `REDIS_URL` is set, else, or when Redis cannot take it, files under
`DJANGO_VAR_DIR/spool/` (each written and fsynced before it is renamed into place). Readers look in
both. Bounded: per source, per `member_id` and in bytes (`BITRIX24_SPOOL_*`), checked and counted in
one step (a Lua script in Redis, a file lock on disk), so concurrent web processes cannot overshoot.

The application-token mirror: an HMAC (keyed by SECRET_KEY) of each installed portal's application
token, by `member_id`, in the same place. It lets an event be admitted while the database is away
without keeping the tokens themselves outside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.utils.crypto import constant_time_compare, salted_hmac

from . import crypto, stores

logger = logging.getLogger(__name__)

UNVERIFIED = "u"  # entries nothing proved yet (lifecycle events): tighter bounds
VERIFIED = "v"  # entries admitted by the application-token mirror


class SpoolFull(Exception):
    """The spool cannot keep this entry: `reason` says which bound, `retry_after` when to come back;
    `sender` is True when the bound is the sender's own (its portal's or its address's share)."""

    def __init__(self, reason: str, *, sender: bool = False, retry_after: int = 60) -> None:
        super().__init__(reason)
        self.sender = sender
        self.retry_after = retry_after


class SpoolUnavailable(Exception):
    """Neither Redis nor the local folder can keep anything."""


@dataclass(frozen=True)
class Entry:
    key: str  # unique; also the deduplication key when it is moved into the database
    received: float  # UNIX time it came
    trust: str
    size: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class Depth:
    entries: int
    bytes: int
    oldest: float | None  # UNIX time of the oldest entry


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _limits(trust: str) -> tuple[int, int]:
    """(per source, per member_id) for entries of this trust."""
    if trust == UNVERIFIED:
        return settings.BITRIX24_SPOOL_UNVERIFIED_PER_SOURCE, settings.BITRIX24_SPOOL_UNVERIFIED_PER_PORTAL
    return settings.BITRIX24_SPOOL_PER_SOURCE, settings.BITRIX24_SPOOL_PER_PORTAL


def _name(received_ns: int, member: str, source: str, size: int, trust: str) -> str:
    # Everything the bounds need is in the key: counting and forgetting need no decryption. Nanoseconds
    # first, so that keys sort in the order the deliveries came.
    return f"{received_ns:020d}-{secrets.token_hex(4)}.{_hash(member)}.{_hash(source)}.{size}.{trust}"


def _parts(key: str) -> tuple[float, str, str, int, str]:
    stamp, member, source, size, trust = key.split(".")
    return int(stamp.split("-")[0]) / 1e9, member, source, int(size), trust


# --- Redis -----------------------------------------------------------------------------------------


def _redis(url: str) -> Any:
    return stores.redis_client(url)


def _prefix() -> str:
    # In braces: a hash tag, so the spool's keys (one Lua script touches three) share a Redis Cluster slot.
    return f"{{{settings.CELERY_TASK_DEFAULT_QUEUE}:spool}}"


# KEYS: entries (hash), order (sorted set), counts (hash). ARGV: key, blob, score, member field, source
# field, size, per-member limit, per-source limit, byte limit.
_PUT = """
local m = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0')
local s = tonumber(redis.call('HGET', KEYS[3], ARGV[5]) or '0')
local b = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
if m >= tonumber(ARGV[7]) then return 'portal' end
if s >= tonumber(ARGV[8]) then return 'source' end
if b + tonumber(ARGV[6]) > tonumber(ARGV[9]) then return 'bytes' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[6])
return 'ok'
"""

# KEYS as above. ARGV: key, member field, source field, size. Counts only what it really removed.
_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(ARGV[4]))
return 1
"""


def _redis_keys() -> list[str]:
    prefix = _prefix()
    return [f"{prefix}:entries", f"{prefix}:order", f"{prefix}:counts"]


def _fields(key: str) -> tuple[str, str, int]:
    _, member, source, size, trust = _parts(key)
    return f"{trust}:m:{member}", f"{trust}:s:{source}", size


def _put_redis(key: str, blob: str, received: float) -> str:
    client = _redis(settings.REDIS_URL)
    member_field, source_field, size = _fields(key)
    per_source, per_member = _limits(_parts(key)[4])
    verdict = client.eval(
        _PUT,
        3,
        *_redis_keys(),
        key,
        blob,
        received,
        member_field,
        source_field,
        size,
        per_member,
        per_source,
        settings.BITRIX24_SPOOL_MAX_BYTES,
    )
    return verdict.decode() if isinstance(verdict, bytes) else str(verdict)


# --- files -----------------------------------------------------------------------------------------


def folder() -> Path:
    return Path(settings.VAR_DIR) / "spool"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_keys() -> list[str]:
    where = folder()
    if not where.is_dir():
        return []
    return sorted(p.name[: -len(".spool")] for p in where.glob("*.spool"))


def _put_file(key: str, blob: str) -> str:
    _, member, source, size, trust = _parts(key)
    per_source, per_member = _limits(trust)
    with _locked(folder() / ".lock"):
        members = sources = total = 0
        for other in _file_keys():
            _, other_member, other_source, other_size, other_trust = _parts(other)
            total += other_size
            if other_trust == trust:
                members += other_member == member
                sources += other_source == source
        if members >= per_member:
            return "portal"
        if sources >= per_source:
            return "source"
        if total + size > settings.BITRIX24_SPOOL_MAX_BYTES:
            return "bytes"
        stores.write_durably(folder() / f"{key}.spool", blob)
    return "ok"


# --- the spool -------------------------------------------------------------------------------------

_REFUSALS = {
    "portal": "this portal has the most deliveries the spool keeps for one portal",
    "source": "the most deliveries the spool keeps from one address",
    "bytes": "the spool is full (BITRIX24_SPOOL_MAX_BYTES)",
}


def put(payload: dict[str, Any], *, member_id: str, source: str, trust: str) -> str:
    """Keep one delivery (encrypted). Returns its key; raises SpoolFull past a bound, SpoolUnavailable
    when neither Redis nor the folder can keep it."""
    text = json.dumps(payload, separators=(",", ":"))
    if len(text.encode()) > settings.BITRIX24_SPOOL_MAX_ENTRY_BYTES:
        raise SpoolFull(f"the delivery is larger than {settings.BITRIX24_SPOOL_MAX_ENTRY_BYTES} bytes")
    received_ns = time.time_ns()
    received = received_ns / 1e9
    blob = crypto.encrypt(json.dumps({"received": received, "payload": payload}, separators=(",", ":")))
    key = _name(received_ns, member_id, source, len(blob), trust)
    verdict = ""
    if settings.REDIS_URL:
        try:
            verdict = _put_redis(key, blob, received)
        except redis.RedisError as exc:
            logger.warning("The spool cannot use Redis (%s): keeping the delivery on local disk", exc)
    if not verdict:
        try:
            verdict = _put_file(key, blob)
        except OSError as exc:
            raise SpoolUnavailable(f"neither Redis nor {folder()} can keep it: {exc}") from exc
    if verdict != "ok":
        raise SpoolFull(_REFUSALS.get(verdict, verdict), sender=verdict in ("portal", "source"))
    return key


def _decode(key: str, blob: str | bytes) -> Entry | None:
    try:
        data = json.loads(crypto.decrypt(blob.decode() if isinstance(blob, bytes) else blob))
    except Exception as exc:  # a key since removed, a damaged file: loudly, and it must not wedge the rest
        logger.error("Unreadable spool entry %s: %s", key, exc)
        return None
    _, _, _, size, trust = _parts(key)
    return Entry(key=key, received=float(data["received"]), trust=trust, size=size, payload=data["payload"])


def entries(limit: int = 500) -> list[Entry]:
    """The oldest entries, from both stores, in the order they came."""
    found: list[Entry] = []
    if settings.REDIS_URL:
        try:
            client = _redis(settings.REDIS_URL)
            entries_key, order_key, _ = _redis_keys()
            keys = [k.decode() for k in client.zrange(order_key, 0, limit - 1)]
            blobs = client.hmget(entries_key, keys) if keys else []
            found += [e for k, b in zip(keys, blobs, strict=True) if b and (e := _decode(k, b))]
        except redis.RedisError as exc:
            logger.warning("Cannot read the spool in Redis: %s", exc)
    for key in _file_keys()[:limit]:
        with contextlib.suppress(FileNotFoundError):
            entry = _decode(key, (folder() / f"{key}.spool").read_text())
            if entry is not None:
                found.append(entry)
    found.sort(key=lambda entry: entry.key)
    return found[:limit]


def remove(key: str) -> None:
    """Forget an entry once the database holds it (or it can never be read)."""
    (folder() / f"{key}.spool").unlink(missing_ok=True)
    if settings.REDIS_URL:
        member_field, source_field, size = _fields(key)
        _redis(settings.REDIS_URL).eval(_REMOVE, 3, *_redis_keys(), key, member_field, source_field, size)


def depth() -> Depth:
    """How much waits, for the metrics and the health answer. Unknown parts count as nothing."""
    stamps: list[float] = []
    total = 0
    if settings.REDIS_URL:
        try:
            client = _redis(settings.REDIS_URL)
            _, order_key, counts_key = _redis_keys()
            count = int(client.zcard(order_key))
            oldest = client.zrange(order_key, 0, 0, withscores=True)
            total += int(client.hget(counts_key, "bytes") or 0)
            if oldest:
                stamps.append(float(oldest[0][1]))
        except redis.RedisError:
            count = 0
    else:
        count = 0
    keys = _file_keys()
    for key in keys:
        total += _parts(key)[3]
    if keys:
        stamps.append(_parts(keys[0])[0])
    return Depth(entries=count + len(keys), bytes=total, oldest=min(stamps) if stamps else None)


def can_take() -> str:
    """Where a delivery would be kept now ("redis" or "disk"), or "" when nowhere (readiness). A Redis that
    answers decides alone, as `put` does; the folder is used only without one."""
    if settings.REDIS_URL:
        try:
            held = int(_redis(settings.REDIS_URL).hget(_redis_keys()[2], "bytes") or 0)
        except redis.RedisError:
            pass
        else:
            return "redis" if held < settings.BITRIX24_SPOOL_MAX_BYTES else ""
    try:
        folder().mkdir(parents=True, exist_ok=True)
    except OSError:
        return ""
    held = sum(_parts(key)[3] for key in _file_keys())
    return "disk" if os.access(folder(), os.W_OK) and held < settings.BITRIX24_SPOOL_MAX_BYTES else ""


# --- the application-token mirror ----------------------------------------------------------------

MIRROR_FILE = "application-tokens.json"
_SYNCED = "__synced__"


def token_digest(application_token: str) -> str:
    # 128 bits of an HMAC: as good as the whole against a guess, half the memory a portal (docs/scaling.md).
    return salted_hmac("bitrix24.spool.application-token", application_token).hexdigest()[:32]


def _mirror_key() -> str:
    return f"{_prefix()}:application-tokens"


def mirror_replace(tokens: dict[str, str]) -> None:
    """The whole mirror from the database (`member_id` -> application token): portals gone are dropped."""
    digests = {member: token_digest(token) for member, token in tokens.items() if token}
    digests[_SYNCED] = str(time.time())
    if settings.REDIS_URL:
        try:
            key = _mirror_key()
            with _redis(settings.REDIS_URL).pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=digests)
                pipe.execute()
        except redis.RedisError as exc:
            logger.warning("Cannot write the application-token mirror to Redis: %s", exc)
    with _locked(folder() / ".mirror.lock"):
        stores.write_durably(folder() / MIRROR_FILE, json.dumps(digests))


def mirror_set(member_id: str, application_token: str) -> None:
    """One portal's entry, as its application token changes ("" forgets it). Best effort: the next full
    rewrite (install.deferred, every few minutes) repairs a miss."""
    digest = token_digest(application_token) if application_token else ""
    if settings.REDIS_URL:
        try:
            client = _redis(settings.REDIS_URL)
            if digest:
                client.hset(_mirror_key(), member_id, digest)
            else:
                client.hdel(_mirror_key(), member_id)
        except redis.RedisError as exc:
            logger.warning("Cannot update the application-token mirror in Redis: %s", exc)
    try:
        with _locked(folder() / ".mirror.lock"):
            path = folder() / MIRROR_FILE
            current = json.loads(path.read_text()) if path.exists() else {}
            if digest:
                current[member_id] = digest
            else:
                current.pop(member_id, None)
            stores.write_durably(path, json.dumps(current))
    except (OSError, ValueError) as exc:
        logger.warning("Cannot update the application-token mirror on disk: %s", exc)


def mirror_matches(member_id: str, application_token: str) -> bool | None:
    """Whether the application token is the portal's, by the mirror; None when no mirror can be read
    (never written, or nowhere to read it from): the delivery cannot be admitted."""
    digest: str | None = None
    known = False
    if settings.REDIS_URL:
        try:
            stored, synced = _redis(settings.REDIS_URL).hmget(_mirror_key(), [member_id, _SYNCED])
            if synced is not None:
                known = True
                digest = stored.decode() if isinstance(stored, bytes) else None
        except redis.RedisError:
            pass
    if not known:
        try:
            current = json.loads((folder() / MIRROR_FILE).read_text())
        except (OSError, ValueError):
            return None
        known = _SYNCED in current
        digest = current.get(member_id)
    if not known:
        return None
    # Compared even when the portal is unknown, so timing does not tell which member_ids exist.
    return constant_time_compare(digest or "\0", token_digest(application_token)) and digest is not None


def mirror_synced_at() -> float | None:
    """When the mirror was last rewritten from the database (UNIX time), None when never or unreadable."""
    if settings.REDIS_URL:
        try:
            synced = _redis(settings.REDIS_URL).hget(_mirror_key(), _SYNCED)
            if synced is not None:
                return float(synced)
        except (redis.RedisError, ValueError):
            pass
    try:
        return float(json.loads((folder() / MIRROR_FILE).read_text())[_SYNCED])
    except (OSError, ValueError, KeyError):
        return None
