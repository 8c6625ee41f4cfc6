"""What the API shows. Tokens only ever leave as `portals.masking.mask` (first four characters, length
and a fingerprint); the renewal log only holds fingerprints."""

from __future__ import annotations

import re
from typing import Any

from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portals import selectors as portal_selectors
from portals.masking import mask
from portals.models import Portal, PortalState, RenewalLog, TokenPair


class ErrorSerializer(serializers.Serializer):
    """The shape of every error answer."""

    error = serializers.CharField(help_text="Machine-readable code, e.g. not_found, invalid, wrong_portal.")
    error_description = serializers.CharField(help_text="What went wrong, for people.")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Invalid input only: field name → messages.",
    )


class MaskedTokenField(serializers.CharField):
    """A token as people may see it: never the token itself."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("read_only", True)
        kwargs.setdefault("help_text", "Masked: first four characters, length and fingerprint.")
        super().__init__(**kwargs)

    def to_representation(self, value: Any) -> str:
        return mask(value)


def _days(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# --- the portal list ------------------------------------------------------------------------------


class PortalListQuerySerializer(serializers.Serializer):
    state = serializers.ChoiceField(
        choices=PortalState.choices, required=False, help_text="Only portals in this state."
    )
    due = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Only portals with a pair due for proactive renewal now (what the next sweep renews).",
    )
    failing = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Only portals whose background pair's renewal failed or was refused for good.",
    )


class BackgroundPairHealthSerializer(serializers.Serializer):
    """Read from the annotations of `portals.selectors.with_token_health`."""

    access_expires_at = serializers.DateTimeField(source="bg_access_expires_at", allow_null=True)
    refresh_issued_at = serializers.DateTimeField(source="bg_refresh_issued_at", allow_null=True)
    refresh_expires_at = serializers.SerializerMethodField()
    refresh_days_left = serializers.SerializerMethodField()
    state = serializers.CharField(source="bg_state", allow_null=True)
    consecutive_failures = serializers.IntegerField(source="bg_failures", allow_null=True)
    last_error = serializers.CharField(source="bg_last_error", allow_null=True)

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_refresh_expires_at(self, portal: Portal) -> Any:
        lapses = portal_selectors.refresh_lapses_at(getattr(portal, "bg_refresh_issued_at", None))
        return None if lapses is None else serializers.DateTimeField().to_representation(lapses)

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_refresh_days_left(self, portal: Portal) -> float | None:
        return _days(portal_selectors.days_left(getattr(portal, "bg_refresh_issued_at", None)))


class LastRenewalSerializer(serializers.Serializer):
    outcome = serializers.CharField(source="last_renewal_outcome")
    at = serializers.DateTimeField(source="last_renewal_at")


class PortalHealthSerializer(serializers.ModelSerializer):
    background_pair = BackgroundPairHealthSerializer(
        source="*", allow_null=True, help_text="The background pair's token health; null without one."
    )
    last_renewal = LastRenewalSerializer(
        source="*", allow_null=True, help_text="The portal's last renewal attempt; null if none."
    )
    pair_count = serializers.SerializerMethodField()

    class Meta:
        model = Portal
        fields: tuple[str, ...] = (
            "member_id",
            "domain",
            "state",
            "state_reason",
            "app_status",
            "installed_at",
            "last_launch_at",
            "uninstalled_at",
            "background_pair",
            "last_renewal",
            "pair_count",
        )

    def get_pair_count(self, portal: Portal) -> int:
        return getattr(portal, "pair_count", None) or 0

    def to_representation(self, instance: Portal) -> dict[str, Any]:
        data = super().to_representation(instance)
        if getattr(instance, "bg_refresh_issued_at", None) is None:
            data["background_pair"] = None
        if getattr(instance, "last_renewal_at", None) is None:
            data["last_renewal"] = None
        return data


# --- one portal -----------------------------------------------------------------------------------


class TokenPairSerializer(serializers.ModelSerializer):
    access_token = MaskedTokenField()
    refresh_token = MaskedTokenField()
    refresh_expires_at = serializers.DateTimeField(read_only=True)
    refresh_days_left = serializers.SerializerMethodField()

    class Meta:
        model = TokenPair
        fields = (
            "id",
            "user_id",
            "is_background",
            "state",
            "access_token",
            "access_expires_at",
            "refresh_token",
            "refresh_issued_at",
            "refresh_expires_at",
            "refresh_days_left",
            "scope",
            "last_renewed_at",
            "last_error",
            "consecutive_failures",
            "next_attempt_at",
        )

    def get_refresh_days_left(self, pair: TokenPair) -> float:
        return round(pair.refresh_days_left, 2)


class RenewalLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = RenewalLog
        fields = (
            "id",
            "created_at",
            "user_id",
            "trigger",
            "outcome",
            "error",
            "duration_ms",
            "old_fingerprint",
            "new_fingerprint",
        )


class PortalDetailSerializer(PortalHealthSerializer):
    pairs = TokenPairSerializer(source="token_pairs", many=True, read_only=True)
    recent_renewals = RenewalLogSerializer(
        many=True, read_only=True, help_text="The last 20 renewal attempts, newest first."
    )

    class Meta(PortalHealthSerializer.Meta):
        fields = (
            *PortalHealthSerializer.Meta.fields,
            "protocol",
            "oauth_server",
            "scope",
            "app_version",
            "payment_expired",
            "license",
            "licence_days",
            "licence_checked_at",
            "created_at",
            "updated_at",
            "pairs",
            "recent_renewals",
        )


# --- actions --------------------------------------------------------------------------------------


class RenewQueuedSerializer(serializers.Serializer):
    queued = serializers.IntegerField(help_text="Renewals queued, one per token pair of the portal.")


class CallSerializer(serializers.Serializer):
    method = serializers.CharField(
        max_length=100,
        validators=[
            RegexValidator(
                re.compile(r"^[a-z0-9_.]{1,100}\Z", re.IGNORECASE),
                message="A Bitrix24 method name: letters, digits, '_' and '.' only.",
            )
        ],
        help_text="A Bitrix24 REST method, e.g. crm.contact.list.",
    )
    params = serializers.DictField(
        required=False, default=dict, help_text="The method's parameters, as a JSON object."
    )


class CallResultSerializer(serializers.Serializer):
    method = serializers.CharField()
    result = serializers.JSONField(help_text="The method's `result`, as Bitrix24 returned it.")


# --- health ---------------------------------------------------------------------------------------


class PairCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField(help_text="Token pairs of portals that are not uninstalled.")
    failing = serializers.IntegerField(help_text="…whose renewal failed in a row, or that are not active.")
    due = serializers.IntegerField(help_text="…due for proactive renewal now.")


class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unavailable"])
    database = serializers.CharField()
    broker = serializers.CharField()
    keys = serializers.CharField(help_text='"ok", or what is wrong with BITRIX24_TOKEN_KEYS.')
    portals = serializers.DictField(child=serializers.IntegerField(), help_text="Portals per state.")
    pairs = PairCountsSerializer()
    background = serializers.DictField(
        child=serializers.IntegerField(),
        help_text=(
            "Portals by token health: due_soon, lapsing, failing, no_usable_pair, lost (a pair lost in "
            "an interrupted renewal), clock_skew (a refresh issue time in the future)."
        ),
    )


# --- the app's frontend ---------------------------------------------------------------------------


class MeSerializer(serializers.Serializer):
    member_id = serializers.CharField()
    domain = serializers.CharField()
    user_id = serializers.IntegerField()
    app_status = serializers.CharField(help_text="The app's licence status on the portal (L/F/D/T/P/S).")


class ProfileSerializer(serializers.Serializer):
    profile = serializers.JSONField(help_text="Bitrix24's `profile` for the current user.")
