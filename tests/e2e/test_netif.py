"""Interface selection (megaface/distributed/netif.py) from routing facts, without a network.

The facts below are what two cluster nodes show: `eth0` on 10.0.0.0/24 with a default route, a docker
bridge, and loopback, with the host name resolving to 127.0.1.1. The end-to-end case (two network namespaces,
torchrun, no interface variable set) is tests/multinode/.
"""

from __future__ import annotations

import ipaddress

import pytest

from megaface.distributed.netif import (
    InterfaceAddr,
    Route,
    choose_interface,
    parse_proc_if_inet6,
    parse_proc_ipv6_route,
    parse_proc_route,
    route_interface,
    socket_ifname_env,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

# /proc/net/route of such a node (addresses little-endian hex): default via 10.0.0.254 on eth0,
# 10.0.0.0/24 on eth0, 172.17.0.0/16 on docker0, and a rejected 10.0.0.128/25
PROC_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\tFE00000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t8000000A\t00000000\t0201\t0\t0\t0\t80FFFFFF\t0\t0\t0
"""
ADDRS = [InterfaceAddr("lo", ip("127.0.0.1")), InterfaceAddr("eth0", ip("10.0.0.1")),
         InterfaceAddr("docker0", ip("172.17.0.1"))]


def test_parse_proc_route() -> None:
    routes = parse_proc_route(PROC_ROUTE)
    assert routes == [Route("eth0", net("0.0.0.0/0"), 100), Route("eth0", net("10.0.0.0/24"), 100),
                      Route("docker0", net("172.17.0.0/16"), 0)]  # the RTF_REJECT route is left out


def test_parse_ipv6() -> None:
    route = ("fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
             "00000000000000000000000000000000 00000100 00000000 00000000 00000001 eth0\n")
    assert parse_proc_ipv6_route(route) == [Route("eth0", net("fd00::/64"), 256)]
    inet6 = "fd000000000000000000000000000001 02 40 00 80     eth0\n00000000000000000000000000000001 01 80 10 80 lo\n"
    assert parse_proc_if_inet6(inet6) == [InterfaceAddr("eth0", ip("fd00::1")), InterfaceAddr("lo", ip("::1"))]


def test_longest_prefix_wins() -> None:
    routes = parse_proc_route(PROC_ROUTE)
    assert route_interface(routes, ip("10.0.0.2")) == "eth0"
    assert route_interface(routes, ip("172.17.0.5")) == "docker0"
    assert route_interface(routes, ip("8.8.8.8")) == "eth0"  # the default route
    assert route_interface([r for r in routes if r.iface == "docker0"], ip("10.0.0.2")) is None
    assert route_interface(routes, ip("fd00::2")) is None  # no IPv6 route in an IPv4 table


def test_lowest_metric_among_equal_prefixes() -> None:
    routes = [Route("slow0", net("10.1.0.0/16"), 200), Route("fast0", net("10.1.0.0/16"), 10)]
    assert route_interface(routes, ip("10.1.2.3")) == "fast0"


def test_choose_interface() -> None:
    routes = parse_proc_route(PROC_ROUTE)
    assert choose_interface(ip("10.0.0.2"), routes, ADDRS) == "eth0"  # another node: the route to it
    assert choose_interface(ip("10.0.0.1"), routes, ADDRS) == "eth0"  # node 0 itself: its own address
    assert choose_interface(ip("127.0.0.1"), routes, ADDRS) is None  # loopback: a one-host job
    assert choose_interface(ip("127.0.1.1"), routes, ADDRS) is None
    # MASTER_ADDR on an address held by loopback (or routed there): never advertised to another host
    assert choose_interface(ip("10.9.9.9"), routes, ADDRS + [InterfaceAddr("lo", ip("10.9.9.9"))]) is None
    assert choose_interface(ip("10.9.9.9"), [Route("lo", net("10.9.9.0/24"))], ADDRS) is None


def test_socket_ifname_env() -> None:
    routes = parse_proc_route(PROC_ROUTE)
    env = {"MASTER_ADDR": "10.0.0.1"}
    assert socket_ifname_env("gloo", env, True, routes, ADDRS) == ("GLOO_SOCKET_IFNAME", "eth0")
    assert socket_ifname_env("nccl", env, True, routes, ADDRS) == ("NCCL_SOCKET_IFNAME", "eth0")
    assert socket_ifname_env("mpi", env, True, routes, ADDRS) is None  # reads no such variable
    assert socket_ifname_env("gloo", {**env, "GLOO_SOCKET_IFNAME": "ib0"}, True, routes, ADDRS) is None
    assert socket_ifname_env("gloo", {"MASTER_ADDR": "127.0.0.1"}, True, routes, ADDRS) is None
    assert socket_ifname_env("gloo", {"MASTER_ADDR": "localhost"}, True, routes, ADDRS) is None
    assert socket_ifname_env("gloo", {}, True, routes, ADDRS) is None


def test_no_interface_names_the_variable() -> None:
    lo_only = [InterfaceAddr("lo", ip("127.0.0.1"))]
    env = {"MASTER_ADDR": "10.0.0.1"}
    with pytest.raises(ValueError, match=r"MASTER_ADDR=10\.0\.0\.1.*export GLOO_SOCKET_IFNAME="):
        socket_ifname_env("gloo", env, True, [], lo_only)
    # one host: gloo's own choice works (every rank is local), so nothing is set and nothing raised
    assert socket_ifname_env("gloo", env, False, [], lo_only) is None


def test_unresolvable_master_addr() -> None:
    with pytest.raises(ValueError, match=r"MASTER_ADDR='no-such-host\.invalid' does not resolve"):
        socket_ifname_env("gloo", {"MASTER_ADDR": "no-such-host.invalid"}, True, [], [])


def test_this_host() -> None:
    """The system readers on this machine: loopback is listed, and a loopback master picks nothing."""
    from megaface.distributed.netif import read_interface_addrs, read_routes

    addrs = read_interface_addrs()
    assert any(a.address.is_loopback for a in addrs), addrs
    assert isinstance(read_routes(), list)
    assert socket_ifname_env("gloo", {"MASTER_ADDR": "127.0.0.1"}, True) is None


def test_timeout_message_names_the_other_host() -> None:
    """A rank that timed out names the host it waited for (gloo's message names no peer)."""
    from megaface.train.loop import _timeout_message

    err = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 15000ms for send operation")
    hosts = ("10.0.0.1 (n1)", "10.0.0.1 (n1)", "10.0.0.2 (n2)", "10.0.0.2 (n2)")
    assert "for a peer rank on 10.0.0.2 (n2): it is stopped" in _timeout_message(err, 15, hosts, rank=0)
    assert "for a peer rank on 10.0.0.1 (n1): it is stopped" in _timeout_message(err, 15, hosts, rank=3)
    three = (*hosts, "10.0.0.3 (n3)")
    assert "on one of 10.0.0.2 (n2), 10.0.0.3 (n3):" in _timeout_message(err, 15, three, rank=0)
    assert "for a peer rank: it is" in _timeout_message(err, 15, ("127.0.0.1 (n1)",) * 2, rank=0)  # one host
    named = RuntimeError("Timed out waiting for rank 2")
    assert "rank 2 (as the backend reports it) on 10.0.0.2 (n2)" in _timeout_message(named, 15, hosts, rank=0)
