"""CRM records as Bitrix24 keeps and answers them, and list filters as it reads them.

From the docs (bitrix24/b24restdocs @ 5988ed13): `crm.deal.get`, `crm.contact.get`, `crm.company.get`,
`crm.lead.get` (every value a string or null, dates ISO 8601 with an offset, flags "Y"/"N"), the defaults
`crm.deal.add` lists, the field descriptions of `crm.deal.fields`, and the filter prefixes of
`crm.deal.list` and `crm.item.list`. A field the entity does not have is not stored (a `UF_CRM_*` custom
field or a `PARENT_ID_*` link is, as text): code that passes here because the stand-in echoed a field
back would fail on a real portal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

JSON = dict[str, Any]

# type, title; "read_only" fields are set by the portal, never by a caller.
INTEGER, STRING, CHAR, DOUBLE, DATETIME, DATE = "integer", "string", "char", "double", "datetime", "date"
STATUS, CATEGORY, CURRENCY, USER = "crm_status", "crm_category", "crm_currency", "user"
COMPANY, CONTACT, LEAD, MULTIFIELD = "crm_company", "crm_contact", "crm_lead", "crm_multifield"

_COMMON_READ_ONLY = ("ID", "CREATED_BY_ID", "MODIFY_BY_ID", "DATE_CREATE", "DATE_MODIFY")

_ADDRESS = {
    name: STRING
    for name in (
        "ADDRESS",
        "ADDRESS_2",
        "ADDRESS_CITY",
        "ADDRESS_POSTAL_CODE",
        "ADDRESS_REGION",
        "ADDRESS_PROVINCE",
        "ADDRESS_COUNTRY",
    )
}
_UTM = {name: STRING for name in ("UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM")}
_PEOPLE = {"ASSIGNED_BY_ID": USER, "CREATED_BY_ID": USER, "MODIFY_BY_ID": USER}
_TIMES = {"DATE_CREATE": DATETIME, "DATE_MODIFY": DATETIME}

FIELDS: dict[str, dict[str, str]] = {
    "crm.deal": {
        "ID": INTEGER,
        "TITLE": STRING,
        "TYPE_ID": STATUS,
        "CATEGORY_ID": CATEGORY,
        "STAGE_ID": STATUS,
        "STAGE_SEMANTIC_ID": STRING,
        "IS_NEW": CHAR,
        "IS_RECURRING": CHAR,
        "IS_RETURN_CUSTOMER": CHAR,
        "IS_REPEATED_APPROACH": CHAR,
        "PROBABILITY": INTEGER,
        "CURRENCY_ID": CURRENCY,
        "OPPORTUNITY": DOUBLE,
        "IS_MANUAL_OPPORTUNITY": CHAR,
        "TAX_VALUE": DOUBLE,
        "COMPANY_ID": COMPANY,
        "CONTACT_ID": CONTACT,
        "QUOTE_ID": INTEGER,
        "LEAD_ID": LEAD,
        "BEGINDATE": DATE,
        "CLOSEDATE": DATE,
        "OPENED": CHAR,
        "CLOSED": CHAR,
        "COMMENTS": STRING,
        "ADDITIONAL_INFO": STRING,
        "LOCATION_ID": STRING,
        "SOURCE_ID": STATUS,
        "SOURCE_DESCRIPTION": STRING,
        "ORIGINATOR_ID": STRING,
        "ORIGIN_ID": STRING,
        "MOVED_BY_ID": USER,
        "MOVED_TIME": DATETIME,
        "LAST_ACTIVITY_TIME": DATETIME,
        "LAST_ACTIVITY_BY": USER,
        **_PEOPLE,
        **_TIMES,
        **_UTM,
    },
    "crm.contact": {
        "ID": INTEGER,
        "HONORIFIC": STATUS,
        "NAME": STRING,
        "SECOND_NAME": STRING,
        "LAST_NAME": STRING,
        "PHOTO": STRING,
        "BIRTHDATE": DATE,
        "TYPE_ID": STATUS,
        "SOURCE_ID": STATUS,
        "SOURCE_DESCRIPTION": STRING,
        "POST": STRING,
        "COMMENTS": STRING,
        "OPENED": CHAR,
        "EXPORT": CHAR,
        "HAS_PHONE": CHAR,
        "HAS_EMAIL": CHAR,
        "HAS_IMOL": CHAR,
        "COMPANY_ID": COMPANY,
        "LEAD_ID": LEAD,
        "ORIGINATOR_ID": STRING,
        "ORIGIN_ID": STRING,
        "ORIGIN_VERSION": STRING,
        "FACE_ID": INTEGER,
        "LAST_ACTIVITY_TIME": DATETIME,
        "LAST_ACTIVITY_BY": USER,
        "PHONE": MULTIFIELD,
        "EMAIL": MULTIFIELD,
        "WEB": MULTIFIELD,
        "IM": MULTIFIELD,
        **_PEOPLE,
        **_TIMES,
        **_ADDRESS,
        **_UTM,
    },
    "crm.company": {
        "ID": INTEGER,
        "TITLE": STRING,
        "COMPANY_TYPE": STATUS,
        "LOGO": STRING,
        "LEAD_ID": LEAD,
        "HAS_PHONE": CHAR,
        "HAS_EMAIL": CHAR,
        "HAS_IMOL": CHAR,
        "BANKING_DETAILS": STRING,
        "INDUSTRY": STATUS,
        "REVENUE": DOUBLE,
        "CURRENCY_ID": CURRENCY,
        "EMPLOYEES": STATUS,
        "COMMENTS": STRING,
        "OPENED": CHAR,
        "IS_MY_COMPANY": CHAR,
        "ORIGINATOR_ID": STRING,
        "ORIGIN_ID": STRING,
        "ORIGIN_VERSION": STRING,
        "LAST_ACTIVITY_TIME": DATETIME,
        "LAST_ACTIVITY_BY": USER,
        "PHONE": MULTIFIELD,
        "EMAIL": MULTIFIELD,
        "WEB": MULTIFIELD,
        "IM": MULTIFIELD,
        **_PEOPLE,
        **_TIMES,
        **_ADDRESS,
        **_UTM,
    },
    "crm.lead": {
        "ID": INTEGER,
        "TITLE": STRING,
        "HONORIFIC": STATUS,
        "NAME": STRING,
        "SECOND_NAME": STRING,
        "LAST_NAME": STRING,
        "COMPANY_TITLE": STRING,
        "COMPANY_ID": COMPANY,
        "CONTACT_ID": CONTACT,
        "IS_RETURN_CUSTOMER": CHAR,
        "BIRTHDATE": DATE,
        "SOURCE_ID": STATUS,
        "SOURCE_DESCRIPTION": STRING,
        "STATUS_ID": STATUS,
        "STATUS_DESCRIPTION": STRING,
        "STATUS_SEMANTIC_ID": STRING,
        "POST": STRING,
        "COMMENTS": STRING,
        "CURRENCY_ID": CURRENCY,
        "OPPORTUNITY": DOUBLE,
        "IS_MANUAL_OPPORTUNITY": CHAR,
        "HAS_PHONE": CHAR,
        "HAS_EMAIL": CHAR,
        "HAS_IMOL": CHAR,
        "DATE_CLOSED": DATETIME,
        "OPENED": CHAR,
        "ORIGINATOR_ID": STRING,
        "ORIGIN_ID": STRING,
        "MOVED_BY_ID": USER,
        "MOVED_TIME": DATETIME,
        "LAST_ACTIVITY_TIME": DATETIME,
        "LAST_ACTIVITY_BY": USER,
        "PHONE": MULTIFIELD,
        "EMAIL": MULTIFIELD,
        "WEB": MULTIFIELD,
        "IM": MULTIFIELD,
        **_PEOPLE,
        **_TIMES,
        **_ADDRESS,
        **_UTM,
    },
}
READ_ONLY = {
    "crm.deal": {
        *_COMMON_READ_ONLY,
        "STAGE_SEMANTIC_ID",
        "IS_NEW",
        "CLOSED",
        "MOVED_BY_ID",
        "MOVED_TIME",
        "LAST_ACTIVITY_TIME",
        "LAST_ACTIVITY_BY",
    },
    "crm.contact": {
        *_COMMON_READ_ONLY,
        "HAS_PHONE",
        "HAS_EMAIL",
        "HAS_IMOL",
        "LAST_ACTIVITY_TIME",
        "LAST_ACTIVITY_BY",
    },
    "crm.company": {
        *_COMMON_READ_ONLY,
        "HAS_PHONE",
        "HAS_EMAIL",
        "HAS_IMOL",
        "LAST_ACTIVITY_TIME",
        "LAST_ACTIVITY_BY",
    },
    "crm.lead": {
        *_COMMON_READ_ONLY,
        "STATUS_SEMANTIC_ID",
        "HAS_PHONE",
        "HAS_EMAIL",
        "HAS_IMOL",
        "MOVED_BY_ID",
        "MOVED_TIME",
        "LAST_ACTIVITY_TIME",
        "LAST_ACTIVITY_BY",
    },
}
_CUSTOM = re.compile(r"^(UF_CRM_[A-Z0-9_]+|PARENT_ID_\d+)$")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _defaults(entity: str, new_id: int, user_id: int, now: datetime) -> JSON:
    """The documented defaults of `add`; the flags that follow other fields (CLOSED, HAS_PHONE …) are
    `_derived`."""
    stamp, user = _iso(now), str(user_id)
    common: JSON = {
        "ASSIGNED_BY_ID": user,
        "CREATED_BY_ID": user,
        "MODIFY_BY_ID": user,
        "DATE_CREATE": stamp,
        "DATE_MODIFY": stamp,
        "OPENED": "Y",
        "LAST_ACTIVITY_TIME": stamp,
        "LAST_ACTIVITY_BY": user,
    }
    if entity == "crm.deal":
        return {
            **common,
            "TITLE": f"Deal #{new_id}",
            "TYPE_ID": "SALE",
            "CATEGORY_ID": "0",
            "STAGE_ID": "NEW",
            "IS_NEW": "Y",
            "IS_RECURRING": "N",
            "IS_RETURN_CUSTOMER": "N",
            "IS_REPEATED_APPROACH": "N",
            "CURRENCY_ID": "USD",
            "OPPORTUNITY": "0.00",
            "IS_MANUAL_OPPORTUNITY": "N",
            "TAX_VALUE": "0.00",
            "BEGINDATE": _iso(now),
            "CLOSEDATE": _iso(now + timedelta(days=7)),
            "SOURCE_ID": "CALL",
            "MOVED_BY_ID": user,
            "MOVED_TIME": stamp,
        }
    if entity == "crm.contact":
        return {
            **common,
            "NAME": "",
            "TYPE_ID": "CLIENT",
            "SOURCE_ID": "CALL",
            "EXPORT": "Y",
        }
    if entity == "crm.company":
        return {
            **common,
            "TITLE": f"Company #{new_id}",
            "COMPANY_TYPE": "CUSTOMER",
            "INDUSTRY": "OTHER",
            "EMPLOYEES": "EMPLOYEES_1",
            "REVENUE": "0",
            "CURRENCY_ID": "USD",
            "IS_MY_COMPANY": "N",
        }
    return {
        **common,
        "TITLE": f"Lead #{new_id}",
        "NAME": "",
        "STATUS_ID": "NEW",
        "SOURCE_ID": "CALL",
        "CURRENCY_ID": "USD",
        "OPPORTUNITY": "0.00",
        "IS_MANUAL_OPPORTUNITY": "N",
        "IS_RETURN_CUSTOMER": "N",
        "MOVED_BY_ID": user,
        "MOVED_TIME": stamp,
    }


def _text(kind: str, value: Any) -> Any:
    """A caller's value as Bitrix24 stores and answers it."""
    if value is None or kind == MULTIFIELD:
        return value
    if kind == CHAR:
        return "Y" if value in (True, 1, "1", "Y", "y", "true") else "N"
    if kind == DOUBLE:
        try:
            return f"{float(value):.2f}"
        except (TypeError, ValueError):
            return "0.00"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def handles(entity: str) -> bool:
    return entity in FIELDS


def _kept(entity: str, fields: JSON) -> JSON:
    """What of a caller's fields the entity stores: its own writable fields and custom ones, as text."""
    schema, read_only = FIELDS[entity], READ_ONLY[entity]
    kept: JSON = {}
    for name, value in fields.items():
        key = str(name).upper()
        if key in schema and key not in read_only:
            kept[key] = _text(schema[key], value)
        elif _CUSTOM.match(key):
            kept[key] = None if value is None else str(value)
    return kept


def _derived(entity: str, row: JSON) -> None:
    """Fields the portal keeps in step with others."""
    if entity == "crm.deal":
        stage = str(row.get("STAGE_ID") or "")
        category = str(row.get("CATEGORY_ID") or "0")
        if category != "0" and ":" not in stage:
            row["STAGE_ID"] = stage = f"C{category}:{stage or 'NEW'}"
        bare = stage.split(":")[-1]
        row["STAGE_SEMANTIC_ID"] = "S" if bare == "WON" else "F" if bare in ("LOSE", "APOLOGY") else "P"
        row["CLOSED"] = "N" if row["STAGE_SEMANTIC_ID"] == "P" else "Y"
    if entity == "crm.lead":
        status = str(row.get("STATUS_ID") or "")
        row["STATUS_SEMANTIC_ID"] = "S" if status == "CONVERTED" else "F" if status == "JUNK" else "P"
    for flag, multi in (("HAS_PHONE", "PHONE"), ("HAS_EMAIL", "EMAIL"), ("HAS_IMOL", "IM")):
        if flag in FIELDS[entity]:
            row[flag] = "Y" if row.get(multi) else "N"


def new_record(entity: str, new_id: int, fields: JSON, *, user_id: int, now: datetime) -> JSON:
    """`<entity>.add`: the whole record, defaults filled in, as `<entity>.get` answers it."""
    row: JSON = {name: None for name in FIELDS[entity]}
    row.update(_defaults(entity, new_id, user_id, now))
    row.update(_kept(entity, fields))
    row["ID"] = str(new_id)
    _derived(entity, row)
    return row


def update_record(entity: str, row: JSON, fields: JSON, *, user_id: int, now: datetime) -> None:
    row.update(_kept(entity, fields))
    row["MODIFY_BY_ID"], row["DATE_MODIFY"] = str(user_id), _iso(now)
    _derived(entity, row)


def describe(entity: str) -> JSON:
    """`<entity>.fields`: each field's description, as `crm.deal.fields` shows them."""
    read_only = READ_ONLY[entity]
    return {
        name: {
            "type": kind,
            "isRequired": False,
            "isReadOnly": name in read_only,
            "isImmutable": name == "CATEGORY_ID",
            "isMultiple": kind == MULTIFIELD,
            "isDynamic": False,
            "title": name.replace("_", " ").title(),
        }
        for name, kind in FIELDS[entity].items()
    }


# --- list filters (crm-deal-list.md, crm-item-list.md) ---------------------------------------------------

_PREFIX = re.compile(r"^(!%=|!=%|!%|!@|!=|%=|=%|>=|<=|@|%|!|=|>|<)?(.+)$")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _equal(left: Any, right: Any) -> bool:
    if left is None or left == "":
        return right is None or right == "" or right is False
    a, b = _number(left), _number(right)
    if a is not None and b is not None:
        return a == b
    return str(left).lower() == str(right).lower()  # the portal's database compares without case


def _order(left: Any, right: Any, test: Callable[[Any, Any], bool]) -> bool:
    if left is None or left == "":
        return False  # a field without a value is neither more nor less than anything
    a, b = _number(left), _number(right)
    if a is not None and b is not None:
        return test(a, b)
    return test(str(left), str(right))


def _like(left: Any, pattern: str) -> bool:
    if left is None:
        return False
    regex = "".join(".*" if char == "%" else re.escape(char) for char in pattern)
    return re.fullmatch(regex, str(left), flags=re.IGNORECASE | re.DOTALL) is not None


def _one(left: Any, op: str, right: Any) -> bool:
    values = right if isinstance(right, list) else [right]
    if op in ("", "="):
        return any(_equal(left, value) for value in values)
    if op in ("!", "!="):
        return not any(_equal(left, value) for value in values)
    if op == "@":
        return any(_equal(left, value) for value in values)
    if op == "!@":
        return not any(_equal(left, value) for value in values)
    if op == "%":
        return left is not None and str(right).lower() in str(left).lower()
    if op == "!%":
        return not (left is not None and str(right).lower() in str(left).lower())
    if op in ("=%", "%="):
        return _like(left, str(right))
    if op in ("!=%", "!%="):
        return not _like(left, str(right))
    tests: dict[str, Callable[[Any, Any], bool]] = {
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }
    return _order(left, right, tests[op])


def matches(row: JSON, filters: JSON) -> bool:
    """Every condition holds (conditions are joined with AND)."""
    for key, value in filters.items():
        match = _PREFIX.match(str(key))
        if match is None:
            continue
        op, field = match.group(1) or "", match.group(2)
        if not _one(row.get(field.upper(), row.get(field)), op, value):
            return False
    return True
