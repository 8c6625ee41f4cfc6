"""A fake Bitrix24 (OAuth server and portals) as real local HTTP servers, for tests and local development.

Standard library only: importing this package never imports Django. See ``server.py`` for the behaviour
and ``payloads.py`` for the requests Bitrix24 sends to an app.
"""

from .server import FakePortal, StandIn

__all__ = ["FakePortal", "StandIn"]
