"""A tcpdump expression compiled by libpcap for the link types vnet's hooks see."""

from __future__ import annotations

from dataclasses import dataclass

from vnet.binding import pcap
from vnet.binding.pcap import ClassicInsn, CompileError

ETHERNET = "ethernet"  # the hook's packet starts at the Ethernet header
RAW = "raw"            # it starts at the IPv4/IPv6 header (tun, ipip, wireguard; skbs before L2 is built)
LINKTYPES = {ETHERNET: pcap.DLT_EN10MB, RAW: pcap.DLT_RAW}


@dataclass(frozen=True)
class Expression:
    """`text` as classic BPF per link type. An expression that needs a link
    header (ether, vlan, arp...) has no raw program: hooks that see L3 only
    reject every packet, as tcpdump on such an interface would find none.
    `raw_error` is libpcap's reason."""

    text: str
    ethernet: tuple[ClassicInsn, ...]
    raw: tuple[ClassicInsn, ...] | None
    raw_error: str | None = None

    def classic(self, link: str) -> tuple[ClassicInsn, ...] | None:
        if link not in LINKTYPES:
            raise ValueError(f"unknown link type {link!r}")
        return self.ethernet if link == ETHERNET else self.raw

    def matches(self, packet: bytes, link: str = ETHERNET, wirelen: int | None = None) -> bool:
        """libpcap's own verdict (pcap_offline_filter) on `packet`: the reference."""
        insns = self.classic(link)
        return insns is not None and pcap.offline_filter(list(insns), packet, wirelen)

    def dump(self, link: str) -> list[str]:
        """`tcpdump -d` lines for `link`."""
        insns = self.classic(link)
        return pcap.image(list(insns)) if insns is not None else []


def compile(text: str) -> Expression:
    """Compile for Ethernet (errors are the user's: libpcap's message, exit code 2)
    and for raw IP (an error there only means: not applicable at L3 hooks)."""
    text = " ".join(text.split())
    if not text:
        raise CompileError("empty filter expression")
    ethernet = tuple(pcap.compile_classic(text, pcap.DLT_EN10MB))
    try:
        raw, raw_error = tuple(pcap.compile_classic(text, pcap.DLT_RAW)), None
    except CompileError as e:
        raw, raw_error = None, e.reason
    return Expression(text, ethernet, raw, raw_error)
