"""The quick look: two namespace "VMs" behind a Linux bridge, every hop of the path
traced (VM vNIC, bridge ports, other VM's vNIC), UDP and ping sent, each packet
followed across the hops with its per-hop latency."""

from __future__ import annotations

from vnet.analysis.paths import hop_latency, paths
from vnet.probes import device as devprobe
from vnet.topology import Topology, ping, send_udp, udp_sink, warm_up
from vnet.trace import DeviceTrace
from vnet.trace.records import format_json

from . import DemoContext, DemoResult

NAME = "bridge"
TITLE = "two VMs behind a Linux bridge, hop by hop"
UDP_PORT = 5000


def run(ctx: DemoContext) -> DemoResult:
    packets = 5 if ctx.quick else 50
    with Topology.two_vms_behind_bridge() as net:
        prefix = net.topology.prefix
        ctx.progress(f"built two namespace VMs behind a bridge ({prefix}*)", 0.1)
        short = lambda text: text.replace(prefix, "").removeprefix("dev:")  # noqa: E731
        warm_up(net.vm1_ns, net.vm2_ip)  # ARP before tracing: the trace shows only the test traffic
        hops = [f"{net.vm1_ns}/{net.vm_if}", f"{net.host_ns}/{net.host_ports[0]}",
                f"{net.host_ns}/{net.host_ports[1]}", f"{net.vm2_ns}/{net.vm_if}"]
        ctx.progress("tracing 4 hooks, sending UDP and ping", 0.3)
        with DeviceTrace([devprobe.resolve(h) for h in hops]) as t:
            with udp_sink(net.vm2_ns, UDP_PORT) as sink:
                send_udp(net.vm1_ns, net.vm2_ip, UDP_PORT, count=packets)
                delivered = sink.received(timeout=3.0, expect=packets)
            replies = ping(net.vm1_ns, net.vm2_ip, count=2)
            expected = 4 * (packets + 2 * replies)  # each datagram, echo request and reply crosses 4 hooks
            events = t.poll_until(lambda evs: len(evs) >= expected, timeout=3.0)
            stats = t.stats()
    ctx.progress("following each packet across the hops", 0.9)
    out = ctx.out_dir / "bridge-events.jsonl"
    out.write_text("".join(format_json(e) + "\n" for e in events))
    wanted = [p for p in paths(events) if p.events[0]["proto"] in ("udp", "icmp")]
    per_hop = {f"{short(a)} -> {short(b)}": {"packets": n, "median_ns": int(med), "max_ns": int(mx)}
               for a, b, n, med, mx in hop_latency(wanted)}
    slowest = max(per_hop, key=lambda k: per_hop[k]["median_ns"]) if per_hop else None
    verdict = (f"{len(wanted)} packets followed across {len(hops)} hooks (same pkt_id at every hook); "
               + (f"the slowest hop is {slowest} (median {per_hop[slowest]['median_ns'] / 1000:.1f} us)."
                  if slowest else "no packet was seen at two hooks."))
    ok = len(events) >= expected and delivered == packets and stats.lost == 0
    return DemoResult(NAME, verdict, {"netns": f"{prefix}*", "sent": packets, "delivered": delivered, "events": len(events),
                                      "lost": stats.lost, "per_hop": per_hop}, [out], ok,
                      "" if ok else f"expected {expected} events and {packets} deliveries, got {len(events)} "
                                    f"and {delivered} ({stats.lost} lost)")
