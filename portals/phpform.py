"""PHP-style nested form keys, both ways.

Bitrix24 is a PHP application: it posts events as ``application/x-www-form-urlencoded`` bodies whose keys
follow PHP's array syntax (``auth[access_token]=…``, ``data[FIELDS][ID]=…``) and it reads REST parameters
the same way (``cmd[key]=…`` for ``batch``, ``fields[NAME]=…``). See b24restdocs
``settings/oauth/simple-way.md`` (install event as a PHP array) and ``settings/how-to-call-rest-api/batch.md``.

``encode`` flattens a nested ``dict`` into such pairs, ``decode`` rebuilds the nesting with PHP semantics.
Standard library only: the REST client and the Django-free stand-in both use it.

Round trip: ``decode(encode(d)) == d`` for dicts whose leaves are strings, whose keys contain no ``[`` or
``]``, whose containers are not empty (PHP, like ``http_build_query``, sends nothing for an empty array)
and where no dict has exactly the keys ``"0" .. "n-1"`` (PHP arrays are both lists and maps; such a dict
comes back as a list, which is also what PHP's ``json_encode`` would make of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["decode", "decode_query", "encode"]


def _scalar(value: Any) -> str | None:
    """Render a leaf the way PHP's ``http_build_query`` does; ``None`` means "send nothing"."""
    if value is None:
        return None
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    else:
        text = _scalar(value)
        if text is not None:
            out.append((prefix, text))


def encode(nested: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten ``nested`` into ``(key, value)`` pairs with PHP-style keys, in insertion order.

    ``{"auth": {"access_token": "x"}, "cmd": ["a", "b"]}`` gives
    ``[("auth[access_token]", "x"), ("cmd[0]", "a"), ("cmd[1]", "b")]``.
    Booleans become ``"1"``/``"0"``, ``None`` and empty containers are left out (as PHP does).
    """
    out: list[tuple[str, str]] = []
    for key, value in nested.items():
        key = str(key)
        if "[" in key or "]" in key:
            raise ValueError(f"top-level key {key!r} must not contain brackets")
        _flatten(key, value, out)
    return out


def _split_key(key: str) -> tuple[str, list[str]]:
    """``"a[b][]"`` → ``("a", ["b", ""])``. An empty segment means "append" (``a[]``)."""
    opening = key.find("[")
    if opening == -1:
        if "]" in key:
            raise ValueError(f"broken nesting in form key {key!r}: ']' without '['")
        if not key:
            raise ValueError("empty form key")
        return key, []
    base = key[:opening]
    if not base:
        raise ValueError(f"broken nesting in form key {key!r}: no name before '['")
    if "]" in base:
        raise ValueError(f"broken nesting in form key {key!r}: ']' without '['")
    segments: list[str] = []
    pos = opening
    while pos < len(key):
        if key[pos] != "[":
            raise ValueError(f"broken nesting in form key {key!r}: unexpected {key[pos:]!r} after ']'")
        closing = key.find("]", pos + 1)
        if closing == -1:
            raise ValueError(f"broken nesting in form key {key!r}: '[' is never closed")
        segment = key[pos + 1 : closing]
        if "[" in segment:
            raise ValueError(f"broken nesting in form key {key!r}: '[' inside a segment")
        segments.append(segment)
        pos = closing + 1
    return base, segments


def _next_index(container: dict[str, Any]) -> str:
    """PHP's ``$a[] = …``: one more than the highest integer key so far, else 0."""
    highest = -1
    for existing in container:
        if existing.lstrip("-").isdigit():
            highest = max(highest, int(existing))
    return str(highest + 1)


def _listify(value: Any) -> Any:
    """Turn every dict whose keys are exactly ``"0" .. "n-1"`` in order into a list, recursively."""
    if not isinstance(value, dict):
        return value
    converted = {key: _listify(item) for key, item in value.items()}
    if converted and list(converted) == [str(i) for i in range(len(converted))]:
        return list(converted.values())
    return converted


def decode(pairs: Iterable[tuple[str, str]], *, max_depth: int | None = None) -> dict[str, Any]:
    """Rebuild the nested structure from PHP-style form pairs: the one decoder of the product (what Bitrix24
    posts to the backend, and what the stand-in is sent).

    ``a[]=1&a[]=2`` → ``{"a": ["1", "2"]}``; ``a[b][c]=1`` → ``{"a": {"b": {"c": "1"}}}``; an array whose
    keys are exactly 0 … n-1 is a list, as PHP's lists are (``a[0]=x&a[1]=y`` → ``["x", "y"]``).
    A repeated plain key keeps the last value (PHP does the same). Raises ``ValueError`` on broken
    nesting (``a[b`` or ``a]``), on a name used both as a value and as an array (``a=1&a[b]=2``),
    where PHP would silently drop data, and on nesting deeper than `max_depth` names.
    """
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        base, segments = _split_key(raw_key)
        path = [base, *segments]
        if max_depth is not None and len(path) > max_depth:
            raise ValueError(f"form key {raw_key[:80]!r} is nested deeper than {max_depth} levels")
        node = root
        for depth, segment in enumerate(path):
            if segment == "":
                segment = _next_index(node)
            is_last = depth == len(path) - 1
            if is_last:
                if isinstance(node.get(segment), dict):
                    shown = "".join(f"[{s}]" for s in path[1 : depth + 1])
                    raise ValueError(
                        f"form key {raw_key!r}: {path[0]}{shown} is already an array, cannot set a value"
                    )
                node[segment] = value
            else:
                child = node.setdefault(segment, {})
                if not isinstance(child, dict):
                    shown = "".join(f"[{s}]" for s in path[1 : depth + 1])
                    raise ValueError(
                        f"form key {raw_key!r}: {path[0]}{shown} is already a value, cannot nest under it"
                    )
                node = child
    return {key: _listify(item) for key, item in root.items()}


def decode_query(query: str, *, max_depth: int | None = None) -> dict[str, Any]:
    """Decode a URL-encoded query string or form body (``a[b]=1&c=2``) with :func:`decode`."""
    return decode(parse_qsl(query, keep_blank_values=True), max_depth=max_depth)
