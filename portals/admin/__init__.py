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

from django.contrib import admin

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
