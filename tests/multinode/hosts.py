"""Two "hosts" on one machine: network namespaces joined by a veth pair, each with an sshd.

Each host has its own address on a private /30 (`ADDRS`), its own loopback, and an /etc/hosts (bind-mounted by
`ip netns exec` from /etc/netns/<ns>/hosts) where the shared host name resolves to 127.0.1.1, as on Debian
clusters. Both ends of the veth pair are called `IFACE` (each lives in its own namespace). The filesystem is
shared, as a cluster's shared filesystem would be. An sshd runs in each namespace on a non-default port with
a fresh host key and a fresh client key; `bin/ssh` wraps the client with a config that knows both (strict
host-key checking), and is put first on PATH so that DeepSpeed's ssh check, pdsh and Open MPI use it.

Names are unique per run (`mf<pid>-<random>`), so runs on one machine do not collide. Everything made here is
removed on exit, also when setting up fails half-way or a test fails or times out; what a run killed with
SIGKILL left behind (its owner pid is in the name) is removed by the next run. `reset()` ends every job
process between tests and brings a lost host back. Needs root, `ip netns` with veth pairs, OpenSSH's sshd,
ssh and ssh-keygen; `missing()` says which one is absent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUBNET_PREFIX = "10.231.77"  # a private /30: .1 and .2 are the two hosts
ADDRS = (f"{SUBNET_PREFIX}.1", f"{SUBNET_PREFIX}.2")
IFACE = "mfnet0"
SSH_PORT = 2222
SETUP_TIMEOUT_S = 20.0
OURS = re.compile(r"^mf(\d+)-[0-9a-f]{4}[ab]$")  # our namespaces: mf<owner pid>-<random><host>


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None)


@functools.cache
def missing() -> str | None:
    """Why the two hosts cannot be made here, or None (probed once per test run, with a throw-away namespace)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd); run as root or in a privileged container"
    for tool, package in (("ip", "iproute2"), ("sshd", "openssh-server"), ("ssh-keygen", "openssh-client"),
                          ("ssh", "openssh-client")):
        if _tool(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y {package})"
    probe = f"mfprobe{os.getpid()}"
    try:
        for what, cmd in (("ip netns add", ["ip", "netns", "add", probe]),
                          ("ip netns exec", ["ip", "netns", "exec", probe, "true"]),
                          ("a veth pair", ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name",
                                           "p1"])):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                return f"cannot make network namespaces here ({what}: {done.stderr.strip()[:200]})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[:500]}")


def _kill_all_in(ns: str, keep: set[int] | None = None) -> None:
    """SIGKILL every process in namespace `ns` but `keep` (the netns shares the machine's pid namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in {int(p) for p in pids.split()} - (keep or set()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove(ns: str) -> None:
    _kill_all_in(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # also removes its end of the veth pair
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Remove the namespaces of earlier runs whose owner is gone (killed before its clean-up); their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale = [name for name in (line.split()[0] for line in listed.splitlines() if line.strip())
             if (m := OURS.match(name)) and not _alive(int(m.group(1)))]
    for ns in stale:
        _remove(ns)
    return stale


@dataclass
class TwoHosts:
    root: Path  # keys, sshd configs and logs, bin/ssh
    namespaces: tuple[str, str]
    sshd: list[subprocess.Popen]

    def in_host(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` run on host i (its network namespace and /etc/hosts)."""
        return ["ip", "netns", "exec", self.namespaces[i], *cmd]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with our ssh wrapper first on PATH (DeepSpeed's ssh check, pdsh and Open MPI call `ssh`)."""
        return dict(base, PATH=f"{self.root / 'bin'}:{base.get('PATH', '/usr/bin:/bin')}")

    def kill_host(self, i: int) -> None:
        """Host i is lost: its link goes down first (no RST reaches the peer), then its processes die."""
        _sh("ip", "-n", self.namespaces[i], "link", "set", IFACE, "down")
        _kill_all_in(self.namespaces[i])

    def revive_host(self, i: int) -> None:
        _sh("ip", "-n", self.namespaces[i], "link", "set", IFACE, "up")
        if self.sshd[i].poll() is None:
            self.sshd[i].kill()
        self.sshd[i].wait(timeout=10)
        self.sshd[i] = self._start_sshd(i)

    def reset(self) -> None:
        """Between tests: every job process (launchers, ranks, ssh sessions) ends; both hosts are up with sshd."""
        for i, ns in enumerate(self.namespaces):
            sshd_up = self.sshd[i].poll() is None
            _kill_all_in(ns, keep={self.sshd[i].pid} if sshd_up else None)
            link = subprocess.run(["ip", "-n", ns, "link", "show", IFACE], capture_output=True, text=True).stdout
            if not sshd_up or not re.search(r"<[^>]*\bUP\b", link):  # flags such as <BROADCAST,UP,LOWER_UP>
                self.revive_host(i)

    def _start_sshd(self, i: int) -> subprocess.Popen:
        sshd = _tool("sshd") or "/usr/sbin/sshd"
        proc = subprocess.Popen(self.in_host(i, [sshd, "-D", "-f", str(self.root / f"sshd{i}.conf"),
                                                 "-E", str(self.root / f"sshd{i}.log")]))
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while time.monotonic() < deadline:  # the port answers once sshd listens
            probe = subprocess.run(self.in_host(i, ["bash", "-c", f"echo > /dev/tcp/{ADDRS[i]}/{SSH_PORT}"]),
                                   capture_output=True)
            if probe.returncode == 0:
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.kill()
        log = (self.root / f"sshd{i}.log").read_text() if (self.root / f"sshd{i}.log").exists() else ""
        raise RuntimeError(f"sshd on host {i} did not start listening on {ADDRS[i]}:{SSH_PORT}: {log[-500:]}")


def _write_ssh_files(root: Path) -> None:
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "client_key"))
    known = []
    for i, addr in enumerate(ADDRS):
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / f"host_key{i}"))
        known.append(f"[{addr}]:{SSH_PORT} " + (root / f"host_key{i}.pub").read_text().strip())
        (root / f"sshd{i}.conf").write_text(
            f"Port {SSH_PORT}\nListenAddress {addr}\nHostKey {root / f'host_key{i}'}\n"
            f"PidFile {root / f'sshd{i}.pid'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPrintMotd no\nMaxStartups 50\n")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    (root / "known_hosts").write_text("\n".join(known) + "\n")
    (root / "ssh_config").write_text(
        f"Host {SUBNET_PREFIX}.*\n  Port {SSH_PORT}\n  User root\n  IdentityFile {root / 'client_key'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {root / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n  ConnectTimeout 10\n")
    (root / "bin").mkdir()
    wrapper = root / "bin" / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {root / 'ssh_config'} \"$@\"\n")
    wrapper.chmod(0o755)


@contextlib.contextmanager
def two_hosts(root: Path) -> Iterator[TwoHosts]:
    remove_leftovers()
    tag = f"mf{os.getpid()}-{secrets.token_hex(2)}"  # at most 15 characters with the veth suffix
    namespaces = (f"{tag}a", f"{tag}b")
    veth = (f"{tag}x", f"{tag}y")
    hosts = TwoHosts(root, namespaces, [])
    made: list[str] = []
    try:
        _write_ssh_files(root)
        for ns in namespaces:
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        _sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for ns, end, addr in zip(namespaces, veth, ADDRS, strict=True):
            _sh("ip", "link", "set", end, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", end, "name", IFACE)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", IFACE)
            _sh("ip", "-n", ns, "link", "set", IFACE, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        for i in range(2):
            hosts.sshd.append(hosts._start_sshd(i))
        yield hosts
    finally:
        for ns in made:  # every process left in a namespace (ranks, launchers, sshd) goes with it
            _kill_all_in(ns)
        for proc in hosts.sshd:
            proc.kill()
            proc.wait(timeout=10)
        for ns in made:
            _remove(ns)
        subprocess.run(["ip", "link", "del", veth[0]], capture_output=True)  # when setup stopped before the move
