"""Fixtures: the Bitrix24 stand-in on loopback, settings pointing at it, and helpers to post to
the backend over real sockets (pytest-django's live_server)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from django.conf import settings as django_settings
from django.db import connection

from portals.standin import FakePortal, StandIn
from portals.standin import payloads as bx


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    with StandIn(client_id="app.standin", client_secret="standin-secret") as server:
        yield server


@pytest.fixture(autouse=True)
def bitrix24_settings(settings: Any, standin: StandIn) -> StandIn:
    """Trust the stand-in's OAuth server and its loopback portals, and nothing else."""
    settings.BITRIX24_OAUTH_SERVERS = [standin.oauth_url]
    settings.BITRIX24_PORTAL_DOMAINS = ["127.0.0.1:*"]
    settings.BITRIX24_ALLOW_HTTP = True
    settings.BITRIX24_CLIENT_ID = standin.client_id
    settings.BITRIX24_CLIENT_SECRET = standin.client_secret
    standin.oauth_mode = "ok"
    standin.oauth_latency = 0.0
    return standin


@pytest.fixture
def b24(standin: StandIn) -> FakePortal:
    """A fresh portal on the stand-in, with the app installed."""
    return standin.add_portal()


@pytest.fixture
def installed_portal(db: None, b24: FakePortal) -> Any:
    """b24 as its install leaves it in the database: the portal row and the installing admin's (user 1)
    background pair, with tokens the stand-in issued. Tests of the install itself post the event instead."""
    # Imported here: the models need Django, and test_standin.py also runs without it (-p no:django).
    from tests.factories import PortalFactory

    return PortalFactory.for_standin(b24)


@pytest.fixture
def staff_user(db: None) -> Any:
    """A staff user (no permissions of its own); password ``pw-<username>``."""
    from tests.factories import UserFactory

    return UserFactory(staff=True)


class Backend:
    """The backend as Bitrix24 sees it: a base URL to post forms to."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        return self.http.post(self.url + path, **kwargs)

    def install_event(self, portal: FakePortal, tokens: dict[str, Any] | None = None) -> requests.Response:
        return self.post(
            "/events/", data=bx.onappinstall(portal, tokens or portal.issue_tokens(1, admin=True))
        )

    def launch(self, portal: FakePortal, tokens: dict[str, Any], **kwargs: Any) -> requests.Response:
        query, body = bx.launch(portal, tokens, **kwargs)
        return self.post("/app/", params=query, data=body)

    def install_frame(self, portal: FakePortal, tokens: dict[str, Any]) -> requests.Response:
        query, body = bx.launch(portal, tokens)
        return self.post("/install/", params=query, data=body)


def _child_env(standin: StandIn) -> dict[str, str]:
    """Environment for a child process (a worker, a second renewer) that uses the test database and
    trusts the stand-in, as the test process does."""
    settings_dict = connection.settings_dict
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BITRIX24_OAUTH_SERVERS=standin.oauth_url,
        BITRIX24_PORTAL_DOMAINS="127.0.0.1:*",
        BITRIX24_ALLOW_HTTP="1",
        BITRIX24_CLIENT_ID=standin.client_id,
        BITRIX24_CLIENT_SECRET=standin.client_secret,
        BITRIX24_OAUTH_ATTEMPTS="2",
        BITRIX24_OAUTH_BACKOFF="0.01",
        DJANGO_VAR_DIR=str(django_settings.VAR_DIR),
    )
    if connection.vendor == "postgresql":
        env["DATABASE_URL"] = (
            f"postgres://{settings_dict['USER']}:{settings_dict.get('PASSWORD') or ''}@{settings_dict['HOST']}:"
            f"{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}"
        )
    else:
        env["DATABASE_URL"] = f"sqlite:///{settings_dict['NAME']}"
    return env


@pytest.fixture
def child_env() -> Callable[[StandIn], dict[str, str]]:
    return _child_env


@pytest.fixture
def backend(live_server: Any, transactional_db: None) -> Iterator[Backend]:
    client = Backend(live_server.url)
    yield client
    # Close keep-alive connections, so that no server thread holds a database session at teardown.
    client.http.close()
