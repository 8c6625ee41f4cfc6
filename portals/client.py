"""Calling a portal's REST API: tokens, the shared rate governor, retries that never duplicate a write,
renamed portals, batches and paged lists.

    client = PortalClient(portal)               # acts with the portal's background pair
    client.call("crm.contact.get", {"id": 7})   # → result
    for contact in client.list("crm.contact.list", {"select": ["ID", "NAME"]}): ...
    client.batch({"me": ("profile", {}), "n": ("crm.contact.list", {"start": 0})})
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

import requests
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from . import clock, governor, http, oauth, phpform, renewal, verification
from .models import Portal, TokenPair

logger = logging.getLogger(__name__)

BATCH_LIMIT = 50
PAGE_SIZE = 50

# Method names that only read. Everything else is treated as a write: not re-sent after a timeout
# unless the caller marks the call idempotent, because Bitrix24 may have carried it out already.
READ_METHODS = {
    "profile",
    "app.info",
    "server.time",
    "scope",
    "methods",
    "method.get",
    "user.current",
    "event.get",
}
READ_SUFFIXES = (".get", ".list", ".fields", ".getlist", ".search", ".count", ".current", ".info", ".status")


def is_read(method: str) -> bool:
    method = method.lower()
    return method in READ_METHODS or method.endswith(READ_SUFFIXES)


# --- errors ---------------------------------------------------------------------------------------


class RestError(Exception):
    """A REST call failed. `code` is Bitrix24's error code (or ours), `status` the HTTP status."""

    def __init__(self, message: str, *, code: str = "", status: int = 0, description: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.description = description


class TransportError(RestError):
    """No answer: connection failed or timed out. `maybe_sent`: the portal may have received it."""

    def __init__(self, message: str, *, maybe_sent: bool) -> None:
        super().__init__(message, code="transport_error")
        self.maybe_sent = maybe_sent


class NotJSON(RestError):
    """The portal answered with something that is not JSON (often an HTML error page)."""


class ExpiredToken(RestError):
    pass


class InvalidToken(RestError):
    """The portal refuses the token for good (invalid_token, NO_AUTH_FOUND): reinstall needed."""


class InsufficientScope(RestError):
    pass


class AccessDenied(RestError):
    pass


class QueryLimitExceeded(RestError):
    pass


class OverloadLimit(RestError):
    pass


class OperationTimeLimit(RestError):
    def __init__(self, message: str, *, reset_at: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reset_at = reset_at


class PortalDeleted(RestError):
    pass


class MethodNotFound(RestError):
    pass


class BatchLengthExceeded(RestError):
    pass


_ERRORS: dict[str, type[RestError]] = {
    "expired_token": ExpiredToken,
    "invalid_token": InvalidToken,
    "no_auth_found": InvalidToken,
    "wrong_client": InvalidToken,
    "insufficient_scope": InsufficientScope,
    "access_denied": AccessDenied,
    "query_limit_exceeded": QueryLimitExceeded,
    "overload_limit": OverloadLimit,
    "portal_deleted": PortalDeleted,
    "error_method_not_found": MethodNotFound,
    "error_batch_length_exceeded": BatchLengthExceeded,
}


def error_from(code: str, description: str = "", status: int = 0, **kwargs: Any) -> RestError:
    cls = _ERRORS.get(code.lower(), RestError)
    message = f"{code}: {description}" if code and description else description or code or "error"
    if code.upper() == "OPERATION_TIME_LIMIT":
        return OperationTimeLimit(
            message, code=code, status=status, description=description, reset_at=kwargs.get("reset_at")
        )
    return cls(message, code=code, status=status, description=description)


# --- results --------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """Results and per-command errors of a batch, keyed by the caller's command keys."""

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, RestError] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    nexts: dict[str, Any] = field(default_factory=dict)
    requests: int = 0

    def raise_for_errors(self) -> None:
        if self.errors:
            key, error = next(iter(self.errors.items()))
            raise RestError(f"{len(self.errors)} batch command(s) failed; {key}: {error}", code=error.code)


def _as_keyed(value: Any, keys: list[str]) -> dict[str, Any]:
    """Bitrix24 (PHP) answers a batch whose keys are 0..n-1 with a JSON list, others with an object."""
    if isinstance(value, list):
        return {keys[i]: item for i, item in enumerate(value) if i < len(keys)} if value else {}
    return dict(value) if isinstance(value, dict) else {}


def _items(result: Any) -> list[Any]:
    if isinstance(result, list):
        return result
    if isinstance(result, dict):
        lists = [v for v in result.values() if isinstance(v, list)]
        if len(lists) == 1:  # e.g. crm.item.list → {"items": [...]}, tasks.task.list → {"tasks": [...]}
            return lists[0]
    raise RestError("the method's result is not a list", code="not_a_list")


def command(method: str, params: Mapping[str, Any] | None = None) -> str:
    """One batch command: `method?query` with PHP-style nested parameters."""
    return f"{method}?{urlencode(phpform.encode(dict(params or {})))}" if params else method


# --- the client -----------------------------------------------------------------------------------

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3


class _Answer(NamedTuple):
    status: int
    body: dict[str, Any]


def _host_key(scheme: str, netloc: str) -> str:
    """host[:port] as compared between a redirect and app.info: lowercased, no trailing dot, no port
    that is the scheme's default. '' when it is not a host at all."""
    try:
        domain = http.normalize_domain(netloc)
    except ValueError:
        return ""
    default = ":443" if scheme == "https" else ":80"
    return domain.removesuffix(default)


def _policy(harmless_twice: bool) -> http.RetryPolicy:
    return http.rest_read_policy() if harmless_twice else http.rest_write_policy()


def _transport_error(
    method: str, exc: requests.RequestException, failure: http.Failure, policy: http.RetryPolicy
) -> TransportError:
    maybe_sent = failure is not http.Failure.NOT_SENT
    unsent_note = (
        " (not re-sent: it may have been carried out)" if maybe_sent and not policy.retries(failure) else ""
    )
    return TransportError(f"{method}: {type(exc).__name__}{unsent_note}", maybe_sent=maybe_sent)


class PortalClient:
    def __init__(
        self,
        portal: Portal,
        user_id: int | None = None,
        *,
        form: bool = False,
        access_token: str = "",
        auth_connector: str = "",
    ) -> None:
        """`access_token`: act with this token as it is (a request's own token, before any pair is
        stored) instead of a stored pair; it is then never renewed.

        `auth_connector`: sent with every write (not reads, batches included), so that the portal does not
        queue offline events for the app's own changes (bitrix24-protocol.md, "Cycles")."""
        self.portal = portal
        self.user_id = user_id
        self.form = form  # send application/x-www-form-urlencoded (PHP keys) instead of JSON
        self.access_token = access_token
        self.auth_connector = auth_connector
        self._pair: TokenPair | None = None

    # -- public

    def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool = False,
        fail_fast: bool = False,
    ) -> Any:
        """Call one method; returns its `result`."""
        return self.call_raw(method, params, idempotent=idempotent, fail_fast=fail_fast).get("result")

    def call_raw(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool = False,
        fail_fast: bool = False,
    ) -> dict[str, Any]:
        """Call one method; returns the whole answer (result, total, next, time)."""
        return self._send(
            method, dict(params or {}), policy=_policy(idempotent or is_read(method)), fail_fast=fail_fast
        )

    def batch(
        self,
        commands: Mapping[str, tuple[str, Mapping[str, Any]] | str],
        *,
        halt: bool = False,
        idempotent: bool = False,
        fail_fast: bool = False,
    ) -> BatchResult:
        """Run commands in batches of 50. With `halt`, the first failing command stops the rest."""
        built = {
            key: self._with_connector(spec if isinstance(spec, str) else command(spec[0], spec[1]))
            for key, spec in commands.items()
        }
        reads_only = all(is_read(cmd.split("?", 1)[0]) for cmd in built.values())
        out = BatchResult()
        keys = list(built)
        for start in range(0, len(keys), BATCH_LIMIT):
            chunk = keys[start : start + BATCH_LIMIT]
            answer = self._send(
                "batch",
                {"halt": 1 if halt else 0, "cmd": {key: built[key] for key in chunk}},
                policy=_policy(idempotent or reads_only),
                fail_fast=fail_fast,
            )
            out.requests += 1
            body = answer.get("result") or {}
            out.results.update(_as_keyed(body.get("result"), chunk))
            out.totals.update(_as_keyed(body.get("result_total"), chunk))
            out.nexts.update(_as_keyed(body.get("result_next"), chunk))
            for key, error in _as_keyed(body.get("result_error"), chunk).items():
                if isinstance(error, dict):
                    out.errors[key] = error_from(
                        str(error.get("error", "")), str(error.get("error_description", ""))
                    )
            if halt and out.errors:
                break
        return out

    def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, fast: bool = False
    ) -> Iterator[Any]:
        """Every item of a list method, page after page.

        `fast=True` uses Bitrix24's `start=-1` path for big exports: no total is counted, pages are
        taken by `ID > last seen`, ordered by ID (the method must support filter[>ID] and order).
        """
        params = dict(params or {})
        if not fast:
            start: Any = params.pop("start", 0)
            while True:
                answer = self.call_raw(method, {**params, "start": start})
                yield from _items(answer.get("result"))
                start = answer.get("next")
                if start in (None, "", 0):
                    return
        last_id = 0
        base_filter = dict(params.pop("filter", {}) or {})
        while True:
            answer = self.call_raw(
                method,
                {**params, "order": {"ID": "ASC"}, "filter": {**base_filter, ">ID": last_id}, "start": -1},
            )
            items = _items(answer.get("result"))
            yield from items
            if len(items) < PAGE_SIZE:
                return
            last = items[-1]
            last_id = int(last.get("ID", last.get("id")))

    def operating(self, method: str) -> dict[str, Any] | None:
        """The last `time.operating` figures seen for a method on this portal (shared by all processes)."""
        try:
            value = cache.get(self._operating_key(method))
        except Exception as exc:  # the shared cache (Redis) is away: the figures are a hint, not a need
            logger.warning("Cache unavailable, operating-time figures unknown: %s", type(exc).__name__)
            return None
        return value if isinstance(value, dict) else None

    # -- internals

    def _operating_key(self, method: str) -> str:
        return f"b24:operating:{self.portal.member_id}:{method.lower()}"

    def _with_connector(self, cmd: str) -> str:
        """A batch command that writes carries the connector itself: the batch call only wraps it."""
        if not self.auth_connector or is_read(cmd.split("?", 1)[0]):
            return cmd
        joiner = "&" if "?" in cmd else "?"
        return f"{cmd}{joiner}{urlencode({'auth_connector': self.auth_connector})}"

    def _token(self) -> str:
        if self.access_token:
            return self.access_token
        self._pair = renewal.valid_pair(self.portal, self.user_id)
        return self._pair.access_token

    def _renew_rejected(self, token: str) -> str:
        assert self._pair is not None
        self._pair = renewal.renewed(self._pair, rejected_access_token=token)
        return self._pair.access_token

    def is_admin(self) -> bool:
        """Whether the acting user is a portal admin, per `profile` (no scope needed). False when unsure."""
        try:
            profile = self.call("profile")
        except RestError as exc:
            logger.info("profile check failed on %s: %s", self.portal.domain, exc.code or exc)
            return False
        return isinstance(profile, dict) and profile.get("ADMIN") in (True, "Y", "true", 1, "1")

    def _follow_rename(self, response: requests.Response) -> tuple[str, str]:
        """Where a renamed portal sends us: checked against the allowlist (and, for a host a wildcard
        admits, where it resolves) before anything else. The new address still has to be confirmed
        with app.info (_confirm_rename) before the token goes there."""
        location = response.headers.get("Location", "")
        target = urlsplit(location)
        scheme = (target.scheme or self.portal.protocol).lower()
        netloc = target.netloc.lower()
        try:
            http.check_url(f"{scheme}://{netloc}/rest/")
        except http.HostNotAllowed as exc:
            raise RestError(
                f"portal redirected to {netloc or location!r}, which is not a portal: {exc}",
                code="bad_redirect",
            ) from exc
        except http.UnresolvedHost as exc:
            raise TransportError(f"portal redirected to {netloc!r}: {exc}", maybe_sent=False) from exc
        return scheme, netloc

    def _confirm_rename(
        self, moved: tuple[str, str], token: str, known: oauth.AppInfo | None
    ) -> oauth.AppInfo | _Answer:
        """Whether the OAuth server agrees that the token's portal now lives at `moved`: its app.info
        must name that domain and this portal's member_id. The allowlist only says the new address is
        some portal; a redirect to another allowlisted portal (or an old domain's new owner sending us
        on) must not get this portal's token, nor become its stored domain. Asked once per call
        (`known`); a further hop must land on the same confirmed domain.

        An _Answer is an expired token as the portal would have reported it, for _send to renew."""
        info = known
        if info is None:
            server = oauth.server_for(self.portal.oauth_server)
            try:
                info = verification.oauth_app_info(
                    server=server, access_token=token, member_id=self.portal.member_id, handed=False
                )
            except verification.UpstreamUnavailable as exc:
                raise TransportError(
                    f"portal redirected to {moved[1]!r}; app.info could not confirm it: {exc}",
                    maybe_sent=False,
                ) from exc
            except verification.VerificationError as exc:
                if exc.cause == "expired_token":
                    return _Answer(401, {"error": "expired_token", "error_description": f"app.info: {exc}"})
                if exc.code == "wrong_portal":
                    raise RestError(
                        f"portal redirected to {moved[1]!r}, but the token belongs to another portal",
                        code="bad_redirect",
                    ) from exc
                raise RestError(
                    f"portal redirected to {moved[1]!r}; app.info refused the token ({exc.cause or exc.code})",
                    code="rename_unconfirmed",
                ) from exc
        if _host_key(moved[0], moved[1]) != _host_key(moved[0], info.domain):
            raise RestError(
                f"portal redirected to {moved[1]!r}, but app.info says the portal is {info.domain!r}",
                code="bad_redirect",
            )
        return info

    def _keep_rename(self, scheme: str, netloc: str) -> None:
        """The new address, confirmed by app.info, answered as a Bitrix24 portal: store it (member_id
        stays the key)."""
        logger.info("Portal %s moved: %s -> %s", self.portal.member_id, self.portal.domain, netloc)
        Portal.objects.filter(pk=self.portal.pk).update(
            domain=netloc, protocol=scheme, updated_at=timezone.now()
        )
        self.portal.domain, self.portal.protocol = netloc, scheme

    def _remember_operating(self, method: str, answer: dict[str, Any]) -> None:
        timing = answer.get("time")
        if isinstance(timing, dict) and "operating" in timing:
            figures = {"operating": timing.get("operating"), "reset_at": timing.get("operating_reset_at")}
            try:
                cache.set(self._operating_key(method), figures, timeout=900)
            except Exception as exc:  # the shared cache (Redis) is away: the figures are a hint
                logger.warning("Cache unavailable, operating-time figures not kept: %s", type(exc).__name__)

    def _send(
        self, method: str, params: dict[str, Any], *, policy: http.RetryPolicy, fail_fast: bool
    ) -> dict[str, Any]:
        """One REST call to its answer. Transport failures are retried as `policy` allows (one budget for
        the whole call); a rejected token is renewed once; the portal's rate limit is backed off under
        the query-limit policy; an operating-time limit is waited out once."""
        if self.auth_connector and method != "batch" and not is_read(method):
            params = {**params, "auth_connector": self.auth_connector}
        token = self._token()
        transport = http.Attempts(policy)
        limited = http.Attempts(http.query_limit_policy())
        renewed = waited_operating = False
        while True:
            answer = self._deliver(method, {**params, "auth": token}, transport)
            # An error is an answer with an `error` key and no `result`: its code may be empty (a CRM record
            # that does not exist: `{"error": "", "error_description": "Not found"}`, crm-deal-get.md).
            if "error" not in answer.body or "result" in answer.body:
                self._remember_operating(method, answer.body)
                return answer.body
            code = str(answer.body.get("error") or "")
            description = str(answer.body.get("error_description") or "")
            upper = code.upper()
            if code == "expired_token" and not renewed and self._pair is not None:
                renewed = True
                token = self._renew_rejected(token)
                continue
            if upper in ("QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT"):
                self._back_off_rate_limit(limited, error_from(code, description, answer.status))
                continue
            if upper == "OPERATION_TIME_LIMIT":
                reset_at = self._operating_reset_at(method, answer.body)
                if not fail_fast and not waited_operating and self._wait_for_reset(reset_at):
                    waited_operating = True
                    continue
                raise error_from(code, description, answer.status, reset_at=reset_at)
            raise error_from(code, description, answer.status)

    def _deliver(self, method: str, payload: dict[str, Any], transport: http.Attempts) -> _Answer:
        """Send until a JSON object comes back, whatever it says."""
        moved: tuple[str, str] | None = None  # (scheme, host) a redirect sent us to, app.info confirmed
        confirmed: oauth.AppInfo | None = None
        redirects = 0
        while True:
            self._reserve_slot()
            response = self._post(method, payload, moved, transport)
            if response is None:
                continue
            if response.status_code in _REDIRECTS and redirects < _MAX_REDIRECTS:
                # A renamed portal: re-send the same method and body to the new address (a plain
                # redirect-follow would turn the POST into a GET and drop the body).
                redirects += 1
                target = self._follow_rename(response)
                checked = self._confirm_rename(target, str(payload.get("auth") or ""), confirmed)
                if isinstance(checked, _Answer):
                    return checked
                moved, confirmed = target, checked
                continue
            body = self._json(method, response, transport)
            if body is None:
                continue
            if moved and ("result" in body or "error" in body):
                self._keep_rename(*moved)
            return _Answer(response.status_code, body)

    def _reserve_slot(self) -> None:
        governor.governor().acquire(
            governor.bucket_key(self.portal.member_id), governor.limit_for(self.portal)
        )

    def _post(
        self,
        method: str,
        payload: dict[str, Any],
        moved: tuple[str, str] | None,
        transport: http.Attempts,
    ) -> requests.Response | None:
        """One POST. None: it failed, the policy has it sent again and its backoff has been slept."""
        base = f"{moved[0]}://{moved[1]}" if moved else self.portal.base_url
        url = f"{base}/rest/{method}.json"
        body: dict[str, Any] = {"data": phpform.encode(payload)} if self.form else {"json": payload}
        try:
            return http.send("POST", url, timeout=transport.policy.timeout, **body)
        except http.HostNotAllowed as exc:
            raise RestError(str(exc), code="host_not_allowed") from exc
        except requests.RequestException as exc:
            failure = http.failure_of(exc)
            transport.retry_or_raise(failure, _transport_error(method, exc, failure, transport.policy))
            return None

    def _json(
        self, method: str, response: requests.Response, transport: http.Attempts
    ) -> dict[str, Any] | None:
        """The answer's JSON object. None: an error page the policy has sent again."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            return body
        error = NotJSON(
            f"{method}: HTTP {response.status_code} with a non-JSON body",
            code="not_json",
            status=response.status_code,
        )
        if response.status_code < 500:
            raise error
        transport.retry_or_raise(http.Failure.BAD_ANSWER, error)
        return None

    def _back_off_rate_limit(self, limited: http.Attempts, error: RestError) -> None:
        # The portal's bucket is fuller than ours says (another app on the same portal, or a limit
        # set too high): hold every process back, then back off ourselves.
        governor.governor().fill(governor.bucket_key(self.portal.member_id), governor.limit_for(self.portal))
        limited.retry_or_raise(http.Failure.NOT_RUN, error)

    def _operating_reset_at(self, method: str, body: dict[str, Any]) -> Any:
        raw_time = body.get("time")
        timing: dict[str, Any] = raw_time if isinstance(raw_time, dict) else {}
        return timing.get("operating_reset_at") or (self.operating(method) or {}).get("reset_at")

    @staticmethod
    def _wait_for_reset(reset_at: Any) -> bool:
        """Sleep until the operating-time limit resets, unless that is unknown or too far off."""
        wait = float(reset_at) - time.time() if reset_at else None
        if wait is None or not 0 <= wait <= settings.BITRIX24_OPERATING_WAIT_MAX:
            return False
        clock.sleep(wait + 0.5)
        return True
