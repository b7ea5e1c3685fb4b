// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Drops: the kfree_skb tracepoint with its drop reason. The reason's numeric
 * value is per kernel; user space names it from the running kernel's BTF
 * (enum skb_drop_reason), never from a table copied here. Twins: tp_btf
 * (typed arguments) and raw_tp. */
#include "vnet_filter.bpf.h"
#include <bpf/bpf_tracing.h>

struct vnet_drop_config {
	__u32 probe_id;
	__u32 wakeup_every; /* a wakeup check every N events per CPU (vnet_wakeup_flags); 0 or 1: each event */
	__u32 wakeup_bytes; /* ... forcing a wakeup when this much is unread in the ring; 0: always */
	__u32 area_chunks;  /* packet events into this CPU's area of vnet_areas, this many chunks (a power of two); 0: the ring */
	__u8 aggregate;     /* enum vnet_agg bits: numbers in maps instead of (or besides) events */
	__u16 snaplen;      /* packet bytes copied after each event (vnet_snap.bpf.h); 0: none */
	struct vnet_filter filter;
};

const volatile struct vnet_drop_config drop_cfg = {};

/* `typed`: the verifier knows `skb` as a struct sk_buff (tp_btf), see VNET_KREAD. */
static __always_inline int vnet_drop_event(struct sk_buff *skb, __u64 *args, __u16 hook, bool typed)
{
	const volatile struct vnet_filter *f = &drop_cfg.filter;
	struct vnet_stats *st;
	struct vnet_event_more m;
	struct vnet_event *ev = &m.ev;
	struct vnet_cursor c;
	__u64 now;

	if (vnet_kernel_rejects_first(f, skb, typed)) {
		vnet_rejected_first(drop_cfg.probe_id);
		return 0;
	}
	st = vnet_stats_this_cpu(drop_cfg.probe_id);
	if (!st)
		return 0;
	st->v[VNET_STAT_SEEN]++;
	if (skb && f->f_pcap && !vnet_pcap_kernel(skb, typed))
		goto filtered;
	__builtin_memset(&m, 0, sizeof(m)); /* after the rejects: they never touch the record */
	c.id = 0;
	if (skb)
		vnet_kernel_meta(skb, ev, typed);
	if (!vnet_filter_early(f, ev))
		goto filtered;
	now = vnet_stamp_early(f);
	if (skb)
		vnet_parse_kernel_skb(&c, skb, ev, !f->f_outer, typed);
	if (!vnet_filter_fields(f, ev))
		goto filtered;
	vnet_finish_id(&c, ev);
	if (!vnet_filter_sample(f, ev))
		goto filtered;
	/* Kept: only now the rest of the event. */
	vnet_hdr_init(&ev->hdr, drop_cfg.probe_id, VNET_KIND_PACKET, vnet_stamp_kept(f, now));
	ev->hook = hook;
	/* The reason argument came with Linux 5.17 ("net: skb: introduce
	 * kfree_skb_reason()"); CO-RE drops this read on older kernels. */
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_NOT_SPECIFIED))
		m.reason = (__u32)args[2];
	vnet_current_task(&m, typed);
	vnet_deliver(st, ev, true, drop_cfg.aggregate, drop_cfg.wakeup_every, drop_cfg.wakeup_bytes, skb, false, false, drop_cfg.snaplen, typed, drop_cfg.area_chunks);
	return 0;
filtered:
	vnet_filtered(st);
	return 0;
}

SEC("tp_btf/kfree_skb")
int vnet_tp_btf_drop(__u64 *ctx)
{
	return vnet_drop_event((struct sk_buff *)ctx[0], ctx, VNET_HOOK_TP_BTF, true);
}

SEC("raw_tp/kfree_skb")
int vnet_raw_tp_drop(struct bpf_raw_tracepoint_args *ctx)
{
	return vnet_drop_event((struct sk_buff *)ctx->args[0], ctx->args, VNET_HOOK_RAW_TP, false);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
