"""`vnet demo`: the main job on a built-in throwaway topology.

Two network-namespace "VMs" behind a Linux bridge in a "host" namespace; vnet
traces every hop of the path (VM vNIC, bridge ports, other VM's vNIC), sends
traffic, prints what it saw and each packet's per-hop latency, then removes it all.
"""

from __future__ import annotations

import sys

import typer

from vnet.analysis.paths import hop_latency, paths
from vnet.probes import device as devprobe
from vnet.probes import features
from vnet.topology import Topology, ping, send_udp, udp_sink, warm_up
from vnet.trace import DeviceTrace
from vnet.trace.records import format_json, format_text

from .common import cli_errors, setup_logging

UDP_PORT = 5000


@cli_errors
def demo(
    packets: int = typer.Option(5, "--packets", "-n", min=1, max=10000, help="UDP datagrams to send vm1 -> vm2."),
    json_out: bool = typer.Option(False, "--json", help="Print the events as JSON Lines."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Build two namespace VMs behind a bridge, trace their traffic hop by hop, tear down."""
    setup_logging(verbose)
    features.require_privileges(net_admin=True)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    with Topology.two_vms_behind_bridge() as net:
        prefix = net.topology.prefix
        short = lambda text: text.replace(prefix, "")  # noqa: E731
        say(f"topology: vm1 {net.vm1_ip} --eth0==tap1-- [br0 in host] --tap2==eth0-- vm2 {net.vm2_ip} "
            f"(namespaces {prefix}*)")
        warm_up(net.vm1_ns, net.vm2_ip)  # ARP before tracing: the trace shows only the test traffic
        hops = [f"{net.vm1_ns}/{net.vm_if}", f"{net.host_ns}/{net.host_ports[0]}",
                f"{net.host_ns}/{net.host_ports[1]}", f"{net.vm2_ns}/{net.vm_if}"]
        with DeviceTrace([devprobe.resolve(h) for h in hops]) as t:
            say(f"tracing {len(t.hooks)} hooks ({'/'.join(sorted(t.hook_kinds))}): " +
                ", ".join(short(h.probe) for h in t.hooks))
            with udp_sink(net.vm2_ns, UDP_PORT) as sink:
                send_udp(net.vm1_ns, net.vm2_ip, UDP_PORT, count=packets)
                delivered = sink.received(timeout=3.0, expect=packets)
            replies = ping(net.vm1_ns, net.vm2_ip, count=2)
            # Each datagram crosses 4 hooks; each echo request and reply does too.
            expected = 4 * (packets + 2 * replies)
            events = t.poll_until(lambda evs: len(evs) >= expected, timeout=3.0)
            stats = t.stats()

    for e in events:
        print(format_json(e) if json_out else short(format_text(e)))
    wanted = [p for p in paths(events) if p.events[0]["proto"] in ("udp", "icmp")]
    print(f"\n{len(wanted)} packets followed across the path (pkt_id: same packet at every hook):")
    for p in wanted[:8]:
        first = p.events[0]
        print(f"  {p.pkt_id} {first['proto'].upper()} {first['src']} > {first['dst']}: " +
              " -> ".join(short(e["probe"].removeprefix("dev:")) for e in p.events) +
              f"  total {p.total_ns / 1000:.1f} us")
    if len(wanted) > 8:
        print(f"  ... and {len(wanted) - 8} more")
    print("\nper-hop latency (median / max over packets):")
    for a, b, n, med, mx in hop_latency(wanted):
        print(f"  {short(a.removeprefix('dev:')):>20} -> {short(b.removeprefix('dev:')):<20} "
              f"{n:4d} pkts  {med / 1000:8.1f} us  {mx / 1000:8.1f} us")
    print(f"\nvnet: {packets} UDP datagrams sent, {delivered} delivered; {len(events)} events, "
          f"{stats.lost} lost (ring buffer full), {stats.seen} packets seen at {len(hops) * 2} hooks; "
          f"topology removed", file=sys.stderr)
    if len(events) < expected:
        raise typer.Exit(1)
