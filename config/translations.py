"""Compiling the project's translation catalogs, with Babel instead of GNU gettext.

Django reads compiled catalogs (`.mo`); the sources are the `.po` files beside each app
(`<app>/locale/<lang>/LC_MESSAGES/django.po`). They are compiled into the var directory when missing
or older than their source, at start-up (settings), so a fresh clone needs no gettext tools and nothing
generated is kept beside the sources. Writes are atomic: several processes may start at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

SKIP = {".venv", "var", "node_modules", ".git"}


def catalogs(base_dir: Path) -> list[Path]:
    """Every `<app>/locale/<lang>/LC_MESSAGES/*.po` under `base_dir` (one level of apps deep)."""
    found = []
    for app in sorted(base_dir.iterdir()):
        if app.name in SKIP or not (app / "locale").is_dir():
            continue
        found += sorted((app / "locale").glob("*/LC_MESSAGES/*.po"))
    return found


def compile_catalogs(base_dir: Path, var_dir: Path) -> list[Path]:
    """Compile what changed; return the locale folders to give Django (LOCALE_PATHS), one per app."""
    paths: dict[Path, None] = {}
    for source in catalogs(base_dir):
        relative = source.relative_to(base_dir)  # <app>/locale/<lang>/LC_MESSAGES/django.po
        app = relative.parts[0]
        target = var_dir / "locale" / app / Path(*relative.parts[2:]).with_suffix(".mo")
        paths[var_dir / "locale" / app] = None
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as handle:
            catalog = read_po(handle, locale=relative.parts[2])
        fd, temporary = tempfile.mkstemp(dir=target.parent, suffix=".mo.tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                write_mo(out, catalog)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return list(paths)
