"""A stand-in portal's page for raising events by hand: ``GET /standin/`` and ``POST /standin/fire``.

For a person trying the app against the stand-in: the page lists the app's widgets (placement.bind) with a
form that opens each one as a portal user would (for a chosen CRM item where the widget has one), the app's
event bindings, its offline queue and the last deliveries, and has two small forms — change a CRM item as a portal user would (the item
changes and its event is raised) and raise any event. Each form posts to ``/standin/fire``, which answers
with a redirect back to the page (post/redirect/get), the outcome in the query string.

A development tool: the portal listens on loopback only, and each form carries the portal's
``console_token`` so that another page open in the same browser cannot post to it. Standard library only.
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import iso
from .events import CRM_EVENTS
from .placements import title_in, with_id

if TYPE_CHECKING:  # the portal serves this page; only its type is named here
    from .portal import FakePortal

__all__ = ["CONSOLE_PATH", "FIRE_PATH", "page", "submit"]

APP_FRAME_PATH = "/app-frame/"  # the portal page that opens the app (server.APP_FRAME_PATH)

CONSOLE_PATH = "/standin/"
FIRE_PATH = "/standin/fire"
RECENT = 20  # deliveries shown, newest first
QUEUE_ROWS = 50  # offline records shown


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None


def submit(portal: FakePortal, form: Mapping[str, str]) -> str:
    """Carry out one form of the page; returns what was done, for the page to show.

    PermissionError without the portal's token; ValueError for anything that cannot be done.
    """
    if not hmac.compare_digest(form.get("token", "").encode(), portal.console_token.encode()):
        raise PermissionError("the form does not carry this portal's token: reload the page")
    user_id = _int(form.get("user_id", "").strip() or "1", "user")
    # User 1 is the portal's administrator, as issue_tokens() has it; the others are employees.
    admin = user_id == 1
    kind = form.get("kind", "")
    if kind == "change":
        entity = form.get("entity", "")
        action = form.get("action", "")
        item_id = form.get("id", "").strip() or None
        title = form.get("title", "").strip()
        fields: dict[str, Any] = {}
        if title:
            fields["NAME" if entity == "crm.contact" else "TITLE"] = title
        item = portal.edit(entity, action, item_id, fields, user_id=user_id, admin=admin)
        return f"{entity} {item}: {action} by user {user_id}"
    if kind == "event":
        event = form.get("event", "").strip().upper()
        if not event.startswith("ON"):
            raise ValueError(f"{event!r} is not an event name (ONCRMDEALUPDATE, …)")
        item_id = form.get("id", "").strip()
        portal.fire(event, {"FIELDS": {"ID": item_id}} if item_id else None, user_id=user_id, admin=admin)
        return f"{event} raised by user {user_id}"
    raise ValueError(f"unknown form {kind!r}")


def _item_id(data: Any) -> str:
    fields = data.get("FIELDS") if isinstance(data, dict) else None
    return str(fields.get("ID", "")) if isinstance(fields, dict) else ""


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class=empty>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _options(values: list[str], selected: str = "") -> str:
    return "".join(
        f"<option{' selected' if value == selected else ''}>{html.escape(value)}</option>" for value in values
    )


def _placement_rows(portal: FakePortal) -> str:
    """One form per bound widget: ``GET /app-frame/?placement=…&handler=…[&id=…]&user_id=…&lang=…``.
    Titles are shown in the portal's language (LANG_ALL, placement-bind.md)."""
    with portal._lock:
        bindings = [dict(binding) for binding in portal.placements]
    if not bindings:
        return "<p class=empty>No widget is bound (placement.bind).</p>"
    rows = []
    for binding in bindings:
        code = html.escape(binding["placement"])
        item = (
            '<label>ID <input name="id" size="6" required></label>' if with_id(binding["placement"]) else ""
        )
        rows.append(
            f"""<tr><td>{code}</td><td>{html.escape(title_in(binding, portal.language_id))}</td>
<td>{html.escape(binding["handler"])}</td><td>
<form method="get" action="{APP_FRAME_PATH}" class="open-placement">
  <input type="hidden" name="placement" value="{code}">
  <input type="hidden" name="handler" value="{html.escape(binding["handler"])}">
  {item}
  <label>User <input name="user_id" size="4" value="1"></label>
  <label>Language <select name="lang">{_options(["en", "de", "ru"], portal.language_id)}</select></label>
  <button type="submit">Open</button>
</form></td></tr>"""
        )
    head = "<tr><th>placement</th><th>title</th><th>handler</th><th>open</th></tr>"
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def page(portal: FakePortal, *, notice: str = "", problem: str = "") -> str:
    """The HTML of ``GET /standin/``."""
    # Copies: the portal's request threads and the courier append to these lists meanwhile.
    bindings = [dict(binding) for binding in list(portal.events)]
    deliveries = list(portal.deliveries)[-RECENT:][::-1]
    records = portal.offline.records()
    binding_rows = [
        [
            str(binding["id"]),
            binding["event"],
            "offline" if binding["offline"] else "online",
            (f"queue: {binding['auth_connector'] or '(no source key)'}")
            if binding["offline"]
            else binding["handler"],
            binding["auth_type"],
            ", ".join(f"{key}={value}" for key, value in (binding.get("options") or {}).items()),
        ]
        for binding in bindings
    ]
    queue_rows = [
        [
            str(record.id),
            record.channel or "(none)",
            record.event,
            _item_id(record.data),
            iso(record.timestamp),
            record.message_id,
            record.process_id,
            "yes" if record.error else "",
        ]
        for record in records[:QUEUE_ROWS]
    ]
    delivery_rows = [
        [
            delivery["event"],
            delivery["handler"],
            str(delivery["status"]) if delivery["status"] is not None else (delivery["error"] or ""),
            iso(delivery["started"]),
            f"{delivery['finished'] - delivery['started']:.3f} s",
        ]
        for delivery in deliveries
    ]
    token = html.escape(portal.console_token)
    entities = _options(list(CRM_EVENTS), "crm.deal")
    # Each deal with its timeline: what an app wrote there (crm.timeline.comment.add) shows here, as the
    # deal's page in Bitrix24 shows it.
    comments = portal.items.get("crm.timeline.comment", [])
    deal_rows = []
    for deal in list(reversed(portal.items.get("crm.deal", [])))[:QUEUE_ROWS]:
        notes = [
            note
            for note in comments
            if str(note.get("ENTITY_ID")) == str(deal["ID"])
            and str(note.get("ENTITY_TYPE", "")).lower() == "deal"
        ]
        latest = str(notes[-1].get("COMMENT", "")) if notes else ""
        deal_rows.append(
            [
                deal["ID"],
                str(deal.get("TITLE") or ""),
                str(deal.get("STAGE_ID") or ""),
                str(len(notes)),
                latest,
            ]
        )
    flash = ""
    if notice:
        flash += f"<p class=notice>{html.escape(notice)}</p>"
    if problem:
        flash += f"<p class=problem>{html.escape(problem)}</p>"
    domain = html.escape(portal.domain)
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{domain} — events — Bitrix24 stand-in</title>
  <style>
    body {{ margin: 0; font: 14px system-ui, sans-serif; background: #eef2f4; }}
    header {{ background: #2fc6f6; color: #fff; padding: 10px 16px; }}
    main {{ padding: 8px 16px; }}
    section {{ background: #fff; border-radius: 8px; padding: 8px 16px; margin: 12px 0; }}
    table {{ border-collapse: collapse; }} td, th {{ padding: 2px 8px; text-align: left; }}
    tr:nth-child(even) {{ background: #f5f7f8; }}
    .notice {{ color: #2b7a0b; }} .problem {{ color: #b00020; }} .empty {{ color: #777; }}
    form {{ margin: 6px 0; }} label {{ margin-right: 8px; }}
  </style>
</head>
<body>
  <header>Bitrix24 stand-in · portal <b>{domain}</b> · member_id {html.escape(portal.member_id)}
    · app {"installed" if portal.installed else "not installed"}
    · <span id="install-finish">{
        "installFinish called" if portal.install_finished else "installFinish not called yet"
    }</span></header>
  <main>
  {flash}
  <section id="placements">
    <h2>Widgets ({len(portal.placements)})</h2>
    {_placement_rows(portal)}
  </section>
  <section>
    <h2>Change an item as a portal user</h2>
    <form method="post" action="{FIRE_PATH}">
      <input type="hidden" name="token" value="{token}">
      <input type="hidden" name="kind" value="change">
      <label>Entity <select name="entity">{entities}</select></label>
      <label>Action <select name="action">{_options(["add", "update", "delete"], "update")}</select></label>
      <label>ID <input name="id" size="6" placeholder="for update, delete"></label>
      <label>Title / name <input name="title" size="20"></label>
      <label>User <input name="user_id" size="4" value="1"></label>
      <button type="submit">Save</button>
    </form>
  </section>
  <section>
    <h2>Raise an event</h2>
    <form method="post" action="{FIRE_PATH}">
      <input type="hidden" name="token" value="{token}">
      <input type="hidden" name="kind" value="event">
      <label>Event <input name="event" size="24" placeholder="ONCRMDEALUPDATE"></label>
      <label>data[FIELDS][ID] <input name="id" size="6"></label>
      <label>User <input name="user_id" size="4" value="1"></label>
      <button type="submit">Raise</button>
    </form>
  </section>
  <section id="deals">
    <h2>Deals and their timeline</h2>
    {
        _table(
            ["ID", "title", "stage", "timeline notes", "latest note"],
            deal_rows,
            "No deal yet: add one with the form above, or with crm.deal.add.",
        )
    }
  </section>
  <section>
    <h2>Bindings ({len(bindings)})</h2>
    {
        _table(
            ["id", "event", "type", "handler", "auth_type", "options"],
            binding_rows,
            "No event is bound: the backend binds its handlers with event.bind after a trusted install or update, "
            "when it runs with BITRIX24_PUBLIC_URL set (bin/run sets it); bin/manage bitrix24_sync binds them again.",
        )
    }
  </section>
  <section>
    <h2>Offline queue ({len(records)} record{"" if len(records) == 1 else "s"})</h2>
    {
        _table(
            ["ID", "source key", "event", "FIELDS.ID", "TIMESTAMP_X", "MESSAGE_ID", "PROCESS_ID", "error"],
            queue_rows,
            "The offline queue is empty.",
        )
    }
  </section>
  <section>
    <h2>Last deliveries</h2>
    {
        _table(
            ["event", "handler", "status", "started", "took"],
            delivery_rows,
            "No event was delivered yet: a change here (the forms above, or a REST write) is posted to each handler "
            "bound for its event. The backend binds its handlers after a trusted install only when it runs with "
            "BITRIX24_PUBLIC_URL set (bin/run sets it), once a worker has run the bindings.",
        )
    }
  </section>
  </main>
</body>
</html>
"""
