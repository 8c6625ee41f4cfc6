"""The second copy of a new token pair, and who holds a refresh in flight.

The moment the OAuth server's answer arrives, the new pair is written here (encrypted) before the
database is asked to store it. The database may be down, or the process may die before its commit;
either way the answer is not lost: whoever resolves the interrupted attempt finds it here.

Where: Redis when `REDIS_URL` is set (with a TTL; a resolver on any machine finds it there), else, or
when Redis cannot take it, a file under `DJANGO_VAR_DIR/renewal-grants/` (written and fsynced before it
is renamed into place). Readers look in both.

Who holds an attempt: host name, process id, and that process's start (boot id and start time from
/proc): a process id reused after a crash does not pass for the holder. Only a holder on this host
can be proven dead; one on another host is presumed alive until its lease expires.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from django.conf import settings

from . import crypto, stores
from .oauth import TokenGrant

logger = logging.getLogger(__name__)

TTL_SECONDS = 30 * 86400  # beyond any refresh token's life: a copy older than that is worthless


# --- holder identity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str  # "" where /proc is not there to tell


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's PID namespace: two containers on one kernel share the boot id and may share a
    host name, and a process id means nothing across their namespaces."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """A process's identity beyond its id: PID namespace, boot id and start time, as seen from this
    process's namespace. None when no such process runs here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] == "Z":  # a zombie has finished; only its parent has not reaped it
        return None
    # "|" between the parts: the namespace reads like "pid:[4026531836]".
    return f"{_pid_namespace()}|{_boot_id()}|{fields[19]}" if len(fields) > 19 else ""


def current_holder() -> Holder:
    pid = os.getpid()
    return Holder(host=socket.gethostname(), pid=pid, start=process_start(pid) or "")


def holder_is_dead(host: str, pid: int, start: str) -> bool:
    """True only when the holder is proven gone: on this host and in this PID namespace, and its process
    id is not running or is running as another process. A lost database session proves nothing."""
    if host != socket.gethostname() or not start:
        return False
    namespace, boot_id, *_ = [*start.split("|"), "", ""]
    if namespace != _pid_namespace():
        return False  # another container on this kernel: its processes are not ours to see
    if boot_id != _boot_id():
        # Another machine with the same host name (containers with host networking take the host's), whose
        # root PID namespace has the same number as ours: its process ids mean nothing here. Or this
        # machine before a reboot: then the holder is gone, but its lease says so soon enough.
        return False
    running = process_start(pid)
    return running is None or (running != "" and running != start)


# --- the second copy ------------------------------------------------------------------------------


def _folder() -> Path:
    return Path(settings.VAR_DIR) / "renewal-grants"


def _redis_key(attempt_id: int) -> str:
    return f"{settings.CELERY_TASK_DEFAULT_QUEUE}:renewal-grant:{attempt_id}"


def _redis(url: str) -> Any:
    return stores.redis_client(url)


def _encode(grant: TokenGrant, pair_id: int, old_fingerprint: str) -> str:
    data = asdict(grant)
    data["expires_at"] = grant.expires_at.isoformat()
    # Which pair and which old token it answers: a copy found under a reused attempt id (a restored
    # database, two deployments on one Redis) must not be taken for another pair's. When: a restored
    # database older than the copy gets it back (`kept_copies`).
    return crypto.encrypt(
        json.dumps(
            {"pair_id": pair_id, "old_fingerprint": old_fingerprint, "grant": data, "kept_at": time.time()}
        )
    )


def _decode(blob: str, pair_id: int, old_fingerprint: str) -> TokenGrant | None:
    data = json.loads(crypto.decrypt(blob))
    if data.get("pair_id") != pair_id or data.get("old_fingerprint") != old_fingerprint:
        logger.error("A second copy under this attempt id belongs to another pair; ignored")
        return None
    grant = data["grant"]
    grant["expires_at"] = datetime.fromisoformat(grant["expires_at"])
    return TokenGrant(**grant)


def keep(attempt_id: int, grant: TokenGrant, *, pair_id: int, old_fingerprint: str) -> bool:
    """Write the second copy, to Redis (when configured) *and* to an fsynced file; True when at least one
    store has it. Never raises: the caller still holds the grant and stores it in the database either way.

    Both, not one: Redis serves every machine's resolvers, but a Redis without persistence (or one that
    evicts keys) loses the copy when it restarts, possibly in the same power cut that kills the worker; the
    file survives that on this host (in a container: a volume the host's workers share)."""
    try:
        blob = _encode(grant, pair_id, old_fingerprint)
    except Exception:
        logger.exception("Cannot encode the second copy of renewal %s", attempt_id)
        return False
    in_redis = False
    if settings.REDIS_URL:
        try:
            _redis(settings.REDIS_URL).set(_redis_key(attempt_id), blob, ex=TTL_SECONDS)
            in_redis = True
        except redis.RedisError as exc:
            logger.warning("Cannot write the second copy of renewal %s to Redis: %s", attempt_id, exc)
    return _keep_file(attempt_id, blob) or in_redis


def _keep_file(attempt_id: int, blob: str) -> bool:
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stores.write_durably(folder / f"{attempt_id}.grant", blob)
    except OSError as exc:
        logger.error("Cannot write the second copy of renewal %s to %s: %s", attempt_id, folder, exc)
        return False
    return True


def find(attempt_id: int, *, pair_id: int, old_fingerprint: str) -> TokenGrant | None:
    """The second copy of an attempt's answer, from whichever store has it. An unreadable copy (for
    example encrypted with a key since removed) counts as none, loudly: it must not wedge the pair."""
    path = _folder() / f"{attempt_id}.grant"
    try:
        found = _decode(path.read_text(), pair_id, old_fingerprint)
        if found is not None:
            return found
    except FileNotFoundError:
        pass
    except Exception as exc:
        logger.error("Unreadable second copy %s: %s", path, exc)
    if settings.REDIS_URL:
        try:
            blob = _redis(settings.REDIS_URL).get(_redis_key(attempt_id))
        except redis.RedisError as exc:
            logger.warning("Cannot read the second copy of renewal %s from Redis: %s", attempt_id, exc)
            return None
        if blob:
            try:
                return _decode(
                    blob.decode() if isinstance(blob, bytes) else str(blob), pair_id, old_fingerprint
                )
            except Exception as exc:
                logger.error("Unreadable second copy of renewal %s in Redis: %s", attempt_id, exc)
    return None


def _stored_folder() -> Path:
    return _folder() / "stored"


def _stored_key(pair_id: int | str) -> str:
    return f"{settings.CELERY_TASK_DEFAULT_QUEUE}:renewal-stored:{pair_id}"


def retention_seconds() -> int:
    return int(settings.BITRIX24_RENEWAL_COPY_DAYS * 86400)


def forget(attempt_id: int, *, pair_id: int | None = None) -> None:
    """The database holds the pair: the copy is no longer needed to resolve the attempt. It is kept, as
    the pair's latest, for BITRIX24_RENEWAL_COPY_DAYS (`pair_id` given and the setting above 0): a database
    restored from a backup brings back refresh tokens already used, and `recover_after_restore` puts the
    live ones back from these. Best effort: the resolver's copy expires anyway."""
    keep_for = retention_seconds() if pair_id is not None else 0
    path = _folder() / f"{attempt_id}.grant"
    try:
        if keep_for and path.exists():
            _stored_folder().mkdir(parents=True, exist_ok=True)
            path.replace(_stored_folder() / f"{pair_id}.grant")  # the pair's latest replaces the one before
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("Cannot retire the second copy of renewal %s: %s", attempt_id, exc)
    if settings.REDIS_URL:
        try:
            client = _redis(settings.REDIS_URL)
            if keep_for:
                with client.pipeline(transaction=True) as pipe:
                    pipe.rename(_redis_key(attempt_id), _stored_key(pair_id or 0))
                    pipe.expire(_stored_key(pair_id or 0), keep_for)
                    pipe.execute()
            else:
                client.delete(_redis_key(attempt_id))
        except redis.ResponseError:
            pass  # no such key: the copy went to the file only
        except redis.RedisError as exc:
            logger.warning("Cannot retire the second copy of renewal %s in Redis: %s", attempt_id, exc)


@dataclass(frozen=True)
class KeptCopy:
    """A pair's latest renewal answer, kept after it was stored (`forget`)."""

    pair_id: int
    where: str  # "redis" or the file's path
    grant: TokenGrant | None  # None when the copy cannot be read (a key since removed, a damaged file)
    kept_at: float | None
    error: str = ""
    old_fingerprint: str = ""  # of the refresh token it replaced


def _read_kept(pair_id: int, blob: str, where: str) -> KeptCopy:
    try:
        data = json.loads(crypto.decrypt(blob))
        if data.get("pair_id") != pair_id:
            raise ValueError(f"it names pair {data.get('pair_id')}")
        grant = data["grant"]
        grant["expires_at"] = datetime.fromisoformat(grant["expires_at"])
        found = TokenGrant(**grant)
        kept_at = float(data.get("kept_at") or found.expires_at.timestamp() - 3600)
        return KeptCopy(
            pair_id=pair_id,
            where=where,
            grant=found,
            kept_at=kept_at,
            old_fingerprint=str(data.get("old_fingerprint", "")),
        )
    except Exception as exc:
        return KeptCopy(
            pair_id=pair_id, where=where, grant=None, kept_at=None, error=f"{type(exc).__name__}: {exc}"
        )


def kept_copies() -> dict[int, KeptCopy]:
    """Every pair's latest kept copy, from Redis and this host's folder: the newer of the two when both
    have one; an unreadable one only when no readable one is found."""
    found: list[KeptCopy] = []
    folder = _stored_folder()
    for path in folder.glob("*.grant") if folder.is_dir() else []:
        try:
            found.append(_read_kept(int(path.stem), path.read_text(), str(path)))
        except (OSError, ValueError) as exc:
            logger.error("Unreadable kept copy %s: %s", path, exc)
    if settings.REDIS_URL:
        client = _redis(settings.REDIS_URL)
        prefix = _stored_key("")
        for key in client.scan_iter(match=f"{prefix}*"):
            name = key.decode() if isinstance(key, bytes) else str(key)
            blob = client.get(name)
            if isinstance(blob, bytes | str) and blob:
                text = blob.decode() if isinstance(blob, bytes) else blob
                found.append(_read_kept(int(name[len(prefix) :]), text, "redis"))
    latest: dict[int, KeptCopy] = {}
    for copy in found:
        current = latest.get(copy.pair_id)
        if current is None or (copy.kept_at or 0) > (current.kept_at or 0):
            latest[copy.pair_id] = copy
    return latest


def sweep_files(older_than: float = TTL_SECONDS) -> int:
    """Remove local copies past their usefulness (Redis expires its own): an attempt's after TTL_SECONDS,
    a pair's kept one after BITRIX24_RENEWAL_COPY_DAYS."""
    removed = 0
    now = time.time()
    for folder, age in ((_folder(), older_than), (_stored_folder(), retention_seconds())):
        for path in folder.glob("*.grant") if folder.is_dir() else []:
            try:
                if path.stat().st_mtime < now - age:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
    return removed


def rotate_copies(rotate: Callable[[str], str]) -> int:
    """Re-encrypt the second copies still kept (rotate_token_keys), so that dropping the old key does
    not make them unreadable."""
    done = 0
    paths = [*_folder().glob("*.grant"), *_stored_folder().glob("*.grant")] if _folder().is_dir() else []
    for path in paths:
        try:
            path.write_text(rotate(path.read_text()))
            done += 1
        except Exception as exc:
            logger.error("Cannot re-encrypt the second copy %s: %s", path, exc)
    if settings.REDIS_URL:
        try:
            client = _redis(settings.REDIS_URL)
            for key in [
                *client.scan_iter(match=f"{settings.CELERY_TASK_DEFAULT_QUEUE}:renewal-grant:*"),
                *client.scan_iter(match=f"{settings.CELERY_TASK_DEFAULT_QUEUE}:renewal-stored:*"),
            ]:
                blob = client.get(key)
                left = client.ttl(key)
                ttl = left if isinstance(left, int) and left > 0 else TTL_SECONDS
                if isinstance(blob, bytes | str) and blob:
                    text = blob.decode() if isinstance(blob, bytes) else blob
                    client.set(key, rotate(text), ex=ttl)
                    done += 1
        except redis.RedisError as exc:
            logger.error("Cannot re-encrypt the second copies in Redis: %s", exc)
    return done
