"""The example app's deal tab in a real browser, opened by the stand-in portal as Bitrix24 opens it.

The placement is bound by the bindings sync; the stand-in's portal page opens the bound handler for a
deal (a form POST with PLACEMENT and PLACEMENT_OPTIONS into its iframe); the tab shows the deal's title,
read through Bitrix24, in the user's language; its JavaScript gets the AUTH_ID from Bitrix24's library
(the stand-in's, BITRIX24_JS_URL) and calls the example's frontend endpoint, and shows the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from example import bitrix24 as example
from portals import bindings, registry
from standin import FakePortal
from standin.server import APP_FRAME_PATH, APP_FRAME_SELECTOR
from tests.test_browser import _shot, browser, page  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def example_app() -> Iterator[None]:
    with registry.replaced(example.register):
        yield


@pytest.mark.parametrize(
    ("lang", "says", "notes"),
    [
        ("de", "Deal 2, wie Sie ihn in Bitrix24 sehen.", "Notizen zu diesem Deal: 0"),
        ("ru", "Сделка 2, как вы её видите в Битрикс24.", "Заметок по этой сделке: 0"),
    ],
)
def test_the_stand_in_opens_the_example_deal_tab_in_the_users_language(
    page: Any,  # noqa: F811
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    example_app: None,
    settings: Any,
    tmp_path: Path,
    lang: str,
    says: str,
    notes: str,
) -> None:
    from playwright.sync_api import expect

    settings.BITRIX24_PUBLIC_URL = backend.url.replace("localhost", "127.0.0.1")
    settings.BITRIX24_JS_URL = f"{b24.url}/api/v1/"  # the stand-in's Bitrix24 library
    synced = bindings.sync_bindings(portal=installed_portal)
    assert "placement CRM_DEAL_DETAIL_TAB → " + settings.BITRIX24_PUBLIC_URL + "/app/" in map(
        str, synced.bound
    )
    b24.seed("crm.deal", 2)
    b24.items["crm.deal"][1]["TITLE"] = "Forty chairs for the canteen"

    page.goto(f"{b24.url}{APP_FRAME_PATH}?placement=CRM_DEAL_DETAIL_TAB&id=2&lang={lang}&user_id=1")
    tab = page.frame_locator(APP_FRAME_SELECTOR)
    expect(tab.locator("#deal-title")).to_have_text("Forty chairs for the canteen")
    expect(tab.locator("#deal-tab")).to_contain_text(says)
    # The tab's JavaScript: AUTH_ID from BX24.getAuth(), then the example's frontend endpoint.
    expect(tab.locator("#notes")).to_have_text(notes)
    expect(tab.locator("html")).to_have_attribute("lang", lang)
    _shot(page, tmp_path, f"example-deal-tab-{lang}")
