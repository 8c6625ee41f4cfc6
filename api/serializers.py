from __future__ import annotations

from rest_framework import serializers

from portals.models import Portal


class PortalSerializer(serializers.ModelSerializer):
    class Meta:
        model = Portal
        fields = (
            "member_id",
            "domain",
            "app_status",
            "state",
            "state_reason",
            "installed_at",
            "last_launch_at",
            "uninstalled_at",
        )
