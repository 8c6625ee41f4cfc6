"""The test app's event handlers, registered only when B24_TEST_EVENTAPP_DIR names a folder.

The suite's other tests run without them (their bindings and events are the project's own). A test that
wants them sets the variable (for the worker processes it starts too) and registers them in its own
process with `portals.registry.replaced(register)`. What a handler did is appended to `handled.jsonl` in
that folder, one JSON line per run, so the test reads what a worker process did.

Files in the folder steer the handlers: `sleep` (seconds to sleep before reading the deal), `fail` (the
company handler raises while it exists).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from portals.registry import on


def _folder() -> Path:
    return Path(os.environ["B24_TEST_EVENTAPP_DIR"])


def _record(**fields: Any) -> None:
    # B24_TEST_MACHINE: which of the test's machines ran it (tests/test_machines.py).
    line = (
        json.dumps({**fields, "pid": os.getpid(), "machine": os.environ.get("B24_TEST_MACHINE", "")}) + "\n"
    )
    with open(_folder() / "handled.jsonl", "a", encoding="utf-8") as out:
        out.write(line)


def deal_added(event: Any) -> None:
    started = time.time()
    pause = _folder() / "sleep"
    if pause.exists():
        time.sleep(float(pause.read_text()))
    deal = event.client.call("crm.deal.get", {"id": event.object_id})
    _record(
        event=event.event,
        id=event.object_id,
        title=deal["TITLE"],
        started=started,
        finished=time.time(),
        attempt=event.attempt,
    )


def company_added(event: Any) -> None:
    if (_folder() / "fail").exists():
        raise RuntimeError(f"company {event.object_id}: the handler is broken")
    _record(event=event.event, id=event.object_id, attempt=event.attempt)


def contact_updated(event: Any) -> None:
    _record(event=event.event, id=event.object_id, offline=event.offline, user_id=event.user_id)


def register() -> None:
    on("ONCRMDEALADD")(deal_added)
    on("ONCRMCOMPANYADD")(company_added)
    on("ONCRMCONTACTUPDATE", offline=True)(contact_updated)


def handled() -> list[dict[str, Any]]:
    path = _folder() / "handled.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if os.environ.get("B24_TEST_EVENTAPP_DIR"):
    register()
