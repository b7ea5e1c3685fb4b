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
	__u32 wakeup_every; /* wake the reader every N events per CPU; 0 or 1: each event */
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
 * already belongs to the peer, so skb->dev would name the wrong end. */
static __always_inline int vnet_skb_event(void *skb, struct net_device *dev, __u16 hook)
{
	struct vnet_stats *st = vnet_stats_this_cpu(skb_cfg.probe_id);
	struct vnet_event ev = {};

	if (!st)
		return 0;
	st->v[VNET_STAT_SEEN]++;
	vnet_hdr_init(&ev.hdr, skb_cfg.probe_id, VNET_KIND_PACKET);
	ev.hook = hook;
	if (skb && skb_cfg.skb_deref && bpf_probe_read_kernel(&skb, sizeof(skb), skb) < 0)
		skb = NULL;
	if (skb && skb_cfg.filter.f_pcap && !vnet_pcap_kernel(skb)) {
		st->v[VNET_STAT_FILTERED]++;
		return 0;
	}
	if (skb)
		vnet_parse_kernel_skb(skb, &ev, !skb_cfg.filter.f_outer);
	else
		ev.flags |= VNET_F_NO_SKB;
	if (dev) {
		ev.ifindex = BPF_CORE_READ(dev, ifindex);
		ev.netns_cookie = vnet_dev_netns_cookie(dev);
	}
	if (skb_cfg.task) {
		ev.pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	}
	vnet_deliver(st, &ev, &skb_cfg.filter, skb_cfg.aggregate, skb_cfg.wakeup_every, skb, false, false,
		     skb_cfg.snaplen);
	return 0;
}

/* fentry, tp_btf and raw_tp see the arguments as an array of u64; `pos` is a
 * read-only config value. Read through bpf_probe_read_kernel: clang merges
 * the cases into one load at a computed ctx offset, which the verifier refuses
 * as a direct ctx access but accepts as a helper argument. */
static __always_inline void *vnet_arg(__u64 *args, __u8 pos)
{
	void *v = NULL;

	if (pos >= 1 && pos <= 6)
		bpf_probe_read_kernel(&v, sizeof(v), &args[pos - 1]);
	return v;
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

SEC("tp_btf")
int vnet_tp_btf_skb(__u64 *ctx)
{
	return vnet_skb_event(vnet_arg(ctx, skb_cfg.skb_arg), vnet_arg(ctx, skb_cfg.dev_arg), VNET_HOOK_TP_BTF);
}

SEC("raw_tp")
int vnet_raw_tp_skb(struct bpf_raw_tracepoint_args *ctx)
{
	return vnet_skb_event(vnet_arg(ctx->args, skb_cfg.skb_arg), vnet_arg(ctx->args, skb_cfg.dev_arg),
			      VNET_HOOK_RAW_TP);
}

/* Classic tracepoints record no device pointer: skb->dev names the device. */
SEC("tracepoint")
int vnet_tp_skb(void *ctx)
{
	void *skb = NULL;

	if (skb_cfg.skb_arg)
		bpf_probe_read_kernel(&skb, sizeof(skb), ctx + skb_cfg.tp_skb_off);
	return vnet_skb_event(skb, NULL, VNET_HOOK_TRACEPOINT);
}

SEC("fentry")
int vnet_fentry_skb(__u64 *ctx)
{
	return vnet_skb_event(vnet_arg(ctx, skb_cfg.skb_arg), vnet_arg(ctx, skb_cfg.dev_arg), VNET_HOOK_FENTRY);
}

SEC("kprobe")
int vnet_kprobe_skb(struct pt_regs *ctx)
{
	return vnet_skb_event(vnet_kprobe_arg(ctx, skb_cfg.skb_arg), vnet_kprobe_arg(ctx, skb_cfg.dev_arg),
			      VNET_HOOK_KPROBE);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
