"""The static files' storage: WhiteNoise's compressed, hashed one, forgiving before `collectstatic`.

With debug off, Django's manifest storage refuses to render a page that links a file `collectstatic` has not
gathered (a checkout run with debug off before its first `collectstatic`, the tests): here such a file is
linked under its own name instead, and WhiteNoise serves what was gathered. After `collectstatic` every name
is the hashed one.
"""

from __future__ import annotations

from typing import Any

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    manifest_strict = False

    def hashed_name(self, name: str, content: Any = None, filename: str | None = None) -> str:
        try:
            return str(super().hashed_name(name, content, filename))
        except ValueError:
            if content is not None:  # collectstatic hashing a file it has: a real error
                raise
            return name
