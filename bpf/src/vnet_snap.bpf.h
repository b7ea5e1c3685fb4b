/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Snap-length capture: with config `snaplen` > 0 (a load-time constant: the
 * verifier prunes all of this when it is 0), a packet record is struct
 * vnet_snap_record (VNET_KIND_PACKET_MORE, for snap_wire): the event, then the
 * packet's first bytes as tcpdump would capture them at that hook (the view of
 * vnet_pcap.bpf.h: from the Ethernet header with a VLAN tag the skb keeps put
 * back, or from the IP header where the hook has no link header, which
 * VNET_F_SNAP_L3 says). The reservation has one constant size, whatever was
 * captured; ev.snap_len says how many of the bytes are the packet's. */
#ifndef VNET_SNAP_BPF_H
#define VNET_SNAP_BPF_H

#include "vnet_pcap.bpf.h"

struct vnet_snap_record {
	struct vnet_event_more m;
	__u8 data[VNET_SNAP_MAX];
};

/* min(n, max) for n >= 1 and max in 1..cap, restated so that Linux 6.1's
 * verifier sees both bounds on a helper's length (see vnet_hash_payload):
 * 1..VNET_SNAP_MAX from the mask behind a barrier, then at most `cap`, a
 * compile-time constant (the room left in the record): 6.1 does not narrow
 * the length by the compare with `max`, a value from the read-only config. */
static __always_inline __u32 vnet_snap_clamp(__u64 n, __u64 max, const __u64 cap)
{
	/* 64-bit, as in vnet_hash_payload: no zero-extended copy to compare in
	 * place of n, which would leave n itself unbounded for the verifier */
	if (n > max)
		n = max;
	barrier_var(n);
	n = ((n - 1) & (VNET_SNAP_MAX - 1)) + 1;
	barrier_var(n); /* else clang compares n - 1 with cap - 1 and 6.1 learns nothing about n */
	if (n > cap)
		n = cap;
	return n;
}

static __always_inline __u32 vnet_snap_limit(__u32 snaplen)
{
	return snaplen > VNET_SNAP_MAX ? VNET_SNAP_MAX : snaplen;
}

/* TC: skb->data is where a capture on the device starts (its link header, or
 * the IP header on an L3 device: `l3`, which user space knows). bpf_skb_load_bytes
 * reads paged skbs too. */
static __always_inline void vnet_snap_tc(struct __sk_buff *skb, struct vnet_snap_record *r, __u32 snaplen,
					 bool l3)
{
	__u32 len = skb->len, max = vnet_snap_limit(snaplen), n;

	if (l3)
		r->m.ev.flags |= VNET_F_SNAP_L3;
	if (len == 0 || max == 0)
		return;
	r->m.snap_wire = len;
	if (!skb->vlan_present || l3 || max <= 16 || len <= 12) {
		n = vnet_snap_clamp(len, max, VNET_SNAP_MAX);
		if (bpf_skb_load_bytes(skb, 0, r->data, n) == 0)
			r->m.ev.snap_len = n;
		return;
	}
	r->m.snap_wire = len + 4;
	if (bpf_skb_load_bytes(skb, 0, r->data, 12) < 0)
		return;
	*(__u16 *)&r->data[12] = skb->vlan_proto; /* network order already */
	*(__u16 *)&r->data[14] = bpf_htons(skb->vlan_tci);
	n = vnet_snap_clamp(len - 12, max - 16, VNET_SNAP_MAX - 16);
	if (bpf_skb_load_bytes(skb, 12, &r->data[16], n) == 0)
		r->m.ev.snap_len = 16 + n;
}

/* Kernel sk_buff: the linear part of vnet_kernel_view's view. */
static __always_inline void vnet_snap_kernel(struct sk_buff *skb, struct vnet_snap_record *r, __u32 snaplen,
					     bool typed)
{
	__u32 max = vnet_snap_limit(snaplen), n;
	struct vnet_skb_view v;

	if (!vnet_kernel_view(skb, &v, typed))
		return;
	if (!v.l2)
		r->m.ev.flags |= VNET_F_SNAP_L3;
	if (v.caplen == 0 || max == 0)
		return;
	r->m.snap_wire = v.wirelen;
	if (!v.l2 || !vnet_skb_vlan_present(skb, typed) || max <= 16 || v.caplen <= 12) {
		n = vnet_snap_clamp(v.caplen, max, VNET_SNAP_MAX);
		if (bpf_probe_read_kernel(r->data, n, v.start) == 0)
			r->m.ev.snap_len = n;
		return;
	}
	r->m.snap_wire = v.wirelen + 4;
	if (bpf_probe_read_kernel(r->data, 12, v.start) < 0)
		return;
	*(__u16 *)&r->data[12] = VNET_KREAD(typed, skb, vlan_proto);
	*(__u16 *)&r->data[14] = bpf_htons(VNET_KREAD(typed, skb, vlan_tci));
	n = vnet_snap_clamp(v.caplen - 12, max - 16, VNET_SNAP_MAX - 16);
	if (bpf_probe_read_kernel(&r->data[16], n, v.start + 12) == 0)
		r->m.ev.snap_len = 16 + n;
}

/* The event and the packet's bytes in one constant-size reservation; a full
 * ring is counted, never silent (as vnet_emit). `skb` is a struct __sk_buff *
 * at TC (`tc`), else a kernel struct sk_buff * (`typed`: see VNET_KREAD) or
 * NULL (no packet: no bytes). */
static __always_inline void vnet_emit_snap(struct vnet_stats *st, struct vnet_event *ev, bool more, void *skb,
					   bool tc, bool l3, __u32 snaplen, __u32 wakeup_every, __u32 wakeup_bytes,
					   bool typed)
{
	void *ring = vnet_ring(ev->hdr.cpu);
	struct vnet_snap_record *r = bpf_ringbuf_reserve(ring, sizeof(*r), 0);

	if (!r) {
		st->v[VNET_STAT_LOST]++;
		return;
	}
	ev->hdr.kind = VNET_KIND_PACKET_MORE;
	if (more) /* ev heads a struct vnet_event_more (vnet_deliver) */
		__builtin_memcpy(&r->m, ev, sizeof(r->m));
	else {
		__builtin_memcpy(&r->m.ev, ev, sizeof(r->m.ev));
		__builtin_memset((__u8 *)&r->m + sizeof(r->m.ev), 0, sizeof(r->m) - sizeof(r->m.ev));
	}
	r->m.ev.snap_len = 0;
	r->m.snap_wire = 0;
	if (skb && !(ev->flags & VNET_F_NO_SKB)) {
		if (tc)
			vnet_snap_tc(skb, r, snaplen, l3);
		else
			vnet_snap_kernel(skb, r, snaplen, typed);
	}
	bpf_ringbuf_submit(r, vnet_wakeup_flags(ring, st, wakeup_every, wakeup_bytes, sizeof(*r)));
	st->v[VNET_STAT_EMITTED]++;
}

#endif /* VNET_SNAP_BPF_H */
