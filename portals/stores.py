"""What the product keeps outside the database, and how: files written so that a power cut leaves the old
version or the new one, never half of one, and the one Redis client of the stores in Redis. Used by the
renewal copies (portals.journal) and the spool (portals.spool)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis


@lru_cache(maxsize=4)
def redis_client(url: str) -> Any:
    """Short timeouts: a Redis that is away must cost seconds, and the callers fall back to files.
    Any: redis-py types every answer as "maybe awaitable"; this client is the synchronous one."""
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def write_durably(path: Path, text: str) -> None:
    """`text` into `path` (mode 600): written and fsynced under another name, renamed into place, and the
    folder fsynced, since the rename is durable only then. Raises OSError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.chmod(0o600)
    tmp.replace(path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
