"""Fault tools: private servers and a TCP proxy that tests may break at will.

The suite's own PostgreSQL and Redis are shared with other runs, so a test that wants to see
the backend lose its database or broker must never stop those. It starts its own instead:

- `PrivatePostgres`: a throw-away PostgreSQL cluster (initdb + postgres) on a free loopback port;
- `PrivateRedis`: a throw-away `redis-server` on a free loopback port;
- `FaultProxy`: a TCP proxy in front of any host:port whose behaviour (pass, delay, cut,
  blackhole) changes while clients are connected.

Everything listens on 127.0.0.1 only. Each server runs as a direct child of the test process,
so that `kill()` is a real SIGKILL of the server and the test reaps it (a daemonized server
killed under a parent that never reaps would stay a zombie and block its own restart).
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"


class FaultToolError(RuntimeError):
    """A private server could not be set up or did not come up in time."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait_port_closed(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The directory holding initdb and postgres, found on this machine rather than assumed:
    PATH first, then `pg_config --bindir`, then the newest Debian-style versioned directory."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))

    # Debian keeps the server binaries out of PATH, one directory per major version.
    def major(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else -1

    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        candidates.append(Path(found))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def _server_user() -> tuple[str | None, str | None]:
    """(user, group) to run PostgreSQL as: initdb and postgres refuse to run as root, so under
    root (this machine, CI) they run as the `postgres` OS user; otherwise as ourselves."""
    if os.geteuid() != 0:
        return None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise FaultToolError(
            "running as root and there is no 'postgres' OS user to run PostgreSQL as"
        ) from exc
    return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name


def postgres_missing_reason() -> str | None:
    """Why PrivatePostgres cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return (
            "PostgreSQL server binaries (initdb, postgres) not found (PATH, pg_config, /usr/lib/postgresql)"
        )
    try:
        _server_user()
    except FaultToolError as exc:
        return str(exc)
    return None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a free loopback port.

    Trust authentication (loopback only), fsync off: it holds nothing worth keeping, and a killed server
    still keeps every committed row (what was written stays in the OS cache), as a real one does. Commits
    stay synchronous: with `synchronous_commit=off` a killed server forgets its last commits, and the
    tests that kill it would measure that instead of the product.
    `url` is a DATABASE_URL for the database `dbname`, created at the first start.
    """

    def __init__(self, dbname: str = "app", start_timeout: float = 30.0, also_listen: str = "") -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise FaultToolError(postgres_missing_reason() or "PostgreSQL binaries not found")
        self.bindir = bindir
        self.user, self.group = _server_user()
        self.dbname = dbname
        self.start_timeout = start_timeout
        self.port = free_port()
        self.host = LOOPBACK
        # Another address of this machine to listen on (a bridge to network namespaces: tests/machines.py).
        self.also_listen = also_listen
        self.dir = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._orphans: list[int] = []
        self._initialised = False
        self._closed = False
        if self.user:
            # The server user must own its directory; mkdtemp made it root's and private.
            shutil.chown(self.dir, self.user, self.group)

    @property
    def url(self) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/{self.dbname}"

    def _run_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.dir}
        if self.user:
            # Drop root's supplementary groups too, not just the uid.
            kwargs.update(user=self.user, group=self.group, extra_groups=[])
        return kwargs

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            **self._run_kwargs(),
        )
        if result.returncode != 0:
            raise FaultToolError(f"initdb failed ({result.returncode}):\n{result.stderr[-2000:]}")
        if self.also_listen:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.also_listen}/24 trust\n")
        self._initialised = True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> PrivatePostgres:
        if self._closed:
            raise FaultToolError("this PrivatePostgres has been cleaned up")
        if self.running:
            return self
        if not self._initialised:
            self._initdb()
        self._wait_orphans_gone()
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._spawn()
            try:
                self._wait_ready(deadline)
                break
            except _EarlyExit as exc:
                # After a kill -9 the old backends may hold the shared memory block a moment
                # longer; the new postmaster refuses to start until they are gone.
                if "still in use" in exc.log and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise FaultToolError(f"postgres exited at start:\n{exc.log}") from None
        self._create_database()
        return self

    def _spawn(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed right after
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={','.join(filter(None, (LOOPBACK, self.also_listen)))}",
                    # The socket lives in our directory, not the system's (which may be absent or
                    # belong to the shared server).
                    "-c",
                    f"unix_socket_directories={self.dir}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=50",
                    "-c",
                    "shared_buffers=16MB",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C at the terminal must not shut it down behind the test.
                start_new_session=True,
                **self._run_kwargs(),
            )
        finally:
            log.close()

    def _connect(self, dbname: str, timeout: float = 2.0) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname=dbname,
            connect_timeout=max(1, int(timeout)),
            autocommit=True,
        )

    def _wait_ready(self, deadline: float) -> None:
        import psycopg

        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise _EarlyExit(_tail(self.log))
            try:
                with self._connect("postgres"):
                    return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
                raise FaultToolError(f"postgres did not answer in {self.start_timeout}s:\n{_tail(self.log)}")
            time.sleep(0.05)

    def _create_database(self) -> None:
        with self._connect("postgres") as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.dbname}"')

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, disconnect clients, checkpoint)."""
        if not self.running:
            return
        assert self.proc is not None
        self._signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        _wait_port_closed(self.port, 2.0)

    def kill(self) -> None:
        """SIGKILL of the postmaster alone, as a crash would: its backends notice and exit on
        their own, and the next start runs crash recovery."""
        if not self.running:
            return
        assert self.proc is not None
        self._orphans = _children_of(self.proc.pid)
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> PrivatePostgres:
        self.stop()
        return self.start()

    def _wait_orphans_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._orphans and time.monotonic() < deadline:
            self._orphans = [pid for pid in self._orphans if _alive(pid)]
            if self._orphans:
                time.sleep(0.05)
        for pid in self._orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._orphans = []

    def cleanup(self) -> None:
        if self._closed:
            return
        try:
            self.stop()
            self._wait_orphans_gone()
        finally:
            self._closed = True
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        # Last resort only: tests use the fixture or the context manager.
        with contextlib.suppress(Exception):
            self.cleanup()


class _EarlyExit(Exception):
    def __init__(self, log: str) -> None:
        super().__init__(log)
        self.log = log


def _children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux); empty where /proc is not readable."""
    children = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            fields = Path(entry).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(Path(entry).parent.name))
    return children


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie has let go of everything and counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- Redis ----------------------------------------------------------------------------------


def redis_missing_reason() -> str | None:
    return None if shutil.which("redis-server") else "redis-server not found on PATH"


class PrivateRedis:
    """A `redis-server` of the test's own on a free loopback port, without persistence.
    A restart keeps the port, so clients configured with `url` reconnect to it."""

    def __init__(self, start_timeout: float = 10.0, also_listen: str = "") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FaultToolError("redis-server not found on PATH")
        self.binary = binary
        self.start_timeout = start_timeout
        self.host = LOOPBACK
        self.also_listen = also_listen  # as PrivatePostgres's
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="faults-redis-"))
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> PrivateRedis:
        if self._closed:
            raise FaultToolError("this PrivateRedis has been cleaned up")
        if self.running:
            return self
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed right after
        try:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--bind",
                    *filter(None, (LOOPBACK, self.also_listen)),
                    "--protected-mode",
                    "no",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while not self._pong():
            if self.proc.poll() is not None:
                raise FaultToolError(f"redis-server exited at start:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                self.kill()
                raise FaultToolError(f"redis-server did not answer in {self.start_timeout}s")
            time.sleep(0.02)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _signal(self, signum: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis closes its clients and exits (nothing to save)."""
        if not self.running:
            return
        assert self.proc is not None
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _wait_port_closed(self.port, 2.0)

    def kill(self) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> PrivateRedis:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.cleanup()


# --- TCP proxy ------------------------------------------------------------------------------

PASS, DELAY, CUT, BLACKHOLE = "pass", "delay", "cut", "blackhole"
_POLL = 0.05  # how often idle threads look at the mode and the closed flag, seconds


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the peer gets 'connection reset', as when a
    firewall or a crashed host drops it, not an orderly end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A threaded TCP proxy on a free loopback port in front of `target_host:target_port`.

    Modes, switchable at any time:

    - `pass_through()`: bytes go through unchanged;
    - `delay(seconds)`: every chunk, in either direction, waits `seconds` before it is forwarded
      (a request/answer round trip takes at least 2 × seconds); connections open at once;
    - `cut()`: every open connection is reset (RST) on both sides, and new ones are accepted and
      reset at once; returns when the open ones are gone;
    - `blackhole()`: connections are accepted and read, nothing is forwarded either way and
      nothing is answered: clients wait until their own timeouts.

    Bytes swallowed by a blackhole are lost: a connection that lived through one is out of step
    with its server, so clients are expected to drop it (their timeouts do) and reconnect. A
    connection accepted during a blackhole has no server side and stays a blackhole.

    `close()` (or leaving the `with` block) resets every connection and joins every thread.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, int(target_port))
        self.host = LOOPBACK
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port = int(self._listener.getsockname()[1])
        self._mode = PASS
        self._delay = 0.0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._live: set[threading.Thread] = set()
        self.accepted = 0  # connections accepted so far, for tests that want to see reconnects
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"FaultProxy:{self.port}", daemon=True
        )
        self._acceptor.start()

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r} names no host and port")
        return cls(parts.hostname, parts.port)

    def url_for(self, url: str) -> str:
        """`url` (a DATABASE_URL, a REDIS_URL …) with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def pass_through(self) -> None:
        self._mode, self._delay = PASS, 0.0

    def delay(self, seconds: float) -> None:
        self._delay = float(seconds)
        self._mode = DELAY

    def blackhole(self) -> None:
        self._mode = BLACKHOLE

    def cut(self, timeout: float = 5.0) -> None:
        self._mode = CUT
        deadline = time.monotonic() + timeout
        while self.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._mode == CUT:
                _reset(client)
                continue
            thread = threading.Thread(
                target=self._serve, args=(client,), name=f"FaultProxy:{self.port}:conn", daemon=True
            )
            with self._lock:
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(thread)
                self._live.add(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if self._mode != BLACKHOLE:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    # The server is down: the client sees its connection dropped, as it would
                    # see a refused one.
                    _reset(client)
                    return
            self._pump(client, upstream)
        finally:
            _reset(client)
            if upstream is not None:
                _reset(upstream)
            with self._lock:
                self._live.discard(threading.current_thread())

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        peer = {client: upstream}
        if upstream is not None:
            peer[upstream] = client
        with selectors.DefaultSelector() as selector:
            for sock in peer:
                # Bounded sends: a peer that stops reading cannot hold a thread past close().
                sock.settimeout(5.0)
                selector.register(sock, selectors.EVENT_READ)
            while not self._closed.is_set():
                if self._mode == CUT:
                    return
                for key, _ in selector.select(_POLL):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    mode, target = self._mode, peer[sock]
                    if mode == BLACKHOLE or target is None:
                        continue
                    if mode == DELAY and self._closed.wait(self._delay):
                        return
                    if self._mode == CUT:
                        return
                    try:
                        target.sendall(data)
                    except OSError:
                        return

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(timeout)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def proxied(url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of the host:port of `url`, and `url` rewritten to go through it."""
    with FaultProxy.for_url(url) as proxy:
        yield proxy, proxy.url_for(url)


# --- The backend as a child process ---------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


class BackendProcess:
    """The product's web process (`manage.py runserver --noreload`, as bin/run runs it) as
    a real child on a free loopback port, on the given database and broker, with production
    settings (DJANGO_DEBUG=0) and throw-away secrets. `migrate()` prepares the database first.

    Whatever DATABASE_URL and REDIS_URL the test process has (the shared servers) are replaced,
    so the child never touches them.
    """

    def __init__(self, database_url: str, redis_url: str, var_dir: Path, **extra_env: str) -> None:
        from cryptography.fernet import Fernet

        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.var_dir = Path(var_dir)
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.var_dir / "backend.log"
        self.env = dict(os.environ)
        self.env.update(
            DJANGO_SETTINGS_MODULE="config.settings",
            DJANGO_DEBUG="0",
            DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
            BITRIX24_TOKEN_KEYS=Fernet.generate_key().decode(),
            DJANGO_VAR_DIR=str(self.var_dir),
            DJANGO_ALLOWED_HOSTS=LOOPBACK,
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            CELERY_QUEUE=f"faults-{self.port}",
            PYTHONUNBUFFERED="1",
        )
        self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise FaultToolError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result

    def migrate(self) -> None:
        self.manage("migrate", "--noinput", "-v0")

    def start(self, timeout: float = 30.0) -> BackendProcess:
        import requests

        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed right after
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "runserver", f"{LOOPBACK}:{self.port}", "--noreload"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        http = requests.Session()
        http.trust_env = False  # loopback only, whatever proxy the environment names
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise FaultToolError(f"the backend exited at start:\n{_tail(self.log)}")
            try:
                # Any answer will do: the test decides which one it expects.
                http.get(self.url + "/healthz", timeout=5)
                return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise FaultToolError(f"the backend did not answer in {timeout}s:\n{_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
