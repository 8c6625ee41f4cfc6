"""The stand-in answers CRM and user methods in Bitrix24's shapes (standin/crm.py, from the docs'
examples): what passes here because the stand-in echoed a caller's types back would fail on a portal."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from portals.client import PortalClient, RestError
from standin import FakePortal

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")


def _call(
    portal: FakePortal, method: str, params: dict[str, Any] | None = None, user: int = 1
) -> requests.Response:
    token = portal.issue_tokens(user)["access_token"]
    return requests.post(portal.client_endpoint + method, json={**(params or {}), "auth": token}, timeout=10)


def _result(portal: FakePortal, method: str, params: dict[str, Any] | None = None, user: int = 1) -> Any:
    answer = _call(portal, method, params, user)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


def test_a_deal_is_stored_as_bitrix24_keeps_it(b24):
    deal_id = _result(
        b24,
        "crm.deal.add",
        {
            "fields": {
                "TITLE": "Forty chairs",
                "OPPORTUNITY": 100,
                "IS_MANUAL_OPPORTUNITY": True,
                "NOT_A_FIELD": 1,
            }
        },
        user=7,
    )
    deal = _result(b24, "crm.deal.get", {"id": deal_id})
    assert deal["ID"] == str(deal_id) and deal["TITLE"] == "Forty chairs"
    assert (deal["OPPORTUNITY"], deal["IS_MANUAL_OPPORTUNITY"]) == (
        "100.00",
        "Y",
    )  # text, as the portal answers
    assert "NOT_A_FIELD" not in deal
    assert (deal["STAGE_ID"], deal["CATEGORY_ID"], deal["CLOSED"], deal["OPENED"]) == ("NEW", "0", "N", "Y")
    assert (deal["ASSIGNED_BY_ID"], deal["CREATED_BY_ID"], deal["CURRENCY_ID"]) == ("7", "7", "USD")
    assert ISO.match(deal["DATE_CREATE"]) and deal["LEAD_ID"] is None
    assert all(value is None or isinstance(value, str) for value in deal.values())

    assert _result(b24, "crm.deal.update", {"id": deal_id, "fields": {"STAGE_ID": "WON"}}) is True
    won = _result(b24, "crm.deal.get", {"id": deal_id})
    assert (won["CLOSED"], won["STAGE_SEMANTIC_ID"]) == ("Y", "S")


def test_contacts_companies_and_leads_have_their_defaults(b24):
    contact = _result(
        b24, "crm.contact.get", {"id": _result(b24, "crm.contact.add", {"fields": {"NAME": "Ann"}})}
    )
    assert (contact["NAME"], contact["TYPE_ID"], contact["HAS_PHONE"], contact["EXPORT"]) == (
        "Ann",
        "CLIENT",
        "N",
        "Y",
    )
    company_id = _result(b24, "crm.company.add", {"fields": {}})
    company = _result(b24, "crm.company.get", {"id": company_id})
    assert (company["TITLE"], company["COMPANY_TYPE"]) == (f"Company #{company_id}", "CUSTOMER")
    lead = _result(
        b24, "crm.lead.get", {"id": _result(b24, "crm.lead.add", {"fields": {"TITLE": "Call back"}})}
    )
    assert (lead["STATUS_ID"], lead["STATUS_SEMANTIC_ID"], lead["OPPORTUNITY"]) == ("NEW", "P", "0.00")


def test_list_filters_read_as_bitrix24_reads_them(b24):
    ids = {
        title: _result(b24, "crm.deal.add", {"fields": {"TITLE": title, "OPPORTUNITY": amount, **extra}})
        for title, amount, extra in (
            ("Forty chairs", 100, {"UF_CRM_COLOUR": "red"}),
            ("Four tables", 20, {}),
            ("A lamp", 0, {}),
        )
    }

    def titles(**params: Any) -> list[str]:
        return sorted(row["TITLE"] for row in _result(b24, "crm.deal.list", params))

    assert titles(filter={">OPPORTUNITY": 50}) == ["Forty chairs"]  # a missing value is not "None"
    assert titles(filter={"%TITLE": "CHAIR"}) == ["Forty chairs"]  # substring, any case
    assert titles(filter={"=%TITLE": "Fo%"}) == ["Forty chairs", "Four tables"]  # the caller's own %
    assert titles(filter={"!%TITLE": "o"}) == ["A lamp"]
    assert titles(filter={"@ID": [ids["A lamp"], ids["Four tables"]]}) == ["A lamp", "Four tables"]
    assert titles(filter={"!@ID": [ids["A lamp"]]}) == ["Forty chairs", "Four tables"]
    assert titles(filter={"UF_CRM_COLOUR": "red"}) == ["Forty chairs"]
    assert titles(filter={">UF_CRM_COLOUR": ""}) == ["Forty chairs"]  # only the deal that has one
    # Upper-case keys, as the docs' examples and many callers write them.
    upper = _result(
        b24, "crm.deal.list", {"FILTER": {"<OPPORTUNITY": 50}, "SELECT": ["TITLE"], "ORDER": {"ID": "DESC"}}
    )
    assert [row["TITLE"] for row in upper] == ["A lamp", "Four tables"]
    assert set(upper[0]) == {"ID", "TITLE"}


def test_a_record_that_does_not_exist_is_an_error_with_an_empty_code(b24, installed_portal):
    answer = _call(b24, "crm.deal.get", {"id": 999})
    assert (answer.status_code, answer.json()) == (400, {"error": "", "error_description": "Not found"})
    # The client takes it for the error it is (an empty code once passed for a result).
    with pytest.raises(RestError) as caught:
        PortalClient(installed_portal).call("crm.deal.get", {"id": 999}, fail_fast=True)
    assert (caught.value.code, caught.value.description, caught.value.status) == ("", "Not found", 400)


def test_fields_user_scope_and_method_get(b24):
    fields = _result(b24, "crm.deal.fields")
    assert fields["ID"] == {
        "type": "integer",
        "isRequired": False,
        "isReadOnly": True,
        "isImmutable": False,
        "isMultiple": False,
        "isDynamic": False,
        "title": "Id",
    }
    assert fields["CATEGORY_ID"]["isImmutable"] is True and fields["STAGE_ID"]["type"] == "crm_status"

    me = _result(b24, "user.current", user=7)
    assert (me["ID"], me["ACTIVE"], me["IS_ONLINE"], me["UF_DEPARTMENT"]) == ("7", True, "Y", [1])
    everyone = _call(b24, "user.get", {"FILTER": {"ID": 7}}).json()
    assert [user["ID"] for user in everyone["result"]] == ["7"] and everyone["total"] == 1

    assert "crm" in _result(b24, "scope")
    assert _result(b24, "method.get", {"name": "crm.deal.list"}) == {"isExisting": True, "isAvailable": True}
    assert _result(b24, "method.get", {"name": "crm.nothing.here"}) == {
        "isExisting": False,
        "isAvailable": False,
    }
    assert _result(b24, "method.get", {"name": ""}) == {"isExisting": False, "isAvailable": False}
