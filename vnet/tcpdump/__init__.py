"""tcpdump filter expressions, run inside vnet's eBPF programs.

libpcap compiles the expression into classic BPF, once for Ethernet and once
for raw IP (hooks that see L3 only); `translate` turns classic BPF into eBPF
with the safety rules of the kernel's own converter; the loader splices that
code into each packet program in place of a no-inline stub (vnet_pcap_*).
"""

from .expression import Expression, compile

__all__ = ["Expression", "compile"]
