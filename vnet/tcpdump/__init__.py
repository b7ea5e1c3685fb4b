"""tcpdump filter expressions, run inside vnet's eBPF programs.

libpcap compiles the expression into classic BPF, once for Ethernet and once
for raw IP (hooks that see L3 only); `translate` turns classic BPF into eBPF
with the safety rules of the kernel's own converter; the loader splices that
code into each packet program in place of a no-inline stub (vnet_pcap_*).
"""

from . import ebpf, translate
from .expression import ETHERNET, RAW, Expression, compile


def stub_bodies(expr: Expression, direct_link: str = ETHERNET,
                window: int = translate.PROBE_WINDOW) -> dict[str, bytes]:
    """Encoded eBPF for each stub: vnet_pcap_direct runs the program for
    `direct_link` (a TC device's link type); vnet_pcap_probe carries both
    (`window`: see translate.translate)."""
    return {translate.STUBS[translate.DIRECT]: ebpf.encode(translate.translate(translate.DIRECT,
                                                                               expr.classic(direct_link))),
            translate.STUBS[translate.PROBE]: ebpf.encode(translate.translate(translate.PROBE, expr.ethernet,
                                                                              expr.raw, window))}


__all__ = ["ETHERNET", "RAW", "Expression", "compile", "stub_bodies"]
