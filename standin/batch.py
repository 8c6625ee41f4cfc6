"""``batch`` (settings/how-to-call-rest-api/batch.md): up to 50 commands in one request, later ones able to use
earlier results through ``$result[key]…``; the batch answers 200 and failures sit in ``result_error``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from . import form as phpform
from .common import JSON, MAX_BATCH, Answer, _php_array, _time_block

__all__ = ["resolve", "run"]

_REFERENCE = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")


def resolve(value: Any, results: dict[str, Any]) -> Any:
    """Substitute ``$result[key][a][b]`` references to earlier commands' results.

    Only ``$result`` is supported (not ``$result_total`` etc.). A value that is exactly one reference takes
    the referenced value as is; a reference inside a longer string is replaced by its text. What a real
    portal does with an unresolvable reference is not documented; here it becomes an empty string.
    """
    if isinstance(value, dict):
        return {key: resolve(item, results) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, results) for item in value]
    if not isinstance(value, str) or "$result[" not in value:
        return value

    def lookup(match: re.Match[str]) -> Any:
        node: Any = results.get(match.group(1))
        for segment in re.findall(r"\[([^\]]*)\]", match.group(2)):
            if (
                isinstance(node, list)
                and segment.lstrip("-").isdigit()
                and -len(node) <= int(segment) < len(node)
            ):
                node = node[int(segment)]
            elif isinstance(node, dict) and segment in node:
                node = node[segment]
            else:
                return ""
        return "" if node is None else node

    whole = _REFERENCE.fullmatch(value)
    if whole is not None:
        return lookup(whole)
    return _REFERENCE.sub(lambda m: str(lookup(m)), value)


def run(params: JSON, call: Callable[[str, JSON], Answer], now: float) -> Answer:
    """``batch``: run each command of ``cmd`` with ``call`` (one method, the batch's own token and limits),
    later ones seeing earlier results; ``now`` is the portal's clock at the start."""
    started = now
    clock = time.perf_counter()
    cmd = params.get("cmd")
    if isinstance(cmd, list):
        commands = {str(index): command for index, command in enumerate(cmd)}
    elif isinstance(cmd, dict):
        commands = {str(key): command for key, command in cmd.items()}
    elif cmd in (None, ""):
        commands = {}
    else:
        return 400, {"error": "INVALID_ARG_VALUE", "error_description": "cmd must be an array"}
    if len(commands) > MAX_BATCH:
        return 400, {
            "error": "ERROR_BATCH_LENGTH_EXCEEDED",
            "error_description": "Max batch length exceeded",
        }
    halt = str(params.get("halt") or "0").lower() in ("1", "true", "y")
    results: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    nexts: dict[str, Any] = {}
    times: dict[str, Any] = {}
    for key, command in commands.items():
        if not isinstance(command, str):
            errors[key] = {"error": "INVALID_ARG_VALUE", "error_description": "command must be a string"}
        else:
            path, _, query = command.partition("?")
            method = path.strip().strip("/").lower()
            if method.endswith(".json"):
                method = method[: -len(".json")]
            try:
                inner = phpform.decode_query(query)
            except ValueError as exc:
                inner = None
                errors[key] = {"error": "INVALID_REQUEST", "error_description": str(exc)}
            if inner is not None:
                inner.pop("auth", None)  # every command runs with the batch's own token
                inner = resolve(inner, results)
                if method == "batch":
                    errors[key] = {
                        "error": "ERROR_BATCH_METHOD_NOT_ALLOWED",
                        "error_description": "Method is not allowed for batch usage",
                    }
                else:
                    status, payload = call(method, inner)
                    if status == 200:
                        results[key] = payload["result"]
                        times[key] = payload["time"]
                        if "total" in payload:
                            totals[key] = payload["total"]
                        if "next" in payload:
                            nexts[key] = payload["next"]
                    else:
                        errors[key] = {
                            "error": payload.get("error", ""),
                            "error_description": payload.get("error_description", ""),
                        }
        if halt and key in errors:
            break
    processing = time.perf_counter() - clock
    # batch-result-error-docs.json: the batch itself answers 200; failures sit in result_error.
    result = {
        "result": _php_array(results),
        "result_error": _php_array(errors),
        "result_total": _php_array(totals),
        "result_next": _php_array(nexts),
        "result_time": _php_array(times),
    }
    return 200, {"result": result, "time": _time_block(started, started + processing, processing)}
