"""The probe catalog: every named point on the virtual network path, the layer
it belongs to, what it yields, and its hook implementations in preference order.

Names: `group:point` (e.g. `net:netif_receive_skb`, `ovs:vport_receive`); device
probes are `dev:IFACE:ingress|egress` (IFACE may be NETNS/IFACE) and are made on
demand for the interfaces that exist (vnet.probes.device).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

# The kernel's PID_MAX_LIMIT on 64-bit: every tgid the scheduler probes can be
# asked to watch is below it (sched.bpf.c's watch bitmap has one bit for each).
PID_LIMIT = 1 << 22

# Layers along the virtual path, guest to host and back.
GUEST, HOST_STACK, SWITCH, BACKEND, NIC, SOCKET, SCHED = (
    "guest", "host stack", "virtual switch", "hypervisor backend", "nic", "socket", "scheduler")


@dataclass(frozen=True)
class Hook:
    """One way to implement a probe."""

    kind: str              # tp_btf | raw_tp | tracepoint | fentry | kprobe
    target: str            # tracepoint "category:name" or kernel function name
    skb_arg: int = 0       # 1-based position of the sk_buff argument; 0: none
    skb_deref: bool = False  # the argument is a struct sk_buff **
    dev_arg: int = 0       # 1-based position of a struct net_device * naming the device; 0: skb->dev

    @property
    def tracepoint(self) -> tuple[str, str]:
        cat, _, name = self.target.partition(":")
        return cat, name

    @property
    def function(self) -> str:
        """The name to verify/attach against: a tracepoint's bare name, or the function."""
        return self.tracepoint[1] if ":" in self.target else self.target


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    layer: str
    yields: str            # "packet", "drop" (packet + reason), "call" (a function ran; no packet), "sched"
    about: str
    hooks: tuple[Hook, ...]
    module: str | None = None  # kernel module that provides the functions
    task: bool = False     # record the current task (pid, comm)
    obj: str = "skb_trace"

    @property
    def group(self) -> str:
        return self.name.partition(":")[0]


def _tracepoint(tp: str, skb_arg: int = 1, dev_arg: int = 0) -> tuple[Hook, ...]:
    """tp_btf -> raw_tp -> classic tracepoint for the tracepoint `category:name`."""
    name = tp.partition(":")[2]
    return (Hook("tp_btf", name, skb_arg, dev_arg=dev_arg), Hook("raw_tp", name, skb_arg, dev_arg=dev_arg),
            Hook("tracepoint", tp, skb_arg))


def _function(fn: str, skb_arg: int = 0, skb_deref: bool = False) -> tuple[Hook, ...]:
    """fentry -> kprobe for kernel function `fn`."""
    return Hook("fentry", fn, skb_arg, skb_deref), Hook("kprobe", fn, skb_arg, skb_deref)


CATALOG: tuple[ProbeSpec, ...] = (
    # Host network stack: the generic receive and transmit points every packet passes.
    ProbeSpec("net:netif_rx", HOST_STACK, "packet", "packet queued to the backlog (veth, tun, loopback receive)",
              _tracepoint("net:netif_rx")),
    ProbeSpec("net:napi_gro_receive_entry", NIC, "packet", "NIC driver hands a packet to GRO (NAPI receive)",
              _tracepoint("net:napi_gro_receive_entry")),
    ProbeSpec("net:netif_receive_skb", HOST_STACK, "packet", "packet enters the receive path of a device",
              _tracepoint("net:netif_receive_skb")),
    # The first points where a sent packet is whole (tot_len is set in __ip_local_out): its
    # pkt_id matches every later hop's. Synchronous for UDP, so the task is the sender.
    ProbeSpec("ip:output", HOST_STACK, "packet", "a locally sent (or forwarded) IPv4 packet leaves IP for its "
              "device, headers complete: for UDP, in the sending task", _function("ip_output", 3), task=True),
    ProbeSpec("ip:output6", HOST_STACK, "packet", "the same for IPv6", _function("ip6_output", 3), task=True),
    ProbeSpec("net:net_dev_queue", HOST_STACK, "packet", "packet queued for transmit on a device (qdisc entry)",
              _tracepoint("net:net_dev_queue")),
    ProbeSpec("net:net_dev_start_xmit", HOST_STACK, "packet", "driver starts transmitting the packet (qdisc exit)",
              _tracepoint("net:net_dev_start_xmit", dev_arg=2)),
    # The skb may be gone when net_dev_xmit fires (as the kernel's own tracepoint
    # assumes): the device comes from the tracepoint's argument, not the skb.
    ProbeSpec("net:net_dev_xmit", HOST_STACK, "packet", "driver returned from transmitting the packet",
              _tracepoint("net:net_dev_xmit", dev_arg=3)),
    # Drops, with the running kernel's reason names.
    ProbeSpec("drop:kfree_skb", HOST_STACK, "drop", "packet dropped, with the kernel's drop reason",
              (Hook("tp_btf", "kfree_skb", 1), Hook("raw_tp", "kfree_skb", 1)), obj="drop"),
    # Sockets: delivery to the application and send entry.
    ProbeSpec("sock:datagram_copy", SOCKET, "packet",
              "payload copied to the application (TCP; UDP only for non-linear skbs)",
              _tracepoint("skb:skb_copy_datagram_iovec"), task=True),
    # Socket delivery for UDP, v4 and v6: queued on the socket (softirq), then taken by the
    # reader. At skb_consume_udp skb->dev holds UDP's dev_scratch (a union; never a kernel
    # address): the event names no device.
    ProbeSpec("sock:udp_enqueue", SOCKET, "packet", "a UDP datagram is queued on its receiving socket",
              _function("__udp_enqueue_schedule_skb", 2)),
    ProbeSpec("sock:udp_read", SOCKET, "packet", "the application takes a UDP datagram off its socket "
              "(recvmsg), in its task", _function("skb_consume_udp", 2), task=True),
    # TCP's delivery point: tcp_rcv_established's tracepoint, every segment that reaches an
    # established socket (data and pure ACKs), before it is queued; a tracepoint, so it works
    # where functions cannot be probed. The read is sock:datagram_copy.
    ProbeSpec("sock:tcp_receive", SOCKET, "packet", "a TCP segment reaches its established socket "
              "(tcp_rcv_established), before it is queued", _tracepoint("tcp:tcp_probe", skb_arg=2)),
    # Freed after use, not dropped. A tap read (tun_do_read: the VM process takes the frame) and,
    # before 6.18, a UDP read (skb_consume_udp) fire it in the reading task; since 6.18 UDP frees
    # through skb_attempt_defer_free, so it fires later, on the CPU that allocated the packet.
    # A driver freeing a sent packet fires it too (virtio-net's transmit completion), after the
    # packet left: on a sending host it is no delivery point (sock:udp_read is).
    ProbeSpec("sock:consume_skb", SOCKET, "packet",
              "packet consumed after use: a VM process read it from its tap (in that task)",
              _tracepoint("skb:consume_skb"), task=True),
    ProbeSpec("sock:udp_recvmsg", SOCKET, "call", "application reads a UDP socket", _function("udp_recvmsg"),
              task=True),
    ProbeSpec("sock:tcp_recvmsg", SOCKET, "call", "application reads a TCP socket", _function("tcp_recvmsg"),
              task=True),
    ProbeSpec("sock:udp_sendmsg", SOCKET, "call", "application sends on a UDP socket", _function("udp_sendmsg"),
              task=True),
    ProbeSpec("sock:tcp_sendmsg", SOCKET, "call", "application sends on a TCP socket", _function("tcp_sendmsg"),
              task=True),
    # Open vSwitch kernel datapath.
    ProbeSpec("ovs:vport_receive", SWITCH, "packet", "OVS datapath receives a packet on a vport",
              _function("ovs_vport_receive", 2), module="openvswitch"),
    ProbeSpec("ovs:dp_process_packet", SWITCH, "packet", "OVS flow table lookup for the packet",
              _function("ovs_dp_process_packet", 1), module="openvswitch"),
    ProbeSpec("ovs:dp_upcall", SWITCH, "packet", "flow miss: packet sent up to ovs-vswitchd",
              _function("ovs_dp_upcall", 2), module="openvswitch"),
    ProbeSpec("ovs:execute_actions", SWITCH, "packet", "OVS executes the flow's actions on the packet",
              _function("ovs_execute_actions", 2), module="openvswitch"),
    ProbeSpec("ovs:vport_send", SWITCH, "packet", "OVS sends the packet out of a vport",
              _function("ovs_vport_send", 2), module="openvswitch"),
    # Linux bridge.
    ProbeSpec("bridge:handle_frame", SWITCH, "packet", "bridge port receives a frame (rx_handler)",
              _function("br_handle_frame", 1, skb_deref=True), module="bridge"),
    ProbeSpec("bridge:forward", SWITCH, "packet", "bridge forwards a frame to a port", _function("br_forward", 2),
              module="bridge"),
    ProbeSpec("bridge:pass_frame_up", SWITCH, "packet", "bridge delivers a frame to the host stack",
              _function("br_pass_frame_up", 1), module="bridge"),
    # veth / tun / vhost: the vNIC backends of containers and VMs.
    ProbeSpec("veth:xmit", BACKEND, "packet", "veth transmits to its peer", _function("veth_xmit", 1),
              module="veth"),
    ProbeSpec("tun:net_xmit", BACKEND, "packet", "host sends a packet to a VM's tap (tun) device",
              _function("tun_net_xmit", 1), module="tun"),
    ProbeSpec("tun:get_user", BACKEND, "call", "a VM's packet is written into its tap (tun) device",
              _function("tun_get_user"), module="tun", task=True),
    ProbeSpec("vhost:handle_tx", BACKEND, "call", "vhost-net worker drains a VM's TX virtqueue",
              _function("handle_tx"), module="vhost_net", task=True),
    ProbeSpec("vhost:handle_rx", BACKEND, "call", "vhost-net worker fills a VM's RX virtqueue",
              _function("handle_rx"), module="vhost_net", task=True),
    # Inside a guest: its virtio-net driver (the frontend of the host's tap/vhost). The receive
    # side is net:napi_gro_receive_entry on the virtio NIC (the driver builds the skb there).
    ProbeSpec("virtio:start_xmit", GUEST, "packet", "a guest's virtio-net driver puts a packet on its TX queue "
              "(towards the host)", _function("start_xmit", 1), module="virtio_net"),
    # Xen netback (dom0): the guest's vif backend.
    ProbeSpec("xen:start_xmit", BACKEND, "packet", "netback sends a packet to a Xen guest",
              _function("xenvif_start_xmit", 1), module="xen_netback"),
    ProbeSpec("xen:tx_action", BACKEND, "call", "netback processes a Xen guest's TX ring",
              _function("xenvif_tx_action"), module="xen_netback", task=True),
    ProbeSpec("xen:rx_action", BACKEND, "call", "netback fills a Xen guest's RX ring",
              _function("xenvif_rx_action"), module="xen_netback", task=True),
    # Scheduler: how long chosen threads (vCPU, vhost, netback, application) wait for a CPU.
    ProbeSpec("sched:runq", SCHED, "sched", "run-queue wait of watched threads (--pid), wakeup to on-CPU",
              (Hook("tp_btf", "sched_switch"), Hook("raw_tp", "sched_switch")), obj="sched"),
)

BY_NAME = {p.name: p for p in CATALOG}


def match(patterns: list[str]) -> tuple[list[ProbeSpec], list[str]]:
    """Catalog probes matching names or globs (`ovs:*`), in catalog order, and
    the patterns that matched nothing. `dev:` patterns are left to the caller."""
    chosen, unmatched = [], []
    for pat in patterns:
        hits = [p for p in CATALOG if fnmatch.fnmatchcase(p.name, pat)]
        if not hits:
            unmatched.append(pat)
        chosen += [p for p in hits if p not in chosen]
    return [p for p in CATALOG if p in chosen], unmatched
