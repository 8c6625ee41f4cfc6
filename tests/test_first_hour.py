"""A new user's first hour, as the README writes it.

The long test copies the checkout into a folder of its own (a fresh clone: no var/, no database, no
secrets; .venv is shared) and runs, as real processes and word for word, the commands of the README's
*Trying it*: `bin/run`, `bin/manage createsuperuser`, `bin/manage bitrix24_standin` (twice: it must
survive a restart), then opens the page the stand-in prints and the admin, and stops everything with
Ctrl-C. Its environment holds no variable of the project's that the README does not name: only the ports
(so that it never meets another run on this machine) and the superuser's password.

The short tests cover the pages a person meets on the way: `/`, and the Bitrix24 URLs opened in a browser.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings

from tests.test_process_manager import _alive, _descendants

# Real processes, private servers or browsers: the system lane (tests/lanes.py).
pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
STARTUP_SECONDS = 240  # bin/setup may have to install requirements.txt into .venv first
# The environment a person's shell gives: nothing of the project's.
SYSTEM_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME", "TERM")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(condition: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Terminal:
    """A command as a terminal runs it: in a process group of its own, its output collected as it comes."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], doc: str = README) -> None:
        assert command in doc, f"the page does not say {command!r}"
        # `NAME=value command` as a shell runs it; a plain command word for word.
        argv = ["bash", "-c", command] if "=" in command.split()[0] else command.split()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def ctrl_c(self, timeout: float) -> int:
        """What Ctrl-C does: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """After a failure: a Ctrl-C first, then SIGKILL to whatever is left, the processes supervisord
        started in groups of their own included."""
        if self.proc.poll() is None:
            left = _descendants(self.proc.pid)
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in _alive(left):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


@contextmanager
def _terminal(command: str, cwd: Path, env: dict[str, str], doc: str = README) -> Iterator[Terminal]:
    terminal = Terminal(command, cwd, env, doc)
    try:
        yield terminal
    finally:
        terminal.kill()
        print(f"$ {command}\n{terminal.output[-6000:]}")  # shown when the test fails


def _fresh_clone(target: Path) -> Path:
    """The checkout's files as git lists them (committed or not, never ignored ones), .venv shared."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if name == ".venv" or not source.is_file():
            continue  # .venv is linked below; a file deleted but not yet committed is gone
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)
    (target / ".venv").symlink_to((ROOT / ".venv").resolve())
    return target


class _Form(HTMLParser):
    """The launch form of the stand-in's portal page: its action and hidden inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.action = values.get("action", "")
        elif tag == "input" and values.get("type") == "hidden":
            self.fields[values["name"]] = values.get("value", "")


def _log_in(base: str, username: str, password: str) -> requests.Session:
    browser = requests.Session()
    page = browser.get(f"{base}/admin/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    answer = browser.post(
        f"{base}/admin/login/?next=/admin/",
        data={"csrfmiddlewaretoken": token.group(1), "username": username, "password": password},
        headers={"Referer": f"{base}/admin/login/"},
        timeout=30,
    )
    assert answer.url == f"{base}/admin/", answer.text[:500]
    return browser


def test_the_readme_from_bin_run_through_the_standin_to_the_admin(tmp_path):
    clone = _fresh_clone(tmp_path / "checkout")
    port, oauth_port, portal_port = _free_port(), _free_port(), _free_port()
    named = {
        "PORT": str(port),
        "BITRIX24_STANDIN_OAUTH_PORT": str(oauth_port),
        "BITRIX24_STANDIN_PORTAL_PORT": str(portal_port),
    }
    password = "a long and unguessable one"  # a throw-away login in a throw-away checkout
    for name in [*named, "DJANGO_SUPERUSER_PASSWORD"]:
        assert f"`{name}" in README, f"the README does not name {name}"
    env = {name: os.environ[name] for name in SYSTEM_VARIABLES if name in os.environ} | named
    base = f"http://127.0.0.1:{port}"
    portal_domain = f"127.0.0.1:{portal_port}"

    with _terminal("bin/run", clone, env) as run:
        started = time.monotonic()
        _wait(lambda: _answers(f"{base}/healthz"), STARTUP_SECONDS, "/healthz to answer 200", run.proc)
        print(f"bin/run answered /healthz {time.monotonic() - started:.1f} s after its start")
        assert "bin/run: preparing the database" in run.output
        assert f"Open http://127.0.0.1:{port}/" in run.output
        assert "Traceback" not in run.output

        # The start page says what this is and where to go next.
        home = requests.get(f"{base}/", timeout=30)
        assert home.status_code == 200
        for text in ("Bitrix24 app backend", 'href="/admin/"', 'href="/api/schema/"', 'href="/healthz"'):
            assert text in home.text, text
        assert "bin/manage bitrix24_standin" in home.text

        # An admin login, non-interactively as the README shows.
        command = "bin/manage createsuperuser --noinput --username admin --email admin@example.com"
        assert command in README
        create = subprocess.run(
            command.split(" "),
            cwd=clone,
            env=env | {"DJANGO_SUPERUSER_PASSWORD": password},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert create.returncode == 0, create.stdout + create.stderr

        # The stand-in, twice: the second run is a restart of the first, with no new settings anywhere.
        pages = []
        for attempt in (1, 2):
            with _terminal("bin/manage bitrix24_standin", clone, env) as standin:
                _wait(lambda: "Ctrl-C stops the stand-in" in standin.output, 120, "the install", standin.proc)
                text = standin.output
                assert "Installed" in text, text
                assert "do not trust" not in text and "export " not in text, text  # bin/run trusts it as is
                assert f"{base}/admin/portals/portal/" in text
                page = re.search(rf"(http://{re.escape(portal_domain)}/app-frame/\S+)", text)
                assert page, text
                pages.append(page.group(1))

                # The page the stand-in prints, as a browser opens it: its form posts the launch into the frame.
                frame_page = requests.get(page.group(1), timeout=30)
                form = _Form()
                form.feed(frame_page.text)
                assert form.action.startswith(f"{base}/app/"), form.action
                app = requests.post(
                    form.action, data=form.fields, headers={"Accept": "text/html"}, timeout=30
                )
                assert app.status_code == 200, app.text[:500]
                assert f"Connected to {portal_domain}" in app.text

                # bin/run binds the app's handlers on the stand-in's portal by itself, after each install.
                console = f"http://{portal_domain}/standin/"
                _wait(
                    lambda console=console: "No event is bound" not in requests.get(console, timeout=30).text,
                    120,
                    "bindings",
                    run.proc,
                )
                assert f"127.0.0.1:{port}/events/" in requests.get(console, timeout=30).text

                assert standin.ctrl_c(timeout=30) == 0, standin.output
                assert "Stopped." in standin.output
                assert "Traceback" not in standin.output
            print(f"stand-in run {attempt}: installed and launched")

        # The admin: the portal, once (the second run reinstalled the same portal), under the product's name.
        browser = _log_in(base, "admin", password)
        listing = browser.get(f"{base}/admin/portals/portal/", timeout=30)
        assert listing.status_code == 200
        assert portal_domain in listing.text
        assert "1 portal" in listing.text
        assert "Bitrix24 app backend" in listing.text and "Django administration" not in listing.text

        # Ctrl-C: every process ends quietly, as it was asked to.
        stop_from = len(run.lines)
        stopped = time.monotonic()
        assert run.ctrl_c(timeout=120) == 0, run.output
        took = time.monotonic() - stopped
        tail = "".join(run.lines[stop_from:])
        print(f"bin/run stopped {took:.1f} s after Ctrl-C:\n{tail}")
        noisy = [
            line
            for line in tail.splitlines()
            if re.search(r"\b(WARN|WARNING|ERROR|CRIT|CRITICAL)\b|Traceback|not expected", line)
            and "received SIGINT indicating exit request" not in line  # supervisord acknowledging the stop
        ]
        assert not noisy, tail
        for program in ("web", "beat", "worker-custody", "worker-app"):
            assert re.search(rf"INFO stopped: {program} \(exit status [01]\)", tail), tail


def test_build_your_app_from_bin_run_as_the_page_writes_it(tmp_path):
    """docs/build-your-app.md, its commands word for word, in a fresh copy of the checkout: the app written
    where step 1 says, `BITRIX24_APPS=myapp bin/run` (the example app stays off: both register the deal tab),
    the stand-in, `bin/manage bitrix24_sync`, the deal tab opened as the portal opens it, and a deal added so
    that bin/run's own worker writes the note. The other walkthrough test runs `manage.py` pieces by hand;
    this one is what a reader types."""
    from tests.test_walkthrough import walkthrough, write_the_app

    clone = _fresh_clone(tmp_path / "checkout")
    assert write_the_app(clone)
    doc = walkthrough()
    port, oauth_port, portal_port = _free_port(), _free_port(), _free_port()
    named = {
        "PORT": str(port),
        "BITRIX24_STANDIN_OAUTH_PORT": str(oauth_port),
        "BITRIX24_STANDIN_PORTAL_PORT": str(portal_port),
    }
    env = {name: os.environ[name] for name in SYSTEM_VARIABLES if name in os.environ} | named
    base = f"http://127.0.0.1:{port}"
    portal = f"http://127.0.0.1:{portal_port}"

    with _terminal("BITRIX24_APPS=myapp bin/run", clone, env, doc) as run:
        _wait(lambda: _answers(f"{base}/healthz"), STARTUP_SECONDS, "/healthz to answer 200", run.proc)
        assert "Traceback" not in run.output and "ImproperlyConfigured" not in run.output
        with _terminal("bin/manage bitrix24_standin", clone, env) as standin:
            _wait(lambda: "Ctrl-C stops the stand-in" in standin.output, 120, "the install", standin.proc)
            hook = re.search(rf"({re.escape(portal)}/rest/1/\w+/)", standin.output)
            assert hook, standin.output

            def rest(method: str, **params: Any) -> Any:
                return requests.post(f"{hook.group(1)}{method}.json", json=params, timeout=30).json()[
                    "result"
                ]

            # Step 5, as the page writes it.
            sync_env = env | {"BITRIX24_APPS": "myapp", "BITRIX24_PUBLIC_URL": base}
            assert "`bin/manage bitrix24_sync`" in doc
            sync = subprocess.run(
                ["bin/manage", "bitrix24_sync"],
                cwd=clone,
                env=sync_env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert sync.returncode == 0, sync.stdout + sync.stderr
            bound = [row["handler"] for row in rest("placement.get")]
            assert bound == [f"{base}/app/"], bound

            # Step 6: the Deal notes tab for a deal, as the portal opens it ...
            deal = rest("crm.deal.add", fields={"TITLE": "Forty chairs for the canteen"})
            frame_page = requests.get(
                f"{portal}/app-frame/?placement=CRM_DEAL_DETAIL_TAB&id={deal}&user_id=1", timeout=30
            )
            form = _Form()
            form.feed(frame_page.text)
            tab = requests.post(form.action, data=form.fields, headers={"Accept": "text/html"}, timeout=30)
            assert tab.status_code == 200, tab.text[:500]
            assert '<h1 id="title">Forty chairs for the canteen</h1>' in tab.text

            # ... and a deal added there: bin/run's worker runs the app's handler, which writes the note.
            added = rest("crm.deal.add", fields={"TITLE": "Six tables"})

            def note() -> Any:
                return rest("crm.timeline.comment.list", filter={"ENTITY_ID": added, "ENTITY_TYPE": "deal"})

            notes = _wait(note, 120, "the handler's note", run.proc)
            assert [n["COMMENT"] for n in notes] == ["Seen by myapp"]
            assert "Seen by myapp" in requests.get(f"{portal}/standin/", timeout=30).text
            assert standin.ctrl_c(timeout=30) == 0, standin.output
        assert run.ctrl_c(timeout=120) == 0, run.output


def _sourced(env: dict[str, str]) -> str:
    """The environment bin/run and bin/manage give their commands: config/development.sh sourced in `env`."""
    return subprocess.run(
        ["bash", "-c", "source config/development.sh && env"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_bin_run_trusts_the_standin_on_the_ports_it_listens_on(tmp_path):
    """config/development.sh (bin/run, bin/manage) and the stand-in's defaults (config/settings.py)
    name the same ports."""
    env = {name: os.environ[name] for name in SYSTEM_VARIABLES if name in os.environ}
    printed = _sourced(env)
    exported = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    oauth_port = exported["BITRIX24_STANDIN_OAUTH_PORT"]
    portal_port = exported["BITRIX24_STANDIN_PORTAL_PORT"]
    assert (int(oauth_port), int(portal_port)) == (
        settings.BITRIX24_STANDIN_OAUTH_PORT,
        settings.BITRIX24_STANDIN_PORTAL_PORT,
    )
    assert exported["BITRIX24_OAUTH_SERVERS"] == f"http://127.0.0.1:{oauth_port}"
    assert exported["BITRIX24_PORTAL_DOMAINS"] == f"127.0.0.1:{portal_port}"
    assert exported["BITRIX24_CLIENT_ID"] == "app.standin"
    assert (exported["DJANGO_DEBUG"], exported["PORT"]) == ("1", "8000")

    # The app's own credentials: nothing of the stand-in is trusted.
    printed = _sourced(env | {"BITRIX24_CLIENT_ID": "app.real"})
    assert "BITRIX24_OAUTH_SERVERS" not in printed and "BITRIX24_ALLOW_HTTP" not in printed

    # An app of one's own named (docs: Build your app): the example, which registers the same deal tab, is off.
    printed = _sourced(env | {"BITRIX24_APPS": "myapp"})
    assert "BITRIX24_EXAMPLE_APP" not in printed and "BITRIX24_CLIENT_ID=app.standin" in printed
    assert "BITRIX24_EXAMPLE_APP=1" in _sourced(env)

    # Debug off: nothing of the stand-in is trusted either, and a server given its credentials refuses to start.
    printed = _sourced(env | {"DJANGO_DEBUG": "0"})
    assert "BITRIX24_CLIENT_ID" not in printed and "BITRIX24_OAUTH_SERVERS" not in printed
    refused = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env
        | {
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "s" * 50,
            "BITRIX24_TOKEN_KEYS": "q2hzsxbhUbMIlPOnDWHHbvR_TNAocF_4oY3VqE8FZv0=",
            "DJANGO_VAR_DIR": str(tmp_path),
            "BITRIX24_CLIENT_ID": "app.standin",
            "DJANGO_SETTINGS_MODULE": "config.settings",
        },
        capture_output=True,
        text=True,
    )
    assert (
        refused.returncode != 0
        and "BITRIX24_CLIENT_ID=app.standin is the Bitrix24 stand-in's" in refused.stderr
    )

    # BITRIX24_STANDIN_HTTPS=1: the stand-in's HTTPS, its authority made in DJANGO_VAR_DIR before the backend
    # starts (the backend checks the bundle at start), and no plain HTTP trusted.
    https_env = env | {"BITRIX24_STANDIN_HTTPS": "1", "DJANGO_VAR_DIR": str(tmp_path / "https")}
    exported = dict(line.split("=", 1) for line in _sourced(https_env).splitlines() if "=" in line)
    bundle = tmp_path / "https" / "standin" / "tls" / "ca.pem"
    assert exported["BITRIX24_OAUTH_SERVERS"] == f"https://127.0.0.1:{oauth_port}"
    assert exported["BITRIX24_CA_BUNDLE"] == str(bundle) and bundle.is_file()
    assert "BITRIX24_ALLOW_HTTP" not in exported
    checked = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=exported, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    wrong = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=exported | {"BITRIX24_CA_BUNDLE": str(tmp_path / "nowhere.pem")},
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0 and "BITRIX24_CA_BUNDLE=" in wrong.stderr and "is not a file" in wrong.stderr


@pytest.mark.django_db
def test_the_start_page_says_what_this_is(client, settings):
    settings.DEBUG = False
    page = client.get("/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "<h1>Bitrix24 app backend</h1>" in html
    for path in ("/admin/", "/admin/dashboard/", "/api/schema/", "/healthz"):
        assert f'href="{path}"' in html, path
    for path in ("/app/", "/install/", "/events/"):
        assert f"http://testserver{path}" in html, path
    assert "bin/manage" not in html  # how to try it is for development only

    settings.DEBUG = True
    assert "bin/manage bitrix24_standin" in client.get("/").content.decode()
    assert client.post("/").status_code == 405


@pytest.mark.parametrize("path", ["/app/", "/install/", "/events/"])
@pytest.mark.django_db
def test_a_bitrix24_url_opened_in_a_browser_says_what_it_is_for(client, path):
    browser = client.get(path, HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")
    assert browser.status_code == 405
    assert browser["Allow"] == "POST"
    assert browser["Content-Type"].startswith("text/html")
    html = browser.content.decode()
    assert "is called by Bitrix24, with POST" in html
    assert 'href="/"' in html

    program = client.get(path, HTTP_ACCEPT="application/json")
    assert program.status_code == 405
    assert program["Allow"] == "POST"
    assert program.json() == {"error": "method_not_allowed", "error_description": "use POST"}
