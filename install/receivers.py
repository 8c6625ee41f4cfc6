from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from portals.services import portal_purged

from .models import InboundRequest


@receiver(portal_purged)
def forget_inbound_requests(sender: Any, portal: Any, **kwargs: Any) -> None:
    """CLEAN=1 asks for the portal's data to go: that includes what it sent us, except the uninstall
    events themselves, kept (redacted, as every row) as the record of why the data went."""
    InboundRequest.objects.filter(member_id=portal.member_id).exclude(event="ONAPPUNINSTALL").delete()
