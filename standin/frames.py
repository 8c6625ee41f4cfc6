"""The portal page that opens an app in its frame (settings/oauth/simple-way.md), and what the app's JS
library tells that page (``installFinish``, ``refreshAuth``)."""

from __future__ import annotations

import hmac
import html
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from . import payloads
from .common import (
    APP_FRAME_ID,
    FRAME_REPORT_PATH,
    JSON,
    MAX_FRAMES,
    _origin,
    _require_loopback_url,
    _static,
)
from .placements import PlacementsMixin


class FramesMixin(PlacementsMixin):
    """App frame pages, a bound widget's page, and the reports of their scripts."""

    def app_frame_page(
        self,
        handler: str,
        *,
        user_id: int = 1,
        admin: bool = True,
        placement: str = "DEFAULT",
        lang: str = "en",
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """The HTML a portal serves when a user opens the app: fresh tokens for that user, posted by a form
        whose ``target`` is an ``<iframe>`` on the same page (settings/oauth/simple-way.md, "What the
        Application Receives on Opening"). The fields are exactly :func:`payloads.launch`'s: ``DOMAIN``,
        ``PROTOCOL``, ``LANG`` and ``APP_SID`` in the action's query string, the rest as hidden inputs;
        ``options`` become ``PLACEMENT_OPTIONS`` (JSON as PHP writes it, api-reference/widgets/crm/
        detail-tab.md).

        The page also answers the JS library inside the frame (``/api/v1/``, see ``static/bx24.js``) over
        ``postMessage``, as a portal page answers BX24.js: its one script submits the form and listens.

        ``handler`` is the app's URL (its "handler path"). Only loopback hosts are accepted: this is a
        development tool that hands out live tokens, not a redirector. Raises ValueError otherwise.
        """
        _require_loopback_url(handler)
        tokens = self.issue_tokens(user_id, admin=admin)
        query, body = payloads.launch(self, tokens, placement=placement, options=options, lang=lang)
        action = handler + ("&" if "?" in handler else "?") + urlencode(query)
        inputs = "\n".join(
            f'    <input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
            for name, value in body.items()
        )
        secret = secrets.token_hex(16)
        self._remember_frame(
            query["APP_SID"],
            {"secret": secret, "user_id": user_id, "admin": admin, "placement": placement},
        )
        raw_options = body.get("PLACEMENT_OPTIONS", "")
        try:
            parsed_options = json.loads(raw_options) if raw_options else {}
        except ValueError:
            parsed_options = {}
        init: JSON = {
            **query,
            "AUTH_ID": body["AUTH_ID"],
            "AUTH_EXPIRES": body["AUTH_EXPIRES"],
            "REFRESH_ID": body["REFRESH_ID"],
            "member_id": body["member_id"],
            "MEMBER_ID": body["member_id"],
            "PLACEMENT": placement,
            "PLACEMENT_OPTIONS": raw_options,
            "USER_ID": user_id,
            "IS_ADMIN": admin,
            "INSTALL": not self.install_finished,
            # What the official JS SDK's getInitData also reads: the options as an object, the REST path.
            "SDK_PLACEMENT_OPTIONS": parsed_options if isinstance(parsed_options, dict) else {},
            "FIRST_RUN": False,
            "PATH": "/rest/",
        }
        frame_config = json.dumps(
            {"appOrigin": _origin(handler), "secret": secret, "reportUrl": FRAME_REPORT_PATH, "init": init}
        )
        domain = html.escape(self.domain)
        frame_name = f"{self.domain}|{query['PROTOCOL']}|{query['APP_SID']}"
        finished = "installFinish called" if self.install_finished else "installFinish not called yet"
        return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{domain} — Bitrix24 stand-in</title>
  <style>
    body {{ margin: 0; font: 14px system-ui, sans-serif; background: #eef2f4; }}
    header {{ background: #2fc6f6; color: #fff; padding: 10px 16px; }}
    iframe {{ display: block; width: calc(100% - 32px); height: 80vh; margin: 16px; border: 0;
              background: #fff; border-radius: 8px; }}
  </style>
</head>
<body>
  <header>Bitrix24 stand-in · portal <b>{domain}</b> · user {int(user_id)} · placement {html.escape(placement)}
    · <span id="standin-status">{finished}</span></header>
  <form id="launch" method="post" action="{html.escape(action)}" target="{html.escape(frame_name)}">
{inputs}
    <noscript><button type="submit">Open the app</button></noscript>
  </form>
  <iframe name="{html.escape(frame_name)}" id="{APP_FRAME_ID}" title="Application"
          data-standin="{html.escape(frame_config)}"></iframe>
  <script>{_static("frame.js")}</script>
</body>
</html>
"""

    def open_placement(
        self,
        placement: str,
        *,
        options: Mapping[str, Any] | None = None,
        user_id: int = 1,
        admin: bool = True,
        lang: str = "en",
        handler: str = "",
    ) -> str:
        """The portal page of a *bound* widget: :meth:`app_frame_page` for the handler bound to
        ``placement`` (the first one, or ``handler`` among them), with ``options`` as PLACEMENT_OPTIONS
        (``{"ID": "3"}`` for CRM_DEAL_DETAIL_TAB). ValueError when nothing is bound, or when an ordinary user
        opens it before BX24.installFinish() (placement-bind.md: until the install is complete widgets are
        "only visible to users with administrative rights")."""
        binding = self.bound_handler(placement, handler)
        if not admin and not self.install_finished:
            raise ValueError(
                f"{binding['placement']} shows to administrators only until the app calls "
                "BX24.installFinish() (placement-bind.md)"
            )
        return self.app_frame_page(
            binding["handler"],
            user_id=user_id,
            admin=admin,
            placement=binding["placement"],
            lang=lang,
            options=options,
        )

    def _remember_frame(self, app_sid: str, frame: JSON) -> None:
        with self._lock:
            self._frames[app_sid] = frame
            while len(self._frames) > MAX_FRAMES:  # the oldest pages can no longer report
                del self._frames[next(iter(self._frames))]

    def frame_report(self, app_sid: str, secret: str, command: str) -> JSON:
        """What the portal page does with a message of the JS library that needs the server (``POST
        /standin/frame``): ``installFinish`` is recorded (``install_finished``, ``frame_messages``);
        ``refreshAuth`` answers fresh tokens for the frame's user (sdk/bx24-js-sdk/system-functions/
        bx24-refresh-auth.md). PermissionError for a page the portal did not render; ValueError otherwise."""
        with self._lock:
            frame = self._frames.get(app_sid)
        if frame is None or not hmac.compare_digest(secret.encode(), str(frame["secret"]).encode()):
            raise PermissionError("not a frame page of this portal: reload it")
        if command == "installFinish":
            with self._lock:
                self.install_finished = True
                self.frame_messages.append(
                    {
                        "command": command,
                        "app_sid": app_sid,
                        "user_id": frame["user_id"],
                        "placement": frame["placement"],
                        "at": self.standin.now(),
                    }
                )
            return {"install_finished": True}
        if command == "refreshAuth":
            tokens = self.issue_tokens(int(frame["user_id"]), admin=bool(frame["admin"]))
            return {
                "AUTH_ID": tokens["access_token"],
                "REFRESH_ID": tokens["refresh_token"],
                "AUTH_EXPIRES": str(tokens["expires_in"]),
            }
        raise ValueError(f"unknown command {command!r}")
