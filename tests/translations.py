"""The messages the app's pages and the example ask to be translated, as Django's makemessages finds them:
templates turned into Python by `templatize`, then every gettext call read by Babel's Python extractor."""

from __future__ import annotations

import io
from pathlib import Path

from babel.messages.extract import extract_python
from django.utils.translation.template import templatize

from tests.processes import ROOT

# The app's pages (install/) and the example app: what a portal user sees.
SOURCES = {
    "install": [*(ROOT / "install" / "templates").rglob("*.html"), *(ROOT / "install").glob("*.py")],
    "example": [*(ROOT / "example" / "templates").rglob("*.html"), *(ROOT / "example").glob("*.py")],
}
# Pages for people who opened a Bitrix24 URL by hand, not portal users: English only.
NOT_FOR_PORTAL_USERS = {"post_only.html"}
KEYWORDS = {"gettext": None, "gettext_lazy": None, "_": None, "pgettext": ((1, "c"), 2), "ngettext": (1, 2)}


def messages(files: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in files:
        if path.name in NOT_FOR_PORTAL_USERS:
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".html":
            # templatize keeps the template's lines with its text blanked out; without their indentation
            # Babel's tokenizer reads them as flat statements, as xgettext would.
            code = "\n".join(line.lstrip() for line in templatize(text, origin=str(path)).splitlines())
        else:
            code = text
        for _line, _function, message, _comments in extract_python(
            io.BytesIO(code.encode("utf-8")), KEYWORDS.keys(), [], {}
        ):
            if isinstance(message, tuple):
                found.update(part for part in message if part)
            elif message:
                found.add(message)
    return found
