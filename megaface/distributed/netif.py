"""Which network interface the collectives advertise to other hosts.

gloo (and NCCL's bootstrap, when it cannot tell) take this host's address from its host name unless
`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` names an interface. On many clusters the host name resolves to a
loopback address (Debian's `127.0.1.1`, a container's `127.0.0.1`), so every rank advertises loopback and the
ranks on other hosts get "Connection refused" (gloo's `connectFullMesh failed`).

When the variable is unset and MASTER_ADDR is not a loopback address, `socket_ifname_env` picks the
interface the kernel uses to reach MASTER_ADDR: the one every other node must be able to reach us through
too. The choice is made from routing facts (`Route`, `InterfaceAddr`) by pure functions, tested without a
network; only `read_routes`/`read_interface_addrs` touch the system (Linux's /proc/net).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

#: the variable each backend reads for the interface to advertise; one home for the names
SOCKET_IFNAME_VARS = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}


@dataclass(frozen=True)
class Route:
    """One routing-table entry: packets to `network` leave through `iface`."""

    iface: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    metric: int = 0


@dataclass(frozen=True)
class InterfaceAddr:
    iface: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


def _hex_ipv4(field: str) -> ipaddress.IPv4Address:
    """/proc/net/route writes addresses as host-order (little-endian on x86/arm) hex of the network bytes."""
    return ipaddress.IPv4Address(bytes.fromhex(field)[::-1])


def parse_proc_route(text: str) -> list[Route]:
    """Routes from the text of /proc/net/route (IPv4); rejected routes (flag RTF_REJECT) are left out."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or int(fields[3], 16) & 0x0200:  # RTF_REJECT
            continue
        dest, mask = _hex_ipv4(fields[1]), _hex_ipv4(fields[7])
        routes.append(Route(fields[0], ipaddress.IPv4Network(f"{dest}/{mask}", strict=False), int(fields[6])))
    return routes


def parse_proc_ipv6_route(text: str) -> list[Route]:
    """Routes from the text of /proc/net/ipv6_route (destination, prefix length, ..., metric, ..., iface)."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or int(fields[8], 16) & 0x0200:
            continue
        dest = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        routes.append(Route(fields[9], ipaddress.IPv6Network(f"{dest}/{int(fields[1], 16)}", strict=False),
                            int(fields[5], 16)))
    return routes


def parse_proc_if_inet6(text: str) -> list[InterfaceAddr]:
    """Addresses from the text of /proc/net/if_inet6 (address, index, prefix, scope, flags, iface)."""
    return [InterfaceAddr(fields[5], ipaddress.IPv6Address(bytes.fromhex(fields[0])))
            for fields in (line.split() for line in text.splitlines()) if len(fields) >= 6]


def route_interface(routes: list[Route], dest: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The interface of the longest-prefix route to `dest` (lowest metric among equals); None if no route."""
    matching = [r for r in routes if r.network.version == dest.version and dest in r.network]
    if not matching:
        return None
    best = max(matching, key=lambda r: (r.network.prefixlen, -r.metric))
    return best.iface


def choose_interface(master: ipaddress.IPv4Address | ipaddress.IPv6Address, routes: list[Route],
                     addrs: list[InterfaceAddr]) -> str | None:
    """The interface to advertise for a job whose rendezvous is at `master`, or None when there is none.

    None for a loopback `master` (a one-host job: nothing to choose). When `master` is one of this host's
    own addresses (we are node 0), its interface; otherwise the interface of the route to it. A loopback
    interface is never returned: other hosts cannot reach it.
    """
    if master.is_loopback:
        return None
    loopback = {a.iface for a in addrs if a.address.is_loopback} | {"lo"}
    own = [a.iface for a in addrs if a.address == master]
    iface = own[0] if own else route_interface(routes, master)
    return None if iface is None or iface in loopback else iface


def resolve_master(master_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """MASTER_ADDR as an address (a host name is resolved, as the rendezvous store does)."""
    try:
        return ipaddress.ip_address(master_addr)
    except ValueError:
        pass
    try:
        info = socket.getaddrinfo(master_addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"MASTER_ADDR={master_addr!r} does not resolve ({err}): set it to node 0's address "
                         "on the network the nodes share") from None
    return ipaddress.ip_address(info[0][4][0])


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def read_routes() -> list[Route]:
    return parse_proc_route(_read("/proc/net/route")) + parse_proc_ipv6_route(_read("/proc/net/ipv6_route"))


def _ipv4_address(iface: str) -> ipaddress.IPv4Address | None:
    import fcntl
    import struct

    siocgifaddr = 0x8915  # <linux/sockios.h>
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", iface.encode()[:15]))
        except OSError:  # no IPv4 address on this interface
            return None
    return ipaddress.IPv4Address(raw[20:24])


def read_interface_addrs() -> list[InterfaceAddr]:
    """This host's interfaces and addresses (IPv4 via SIOCGIFADDR, IPv6 from /proc/net/if_inet6)."""
    addrs = []
    for _, name in socket.if_nameindex():
        v4 = _ipv4_address(name)
        if v4 is not None:
            addrs.append(InterfaceAddr(name, v4))
    return addrs + parse_proc_if_inet6(_read("/proc/net/if_inet6"))


def socket_ifname_env(backend: str, environ: dict[str, str] | os._Environ[str], multi_host: bool,
                      routes: list[Route] | None = None,
                      addrs: list[InterfaceAddr] | None = None) -> tuple[str, str] | None:
    """(variable, interface) to export for `backend`, or None when there is nothing to set.

    Nothing when the backend reads no such variable, the user set it, or MASTER_ADDR is loopback. Raises
    ValueError naming the variable when no usable interface routes to MASTER_ADDR in a job that spans
    hosts (gloo would advertise the host name's address, often loopback, and hang or be refused).
    """
    var = SOCKET_IFNAME_VARS.get(backend)
    master_addr = environ.get("MASTER_ADDR", "")
    if var is None or environ.get(var) or not master_addr:
        return None
    master = resolve_master(master_addr)
    if master.is_loopback:
        return None
    routes = read_routes() if routes is None else routes
    addrs = read_interface_addrs() if addrs is None else addrs
    iface = choose_interface(master, routes, addrs)
    if iface is None:
        if not multi_host:
            return None
        raise ValueError(f"no network interface of this host routes to MASTER_ADDR={master_addr} (except "
                         f"loopback): export {var}=<the interface on the network the nodes share> on every node")
    return var, iface



def local_address(master_addr: str, iface: str | None) -> str:
    """The address this host is reached by in the job: `iface`'s, else the source of the route to
    MASTER_ADDR, else the host name's. For messages (which host a rank is on), never for connecting."""
    if iface:
        own = [a.address for a in read_interface_addrs() if a.iface == iface]
        if own:
            return str(own[0])
    try:
        master = resolve_master(master_addr)
        if not master.is_loopback:
            family = socket.AF_INET if master.version == 4 else socket.AF_INET6
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((str(master), 9))  # UDP: nothing is sent, the kernel only picks the route
                return str(sock.getsockname()[0])
        return socket.gethostbyname(socket.gethostname())
    except (OSError, ValueError):
        return "unknown address"
