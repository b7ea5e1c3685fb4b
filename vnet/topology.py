"""Throwaway virtual networks: network namespaces, veth pairs and Linux bridges.

Used by `vnet demo` and by the kernel tests. Needs root. Everything a
`Topology` creates carries a prefix unique to that instance (``vn1a2b-``), so
parallel or leftover runs never collide, and it is removed again by `close()`
(also on `with` exit and, as a safety net, at interpreter exit)::

    with Topology.two_vms_behind_bridge() as net:
        warm_up(net.vm1_ns, net.vm2_ip)
        with udp_sink(net.vm2_ns, 5000) as sink:
            send_udp(net.vm1_ns, net.vm2_ip, 5000, count=100)
            assert sink.received(expect=100) == 100

Naming rule: a device inside a namespace this topology owns keeps the name it
was given (``eth0``); a device anywhere else (``ns=None``: the namespace the
topology was created in, normally the root one) gets the prefix. Methods take
and return the real names. A `Topology` is not thread-safe; the traffic
helpers are.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from vnet import netns

__all__ = [
    "Topology",
    "TopologyError",
    "TwoVms",
    "UdpSink",
    "VethPair",
    "veth_pair",
    "in_netns",
    "netns_cookie",
    "ping",
    "send_udp",
    "tcp_exchange",
    "udp_sink",
    "warm_up",
]

IFNAMSIZ = 15  # usable characters; the kernel's IFNAMSIZ (16) counts the NUL
NETNS_RUN_DIR = netns.NETNS_RUN_DIR
IFA_F_NODAD = 0x02
PREFIX_STEM = "vn"
# Defaults for devices in our namespaces: without them every new device sends
# router solicitations for minutes and DAD probes, noise in exact packet counts.
QUIET_IPV6 = {"router_solicitations": "0", "accept_dad": "0"}
COMMAND_TIMEOUT = 30.0


class TopologyError(RuntimeError):
    """A topology could not be built, queried or torn down."""


# --- namespaces --------------------------------------------------------------


in_netns = netns.enter          # the calling thread only; a name or /proc/PID/ns/net
netns_cookie = netns.cookie    # the value bpf_get_netns_cookie() reports
_ns_fd = netns.open_fd
_in_netns_fd = netns.enter_fd


def _socket_in(ns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, type_, proto)


# --- topology ----------------------------------------------------------------


def _free_prefix() -> str:
    """A ``vnXXXX-`` prefix used by no named netns and no device in this namespace."""
    try:
        taken = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        taken = []
    taken += [name for _, name in socket.if_nameindex()]
    for _ in range(32):
        prefix = f"{PREFIX_STEM}{secrets.token_hex(2)}-"
        if not any(name.startswith(prefix) for name in taken):
            return prefix
    raise TopologyError(f"no free {PREFIX_STEM}XXXX- prefix: clean up {NETNS_RUN_DIR}")


def _is_gone(exc: Exception) -> bool:
    code = exc.code if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    return code in (errno.ENODEV, errno.ENOENT)


class Topology:
    """Namespaces, veth pairs and bridges that vanish again on `close()`.

    ``ns=None`` in every method means the namespace the topology was created in.
    """

    def __init__(self) -> None:
        self.prefix = _free_prefix()
        self._pid = os.getpid()
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._namespaces: list[str] = []
        self._devices: list[tuple[str | None, str]] = []  # deleted in reverse order
        self._iprs: dict[str | None, IPRoute] = {}
        self._closed = False
        atexit.register(self.close)  # safety net when neither `with` nor close() ran

    def __repr__(self) -> str:
        return f"Topology(prefix={self.prefix!r}, namespaces={self._namespaces})"

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self.close()
        except TopologyError as cleanup_error:
            if exc is None:
                raise
            # Do not mask the body's exception with a cleanup one.
            warnings.warn(str(cleanup_error), RuntimeWarning, stacklevel=2)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Real names of the namespaces created so far."""
        return tuple(self._namespaces)

    # -- building --

    def add_netns(self, name: str) -> str:
        """Create netns ``<prefix><name>`` with loopback up; return its real name."""
        self._check_open()
        real = self.prefix + name
        if "/" in name or os.path.exists(netns.path(real)):
            raise TopologyError(f"netns {real!r} exists or is not a valid name")
        # Recorded first: a half-done create (mount point without mount) is ours to remove.
        self._namespaces.append(real)
        pr_netns.create(real)
        with in_netns(real):  # /proc/sys/net shows the writing thread's namespace
            for key, value in QUIET_IPV6.items():
                with open(f"/proc/sys/net/ipv6/conf/default/{key}", "w") as f:
                    f.write(value)
        self._up("lo", real)
        return real

    def add_veth_pair(
        self, a_name: str, a_ns: str | None, b_name: str, b_ns: str | None
    ) -> tuple[str, str]:
        """Create a veth pair with end `a_name` in `a_ns` and `b_name` in `b_ns`, both up.

        Returns the real names of the two ends.
        """
        self._check_open()
        a, b = self._ifname(a_name, a_ns), self._ifname(b_name, b_ns)
        peer: dict[str, Any] = {"ifname": b}
        with contextlib.ExitStack() as stack:
            if b_ns != a_ns:  # the peer is born in its namespace: no move, no rename
                peer["net_ns_fd"] = (self._home if b_ns is None
                                     else stack.enter_context(_ns_fd(b_ns)))
            self._netlink(a_ns, f"create veth {a}/{b}", "link", "add",
                          ifname=a, kind="veth", peer=peer)
        self._devices.append((a_ns, a))  # deleting one end deletes the pair
        self._up(a, a_ns)
        self._up(b, b_ns)
        return a, b

    def add_bridge(self, name: str, ns: str | None) -> str:
        """Create a bridge (no STP: ports forward at once) in `ns`, up; return its real name."""
        self._check_open()
        br = self._ifname(name, ns)
        self._netlink(ns, f"create bridge {br}", "link", "add", ifname=br, kind="bridge")
        self._devices.append((ns, br))
        self._up(br, ns)
        return br

    def attach_to_bridge(self, ifname: str, ns: str | None, bridge: str) -> None:
        """Enslave `ifname` to `bridge`; both live in `ns`."""
        master = self.ifindex(bridge, ns)
        self._netlink(ns, f"attach {ifname} to {bridge}", "link", "set",
                      index=self.ifindex(ifname, ns), master=master)

    def add_address(self, ifname: str, ns: str | None, cidr: str) -> None:
        """Add an IPv4 or IPv6 address such as ``10.199.0.1/24`` (IPv6 without DAD)."""
        iface = ipaddress.ip_interface(cidr)
        # nodad: an IPv6 address is otherwise "tentative" and unusable for ~1 s.
        flags = IFA_F_NODAD if iface.version == 6 else 0
        self._netlink(ns, f"add {cidr} to {ifname}", "addr", "add",
                      index=self.ifindex(ifname, ns), address=str(iface.ip),
                      prefixlen=iface.network.prefixlen, flags=flags)

    def disable_offloads(self, ifname: str, ns: str | None) -> None:
        """Turn off tx checksumming, TSO, GSO and GRO on `ifname`.

        One skb is then one wire packet at every hook (exact counts), and no
        packet crosses a bridge with a checksum left for hardware to fill in.
        TCP builds GSO skbs whatever the gso flag says (segmented after the TC
        egress hook), so gso_max_segs is set to 1 as well.
        """
        self.run(ns, ["ethtool", "-K", ifname,
                      "tx", "off", "tso", "off", "gso", "off", "gro", "off"])
        self._netlink(ns, f"set gso_max_segs 1 on {ifname}", "link", "set",
                      index=self.ifindex(ifname, ns), gso_max_segs=1)

    # -- querying and running --

    def ifindex(self, ifname: str, ns: str | None) -> int:
        """The ifindex of `ifname` in `ns` (ifindexes are per namespace)."""
        found = self._ipr(ns).link_lookup(ifname=ifname)
        if not found:
            raise TopologyError(f"no interface {ifname!r} in netns {ns or 'home'}")
        return found[0]

    def run(self, ns: str | None, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run `argv` in `ns` via ``ip netns exec``.

        Defaults: text output captured, 30 s timeout, and `check=True`, which
        raises TopologyError carrying stderr; any subprocess.run() keyword overrides.
        """
        check = kw.pop("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", COMMAND_TIMEOUT)
        if ns is None:
            with self.in_netns(None):  # the child is forked from this thread, so starts there
                proc = subprocess.run(list(argv), check=False, **kw)
        else:
            proc = subprocess.run(["ip", "netns", "exec", ns, *argv], check=False, **kw)
        if check and proc.returncode != 0:
            raise TopologyError(
                f"{' '.join(argv)} in netns {ns or 'home'} exited {proc.returncode}: "
                f"{(proc.stderr or '').strip()}"
            )
        return proc

    def in_netns(self, ns: str | None) -> contextlib.AbstractContextManager[None]:
        """Like the module's `in_netns`, but None means this topology's home namespace."""
        self._check_open()
        return self._enter(ns)

    # -- teardown --

    def close(self) -> None:
        """Delete every device and namespace created; idempotent, tries every step.

        Devices are deleted explicitly (synchronously) rather than left to the
        asynchronous namespace teardown, so they are gone when this returns.
        Raises TopologyError listing what could not be removed.
        """
        if self._closed or os.getpid() != self._pid:  # a forked child owns nothing
            return
        self._closed = True
        atexit.unregister(self.close)
        errors: list[str] = []
        for ns, ifname in reversed(self._devices):
            try:
                ipr = self._ipr(ns)
                for index in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=index)
            except TopologyError:
                pass  # its namespace is gone already, and the device with it
            except (NetlinkError, OSError) as e:
                if not _is_gone(e):
                    errors.append(f"device {ifname} in {ns or 'home'}: {e}")
        # Open handles pin their namespace: close them before unmounting.
        for ns, ipr in self._iprs.items():
            try:
                ipr.close()
            except Exception as e:  # still unmount the namespaces below
                errors.append(f"netlink handle in {ns or 'home'}: {e}")
        self._iprs.clear()
        for ns in reversed(self._namespaces):
            try:
                pr_netns.remove(ns)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"netns {ns}: {e}")
        os.close(self._home)
        if errors:
            raise TopologyError("cleanup incomplete: " + "; ".join(errors))

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise TopologyError("topology already closed")

    def _ifname(self, name: str, ns: str | None) -> str:
        real = name if ns in self._namespaces else self.prefix + name
        if not 0 < len(real) <= IFNAMSIZ or "/" in real or " " in real:
            raise ValueError(f"interface name {real!r} is invalid or longer than {IFNAMSIZ}")
        return real

    def _enter(self, ns: str | None) -> contextlib.AbstractContextManager[None]:
        return _in_netns_fd(self._home) if ns is None else in_netns(ns)

    def _ipr(self, ns: str | None) -> IPRoute:
        # One netlink handle per namespace, opened while this thread is inside it:
        # cheaper than IPRoute(netns=...), which forks a helper process each time.
        if ns not in self._iprs:
            with self._enter(ns):
                self._iprs[ns] = IPRoute()
        return self._iprs[ns]

    def _netlink(self, ns: str | None, what: str, method: str, *args: Any, **kw: Any) -> None:
        try:
            getattr(self._ipr(ns), method)(*args, **kw)
        except NetlinkError as e:
            raise TopologyError(f"{what} in netns {ns or 'home'}: {e}") from e

    def _up(self, ifname: str, ns: str | None) -> None:
        self._netlink(ns, f"set {ifname} up", "link", "set",
                      index=self.ifindex(ifname, ns), state="up")

    # -- ready-made topologies --

    @classmethod
    def two_vms_behind_bridge(cls) -> TwoVms:
        """The canonical demo: two "VMs" on one bridge in a "host" namespace.

        ::

            vm1: eth0 --veth-- tap1 \\
                                      br0   (host)
            vm2: eth0 --veth-- tap2 /

        Addresses 10.199.0.{1,2}/24 and fd00:199::{1,2}/64, offloads off on
        every veth end. Use the result as a context manager.
        """
        topo = cls()
        try:
            host = topo.add_netns("host")
            bridge = topo.add_bridge("br0", host)
            vms = []
            for i in (1, 2):
                vm = topo.add_netns(f"vm{i}")
                port, vm_if = topo.add_veth_pair(f"tap{i}", host, "eth0", vm)
                topo.attach_to_bridge(port, host, bridge)
                topo.disable_offloads(port, host)
                topo.disable_offloads(vm_if, vm)
                topo.add_address(vm_if, vm, f"10.199.0.{i}/24")
                topo.add_address(vm_if, vm, f"fd00:199::{i}/64")
                vms.append((vm, port))
        except BaseException:
            topo.close()
            raise
        return TwoVms(
            topology=topo, host_ns=host, bridge=bridge,
            vm1_ns=vms[0][0], vm2_ns=vms[1][0], vm_if="eth0",
            host_ports=(vms[0][1], vms[1][1]),
            vm1_ip="10.199.0.1", vm2_ip="10.199.0.2",
            vm1_ip6="fd00:199::1", vm2_ip6="fd00:199::2",
        )


@dataclass(frozen=True)
class VethPair:
    """Names in `veth_pair()`: ns1/if1 <-veth-> ns2/if2; a context manager closing it."""

    topo: Topology
    ns1: str
    ns2: str
    if1: str
    if2: str
    ip1: str
    ip2: str

    @property
    def spec1(self) -> str:
        """`NETNS/IFACE`, as vnet's -i takes it."""
        return f"{self.ns1}/{self.if1}"

    @property
    def spec2(self) -> str:
        return f"{self.ns2}/{self.if2}"

    def __enter__(self) -> VethPair:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.topo.__exit__(exc_type, exc, tb)


def veth_pair(subnet: int, net: str = "10.199", warm_timeout: float = 3.0) -> VethPair:
    """Two namespaces joined by one veth pair (ifA, ifB), offloads off,
    NET.SUBNET.1 and .2, with ARP done both ways before anyone traces."""
    topo = Topology()
    try:
        ns1, ns2 = topo.add_netns("a"), topo.add_netns("b")
        if1, if2 = topo.add_veth_pair("ifA", ns1, "ifB", ns2)
        for ifname, ns in ((if1, ns1), (if2, ns2)):
            topo.disable_offloads(ifname, ns)
        ip1, ip2 = f"{net}.{subnet}.1", f"{net}.{subnet}.2"
        topo.add_address(if1, ns1, f"{ip1}/24")
        topo.add_address(if2, ns2, f"{ip2}/24")
        warm_up(ns1, ip2, timeout=warm_timeout)
        warm_up(ns2, ip1, timeout=warm_timeout)
    except BaseException:
        topo.close()
        raise
    return VethPair(topo, ns1, ns2, if1, if2, ip1, ip2)


@dataclass(frozen=True)
class TwoVms:
    """Names in `Topology.two_vms_behind_bridge()`; a context manager closing it."""

    topology: Topology
    host_ns: str
    bridge: str
    vm1_ns: str
    vm2_ns: str
    vm_if: str  # the interface name inside both vm namespaces
    host_ports: tuple[str, str]  # bridge ports in host_ns, facing vm1 and vm2
    vm1_ip: str
    vm2_ip: str
    vm1_ip6: str
    vm2_ip6: str

    def __enter__(self) -> TwoVms:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.topology.__exit__(exc_type, exc, tb)


# --- traffic -----------------------------------------------------------------


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str | None, dst: str, count: int = 3, interval: float = 0.01,
         timeout: float = 1.0) -> int:
    """Send `count` ICMP(v6) echo requests from `ns` to `dst`; return the replies seen.

    Like ``ping -c COUNT -i INTERVAL -W TIMEOUT``, over a raw socket: iputils-ping
    is not a dependency. Waits at most `timeout` after the last request.
    """
    family = _family(dst)
    v6 = family == socket.AF_INET6
    proto, echo, reply = (socket.IPPROTO_ICMPV6, 128, 129) if v6 else (socket.IPPROTO_ICMP, 8, 0)
    ident = secrets.randbits(16)  # raw sockets see every ICMP packet: match ours by id
    replied: set[int] = set()
    with _socket_in(ns, family, socket.SOCK_RAW, proto) as s:

        def drain(until: float) -> None:
            while len(replied) < count and (left := until - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data = s.recv(65535)
                except TimeoutError:
                    return
                # IPv4 raw sockets deliver the IP header, IPv6 ones do not.
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                if len(icmp) >= 8:
                    type_, _, _, rid, seq = struct.unpack("!BBHHH", icmp[:8])
                    if type_ == reply and rid == ident:
                        replied.add(seq)

        for seq in range(count):
            body = b"vnet-ping-%06d" % seq
            header = struct.pack("!BBHHH", echo, 0, 0, ident, seq)
            if not v6:  # the kernel fills in the ICMPv6 checksum itself
                header = struct.pack("!BBHHH", echo, 0, _checksum(header + body), ident, seq)
            s.sendto(header + body, (dst, 0))
            drain(time.monotonic() + interval)
        drain(time.monotonic() + timeout)
    return len(replied)


def warm_up(ns: str | None, dst: str, timeout: float = 3.0) -> None:
    """Ping `dst` from `ns` until it answers, so ARP/ND is done before counting packets.

    Afterwards both ends hold a neighbour entry for each other: the next
    datagrams leave at once and no ARP/ND packet interleaves with them.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(ns, dst, count=1, timeout=min(0.5, max(deadline - time.monotonic(), 0.01))):
            return
    raise TopologyError(f"{dst} does not answer ping from netns {ns} within {timeout} s")


def send_udp(
    ns: str | None,
    dst: str,
    dport: int,
    count: int,
    payload_fn: Callable[[int], bytes] | None = None,
    sport: int | None = None,
    src: str | None = None,
) -> None:
    """Send exactly `count` UDP datagrams from `ns` to `dst`:`dport`.

    Payload i is ``payload_fn(i)``, by default ``b"vnet-%06d" % i``. A blocking
    socket never drops locally; call `warm_up` first if ARP must not show up.
    """
    payload_fn = payload_fn or (lambda i: b"vnet-%06d" % i)
    family = _family(dst)
    with _socket_in(ns, family, socket.SOCK_DGRAM) as s:
        if src is not None or sport is not None:
            s.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), sport or 0))
        for i in range(count):
            s.sendto(payload_fn(i), (dst, dport))


class UdpSink:
    """A UDP socket bound in a netns, drained by a thread. Use `udp_sink()`."""

    def __init__(self, ns: str | None, port: int, bind: str = "::") -> None:
        family = _family(bind)
        self._sock = _socket_in(ns, family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:  # "::" then also receives IPv4
                self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._sock.bind((bind, port))
            self._sock.settimeout(0.1)  # how often the reader checks for stop
        except BaseException:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._payloads: list[bytes] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"udp-sink-{self.port}",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:  # closed under us
                return
            with self._cond:
                self._payloads.append(data)
                self._cond.notify_all()

    @property
    def payloads(self) -> list[bytes]:
        """Datagrams received so far, in arrival order."""
        with self._cond:
            return list(self._payloads)

    def received(self, timeout: float = 1.0, expect: int | None = None) -> int:
        """How many datagrams arrived; waits until `expect` did or `timeout` passed.

        Without `expect` it always waits the full `timeout` (to catch stragglers).
        """
        with self._cond:
            self._cond.wait_for(
                lambda: expect is not None and len(self._payloads) >= expect, timeout)
            return len(self._payloads)

    def close(self) -> None:
        """Stop the reader and close the socket."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


@contextlib.contextmanager
def udp_sink(ns: str | None, port: int, bind: str = "::") -> Iterator[UdpSink]:
    """A `UdpSink` receiving on `bind`:`port` in `ns` (port 0: any; see `.port`)."""
    sink = UdpSink(ns, port, bind)
    try:
        yield sink
    finally:
        sink.close()


def tcp_exchange(ns_client: str | None, ns_server: str | None, server_ip: str, port: int,
                 nbytes: int, timeout: float = 10.0) -> int:
    """Send `nbytes` over one TCP connection from `ns_client` to a listener in `ns_server`.

    Returns how many bytes the server read before the client closed.
    """
    family = _family(server_ip)
    listener = _socket_in(ns_server, family, socket.SOCK_STREAM)
    got = 0
    failure: list[BaseException] = []

    def serve() -> None:
        nonlocal got
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                while chunk := conn.recv(65536):
                    got += len(chunk)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((server_ip, port))
        listener.listen(1)  # before the client connects: no race
        listener.settimeout(timeout)
        server = threading.Thread(target=serve, name=f"tcp-server-{port}", daemon=True)
        server.start()
        with _socket_in(ns_client, family, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect((server_ip, port))
            block = bytes(range(256)) * 256
            left = nbytes
            while left:
                left -= client.send(block[:min(left, len(block))])
            client.shutdown(socket.SHUT_WR)
            server.join(timeout)
    if failure:
        raise TopologyError(f"tcp server in netns {ns_server}: {failure[0]}") from failure[0]
    if server.is_alive():
        raise TopologyError(f"tcp server in netns {ns_server} still reading after {timeout} s")
    return got
