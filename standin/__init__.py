"""A fake Bitrix24 (OAuth server and portals) as real local HTTP servers, for tests and local development.

Standard library only, and nothing of the product it stands in for: importing it never imports Django, and
sharing no code with the product lets it catch the product's mistakes instead of agreeing with them. By job:
``oauth.py`` (the OAuth server and its tokens), ``portal.py`` (a portal's REST API and limits), ``crm.py``
(CRM records and list filters), ``events.py`` (bindings, deliveries, the offline queue), ``placements.py``
(widgets), ``transport.py`` (the HTTP servers), ``form.py`` (PHP's form fields), ``console.py`` (the
``/standin/`` page), ``payloads.py`` (the requests Bitrix24 sends to an app) and ``server.py`` (the command
line, ``python -m standin``).
"""

from .server import FakePortal, StandIn

__all__ = ["FakePortal", "StandIn"]
