"""The "Build your app" walkthrough (docs/build-your-app.md), run as written.

The code blocks of that section are written to the files their first line names (`# myapp/…`), in a
folder of their own; the backend runs as separate processes with `BITRIX24_APPS=myapp` (a web process, a
Celery worker, `manage.py bitrix24_sync`), as a reader would run them; the stand-in plays Bitrix24. A
change to the page that breaks the walkthrough, or a change to the project that breaks the page's code,
fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from config.celery import app as celery_app
from standin import FakePortal, StandIn
from standin.server import APP_FRAME_PATH, APP_FRAME_SELECTOR
from tests.processes import ROOT, celery_worker
from tests.test_browser import _shot, browser, page  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.system, pytest.mark.django_db(transaction=True)]

TRUST = (
    "BITRIX24_OAUTH_SERVERS",
    "BITRIX24_PORTAL_DOMAINS",
    "BITRIX24_ALLOW_HTTP",
    "BITRIX24_CLIENT_ID",
    "BITRIX24_CLIENT_SECRET",
)
BLOCK = re.compile(r"```(?:python|html)\n(.*?)```", re.S)
FIRST_LINE = re.compile(r"^(?:# |<!-- )(myapp/[\w/.]+)(?: -->)?$")


def walkthrough() -> str:
    return (ROOT / "docs" / "build-your-app.md").read_text(encoding="utf-8")


def write_the_app(folder: Path) -> list[str]:
    """Step 1's command, then every code block where its first line says."""
    section = walkthrough()
    command = "mkdir -p myapp/templates/myapp && touch myapp/__init__.py"
    assert f"`{command}`" in section
    subprocess.run(["bash", "-c", command], cwd=folder, check=True)
    written = []
    for block in BLOCK.findall(section):
        first = block.splitlines()[0]
        match = FIRST_LINE.match(first)
        if match:
            (folder / match[1]).write_text(block, encoding="utf-8")
            written.append(match[1])
    return written


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_readme_walkthrough_builds_an_app_that_works(
    page: Any,  # noqa: F811
    standin: StandIn,
    b24: FakePortal,
    installed_portal: Any,
    child_env: Any,
    backend_process: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    assert write_the_app(tmp_path) == [
        "myapp/bitrix24.py",
        "myapp/templates/myapp/deal_tab.html",
        "myapp/frontend.py",
    ]
    env = child_env(standin)
    app_env = {"BITRIX24_APPS": "myapp", "PYTHONPATH": str(tmp_path)}
    web = backend_process(
        env["DATABASE_URL"],
        env.get("REDIS_URL", ""),
        migrate=False,
        BITRIX24_TOKEN_KEYS=os.environ["BITRIX24_TOKEN_KEYS"],  # it reads the pairs this test stored
        BITRIX24_JS_URL=f"{b24.url}/api/v1/",  # the stand-in's Bitrix24 library
        **app_env,
        **{key: env[key] for key in TRUST},
    )

    # Step 5: bind it.
    sync = subprocess.run(
        [sys.executable, "manage.py", "bitrix24_sync"],
        cwd=ROOT,
        env={**env, **app_env, "BITRIX24_PUBLIC_URL": web.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(sync.stdout[-1500:], sync.stderr[-1500:])
    assert sync.returncode == 0
    assert [(p["placement"], p["handler"]) for p in b24.placements] == [
        ("CRM_DEAL_DETAIL_TAB", f"{web.url}/app/")
    ]
    assert b24.placements[0]["lang_all"]["en"]["TITLE"] == "Deal notes"
    assert {(e["event"], e["handler"]) for e in b24.events} >= {("ONCRMDEALADD", f"{web.url}/events/")}

    # Step 6: open the tab for a deal, as the portal does; its JavaScript asks the frontend endpoint.
    b24.seed("crm.deal", 1)
    b24.items["crm.deal"][0]["TITLE"] = "Forty chairs for the canteen"
    page.goto(f"{b24.url}{APP_FRAME_PATH}?placement=CRM_DEAL_DETAIL_TAB&id=1&user_id=1")
    tab = page.frame_locator(APP_FRAME_SELECTOR)
    expect(tab.locator("#title")).to_have_text("Forty chairs for the canteen")
    expect(tab.locator("#answer")).to_have_text("Forty chairs for the canteen")
    _shot(page, tmp_path, "walkthrough-deal-tab")

    # ... and add a deal: the stand-in posts ONCRMDEALADD to the web, a worker runs the handler.
    celery_app.control.purge()
    broker = {key: web.env[key] for key in ("CELERY_QUEUE", "DJANGO_VAR_DIR")}
    with celery_worker({**env, **broker, **app_env}):
        token = b24.issue_tokens(1)["access_token"]
        added = requests.post(
            f"{b24.client_endpoint}crm.deal.add",
            json={"fields": {"TITLE": "Six tables"}, "auth": token},
            timeout=10,
        ).json()["result"]
        notes = _wait(lambda: b24.items["crm.timeline.comment"], 60, "the handler's timeline note")
    assert [(n["ENTITY_ID"], n["ENTITY_TYPE"], n["COMMENT"]) for n in notes] == [
        (str(added), "deal", "Seen by myapp")
    ]
