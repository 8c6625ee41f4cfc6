"""One table from domain errors to answers (portals.answers): every domain error, met in a launch's
placement view, in an API view and in a plain view behind the middleware, gets the same status, code and
Retry-After on each."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from portals import answers, client, errors, registry
from portals.verification import Refusal, TooManyUnverified, UpstreamUnavailable, VerificationError
from standin import payloads as bx
from tests import answers_urls

pytestmark = pytest.mark.django_db(transaction=True)

# What each domain error is answered with, wherever it is met: (status, code, Retry-After).
CASES: dict[str, tuple[Callable[[], BaseException], tuple[int, str, str | None]]] = {
    "forged": (
        lambda: VerificationError("Bitrix24 did not accept the token", code="invalid_token"),
        (401, "invalid_token", None),
    ),
    "another_portal": (
        lambda: VerificationError(
            "the token is another portal's", refusal=Refusal.NOT_HERE, code="wrong_portal"
        ),
        (403, "wrong_portal", None),
    ),
    "overtaken": (
        lambda: VerificationError("uninstalled meanwhile", refusal=Refusal.STALE, code="uninstalled"),
        (409, "uninstalled", None),
    ),
    "oauth_away": (
        lambda: UpstreamUnavailable("cannot reach the OAuth server"),
        (503, "bitrix24_unavailable", "15"),
    ),
    "unverified_flood": (lambda: TooManyUnverified("too many refused"), (429, "too_many_requests", "60")),
    "event_flood": (
        lambda: errors.TooManyEvents("over the event budget", retry_after=30),
        (429, "too_many_requests", "30"),
    ),
    "no_pair": (lambda: errors.NoUsablePair("no active token pair"), (409, "no_usable_pair", None)),
    "portal_busy": (
        lambda: errors.PortalBusy("the portal's rate limit has no slot for 4.2 s", wait=4.2),
        (503, "portal_busy", "5"),
    ),
    "renewal_pending": (lambda: errors.RenewalPending("still renewing"), (503, "renewal_pending", "15")),
    "renewal_refused": (
        lambda: errors.RenewalFailed("invalid_grant", transient=False, code="invalid_grant"),
        (409, "renewal_refused", None),
    ),
    "renewal_for_now": (
        lambda: errors.RenewalFailed("timed out", transient=True, code="timeout"),
        (503, "bitrix24_unavailable", "15"),
    ),
    "bitrix24_refused": (
        lambda: client.AccessDenied("Access denied", code="ACCESS_DENIED", status=403),
        (502, "ACCESS_DENIED", None),
    ),
    "not_configured": (
        lambda: ImproperlyConfigured("BITRIX24_TOKEN_KEYS cannot decrypt the stored tokens"),
        (503, "not_configured", "60"),
    ),
}


@pytest.fixture
def raising(settings: Any) -> Iterator[None]:
    settings.ROOT_URLCONF = "tests.answers_urls"

    def raiser(make: Callable[[], BaseException]) -> Callable[[], None]:
        def fail() -> None:
            raise make()

        return fail

    answers_urls.ERRORS.update({key: raiser(make) for key, (make, _) in CASES.items()})
    yield
    answers_urls.ERRORS.clear()


def test_every_domain_error_has_an_answer() -> None:
    """A new domain error without a line in the table would be a 500 somewhere: each one has its answer."""
    domain = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, Exception)]
    domain += [
        VerificationError,
        UpstreamUnavailable,
        TooManyUnverified,
        client.RestError,
        ImproperlyConfigured,
    ]
    for cls in domain:
        assert any(base in answers.TABLE for base in cls.__mro__), f"{cls.__name__} has no answer"
    covered = {type(make()) for make, _ in CASES.values()}
    assert {cls for cls in domain if cls in answers.TABLE} <= covered | {client.RestError}


@pytest.mark.parametrize("key", list(CASES))
def test_a_domain_error_is_answered_alike_by_the_api_a_frontend_endpoint_and_the_middleware(
    client: Any, raising: None, key: str
) -> None:
    status, code, retry_after = CASES[key][1]
    for path in ("/test-answers/api/", "/test-answers/frontend/", "/test-answers/plain/"):
        response = client.get(path, {"error": key})
        assert (response.status_code, response.json()["error"], response.get("Retry-After")) == (
            status,
            code,
            retry_after,
        ), path
        assert response.json()["error_description"]


@pytest.mark.parametrize("key", list(CASES))
def test_a_domain_error_in_a_launch_is_answered_as_in_the_api(backend: Any, b24: Any, key: str) -> None:
    status, code, retry_after = CASES[key][1]
    make = CASES[key][0]

    def home(request: Any, context: Any) -> Any:
        raise make()

    with registry.replaced():
        registry.placement("DEFAULT", title="Home")(home)
        response = backend.launch(b24, b24.issue_tokens(1, admin=True))
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.headers.get("Retry-After") == retry_after
    # In the portal's frame (a browser asking for HTML) the same answer is a page that names the code.
    query, body = bx.launch(b24, b24.issue_tokens(1, admin=True))
    with registry.replaced():
        registry.placement("DEFAULT", title="Home")(home)
        framed = backend.post("/app/", params=query, data=body, headers={"Accept": "text/html"})
    assert framed.status_code == status
    assert f"({code})" in framed.text


def test_the_docs_list_every_answer() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "urls.md").read_text(encoding="utf-8")
    table = page.split("### Error answers", 1)[1].split("\n\n", 3)[2]
    for key, (_, (status, code, _retry)) in CASES.items():
        named = "" if key in {"forged", "another_portal", "overtaken", "bitrix24_refused"} else f"`{code}`"
        # (the refusal's or Bitrix24's own code: those rows name examples)
        assert any(f"`{status}`" in row and named in row for row in table.splitlines()), key


def test_staff_are_told_which_setting_is_wrong_others_only_that_one_is(
    client: Any, raising: None, admin_user: Any
) -> None:
    anonymous = client.get("/test-answers/plain/", {"error": "not_configured"}).json()
    assert anonymous["error_description"] == answers.NOT_CONFIGURED
    client.force_login(admin_user)
    for path in ("/test-answers/plain/", "/test-answers/api/"):
        told = client.get(path, {"error": "not_configured"}).json()
        assert "BITRIX24_TOKEN_KEYS" in told["error_description"], path
