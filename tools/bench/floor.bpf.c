// SPDX-License-Identifier: GPL-2.0
/* The floor of benchmark 1 (datapath.py, tool `floor`): programs that do nothing, at
 * the hooks `vnet trace` uses at every hop. What the path loses with these attached is
 * what any per-hop tracer pays before it reads a byte (the hooks' dispatch), so it bounds
 * what the "every hop >= 0.95x untraced" target leaves for the work itself.
 * Built by datapath.py at benchmark time (clang -target bpf); not part of vnet. */
#define SEC(name) __attribute__((section(name), used))

SEC("tc") int floor_tc(void *skb) { return -1; /* TC_ACT_UNSPEC: pass on */ }
SEC("tp_btf/net_dev_queue") int floor_net_dev_queue(void *ctx) { return 0; }
SEC("tp_btf/netif_receive_skb") int floor_netif_receive_skb(void *ctx) { return 0; }

char LICENSE[] SEC("license") = "GPL";
