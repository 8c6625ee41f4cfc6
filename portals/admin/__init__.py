"""Staff's view of installations: health at a glance, and the operations staff may run.

Tokens are never shown in full, never editable and never searchable (masking.mask shows the first
four characters, the length and a fingerprint). Everything Bitrix24 told us is read-only here;
the only changes staff make go through `portals.operations`.

- `portal`: the portal list and page, with its token-pair and renewal inlines;
- `logs`: the token pairs and the renewal log across portals;
- `filters`: the token-health filter of the portal list;
- `actions`: the operations (list actions and the portal page's buttons), each a call to
  `portals.operations`;
- `dashboard`: the dashboard page (/admin/dashboard/);
- `display`: how values read (masked tokens, relative times, days left, outcomes), read-only admins;
- `palette`: the one set of colours the list badges and the dashboard use.

Importing the package registers the admins (Django's autodiscovery imports it).
"""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from . import logs, portal

__all__ = ["logs", "portal"]

# The admin index links to the dashboard (portals/templates/admin/portals/index.html). Django's own
# admin/index.html comes first in the template search (django.contrib.admin is listed before this
# app), so the site is pointed at a differently named template that extends it.
admin.site.index_template = "admin/portals/index.html"

# The header, the browser tab and the home page's heading name the product, not the framework.
admin.site.site_header = "Bitrix24 app backend"
admin.site.site_title = "Bitrix24 app backend admin"
admin.site.index_title = "Staff admin"

# Django's navigation sidebar takes 275 px of a 1,280 px screen on every page, beside a list's own filters:
# lists with several columns did not fit. The breadcrumbs and the index lead everywhere it did.
admin.site.enable_nav_sidebar = False

# The product's sections first on the index and in the breadcrumbs' lists, then the frameworks' (users,
# the beat schedule, login attempts), each group in Django's order.
_PRODUCT_APPS = ("portals", "events", "install")
_framework_app_list = admin.site.get_app_list


def _app_list(request: HttpRequest, app_label: str | None = None) -> list[dict[str, Any]]:
    apps = _framework_app_list(request, app_label)
    return sorted(
        apps,
        key=lambda app: _PRODUCT_APPS.index(app["app_label"])
        if app["app_label"] in _PRODUCT_APPS
        else len(_PRODUCT_APPS),
    )


admin.site.get_app_list = _app_list  # type: ignore[method-assign]
