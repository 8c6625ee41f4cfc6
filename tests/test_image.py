"""The container image, for real: built from the Dockerfile, run as containers (migrate, web, both workers, beat)
against this machine's PostgreSQL and Redis and the stand-in, all on the host's network (no registry, no bridge).

Needs a Docker daemon (`.ci/run` installs Debian's docker.io and starts it: `dockerd --bridge=none
--iptables=false`) and a local Debian base image (`deploy/base-image.sh`, built once per machine). Missing
either fails the test, as a missing PostgreSQL does.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from events.models import AppEvent, EventState
from portals.models import AttemptState, Portal, RenewalAttempt, RenewalLog, RenewalOutcome, TokenPair
from portals.tasks import renew_pair_task
from standin import StandIn
from standin import payloads as bx
from tests.processes import ROOT

pytestmark = [pytest.mark.system, pytest.mark.needs_postgres, pytest.mark.needs_redis]

BASE = "local/python:3.11-bookworm"
# Trusted by pip inside the build where this machine's HTTPS goes through a proxy with a CA of its own.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def _docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:3])} …: {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("docker") is None or _docker("info", check=False).returncode != 0:
        pytest.fail("no Docker daemon: install docker.io and start `dockerd --bridge=none --iptables=false`")
    subprocess.run([str(ROOT / "deploy" / "base-image.sh")], check=True, timeout=900)
    base = BASE
    if HOST_CA.exists():
        folder = tmp_path_factory.mktemp("base")
        shutil.copy(HOST_CA, folder / "ca.crt")
        (folder / "Dockerfile").write_text(
            f"FROM {BASE}\nCOPY ca.crt {HOST_CA}\nENV PIP_CERT={HOST_CA} SSL_CERT_FILE={HOST_CA}\n"
        )
        base = f"{BASE}-ca"
        _docker("build", "-q", "--network", "host", "-t", base, str(folder))
    tag = "bitrix24-backend:test"
    started = time.monotonic()
    _docker("build", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag, str(ROOT), timeout=1200)
    size = int(_docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())
    print(f"image built in {time.monotonic() - started:.1f} s, {size / 2**20:.0f} MiB")
    return tag


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def containers(
    image: str, standin: StandIn, child_env: Callable[[StandIn], dict[str, str]], tmp_path: Path
) -> Iterator[Any]:
    """Start the product's containers on the test database; each is removed after the test, its log printed."""
    port = _free_port()
    parent = child_env(standin)
    env = {
        "DATABASE_URL": parent["DATABASE_URL"],
        "REDIS_URL": os.environ["REDIS_URL"],
        "CELERY_QUEUE": parent.get("CELERY_QUEUE", "bitrix24"),
        "CELERY_CONCURRENCY": "2",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": parent["DJANGO_SECRET_KEY"],
        "BITRIX24_TOKEN_KEYS": parent["BITRIX24_TOKEN_KEYS"],
        "BITRIX24_CLIENT_ID": standin.client_id,
        "BITRIX24_CLIENT_SECRET": standin.client_secret,
        "BITRIX24_OAUTH_SERVERS": standin.oauth_url,
        "BITRIX24_PORTAL_DOMAINS": "127.0.0.1:*",
        "BITRIX24_ALLOW_HTTP": "1",
        "BITRIX24_EXAMPLE_APP": "1",
        "BITRIX24_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_COOKIES": "0",
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
    }
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    var = tmp_path / "var"
    var.mkdir()
    var.chmod(0o777)  # the image's user (uid 10001) writes the renewal copies here
    names: list[str] = []
    suffix = os.urandom(3).hex()

    def run(role: str, *, detach: bool = True) -> str:
        name = f"b24-{role}-{suffix}"
        args = ["run", "--network", "host", "--env-file", str(env_file), "-v", f"{var}:/var/lib/bitrix24"]
        if detach:
            names.append(name)
            _docker(*args, "-d", "--name", name, image, role)
        else:
            _docker(*args, "--rm", image, role, timeout=300)
        return name

    class Running:
        url = f"http://127.0.0.1:{port}"
        start = staticmethod(run)

    Running.names = names  # type: ignore[attr-defined]

    try:
        yield Running
    finally:
        for name in names:
            print(f"--- {name}\n" + _docker("logs", "--tail", "40", name, check=False).stdout[-3000:])
            _docker("rm", "-f", name, check=False)


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_image_runs_the_product_and_a_stopped_custody_worker_keeps_the_pair(
    containers: Any, standin: StandIn, transactional_db: None
) -> None:
    containers.start("migrate", detach=False)  # on every deploy, before the rest
    for role in ("web", "worker-custody", "worker-app", "beat"):
        containers.start(role)
    url = containers.url
    _wait(lambda: requests.get(f"{url}/healthz", timeout=2).status_code == 200, 90, "the web container")

    # The admin is styled: its CSS, gathered into the image, answers 200 under its hashed name.
    login = requests.get(f"{url}/admin/login/", timeout=10).text
    css = re.search(r'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', login)
    assert css, login[:2000]
    assert requests.get(url + css[1], timeout=10).status_code == 200

    # Installed from a stand-in portal: the custody worker renews the handed-over pair once.
    b24 = standin.add_portal()
    b24.seed("crm.deal", 1)
    assert requests.post(f"{url}/events/", data=bx.onappinstall(b24, b24.issue_tokens(1)), timeout=30).ok
    portal = Portal.objects.get(member_id=b24.member_id)
    pair = _wait(
        lambda: TokenPair.objects.filter(portal=portal, is_background=True, refresh_ours=True).first(),
        60,
        "the install's proving renewal by the custody worker",
    )
    # Launched in the portal's frame.
    query, body = bx.launch(b24, b24.issue_tokens(1))
    assert requests.post(f"{url}/app/", params=query, data=body, timeout=30).status_code == 200
    # An event handled by the app worker: the app worker bound the example's events to the web container;
    # a user adds a deal, the portal delivers ONCRMDEALADD, the example's handler notes it on the timeline.
    _wait(lambda: any(b["event"] == "ONCRMDEALADD" for b in b24.events), 60, "the app worker's bindings sync")
    user_token = b24.issue_tokens(1)["access_token"]
    added = requests.post(
        b24.client_endpoint + "crm.deal.add",
        json={"fields": {"TITLE": "Forty chairs"}, "auth": user_token},
        timeout=10,
    )
    assert added.ok, added.text
    _wait(
        lambda: AppEvent.objects.filter(
            portal=portal, event="ONCRMDEALADD", state=EventState.HANDLED
        ).exists(),
        90,
        "the event handled by the app worker",
    )

    # A slow refresh in the custody worker, then `docker stop`: SIGINT through tini to the whole group; the
    # worker stores the new pair before it exits.
    standin.oauth_mode, standin.slow_seconds = "slow", 8.0
    before = TokenPair.objects.get(pk=pair.pk).refresh_token
    renew_pair_task.apply_async(args=(pair.pk, "staff", True))
    _wait(
        lambda: RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).exists(),
        30,
        "the refresh to be under way",
    )
    custody = next(name for name in containers.names if "worker-custody" in name)
    started = time.monotonic()
    _docker("stop", "-t", "100", custody, timeout=150)
    print(f"custody worker stopped in {time.monotonic() - started:.1f} s")
    kept = TokenPair.objects.get(pk=pair.pk)
    assert kept.refresh_token != before and kept.state == "active"
    assert not RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).exists()
    assert RenewalLog.objects.filter(pair=pair, trigger="staff", outcome=RenewalOutcome.RENEWED).exists()


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.standin.yaml")])
def test_the_compose_files_are_valid(files: tuple[str, ...], tmp_path: Path) -> None:
    """`docker-compose config` (Debian's) on the shipped files, with .env from the shipped example: clean.
    Never `up` here: its PostgreSQL and Redis images cannot be pulled on this machine."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `apt-get install docker-compose` (.ci/run does)")
    for name in files:
        shutil.copy(ROOT / name, tmp_path / name)
    example = (ROOT / ".env.example").read_text()
    (tmp_path / ".env").write_text(example.replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=example\n"))
    args = [arg for name in files for arg in ("-f", name)]
    done = subprocess.run(
        ["docker-compose", *args, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    resolved = done.stdout
    assert "stop_grace_period: 1m40s" in resolved or "stop_grace_period: 100s" in resolved
