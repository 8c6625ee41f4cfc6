"""A request's source, as the budgets of unverified requests and the login throttle count it."""

from __future__ import annotations

import pytest

from portals import sources


@pytest.fixture(autouse=True)
def proxies(settings):
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1", "10.0.0.0/8", "::1"]


@pytest.mark.parametrize(
    "peer, forwarded, source",
    [
        ("198.51.100.7", "", "198.51.100.7"),  # no proxy
        (
            "198.51.100.7",
            "203.0.113.9",
            "198.51.100.7",
        ),  # not a proxy: its X-Forwarded-For is the client's word
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),  # through our proxy
        ("127.0.0.1", "1.2.3.4, 203.0.113.9", "203.0.113.9"),  # the client wrote 1.2.3.4: ignored
        ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # two proxies of ours
        ("127.0.0.1", "", "127.0.0.1"),  # the proxy itself
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # only proxies: the left-most of them
        ("127.0.0.1", "garbage, 203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "203.0.113.9, garbage", "127.0.0.1"),  # garbage next to us: the peer stands
        ("127.0.0.1", "[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),  # IPv6 by /64
        ("2001:db8:1:2::99", "", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "", "198.51.100.7"),
        ("", "", "unknown"),
    ],
)
def test_the_source_is_the_right_most_address_that_is_not_a_proxy(peer, forwarded, source):
    assert sources.source_of({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}) == source


def test_the_login_throttle_counts_the_same_client(rf):
    request = rf.get("/admin/login/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="1.2.3.4, 2001:db8::5")
    assert sources.axes_client_ip(request) == "2001:db8::5"  # the address itself: axes stores an address


@pytest.mark.system
@pytest.mark.parametrize(
    "value, message",
    [
        ("*", "FORWARDED_ALLOW_IPS=* believes any client's X-Forwarded-For"),
        ("127.0.0.1,proxy.example", "FORWARDED_ALLOW_IPS: 'proxy.example' is not an address or a network"),
    ],
)
def test_a_server_does_not_start_believing_anyone(value, message, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cryptography.fernet import Fernet

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "s" * 50,
        "BITRIX24_TOKEN_KEYS": Fernet.generate_key().decode(),
        "DJANGO_VAR_DIR": str(tmp_path),
        "FORWARDED_ALLOW_IPS": value,
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert message in done.stderr
