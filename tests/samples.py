"""The documentation's payloads in ``tests/payloads/`` (see its README), read into Python.

Standard library only: ``test_standin.py`` also runs without Django.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).parent / "payloads"

_PRINT_R_LINE = re.compile(r"^\s*\[(?P<key>[^\]]+)\] => (?P<value>.*)$")
_PHP_ENTRY = re.compile(r"^'(?P<key>[^']+)' => (?:'(?P<value>[^']*)',|(?P<open>array\())$")


def text(name: str) -> str:
    """The sample without its ``#`` comment lines (source and format notes)."""
    lines = (PAYLOADS / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


def load_json(name: str) -> Any:
    return json.loads(text(name))


def load_print_r(name: str) -> dict[str, str]:
    """A flat PHP ``print_r()`` dump (``[KEY] => value`` lines), values as the strings PHP printed."""
    fields = {}
    for line in text(name).splitlines():
        match = _PRINT_R_LINE.match(line)
        if match:
            fields[match["key"]] = match["value"]
    if not fields:
        raise ValueError(f"{name}: no [KEY] => value lines")
    return fields


def load_php_array(name: str) -> list[tuple[str, str]]:
    """A PHP array literal of strings, as the form pairs PHP would post it: ``[("auth[domain]", "…"), …]``,
    in the order of the literal."""
    pairs: list[tuple[str, str]] = []
    path: list[str] = []
    lines = [line.strip() for line in text(name).splitlines() if line.strip()]
    if lines[0] != "array(" or lines[-1] != ")":
        raise ValueError(f"{name}: not an array( … ) literal")
    for line in lines[1:-1]:
        if line == "),":
            path.pop()
            continue
        match = _PHP_ENTRY.match(line)
        if match is None:
            raise ValueError(f"{name}: cannot read {line!r}")
        key = match["key"] if not path else f"{path[0]}{''.join(f'[{p}]' for p in path[1:])}[{match['key']}]"
        if match["open"]:
            path.append(match["key"])
        else:
            pairs.append((key, match["value"]))
    if path:
        raise ValueError(f"{name}: unbalanced array(")
    return pairs


def shape(value: Any) -> Any:
    """The JSON shape of a value: objects as their keys and the shapes of their values, lists by the shape
    of their first item, scalars by JSON type (an int and a float are both a number)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``[("auth[domain]", "x")]`` as ``{"auth": {"domain": "x"}}`` (keys in the order of the pairs)."""
    tree: dict[str, Any] = {}
    for key, value in pairs:
        head, *rest = key.replace("]", "").split("[")
        node = tree
        for part in [head, *rest][:-1]:
            node = node.setdefault(part, {})
        node[[head, *rest][-1]] = value
    return tree


def docs_event(name: str, portal: Any, tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """A documented event (JSON, or the PHP array literal) as Bitrix24 would send it for a stand-in portal:
    the sample verbatim, except that ``auth`` names the portal (domain, endpoints, member_id, application
    token) and carries the given tokens wherever the sample has tokens. Post ``phpform.encode(event)``."""
    event = load_json(name) if name.endswith(".json") else _nest(load_php_array(name))
    auth = event["auth"]
    auth.update(
        domain=portal.domain,
        server_endpoint=portal.standin.server_endpoint,
        client_endpoint=portal.client_endpoint,
        member_id=portal.member_id,
    )
    if "application_token" in auth:
        auth["application_token"] = portal.application_token
    for key in ("access_token", "refresh_token"):
        if key in auth:
            if tokens is None:
                raise ValueError(f"{name} carries {key}: pass the tokens to put in it")
            auth[key] = tokens[key]
    return event
