"""Bad input gets a 4xx with a clear JSON error, never a 5xx, and stores nothing but its log row."""

from __future__ import annotations

import json
import string
from urllib.parse import urlencode

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from install.models import InboundRequest, InboundStatus
from install.parsing import BadRequest, decode_php_form
from portals.models import Portal, TokenPair
from standin import payloads as bx

FORM = "application/x-www-form-urlencoded"


def _post(client: Client, path: str, body: bytes | str, content_type: str = FORM, query: str = ""):
    return client.generic("POST", f"{path}?{query}" if query else path, body, content_type=content_type)


def _assert_clean_4xx(response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    if status is not None:
        assert response.status_code == status, response.content[:300]
    payload = response.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["error_description"]
    assert not Portal.objects.exists()
    assert not TokenPair.objects.exists()


def _good_install(b24) -> list[tuple[str, str]]:
    return bx.onappinstall(b24, b24.issue_tokens(1))


@pytest.mark.django_db
class TestMalformedEvents:
    def test_missing_event_name(self, client, b24):
        body = urlencode([(k, v) for k, v in _good_install(b24) if k != "event"])
        _assert_clean_4xx(_post(client, "/events/", body), 400)

    @pytest.mark.parametrize(
        "field",
        [
            "auth[access_token]",
            "auth[refresh_token]",
            "auth[member_id]",
            "auth[domain]",
            "auth[application_token]",
        ],
    )
    def test_missing_install_fields(self, client, b24, field):
        body = urlencode([(k, v) for k, v in _good_install(b24) if k != field])
        response = _post(client, "/events/", body)
        _assert_clean_4xx(response, 400)
        assert field in response.json()["error_description"]

    def test_auth_that_is_not_a_group(self, client, b24):
        body = urlencode([("event", "ONAPPINSTALL"), ("auth", "x")])
        _assert_clean_4xx(_post(client, "/events/", body), 400)

    @pytest.mark.parametrize(
        "key", ["auth[access_token", "auth]x[", "auth[a]b", "[]", "auth[a][b][c][d][e][f][g][h][i]"]
    )
    def test_broken_nesting(self, client, b24, key):
        body = urlencode([*_good_install(b24), (key, "1")])
        response = _post(client, "/events/", body)
        _assert_clean_4xx(response, 400)

    def test_key_used_as_value_and_container(self, client, b24):
        body = urlencode([*_good_install(b24), ("auth[member_id][x]", "1")])
        _assert_clean_4xx(_post(client, "/events/", body), 400)

    def test_wrong_types(self, client, b24):
        body = urlencode([(k, "soon" if k == "auth[expires_in]" else v) for k, v in _good_install(b24)])
        response = _post(client, "/events/", body)
        _assert_clean_4xx(response, 400)
        assert "whole number" in response.json()["error_description"]

    def test_token_with_characters_a_token_cannot_have(self, client, b24):
        body = urlencode([(k, "<script>" if k == "auth[access_token]" else v) for k, v in _good_install(b24)])
        _assert_clean_4xx(_post(client, "/events/", body), 400)

    def test_non_utf8_body(self, client, b24):
        _assert_clean_4xx(_post(client, "/events/", b"event=ONAPPINSTALL&auth[domain]=\xff\xfe"), 400)

    def test_percent_encoded_non_utf8(self, client):
        _assert_clean_4xx(_post(client, "/events/", "event=ONAPPINSTALL&auth%5Bdomain%5D=%FF%FE"), 400)

    def test_invalid_json_body(self, client):
        _assert_clean_4xx(_post(client, "/events/", "{not json", content_type="application/json"), 400)

    def test_json_that_is_not_an_object(self, client):
        _assert_clean_4xx(_post(client, "/events/", "[1, 2]", content_type="application/json"), 400)

    def test_multipart_is_refused(self, client):
        _assert_clean_4xx(
            _post(client, "/events/", b"--x--", content_type="multipart/form-data; boundary=x"), 415
        )

    def test_huge_body(self, client, settings):
        response = _post(client, "/events/", "event=" + "A" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10))
        _assert_clean_4xx(response, 413)

    def test_huge_value(self, client, b24):
        body = urlencode([(k, "a" * 5000 if k == "auth[access_token]" else v) for k, v in _good_install(b24)])
        _assert_clean_4xx(_post(client, "/events/", body), 400)

    def test_too_many_fields(self, client):
        _assert_clean_4xx(_post(client, "/events/", "&".join(f"f{i}=1" for i in range(1100))), 400)

    @pytest.mark.parametrize("path", ["/events/", "/app/", "/install/"])
    def test_wrong_method(self, client, path):
        response = client.get(path)
        assert response.status_code == 405
        assert response["Allow"] == "POST"
        assert response.json()["error"] == "method_not_allowed"

    def test_rejections_are_logged_with_the_reason(self, client, b24):
        body = urlencode([(k, v) for k, v in _good_install(b24) if k != "auth[access_token]"])
        _post(client, "/events/", body)
        row = InboundRequest.objects.get()
        assert row.status == InboundStatus.REJECTED
        assert row.http_status == 400
        assert "auth[access_token] is required" in row.error
        assert row.event == "ONAPPINSTALL"


@pytest.mark.django_db
class TestMalformedFrames:
    @pytest.mark.parametrize("field", ["AUTH_ID", "REFRESH_ID", "member_id", "DOMAIN"])
    @pytest.mark.parametrize("path", ["/app/", "/install/"])
    def test_missing_fields(self, client, b24, field, path):
        query, body = bx.launch(b24, b24.issue_tokens(1))
        query.pop(field, None)
        body.pop(field, None)
        response = _post(client, path, urlencode(body), query=urlencode(query))
        _assert_clean_4xx(response, 400)
        assert field in response.json()["error_description"]

    def test_invalid_json_in_placement_options(self, client, b24):
        query, body = bx.launch(b24, b24.issue_tokens(1))
        body["PLACEMENT_OPTIONS"] = '{"ID": "8061"'
        response = _post(client, "/app/", urlencode(body), query=urlencode(query))
        _assert_clean_4xx(response, 400)
        assert "PLACEMENT_OPTIONS is not valid JSON" in response.json()["error_description"]

    def test_placement_options_that_are_not_an_object(self, client, b24):
        query, body = bx.launch(b24, b24.issue_tokens(1))
        body["PLACEMENT_OPTIONS"] = "[1,2]"
        _assert_clean_4xx(_post(client, "/app/", urlencode(body), query=urlencode(query)), 400)

    def test_domain_that_is_not_a_host_name(self, client, b24):
        query, body = bx.launch(b24, b24.issue_tokens(1))
        query["DOMAIN"] = "portal.bitrix24.com/evil?x=1"
        _assert_clean_4xx(_post(client, "/app/", urlencode(body), query=urlencode(query)), 400)

    def test_browser_gets_a_readable_page(self, client, b24):
        query, body = bx.launch(b24, b24.issue_tokens(1))
        body.pop("AUTH_ID")
        response = client.generic(
            "POST", "/app/?" + urlencode(query), urlencode(body), content_type=FORM, HTTP_ACCEPT="text/html"
        )
        assert response.status_code == 400
        assert b"The app could not open" in response.content
        assert b"AUTH_ID is required" in response.content


# --- properties -----------------------------------------------------------------------------------

keys = st.text(alphabet=string.ascii_letters + string.digits + "[]_", min_size=1, max_size=30)
values = st.text(max_size=40)


@given(st.lists(st.tuples(keys, values), max_size=30))
@settings(max_examples=400, deadline=None)
def test_php_form_decoder_either_decodes_or_says_why(pairs):
    try:
        decoded = decode_php_form(pairs)
    except BadRequest as exc:
        assert str(exc)
        return
    assert isinstance(decoded, dict)


nested = st.recursive(
    st.text(alphabet=string.ascii_letters + string.digits + " -_.", max_size=12),
    lambda children: st.dictionaries(
        st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8),
        children,
        max_size=4,
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), nested, max_size=5))
@settings(max_examples=300, deadline=None)
def test_php_form_round_trip(data):
    from portals import phpform

    def without_empty_groups(value):
        if isinstance(value, dict):
            kept = {
                k: without_empty_groups(v)
                for k, v in value.items()
                if v != {} and without_empty_groups(v) != {}
            }
            # An array keyed exactly 0 … n-1 is a PHP list, and comes back as one.
            if kept and list(kept) == [str(i) for i in range(len(kept))]:
                return list(kept.values())
            return kept
        return value

    assert decode_php_form(phpform.encode(data)) == without_empty_groups(data)


form_bodies = st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(keys, values), max_size=25).map(lambda pairs: urlencode(pairs).encode()),
)


@pytest.mark.django_db
@given(
    path=st.sampled_from(["/events/", "/app/", "/install/"]), body=form_bodies, query=st.binary(max_size=80)
)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_endpoints_never_answer_5xx_to_junk(client, path, body, query):
    from urllib.parse import quote_from_bytes

    response = client.generic("POST", f"{path}?{quote_from_bytes(query, safe='=&')}", body, content_type=FORM)
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
    assert response.json()["error"]
    assert not Portal.objects.exists()


@pytest.mark.parametrize(
    "host", ["2130706433", "127.1", "0x7f000001", "0177.0.0.1", "169.254.169.254", "[::1]"]
)
def test_addresses_in_disguise_never_match_a_wildcard_pattern(settings, host):
    from portals.http import portal_domain_allowed

    settings.BITRIX24_PORTAL_DOMAINS = ["*", "*.bitrix24.com"]
    assert not portal_domain_allowed(host)
    assert portal_domain_allowed("acme.bitrix24.com")


# --- bodies that used to reach a 5xx (RecursionError, NaN, NUL, lone surrogates) ------------------

JSON = "application/json"
_big_form_with_nul_key = "&".join(f"f{i}={'a' * 400}" for i in range(140)) + "&k%00ey=1&event=ONAPPINSTALL"
MALFORMED = [
    pytest.param('{"x":' * 600, JSON, id="json-open-objects-600"),
    pytest.param("[" * 100_000, JSON, id="json-open-lists-100000"),
    pytest.param("[" * 600 + "]" * 600, JSON, id="json-nested-600"),
    pytest.param('{"a": ' * 40 + "1" + "}" * 40, JSON, id="json-object-nested-40"),
    pytest.param('{"event": NaN}', JSON, id="json-nan"),
    pytest.param('{"event": "ONX", "n": -Infinity}', JSON, id="json-infinity"),
    pytest.param('{"event": "ONX", "n": 1e999}', JSON, id="json-overflowing-float"),
    pytest.param('{"\\ud800": 1}', JSON, id="json-surrogate-key"),
    pytest.param('{"event": "ONAPPINSTALL", "auth": {"domain": "\\udfff"}}', JSON, id="json-surrogate-value"),
    pytest.param('{"ev\\u0000ent": "ONX"}', JSON, id="json-nul-key"),
    pytest.param('{"event": "ON\\u0000X"}', JSON, id="json-nul-value"),
    pytest.param("event=ON%00X", FORM, id="form-nul-value"),
    pytest.param("ev%00ent=ONX", FORM, id="form-nul-key"),
    pytest.param(b"event=ON\x00X&auth[domain]=x", FORM, id="form-raw-nul"),
    pytest.param(_big_form_with_nul_key, FORM, id="form-over-50kb-nul-key"),
    pytest.param("event=ONAPPINSTALL&auth[domain]=%ED%A0%80", FORM, id="form-encoded-surrogate"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/events/", "/app/", "/install/"])
@pytest.mark.parametrize(("body", "content_type"), MALFORMED)
def test_malformed_bodies_get_a_4xx_and_a_small_log_row(client, path, body, content_type):
    response = _post(client, path, body, content_type=content_type)
    _assert_clean_4xx(response, 400)
    row = InboundRequest.objects.get()
    assert row.status == InboundStatus.REJECTED
    assert row.http_status == 400
    assert len(json.dumps([row.body, row.query, row.headers, row.error])) < 8000


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/events/", "/app/", "/install/"])
@pytest.mark.parametrize("query", ["a=%00", "a%00=1", "DOMAIN=%ED%B0%80"])
def test_malformed_query_strings_get_a_4xx(client, path, query):
    _assert_clean_4xx(_post(client, path, "", query=query), 400)


def test_placement_options_cannot_nest_deeply(b24):
    from install.parsing import placement_options

    with pytest.raises(BadRequest, match="nested deeper"):
        placement_options({"PLACEMENT_OPTIONS": "[" * 9000})
    with pytest.raises(BadRequest, match="NaN"):
        placement_options({"PLACEMENT_OPTIONS": '{"ID": NaN}'})


# Text that no database stores, mixed into ordinary text.
unstorable = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\x00", "\ud800", "a\udc00b", "ON\x00APP", "\ud83d", "\ufffe"]),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        unstorable,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(unstorable, children, max_size=4)
    ),
    max_leaves=15,
)
deep_json = st.integers(min_value=20, max_value=120_000).flatmap(
    lambda n: st.sampled_from(["[" * n, "[" * n + "]" * n, '{"x":' * n, '{"x":' * n + "1" + "}" * n])
)
json_bodies = st.one_of(
    st.dictionaries(
        st.sampled_from(["event", "auth", "data", "DOMAIN", "member_id"]) | unstorable, json_values
    ).map(lambda d: json.dumps(d, allow_nan=True)),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    deep_json,
)
nul_forms = st.lists(st.tuples(keys | unstorable, values | unstorable), max_size=12).map(
    lambda pairs: urlencode(
        [(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass")) for k, v in pairs]
    )
)


@pytest.mark.django_db
@given(
    path=st.sampled_from(["/events/", "/app/", "/install/"]),
    body_and_type=st.one_of(
        json_bodies.map(lambda body: (body, JSON)),
        nul_forms.map(lambda body: (body, FORM)),
        form_bodies.map(lambda body: (body, FORM)),
    ),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_body_gets_a_5xx(client, path, body_and_type):
    """Nested JSON, NaN and Infinity, NUL and lone surrogates (in keys and values, JSON and forms),
    on every endpoint: a 4xx with the usual JSON error, never a 5xx."""
    body, content_type = body_and_type
    response = _post(client, path, body, content_type=content_type)
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
    assert response.json()["error"]
    assert not Portal.objects.exists()
    assert not TokenPair.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("body", ["[" * 100_000, "{" * 100_000, '{"method": ' + "[" * 5000])
def test_the_staff_api_answers_400_to_deeply_nested_json(client, body):
    """`[` x 100,000 in a staff API body answered 500 (the JSON parser's RecursionError)."""
    from rest_framework.authtoken.models import Token

    from tests.factories import PortalFactory, UserFactory

    portal = PortalFactory()
    token = Token.objects.create(user=UserFactory(staff=True, superuser=True)).key
    response = client.post(
        f"/api/portals/{portal.member_id}/call/",
        body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {token}",
    )
    assert response.status_code == 400, response.content[:300]
    assert response.json()["error"] == "parse_error"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("deal_id", ["-1", "1.5", "1e5", " 1", "²", "０", "9" * 400, "007"])
def test_the_example_deal_tab_answers_400_to_what_is_not_a_deal_id(backend, b24, installed_portal, deal_id):
    from example import bitrix24 as example
    from portals import registry

    b24.seed("crm.deal", 1)
    with registry.replaced(example.register):
        query, body = bx.launch(
            b24, b24.issue_tokens(1), placement="CRM_DEAL_DETAIL_TAB", options={"ID": deal_id}
        )
        response = backend.post("/app/", params=query, data=body)
        assert response.status_code == 400, response.text[:300]
        assert "PLACEMENT_OPTIONS[ID] is not a deal's id" in response.text
        query, body = bx.launch(
            b24, b24.issue_tokens(1), placement="CRM_DEAL_DETAIL_TAB", options={"ID": "1"}
        )
        assert backend.post("/app/", params=query, data=body).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("deal_id", ["9" * 400, "007", "-1"])
def test_the_example_endpoint_answers_404_to_what_is_not_a_deal_id_without_asking_bitrix24(client, deal_id):
    response = client.get(f"/api/app/example/deals/{deal_id}/")
    assert response.status_code == 404, response.content[:200]
    assert response.json()["error"] == "not_found"
