// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Device probe: one event per packet at a netdev's TC ingress or egress hook.
 * Attached as a tcx link where the kernel has tcx (>= 6.6), else as a clsact
 * direct-action filter; the program is the same for both.
 *
 * One object instance is loaded per traced device, all sharing one ring and
 * one set of counters: its probe_id names the device even where ifindexes
 * repeat across network namespaces (tc has no portable netns helper). */
#define VNET_TC_ONLY /* no kernel sk_buff to parse (vnet_packet.bpf.h) */
#include "vnet_filter.bpf.h"

#define VNET_TC_NEXT -1 /* TC_ACT_UNSPEC == TCX_NEXT: never alter the packet's fate */

struct vnet_tc_config {
	__u32 probe_id;      /* copied into every event: the device this instance watches */
	__u32 wakeup_every;  /* a wakeup check every N events per CPU (vnet_wakeup_flags); 0 or 1: each event */
	__u32 wakeup_bytes;  /* ... forcing a wakeup when this much is unread in the ring; 0: always */
	__u32 area_chunks;  /* packet events into this CPU's area of vnet_areas, this many chunks (a power of two); 0: the ring */
	__u8 aggregate;     /* enum vnet_agg bits: numbers in maps instead of (or besides) events */
	__u8 l3;            /* the device has no link header: skb->data is the IP header (tun, ipip, wireguard) */
	__u16 snaplen;      /* packet bytes copied after each event (vnet_snap.bpf.h); 0: none */
	struct vnet_filter filter;
};

const volatile struct vnet_tc_config tc_cfg = {};

static __always_inline int vnet_tc(struct __sk_buff *skb, __u16 hook)
{
	const volatile struct vnet_filter *f = &tc_cfg.filter;
	struct vnet_stats *st;
	struct vnet_event event; /* never the longer record: nothing at tc fills its fields */
	struct vnet_event *ev = &event;
	struct vnet_cursor c;
	__u64 now;

	if (vnet_filter_on_fields(f) && !vnet_filter_tc_may_keep(f, skb, tc_cfg.l3, !f->f_outer)) {
		vnet_rejected_first(tc_cfg.probe_id);
		return VNET_TC_NEXT;
	}
	st = vnet_stats_this_cpu(tc_cfg.probe_id);
	if (!st)
		return VNET_TC_NEXT;
	st->v[VNET_STAT_SEEN]++;
	if (f->f_pcap && !vnet_pcap_tc(skb))
		goto filtered;
	__builtin_memset(&event, 0, sizeof(event)); /* after the rejects: they never touch the record */
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	ev->mark = skb->mark;
	ev->hook = hook;
	if (!vnet_filter_early(f, ev))
		goto filtered;
	now = vnet_stamp_early(f);
	vnet_parse_skb(&c, skb, ev, !f->f_outer, tc_cfg.l3);
	if (!vnet_filter_fields(f, ev))
		goto filtered;
	vnet_finish_id(&c, ev);
	if (!vnet_filter_sample(f, ev))
		goto filtered;
	/* Kept: only now the rest of the event. */
	vnet_hdr_init(&ev->hdr, tc_cfg.probe_id, VNET_KIND_PACKET, vnet_stamp_kept(f, now));
	vnet_deliver(st, ev, false, tc_cfg.aggregate, tc_cfg.wakeup_every, tc_cfg.wakeup_bytes, skb, true, tc_cfg.l3, tc_cfg.snaplen, false, tc_cfg.area_chunks);
	return VNET_TC_NEXT;
filtered:
	vnet_filtered(st);
	return VNET_TC_NEXT;
}

SEC("tc")
int vnet_tc_ingress(struct __sk_buff *skb)
{
	return vnet_tc(skb, VNET_HOOK_TC_INGRESS);
}

SEC("tc")
int vnet_tc_egress(struct __sk_buff *skb)
{
	return vnet_tc(skb, VNET_HOOK_TC_EGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
