"""A fake Bitrix24 (OAuth server and portals) as real local HTTP servers, for tests and local development.

Standard library only, and nothing of the product it stands in for: importing it never imports Django, and
sharing no code with the product lets it catch the product's mistakes instead of agreeing with them. By job:
``oauth.py`` (the OAuth server and its tokens), ``portal.py`` (a portal: its REST API's front door, limits,
users), ``state.py`` (a portal's install state and tokens), ``records.py`` and ``crm.py`` (entities, CRM
records and list filters), ``bindings.py`` and ``events.py`` (event bindings, deliveries, the offline queue),
``placements.py`` and ``frames.py`` (widgets, the app's frame), ``batch.py``, ``pages.py`` (a portal's HTTP
requests) over ``transport.py`` (the HTTP servers), ``tls.py`` (optional HTTPS with a local CA), ``form.py``
(PHP's form fields), ``console.py`` (the ``/standin/`` page), ``payloads.py`` (the requests Bitrix24 sends to an
app) and ``server.py`` (the command line, ``python -m standin``). Imports point one way, type hints included.
"""

from .server import FakePortal, StandIn

__all__ = ["FakePortal", "StandIn"]
