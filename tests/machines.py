"""Separate machines in one test: network namespaces on a bridge of their own, each process tree in a PID
and UTS namespace of its own (its own host name, its own process ids), as containers on separate hosts are.

`Network()` makes a bridge (a free 10.x.y.1/24) in this machine's namespace, where the test's own PostgreSQL,
Redis and stand-in listen; `network.host(name, hostname)` adds a namespace on a veth pair (10.x.y.<k>),
with no default route: nothing leaves the machine. Everything is removed on `close()`, in a `finally` (and
the names are unique per test run, so a killed run leaves nothing another run trips on).

Needs root (ip netns, unshare). `missing_reason()` says why not, for a skip outside CI.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def _free_subnet() -> str:
    """A 10.x.y.0/24 no interface of this machine is on: tests in parallel (pytest-xdist) each get their own."""
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    while True:
        subnet = f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}"
        if f" {subnet}." not in taken:
            return subnet


def missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (iproute2, util-linux)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Host:
    """One machine: a network namespace; `spawn` runs a command in it, in new PID and UTS namespaces
    (`hostname` set), and `kill_all` kills every process of the machine at once (as a power cut does)."""

    def __init__(self, network: Network, name: str, hostname: str, address: str) -> None:
        self.network = network
        self.netns = name
        self.hostname = hostname
        self.address = address
        self.procs: list[subprocess.Popen[str]] = []
        self.outside = ""  # its veth's end on the bridge

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[str]:
        """`argv` as the first process of a new PID namespace of this machine (its `unshare` is the
        namespace's init: killing it kills everything in it)."""
        inner = f'hostname {self.hostname} && exec "$@"'
        out = open(log, "a")  # noqa: SIM115 - handed to the child, closed right after
        try:
            proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.netns),
                    *("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child"),
                    *("sh", "-c", inner, "sh", *argv),
                ],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def run(
        self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """`argv` to its end on this machine (own PID and UTS namespaces), its output returned."""
        inner = f'hostname {self.hostname} && exec "$@"'
        return subprocess.run(
            [
                *("ip", "netns", "exec", self.netns),
                *("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child"),
                *("sh", "-c", inner, "sh", *argv),
            ],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kill_all(self) -> None:
        """SIGKILL to every process tree started here: their PID namespaces die whole."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)


class Network:
    def __init__(self) -> None:
        self.subnet = _free_subnet()
        self.tag = secrets.token_hex(2)
        self.bridge = f"b24br{self.tag}"
        self.gateway = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _ip("link", "add", "name", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, name: str, hostname: str) -> Host:
        index = len(self.hosts) + 2
        netns = f"b24{self.tag}{name}"
        outside, inside = f"b24v{self.tag}{index}", f"b24i{self.tag}{index}"
        _ip("netns", "add", netns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", self.bridge, "up")
        address = f"{self.subnet}.{index}"
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", netns, "link", "set", inside, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = Host(self, netns, hostname, address)
        host.outside = outside
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):  # removing the namespace below ends what is left
                host.kill_all()
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
            # The pair goes with the namespace once its last process is gone; not waiting for that.
            subprocess.run(["ip", "link", "del", host.outside], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        time.sleep(0.1)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
