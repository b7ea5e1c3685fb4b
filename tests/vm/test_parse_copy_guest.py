"""On Debian 12's 6.1 kernel: the parse_copy probe (vnet/probes/features.py) says no, so
kernel hooks are loaded reading each header (bpf/src/vnet_packet.bpf.h parse_cfg.copy 0).
6.1's verifier keeps apart the stack states the parse from one copy leaves (it walked that
parser 6-25x longer than the header reads, up to its 1 M limit: docs/benchmarks.md); the
probe's eight two-way stack slots show it in ~8 k instructions, where 6.18 walks ~170.
Nor does 6.1 let a program load through skb->head (parse_direct: a plain number to it), so
the direct reads' code, left out by the read-only config, never reaches its verifier."""

from __future__ import annotations

from vnet.probes import catalog, features
from vnet.probes import resolve as resolver
from vnet.probes.features import Support
from vnet.trace import Trace


def test_the_pruning_probe_walks_every_combination_on_6_1():
    features.clear_cache()
    f = features.check("parse_copy")
    assert f.support is Support.UNSUPPORTED, f
    walked = int(f.detail.split(" took ")[1].split()[0])
    assert walked > 2 ** features.PRUNE_DIAMONDS * 8, f.detail  # every one of the 256 paths, walked


def test_the_skb_head_probe_is_refused_on_6_1():
    features.clear_cache()
    f = features.check("parse_direct")
    assert f.support is Support.UNSUPPORTED and "refuses loads through skb->head" in f.detail, f


def test_kernel_hooks_read_each_header_on_6_1(guest_modules):
    features.clear_cache()
    for probe in ("net:netif_receive_skb", "drop:kfree_skb"):
        plan = resolver.plan(resolver.resolve(catalog.BY_NAME[probe]))
        with Trace([plan], ring_bytes=1 << 16) as t:
            assert t.parse_copy is False and not t.parse_direct
            assert t.objects[0].config("parse_cfg") == {"copy": 0, "direct": 0}, probe
