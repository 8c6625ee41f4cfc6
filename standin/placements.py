"""Widget placements on a stand-in portal: ``placement.bind``, ``placement.get``, ``placement.unbind``,
``placement.list`` (docs ``api-reference/widgets/``), and the bindings they keep.

A binding is a dict, in the order made::

    {"id": 1, "placement": "CRM_DEAL_DETAIL_TAB", "handler": "http://127.0.0.1:8000/tab/",
     "title": "Orders", "description": "", "group_name": "", "user_id": 0,
     "lang_all": {"de": {"TITLE": "Aufträge", "DESCRIPTION": "", "GROUP_NAME": ""}},
     "options": {}}

The portal keeps them in ``FakePortal.placements``; opening one is ``FakePortal.open_placement``.
Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .base import RestError
from .common import _Grant, _require_loopback_url, _split_scope
from .state import PortalState

__all__ = [
    "PLACEMENT_SCOPES",
    "bind_params",
    "for_get",
    "known",
    "required_scope",
    "title_in",
    "unbind_params",
    "with_id",
]

JSON = dict[str, Any]

# Placement code -> the scope it needs besides ``placement`` ("" for none). Pages:
# api-reference/widgets/crm/detail-tab.md (scope crm), crm/list-menu.md (scope crm), left-menu.md (scope
# basic), universal/app-url.md (scope placement). Only these are known to the stand-in; any other code
# answers ERROR_PLACEMENT_NOT_FOUND, as an unknown code or a missing scope does on a portal
# (api-reference/widgets/telephony/index.md, "Common Mistakes").
_CRM_OBJECTS = ("LEAD", "DEAL", "CONTACT", "COMPANY", "QUOTE", "SMART_INVOICE")
PLACEMENT_SCOPES: dict[str, str] = {
    **{f"CRM_{name}_DETAIL_TAB": "crm" for name in _CRM_OBJECTS},
    **{f"CRM_{name}_LIST_MENU": "crm" for name in (*_CRM_OBJECTS, "ACTIVITY")},
    "LEFT_MENU": "",
    "REST_APP_URI": "",
}
# detail-tab.md, list-menu.md: CRM_DYNAMIC_<entityTypeId>_DETAIL_TAB / _LIST_MENU for custom object types.
_DYNAMIC = re.compile(r"^CRM_DYNAMIC_\d+_(DETAIL_TAB|LIST_MENU)$")
# Placements whose PLACEMENT_OPTIONS carry the ID of the CRM object they were opened for (detail-tab.md).
with_id = re.compile(r"^CRM_\w+_(DETAIL_TAB|LIST_MENU)$").match

_LANG_FIELDS = ("TITLE", "DESCRIPTION", "GROUP_NAME")


def required_scope(code: str) -> str | None:
    """The scope a placement needs besides ``placement`` ("" none), or None for a code the portal lacks."""
    if code in PLACEMENT_SCOPES:
        return PLACEMENT_SCOPES[code]
    if _DYNAMIC.match(code):
        return "crm"
    return None


def known(code: str, scopes: set[str]) -> bool:
    """Whether an app with ``scopes`` may bind ``code`` (placement.list lists exactly these)."""
    needed = required_scope(code)
    return needed is not None and (not needed or needed in scopes)


def _upper(params: Mapping[str, Any]) -> JSON:
    """The portal reads placement parameters in any case (``placement`` as ``PLACEMENT``); not documented."""
    return {str(key).upper(): value for key, value in params.items()}


def _text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value).strip()


def _required(params: JSON, name: str) -> str:
    """placement-bind.md / placement-unbind.md: a missing required field is ERROR_ARGUMENT with the field
    in ``argument``. (The pages disagree on its HTTP status, 200 or 400; the stand-in answers 400.)"""
    value = params.get(name)
    if value is not None and not isinstance(value, str | int | float):
        raise RestError(
            400, "ERROR_ARGUMENT", f"The value of an argument '{name}' must be of type string", argument=name
        )
    text = _text(value)
    if not text:
        raise RestError(400, "ERROR_ARGUMENT", f"Argument '{name}' is null or empty", argument=name)
    return text


def _lang_all(value: Any) -> dict[str, dict[str, str]]:
    """``LANG_ALL``: ``{lang: {TITLE, DESCRIPTION, GROUP_NAME}}``; each language keeps all three (empty when
    not given), as placement-get.md shows them."""
    if not isinstance(value, Mapping):
        return {}
    langs: dict[str, dict[str, str]] = {}
    for lang, fields in value.items():
        if not isinstance(fields, Mapping):
            continue
        upper = _upper(fields)
        langs[str(lang).lower()] = {name: _text(upper.get(name)) for name in _LANG_FIELDS}
    return langs


def bind_params(params: Mapping[str, Any], scopes: set[str]) -> JSON:
    """Check placement.bind's parameters (placement-bind.md) and return the binding to keep (no ``id``).

    The handler's host is the server's business (it must be a loopback URL here); so is "already binded".
    """
    upper = _upper(params)
    code = _required(upper, "PLACEMENT").upper()
    handler = _required(upper, "HANDLER")
    if not known(code, scopes):
        # DEFAULT (the app's own page) is no widget either: it is set in the app's settings, not bound.
        raise RestError(400, "ERROR_PLACEMENT_NOT_FOUND", "Placement not found")
    if _text(upper.get("USER_ID")):
        # placement-bind.md: USER_ID is for PAGE_BACKGROUND_WORKER only, which the stand-in does not have.
        raise RestError(400, "ERROR_PLACEMENT_USER_MODE", "User mode is not available")
    options = upper.get("OPTIONS")
    return {
        "placement": code,
        "handler": handler,
        "title": _text(upper.get("TITLE")),
        "description": _text(upper.get("DESCRIPTION")),
        "group_name": _text(upper.get("GROUP_NAME")),
        "user_id": 0,
        "lang_all": _lang_all(upper.get("LANG_ALL")),
        "options": dict(options) if isinstance(options, Mapping) else {},
    }


def unbind_params(params: Mapping[str, Any]) -> tuple[str, str]:
    """placement-unbind.md: ``PLACEMENT`` (required) and ``HANDLER`` (empty: every handler of it)."""
    upper = _upper(params)
    return _required(upper, "PLACEMENT").upper(), _text(upper.get("HANDLER"))


def for_get(binding: Mapping[str, Any]) -> JSON:
    """One entry of placement.get's answer, as placement-get.md shows it: ``placement``, ``userId``,
    ``handler``, ``options`` (``[]`` when empty: PHP's empty array), ``title``, ``description``,
    ``langAll``."""
    return {
        "placement": binding["placement"],
        "userId": binding["user_id"],
        "handler": binding["handler"],
        "options": dict(binding["options"]) or [],
        "title": binding["title"],
        "description": binding["description"],
        "langAll": {lang: dict(fields) for lang, fields in binding["lang_all"].items()} or [],
    }


def title_in(binding: Mapping[str, Any], lang: str) -> str:
    """What a user with interface language ``lang`` sees (placement-bind.md, LANG_ALL): the title given for
    that language, else TITLE. What a portal shows when both are empty is not documented: the code here."""
    localized = binding["lang_all"].get(lang.lower(), {}).get("TITLE", "")
    return str(localized or binding["title"] or binding["placement"])


# --------------------------------------------------------------------------------------------------------
# A portal's widgets (api-reference/widgets/placement-bind.md, placement-get.md, placement-unbind.md)


class PlacementsMixin(PortalState):
    """placement.* methods over the portal's bound"""

    def _placement_method(self, method: str, params: JSON, grant: _Grant) -> Any:
        """placement.bind / .get / .unbind / .list. All need the ``placement`` scope (answered like any
        method outside the app's scope); all but .list are for administrators ("Who can execute the method:
        administrator"; placement-unbind.md: 403 ACCESS_DENIED "Access denied!")."""
        scopes = _split_scope(self.scope)
        if "placement" not in scopes:
            raise RestError(
                403, "insufficient_scope", "The request requires higher privileges than provided."
            )
        if method == "placement.list":
            # placement-list.md: the codes this app may bind, given its scopes.
            return [code for code in PLACEMENT_SCOPES if known(code, scopes)]
        if method not in ("placement.bind", "placement.get", "placement.unbind"):
            raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        if not grant.admin:
            raise RestError(403, "ACCESS_DENIED", "Access denied!")
        if method == "placement.get":
            with self._lock:
                return [for_get(binding) for binding in self.placements]
        if method == "placement.unbind":
            return self._placement_unbind(params)
        binding = bind_params(params, scopes)
        handler = binding["handler"]
        parts = urlsplit(handler)
        if parts.scheme.lower() not in ("http", "https"):
            # Not documented for placement.bind: event-bind.md's answer for the same mistake.
            raise RestError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")
        try:
            # placement-bind.md wants a handler on the app's own domain, reachable from outside; the
            # stand-in opens only loopback apps, so that is what it accepts (not documented: the code).
            _require_loopback_url(handler)
        except ValueError:
            raise RestError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL") from None
        with self._lock:
            if any(
                existing["placement"] == binding["placement"] and existing["handler"] == handler
                for existing in self.placements
            ):
                # The answer user-field-type binding documents for the same placement table
                # (api-reference/widgets/user-field/userfieldtype-add.md); apps look for "already binded".
                raise RestError(400, "ERROR_CORE", "Unable to set placement handler: Handler already binded")
            binding["id"] = self._next_placement
            self._next_placement += 1
            self.placements.append(binding)
        return True

    def _placement_unbind(self, params: JSON) -> JSON:
        """placement-unbind.md: removes the app's handlers of ``PLACEMENT`` (all of them without ``HANDLER``).
        ``count`` follows the page's current wording: "+1 for each found handler record before the removal
        call, +1 after each successful removal" — two per removed handler (its example answers 4). An
        older version of the page said "the number of removed handlers"; an app should test ``count > 0``."""
        code, handler = unbind_params(params)
        with self._lock:
            removed = [
                binding
                for binding in self.placements
                if binding["placement"] == code and (not handler or binding["handler"] == handler)
            ]
            self.placements[:] = [binding for binding in self.placements if binding not in removed]
        return {"count": 2 * len(removed)}

    def is_bound(self, placement: str, handler: str) -> bool:
        try:
            self.bound_handler(placement, handler)
        except ValueError:
            return False
        return True

    def bound_handler(self, placement: str, handler: str = "") -> JSON:
        """The binding that opens ``placement`` (the first bound, or the one of ``handler``); ValueError if
        none."""
        code = placement.strip().upper()
        with self._lock:
            for binding in self.placements:
                if binding["placement"] == code and (not handler or binding["handler"] == handler):
                    return dict(binding)
        raise ValueError(f"no handler is bound to {code} on this portal (placement.bind)")
