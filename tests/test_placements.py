"""The app's pages: placement views routed by PLACEMENT, frontend endpoints under /api/app/, languages.

Launches are posted as a portal posts them (payloads.launch) to the backend over real sockets; the views
are the example app's (example/), registered for the test with `portals.registry.replaced`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from babel.messages.pofile import read_po
from django.core.exceptions import ImproperlyConfigured

from events import services
from events.models import AppEvent, EventSource
from events.tasks import handle_event_task
from example import bitrix24 as example
from portals import registry
from standin import FakePortal
from tests.processes import ROOT
from tests.translations import SOURCES, messages


@pytest.fixture
def example_app() -> Iterator[None]:
    with registry.replaced(example.register):
        yield


@pytest.fixture
def deal(b24: FakePortal) -> str:
    b24.seed("crm.deal", 2)
    b24.items["crm.deal"][1]["TITLE"] = "Forty chairs for the canteen"
    return "2"


def open_tab(
    backend: Any, b24: FakePortal, options: dict[str, Any], lang: str = "en", user_id: int = 1
) -> Any:
    tokens = b24.issue_tokens(user_id, admin=user_id == 1)
    return backend.launch(b24, tokens, placement="CRM_DEAL_DETAIL_TAB", options=options, lang=lang), tokens


# --- the registry ------------------------------------------------------------------------------------


def test_a_placement_needs_a_code_a_title_and_one_view() -> None:
    with registry.replaced():
        with pytest.raises(ImproperlyConfigured, match="not a Bitrix24 placement code"):
            registry.placement("deal tab", title="Tab")
        with pytest.raises(ImproperlyConfigured, match="needs a title"):
            registry.placement("CRM_DEAL_DETAIL_TAB", title="")
        registry.placement("CRM_DEAL_DETAIL_TAB", title="Tab")(example.deal_tab)
        with pytest.raises(ImproperlyConfigured, match="already has a view"):
            registry.placement("crm_deal_detail_tab", title="Tab")(example.deal_added)
        assert [p.code for p in registry.placements()] == ["CRM_DEAL_DETAIL_TAB"]
    assert registry.placements() == []


# --- launches routed by PLACEMENT ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lang", "says"),
    [
        ("en", "Deal 2, as you see it in Bitrix24."),
        ("de", "Deal 2, wie Sie ihn in Bitrix24 sehen."),
        ("ru", "Сделка 2, как вы её видите в Битрикс24."),
        ("xx", "Deal 2, as you see it in Bitrix24."),  # a language the app is not translated to
    ],
)
def test_a_registered_placement_opens_its_view_with_the_deal_read_through_bitrix24(
    backend: Any, installed_portal: Any, b24: FakePortal, deal: str, example_app: None, lang: str, says: str
) -> None:
    answer, _tokens = open_tab(backend, b24, {"ID": deal}, lang=lang, user_id=5)
    assert answer.status_code == 200, answer.text[:500]
    page = answer.text
    assert '<h1 id="deal-title">Forty chairs for the canteen</h1>' in page
    assert says in page
    assert f'<html lang="{lang if lang != "xx" else "en"}">' in page
    assert answer.headers["Content-Security-Policy"] == f"frame-ancestors {installed_portal.origin}"
    # Read as the user who opened the tab, with the pair their launch stored (user 5, not the installer).
    reads = [params for _http, method, params in b24.calls if method == "crm.deal.get"]
    assert reads and reads[-1]["id"] == deal
    assert installed_portal.token_pairs.filter(user_id=5).exists()


def test_a_placement_the_app_does_not_have_gets_a_clear_page(
    backend: Any, installed_portal: Any, b24: FakePortal, example_app: None
) -> None:
    tokens = b24.issue_tokens(1)
    answer = backend.launch(b24, tokens, placement="CRM_LEAD_LIST_MENU", lang="ru")
    assert answer.status_code == 404
    assert "Это место не относится к этому приложению" in answer.text
    assert "CRM_LEAD_LIST_MENU" in answer.text
    assert answer.headers["Content-Security-Policy"] == f"frame-ancestors {installed_portal.origin}"


def test_a_forged_launch_of_a_placement_is_refused_before_the_view_runs(
    backend: Any, installed_portal: Any, b24: FakePortal, deal: str, example_app: None
) -> None:
    forged = {"access_token": "f" * 32, "refresh_token": "e" * 32}
    answer = backend.launch(b24, forged, placement="CRM_DEAL_DETAIL_TAB", options={"ID": deal})
    assert answer.status_code == 401
    assert not any(method == "crm.deal.get" for _http, method, _params in b24.calls)


def test_the_default_launch_is_the_app_page_in_the_users_language(
    backend: Any, installed_portal: Any, b24: FakePortal, settings: Any
) -> None:
    settings.BITRIX24_JS_URL = "http://127.0.0.1:9/bx24.js"
    answer = backend.launch(b24, b24.issue_tokens(1), lang="de")
    assert answer.status_code == 200
    assert f"Verbunden mit {b24.domain}" in answer.text
    assert '<script src="http://127.0.0.1:9/bx24.js"></script>' in answer.text  # the library from the setting


# --- frontend endpoints ------------------------------------------------------------------------------


def test_the_example_frontend_endpoint_answers_the_page_with_its_auth_id(
    backend: Any, installed_portal: Any, b24: FakePortal, deal: str, example_app: None
) -> None:
    _answer, tokens = open_tab(backend, b24, {"ID": deal}, user_id=5)
    url = f"{backend.url}/api/app/example/deals/{deal}/"
    headers = {"X-Bitrix24-Auth": tokens["access_token"], "X-Bitrix24-Member-Id": b24.member_id}
    first = requests.get(url, headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    assert first.json() == {"id": int(deal), "title": "Forty chairs for the canteen", "notes": 0}

    # The example's ONCRMDEALADD handler writes a note on the deal's timeline; the endpoint counts it.
    backend.post(
        "/events/",
        data=[
            ("event", "ONCRMDEALADD"),
            ("data[FIELDS][ID]", deal),
            ("ts", "1724695689"),
            ("auth[member_id]", b24.member_id),
            ("auth[domain]", b24.domain),
            ("auth[application_token]", b24.application_token),
        ],
    )
    assert handle_event_task.apply(args=(AppEvent.objects.get().pk,)).get() == "handled"
    assert requests.get(url, headers=headers, timeout=10).json()["notes"] == 1
    note = b24.items["crm.timeline.comment"][0]
    assert (note["ENTITY_ID"], note["ENTITY_TYPE"]) == (deal, "deal")
    assert "Forty chairs for the canteen" in note["COMMENT"]

    forged = requests.get(url, headers={**headers, "X-Bitrix24-Auth": "f" * 32}, timeout=10)
    assert forged.status_code == 401
    assert forged.json()["error"] == "invalid_token"
    unknown = requests.get(f"{backend.url}/api/app/example/nothing/", headers=headers, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"  # JSON, as the API answers


# --- languages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("app", sorted(SOURCES))
@pytest.mark.parametrize("lang", ["ru", "de"])
def test_every_string_of_the_app_pages_and_the_example_is_translated(app: str, lang: str) -> None:
    """A string added to a template or a handler without its translations fails here (see docs/build-your-app.md,
    "Languages", for how to add them)."""
    wanted = messages(SOURCES[app])
    assert len(wanted) > 5
    with (ROOT / app / "locale" / lang / "LC_MESSAGES" / "django.po").open("rb") as handle:
        catalog = read_po(handle, locale=lang)
    translated = {m.id for m in catalog if m.id and m.string and not m.fuzzy}
    missing = sorted(wanted - translated)
    assert missing == [], f"{app}: not translated to {lang}: {missing}"
    unused = sorted({m.id for m in catalog if m.id} - wanted)
    assert unused == [], f"{app}: {lang} translations of strings no longer used: {unused}"


# --- the example's offline handler -------------------------------------------------------------------


def test_the_example_notes_a_contact_change_without_queueing_its_own_write(
    installed_portal: Any, b24: FakePortal, example_app: None, settings: Any
) -> None:
    """An offline ONCRMCONTACTUPDATE (as a pull stores it): the example writes a timeline note with the
    connector, so the portal does not queue that write back to the app."""
    settings.BITRIX24_AUTH_CONNECTOR = "example-app"
    b24.seed("crm.contact", 3)
    accepted = services.store(
        portal=installed_portal,
        event="ONCRMCONTACTUPDATE",
        source=EventSource.OFFLINE,
        dedup_key="offline|ONCRMCONTACTUPDATE|1|m1|2026-11-28T08:00:00+00:00",
        ids={"FIELDS.ID": "3"},
        user_id=1,
        occurred_at=None,
    )
    assert accepted.record is not None
    assert handle_event_task.apply(args=(accepted.record.pk,)).get() == "handled"
    note = b24.items["crm.timeline.comment"][0]
    assert (note["ENTITY_ID"], note["ENTITY_TYPE"]) == ("3", "contact")
    assert "Name3 Seeded3" in note["COMMENT"]
    writes = [params for _http, method, params in b24.calls if method == "crm.timeline.comment.add"]
    assert writes[0]["auth_connector"] == "example-app"
    reads = [params for _http, method, params in b24.calls if method == "crm.contact.get"]
    assert "auth_connector" not in reads[0]  # reads need no connector
