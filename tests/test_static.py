"""The application serves its own static files (WhiteNoise): after `collectstatic` the admin's CSS answers 200
under its hashed name, compressed, with debug off and no proxy in front."""

from __future__ import annotations

import pytest
from django.contrib.staticfiles.storage import staticfiles_storage
from django.core.management import call_command
from django.test import Client


@pytest.mark.django_db
def test_the_admins_css_is_served_hashed_and_compressed_with_debug_off(settings, tmp_path):
    settings.DEBUG = False
    settings.STATIC_ROOT = tmp_path / "static"
    call_command("collectstatic", "--noinput", verbosity=0)
    url = staticfiles_storage.url("admin/css/base.css")
    assert url != "/static/admin/css/base.css" and url.endswith(".css")  # hashed

    client = Client()  # built after collectstatic: WhiteNoise reads STATIC_ROOT when it starts
    plain = client.get(url)
    assert plain.status_code == 200 and plain["Content-Type"].startswith("text/css")
    assert "max-age=315360000" in plain["Cache-Control"]  # a hashed name never changes: cached for good
    squeezed = client.get(url, HTTP_ACCEPT_ENCODING="gzip, br")
    assert squeezed.status_code == 200 and squeezed["Content-Encoding"] in ("gzip", "br")
    assert int(squeezed["Content-Length"]) < int(plain["Content-Length"])
    assert url in client.get("/admin/login/").content.decode()  # the pages link the hashed name
    assert client.get("/static/admin/css/nothing-here.css").status_code == 404
