"""The benchmark worker's app: the product's Celery app plus the no-op floor, a task that makes only the
same OAuth calls as a batch of renewals (no database, no encryption, no journal)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.celery import app
from portals import oauth

__all__ = ["app", "floor"]


@app.task(name="bench.floor", acks_late=True)
def floor(server: str, refresh_tokens: list[str]) -> int:
    for token in refresh_tokens:
        oauth.refresh(server, token)
    return len(refresh_tokens)
