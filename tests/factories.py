"""factory_boy factories for the backend's rows.

Two kinds of portal:

* ``PortalFactory()`` — a row only, on a made-up ``*.bitrix24.com`` domain: for the admin, the API's
  listings, the sweep's selection — anything that never talks to Bitrix24.
* ``PortalFactory.for_standin(fake)`` — the rows an install of a stand-in portal (``standin.add_portal()``)
  leaves: same member_id, domain, OAuth server, status and application token, and a token pair per user
  with tokens the stand-in really issued, so renewals, app.info and REST calls work against it.

Tokens go through the model's encrypted fields, as the install stores them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from install.models import InboundKind, InboundRequest, InboundStatus
from portals.models import (
    AppStatus,
    Portal,
    PortalState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
)
from standin import FakePortal


def _token() -> str:
    return secrets.token_hex(16)


class PortalFactory(DjangoModelFactory):
    class Meta:
        model = Portal

    member_id = factory.LazyFunction(_token)
    domain = factory.Sequence(lambda n: f"portal{n}.bitrix24.com")
    protocol = "https"
    oauth_server = "https://oauth.bitrix.info"
    app_status = AppStatus.FREE
    state = PortalState.INSTALLED
    application_token = factory.LazyFunction(_token)
    scope = "crm,user,placement,im"
    app_version = "1"
    installed_at = factory.LazyFunction(timezone.now)

    class Params:
        uninstalled = factory.Trait(
            state=PortalState.UNINSTALLED, uninstalled_at=factory.LazyFunction(timezone.now)
        )
        needs_reinstall = factory.Trait(state=PortalState.NEEDS_REINSTALL, state_reason="invalid_grant")

    @classmethod
    def for_standin(cls, fake: FakePortal, *, users: Iterable[int] = (1,), **fields: Any) -> Portal:
        """The portal row and token pairs an install of ``fake`` leaves: one pair per user in ``users``
        (tokens issued by the stand-in); the first user is the installing admin and holds the background
        pair. Keyword arguments go to the portal, ``pair__…`` ones to every pair (``pair__state=…``,
        ``pair__issued_days_ago=…``, ``pair__expired_access=True``)."""
        pair_fields = {
            key[len("pair__") :]: value for key, value in fields.items() if key.startswith("pair__")
        }
        portal_fields = {key: value for key, value in fields.items() if not key.startswith("pair__")}
        portal = cls(
            member_id=fake.member_id,
            domain=fake.domain,
            protocol="https" if fake.url.startswith("https://") else "http",
            oauth_server=fake.standin.oauth_url,
            app_status=fake.status,
            application_token=fake.application_token,
            scope=fake.scope,
            app_version=str(fake.app_version),
            **portal_fields,
        )
        for index, user_id in enumerate(users):
            TokenPairFactory.for_standin(
                fake,
                portal=portal,
                user_id=user_id,
                admin=index == 0,
                is_background=index == 0,
                **pair_fields,
            )
        return portal


class TokenPairFactory(DjangoModelFactory):
    """A pair as a renewal of ours leaves it: access token valid for an hour, refresh token issued now, both
    ours (``refresh_ours``, ``access_ours``: an install's pair is renewed once at once to make it so).

    ``issued_days_ago`` back-dates the refresh token; ``expired_access=True`` stores an access token
    that expired a second ago; ``handed=True`` stores tokens as an install or a launch hands them over."""

    class Meta:
        model = TokenPair

    class Params:
        expires_in = 3600  # seconds the access token lives from now
        issued_days_ago = 0.0
        expired_access = factory.Trait(
            access_expires_at=factory.LazyFunction(lambda: timezone.now() - timedelta(seconds=1))
        )
        handed = factory.Trait(refresh_ours=False, access_ours=False)

    portal = factory.SubFactory(PortalFactory)
    user_id = 1
    is_background = True
    access_token = factory.LazyFunction(_token)
    refresh_token = factory.LazyFunction(_token)
    access_expires_at = factory.LazyAttribute(lambda o: timezone.now() + timedelta(seconds=o.expires_in))
    refresh_issued_at = factory.LazyAttribute(lambda o: timezone.now() - timedelta(days=o.issued_days_ago))
    scope = factory.SelfAttribute("portal.scope")
    refresh_ours = True
    access_ours = True

    @classmethod
    def for_standin(
        cls,
        fake: FakePortal,
        *,
        portal: Portal | None = None,
        user_id: int = 1,
        admin: bool = True,
        **fields: Any,
    ) -> TokenPair:
        """A pair whose tokens ``fake`` issued just now to ``user_id`` (a portal admin unless told)."""
        tokens = fake.issue_tokens(user_id, admin=admin)
        return cls(
            portal=portal if portal is not None else PortalFactory.for_standin(fake, users=()),
            user_id=user_id,
            access_token=tokens["access_token"],
            refresh_token=tokens["refresh_token"],
            scope=tokens["scope"],
            expires_in=int(tokens["expires_in"]),
            **fields,
        )


class RenewalLogFactory(DjangoModelFactory):
    class Meta:
        model = RenewalLog

    pair = None
    portal = factory.Maybe(
        "pair",
        yes_declaration=factory.SelfAttribute("pair.portal"),
        no_declaration=factory.SubFactory(PortalFactory),
    )
    user_id = factory.Maybe("pair", yes_declaration=factory.SelfAttribute("pair.user_id"), no_declaration=1)
    trigger = RenewalTrigger.BEAT
    outcome = RenewalOutcome.RENEWED


class InboundRequestFactory(DjangoModelFactory):
    """A logged event that was accepted (``member_id`` as the request claimed it)."""

    class Meta:
        model = InboundRequest

    kind = InboundKind.EVENT
    event = "ONAPPINSTALL"
    member_id = factory.LazyFunction(_token)
    status = InboundStatus.ACCEPTED
    http_status = 200


class UserFactory(DjangoModelFactory):
    """A Django user; ``staff=True`` for support staff, ``superuser=True`` for an admin with every right,
    ``permissions=["portals.view_portal", …]`` for what a staff user was granted. The password is
    ``pw-<username>`` unless given (hashed either way)."""

    class Meta:
        model = "auth.User"
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.invalid")
    password = factory.django.Password(factory.LazyAttribute(lambda o: f"pw-{o.username}"))
    is_staff = False

    class Params:
        staff = factory.Trait(is_staff=True)
        superuser = factory.Trait(is_staff=True, is_superuser=True)

    @factory.post_generation
    def permissions(self, create: bool, extracted: Any, **kwargs: Any) -> None:
        from django.contrib.auth.models import Permission

        for name in extracted or ():
            app_label, codename = name.split(".", 1)
            self.user_permissions.add(  # type: ignore[attr-defined]
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
