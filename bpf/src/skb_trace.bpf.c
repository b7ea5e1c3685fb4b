// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Function and tracepoint probes on the packet path: one generic program per
 * hook kind, fallback twins in one file (tp_btf -> raw_tp -> tracepoint,
 * fentry -> kprobe). User space keeps the one it chose, sets its target
 * (tracepoint or kernel function, also in modules such as openvswitch) and
 * loads one instance per probe; all instances share one ring and one set of
 * counters. Which argument holds the sk_buff is a load-time constant. */
#include "vnet_filter.bpf.h"
#include <bpf/bpf_tracing.h>

struct vnet_skb_config {
	__u32 probe_id;     /* copied into every event: the probe this instance is */
	__u32 wakeup_every; /* a wakeup check every N events per CPU (vnet_wakeup_flags); 0 or 1: each event */
	__u32 wakeup_bytes; /* ... forcing a wakeup when this much is unread in the ring; 0: always */
	__u32 area_chunks;  /* packet events into this CPU's area of vnet_areas, this many chunks (a power of two); 0: the ring */
	__u16 tp_skb_off;   /* classic tracepoint: offset of `skbaddr` in the record (tracefs format) */
	__u8 skb_arg;       /* 1-based position of the sk_buff argument; 0: the function has none */
	__u8 skb_deref;     /* that argument is a struct sk_buff ** (e.g. br_handle_frame) */
	__u8 task;          /* record pid and comm of the current task (socket probes) */
	__u8 dev_arg;       /* 1-based position of a struct net_device * naming the device; 0: skb->dev */
	__u8 aggregate;     /* enum vnet_agg bits: numbers in maps instead of (or besides) events */
	__u16 snaplen;      /* packet bytes copied after each event (vnet_snap.bpf.h); 0: none */
	struct vnet_filter filter;
};

const volatile struct vnet_skb_config skb_cfg = {};

/* `dev`, where the hook names the device itself: at net_dev_xmit a veth skb
 * already belongs to the peer, so skb->dev would name the wrong end.
 * `typed`: the verifier knows `skb` and `dev` by their BTF types (tp_btf and
 * fentry arguments): their fields are plain loads (VNET_KREAD). */
static __always_inline int vnet_skb_event(void *skb, struct net_device *dev, __u16 hook, bool typed)
{
	const volatile struct vnet_filter *f = &skb_cfg.filter;
	struct vnet_stats *st;
	struct vnet_event_more m;
	struct vnet_event *ev = &m.ev;
	struct vnet_cursor c;
	__u64 now;

	if (vnet_kernel_rejects_first(f, skb, typed)) {
		vnet_rejected_first(skb_cfg.probe_id);
		return 0;
	}
	st = vnet_stats_this_cpu(skb_cfg.probe_id);
	if (!st)
		return 0;
	st->v[VNET_STAT_SEEN]++;
	if (!typed && skb && skb_cfg.skb_deref && bpf_probe_read_kernel(&skb, sizeof(skb), skb) < 0)
		skb = NULL;
	if (skb && f->f_pcap && !vnet_pcap_kernel(skb, typed))
		goto filtered;
	__builtin_memset(&m, 0, sizeof(m)); /* after the rejects: they never touch the record */
	c.id = 0;
	if (skb)
		vnet_kernel_meta(skb, ev, typed);
	else
		ev->flags |= VNET_F_NO_SKB;
	if (dev) {
		ev->ifindex = VNET_KREAD(typed, dev, ifindex);
		ev->netns_cookie = vnet_dev_netns_cookie(dev, typed);
	}
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
	vnet_hdr_init(&ev->hdr, skb_cfg.probe_id, VNET_KIND_PACKET, vnet_stamp_kept(f, now));
	ev->hook = hook;
	if (skb_cfg.task)
		vnet_current_task(&m, typed);
	/* fentry programs may be preempted (the trampoline only disables migration): two
	 * could then write one CPU's area at once, so theirs go to the ring */
	vnet_deliver(st, ev, skb_cfg.task, skb_cfg.aggregate, skb_cfg.wakeup_every, skb_cfg.wakeup_bytes, skb, false, false,
		     skb_cfg.snaplen, typed, hook == VNET_HOOK_FENTRY ? 0 : skb_cfg.area_chunks);
	return 0;
filtered:
	vnet_filtered(st);
	return 0;
}

/* raw_tp (and fentry for an sk_buff ** argument) see the arguments as an array
 * of u64 with no types; `pos` is a read-only config value. Read through
 * bpf_probe_read_kernel: clang merges the cases into one load at a computed
 * ctx offset, which the verifier refuses as a direct ctx access but accepts as
 * a helper argument. */
static __always_inline void *vnet_arg(__u64 *args, __u8 pos)
{
	void *v = NULL;

	if (pos >= 1 && pos <= 6)
		bpf_probe_read_kernel(&v, sizeof(v), &args[pos - 1]);
	return v;
}

/* tp_btf and fentry: the argument at position `pos` as the verifier types it
 * from BTF (a struct sk_buff *, a struct net_device *), so that its fields are
 * plain loads. One load at a constant ctx offset per position, each in its own
 * asm statement: clang cannot merge them into a computed offset (which the
 * verifier refuses), and the verifier walks only the case `pos` (read-only
 * config) selects. */
#define VNET_CTX_LOAD(ctx, off) ({								\
	void *__v;										\
	asm volatile("%0 = *(u64 *)(%1 + " #off ")" : "=r"(__v) : "r"(ctx));			\
	__v;											\
})

static __always_inline void *vnet_btf_arg(__u64 *ctx, __u8 pos)
{
	switch (pos) {
	case 1: return VNET_CTX_LOAD(ctx, 0);
	case 2: return VNET_CTX_LOAD(ctx, 8);
	case 3: return VNET_CTX_LOAD(ctx, 16);
	case 4: return VNET_CTX_LOAD(ctx, 24);
	case 5: return VNET_CTX_LOAD(ctx, 32);
	case 6: return VNET_CTX_LOAD(ctx, 40);
	default: return NULL;
	}
}

/* kprobe: the same, through the _CORE register accessors. */
static __always_inline void *vnet_kprobe_arg(struct pt_regs *ctx, __u8 pos)
{
	switch (pos) {
	case 1: return (void *)PT_REGS_PARM1_CORE(ctx);
	case 2: return (void *)PT_REGS_PARM2_CORE(ctx);
	case 3: return (void *)PT_REGS_PARM3_CORE(ctx);
	case 4: return (void *)PT_REGS_PARM4_CORE(ctx);
	case 5: return (void *)PT_REGS_PARM5_CORE(ctx);
	default: return NULL;
	}
}

/* Tracepoints never pass an sk_buff ** (skb_deref is for kernel functions). */
SEC("tp_btf")
int vnet_tp_btf_skb(__u64 *ctx)
{
	return vnet_skb_event(vnet_btf_arg(ctx, skb_cfg.skb_arg), vnet_btf_arg(ctx, skb_cfg.dev_arg), VNET_HOOK_TP_BTF,
			      true);
}

SEC("raw_tp")
int vnet_raw_tp_skb(struct bpf_raw_tracepoint_args *ctx)
{
	return vnet_skb_event(vnet_arg(ctx->args, skb_cfg.skb_arg), vnet_arg(ctx->args, skb_cfg.dev_arg),
			      VNET_HOOK_RAW_TP, false);
}

/* Classic tracepoints record no device pointer: skb->dev names the device. */
SEC("tracepoint")
int vnet_tp_skb(void *ctx)
{
	void *skb = NULL;

	if (skb_cfg.skb_arg)
		bpf_probe_read_kernel(&skb, sizeof(skb), ctx + skb_cfg.tp_skb_off);
	return vnet_skb_event(skb, NULL, VNET_HOOK_TRACEPOINT, false);
}

/* An sk_buff ** argument (br_handle_frame) is no struct pointer to the verifier:
 * that probe reads it, and the sk_buff behind it, untyped. */
SEC("fentry")
int vnet_fentry_skb(__u64 *ctx)
{
	if (skb_cfg.skb_deref)
		return vnet_skb_event(vnet_arg(ctx, skb_cfg.skb_arg), vnet_arg(ctx, skb_cfg.dev_arg), VNET_HOOK_FENTRY,
				      false);
	return vnet_skb_event(vnet_btf_arg(ctx, skb_cfg.skb_arg), vnet_btf_arg(ctx, skb_cfg.dev_arg), VNET_HOOK_FENTRY,
			      true);
}

SEC("kprobe")
int vnet_kprobe_skb(struct pt_regs *ctx)
{
	return vnet_skb_event(vnet_kprobe_arg(ctx, skb_cfg.skb_arg), vnet_kprobe_arg(ctx, skb_cfg.dev_arg),
			      VNET_HOOK_KPROBE, false);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
