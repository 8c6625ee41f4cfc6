"""Who may use each staff endpoint: an active staff user holding the model permission the endpoint names.

Being staff only lets a user into the admin; what they may see or do there, and here, is what their
permissions say (a superuser holds all). The permissions are portals.Portal's: view_portal (Django's own),
renew_portal, call_portal (read methods) and call_any_method (docs/api.md).
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

PERMISSION_NAMES = {
    "portals.view_portal": "view portals",
    "portals.renew_portal": "queue token renewals",
    "portals.call_portal": "call Bitrix24 with a portal's pair",
}


class StaffWith(BasePermission):
    """An active staff user holding `permission`."""

    permission = ""

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_active and user.is_staff and user.has_perm(self.permission))


def staff_with(permission: str) -> type[StaffWith]:
    what = PERMISSION_NAMES.get(permission, permission)
    return type(
        f"StaffWith[{permission}]",
        (StaffWith,),
        {"permission": permission, "message": f"Staff with the permission to {what} ({permission}) only."},
    )
