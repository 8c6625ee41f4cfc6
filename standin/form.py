"""Form fields as PHP writes and reads them: what a portal sends (`http_build_query`: `auth[member_id]=…`,
`data[FIELDS][ID]=…`) and how it parses what it is sent (`$_POST`: `filter[>ID]=5`, `select[]=ID`).

The stand-in's own code on purpose, not the product's parser: sharing it would make the stand-in agree with
the product's bugs instead of catching them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

# PHP's max_input_nesting_level.
MAX_DEPTH = 64


def _leaves(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [pair for key, item in value.items() for pair in _leaves(f"{prefix}[{key}]", item)]
    if isinstance(value, list | tuple):
        return [pair for index, item in enumerate(value) for pair in _leaves(f"{prefix}[{index}]", item)]
    if value is None:
        return []  # http_build_query leaves nulls out
    if isinstance(value, bool):
        return [(prefix, "1" if value else "0")]
    return [(prefix, str(value))]


def encode(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`http_build_query`: nested mappings and lists as bracketed keys, booleans as 1/0, nulls left out."""
    return [pair for key, value in fields.items() for pair in _leaves(str(key), value)]


def _path(key: str) -> list[str]:
    """`a[b][]` → ["a", "b", ""]; a key without brackets is one segment; an unclosed bracket ends the path."""
    head, bracket, rest = key.partition("[")
    path = [head]
    while bracket:
        inner, closed, rest = rest.partition("]")
        if not closed:
            break
        path.append(inner)
        if not rest.startswith("["):
            break
        rest = rest[1:]
    if len(path) > MAX_DEPTH:
        raise ValueError(f"the field {key[:80]!r} is nested deeper than {MAX_DEPTH} levels")
    return path


def _as_lists(value: Any) -> Any:
    """A PHP array whose keys are 0…n-1 in order is a list (as json_encode writes it)."""
    if not isinstance(value, dict):
        return value
    value = {key: _as_lists(item) for key, item in value.items()}
    if value and list(value) == [str(index) for index in range(len(value))]:
        return list(value.values())
    return value


def decode(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`$_POST` from form fields: the last of a repeated plain key wins, `[]` appends."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        path = _path(key)
        node = root
        for index, segment in enumerate(path):
            last = index == len(path) - 1
            if segment == "" and index:
                segment = str(sum(1 for existing in node if existing.isdigit()))
            if last:
                node[segment] = value
            else:
                child = node.get(segment)
                if not isinstance(child, dict):
                    child = node[segment] = {}
                node = child
    return {key: _as_lists(value) for key, value in root.items()}


def decode_query(text: str) -> dict[str, Any]:
    """A query string or a form body (application/x-www-form-urlencoded)."""
    return decode(parse_qsl(text, keep_blank_values=True))
