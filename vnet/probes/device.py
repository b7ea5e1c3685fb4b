"""Device probe: a netdev's TC ingress/egress hook (veth, tap, bridge port,
vxlan, physical NIC). Preferred hook: a tcx link (Linux >= 6.6, vanishes with
the process); fallback: a clsact direct-action filter."""

from __future__ import annotations

import errno
import fnmatch
import logging
import socket
from dataclasses import dataclass
from functools import lru_cache

from vnet import netns
from vnet.binding import BpfObject, Btf, Link
from vnet.errors import AttachError, NoSuchInterfaceError, UsageError
from vnet.objects import object_path

from . import features

log = logging.getLogger("vnet.probes.device")
DIRECTIONS = ("ingress", "egress")
PROGRAMS = {"ingress": "vnet_tc_ingress", "egress": "vnet_tc_egress"}


@lru_cache(maxsize=1)
def hook_values() -> dict[str, int]:
    """enum vnet_hook values of the two directions, from the object's BTF."""
    with Btf.from_file(str(object_path("tc_trace"))) as btf:
        hooks = btf.enum("vnet_hook")
    return {"ingress": hooks["VNET_HOOK_TC_INGRESS"], "egress": hooks["VNET_HOOK_TC_EGRESS"]}
# tcx attach says this when the kernel predates tcx: fall back to clsact.
_NO_TCX = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: the kernel's ENOTSUPP


@dataclass(frozen=True)
class Device:
    """An interface, in the network namespace that owns it."""

    ifname: str
    ifindex: int
    netns: str | None      # `ip netns` name; None: vnet's own namespace
    netns_cookie: int      # as bpf_get_netns_cookie() reports it
    link: str = "ethernet"  # what TC hooks see first: "ethernet" header, or "raw" IP (tun, ipip, wireguard)

    @property
    def label(self) -> str:
        return f"{self.netns}/{self.ifname}" if self.netns else self.ifname

    def probe_name(self, direction: str) -> str:
        return f"dev:{self.label}:{direction}"


def resolve(spec: str, default_netns: str | None = None) -> Device:
    """'IFACE' or 'NETNS/IFACE' ('/' cannot occur in an interface name)."""
    ns, _, name = spec.rpartition("/")
    ns = ns or default_netns
    if not name or len(name) > 15:
        raise UsageError(f"invalid interface name: {spec!r}")
    with netns.enter(ns):
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            where = f" in network namespace {ns}" if ns else ""
            raise NoSuchInterfaceError(f"no such interface: {name}{where}",
                                       hint="list interfaces with 'ip link'" +
                                       (f" (ip -n {ns} link)" if ns else "")) from None
        cookie = netns.cookie()
        link = _link_type(name)
    return Device(name, ifindex, ns, cookie, link)


def gone(dev: Device) -> str | None:
    """Why a device traced since `resolve` is not there any more (None: it is): deleted,
    or its network namespace deleted or replaced. Holds nothing of the namespace after."""
    try:
        with netns.enter(dev.netns):
            if dev.netns and dev.netns_cookie and netns.cookie() not in (0, dev.netns_cookie):
                return f"network namespace {dev.netns} was replaced by another of that name"
            socket.if_indextoname(dev.ifindex)
    except NoSuchInterfaceError:
        return f"network namespace {dev.netns} was deleted"
    except OSError:
        return "deleted"
    return None


SIOCGIFHWADDR = 0x8927
ARPHRD_ETHERNET_LIKE = {1, 772}  # ARPHRD_ETHER; ARPHRD_LOOPBACK has a zeroed Ethernet header


def _link_type(name: str) -> str:
    """"ethernet" or "raw", from the device's ARPHRD type (in the current netns)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifr = fcntl.ioctl(sock, SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
        except OSError:
            return "ethernet"
    arphrd = struct.unpack_from("H", ifr, 16)[0]
    return "ethernet" if arphrd in ARPHRD_ETHERNET_LIKE else "raw"


def attach(obj: BpfObject, dev: Device, direction: str) -> tuple[Link, str]:
    """Attach the loaded tc program for `direction`; returns the link and the hook kind used."""
    prog = obj.programs[PROGRAMS[direction]]
    ingress = direction == "ingress"
    # tcx is tried directly (a kernel without it refuses the link with one of _NO_TCX), not probed
    # first: the probe loads and attaches a second copy of the program (~50 ms of vnet trace's start).
    # An answer some earlier caller cached (vnet doctor, the agent's hello) is still used.
    known = features.known("tcx")
    try_tcx = known is None or known.support is not features.Support.UNSUPPORTED
    with netns.enter(dev.netns):
        if try_tcx:
            try:
                return prog.attach_tcx(dev.ifindex, ingress), "tcx"
            except AttachError as e:
                if e.errno not in _NO_TCX:
                    raise
                log.info("tcx refused on %s (%s); using a clsact filter", dev.label, e)
        return prog.attach_tc_filter(dev.ifindex, ingress, dev.netns), "clsact"


def expand(pattern: str, default_netns: str | None = None) -> list[tuple[Device, str]]:
    """`dev:IFACE:DIR` with globs (`dev:tap*:*`, `dev:ns1/eth0:ingress`) -> the
    (device, direction) pairs that exist now; DIR may be omitted (both)."""
    body = pattern.removeprefix("dev:")
    iface, _, direction = body.partition(":")
    ns, _, name_glob = iface.rpartition("/")
    ns = ns or default_netns
    dirs = [d for d in DIRECTIONS if fnmatch.fnmatchcase(d, direction or "*")]
    if not dirs:
        raise UsageError(f"bad direction in {pattern!r} (use ingress, egress or *)")
    with netns.enter(ns):
        names = [name for _, name in sorted(socket.if_nameindex())]
    hits = [n for n in names if fnmatch.fnmatchcase(n, name_glob)]
    if not hits:
        where = f" in network namespace {ns}" if ns else ""
        raise NoSuchInterfaceError(f"no interface matches {name_glob!r}{where}", hint="list them with 'ip link'")
    return [(resolve(f"{ns}/{n}" if ns else n), d) for n in hits for d in dirs]
