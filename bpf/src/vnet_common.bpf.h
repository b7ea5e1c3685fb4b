/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Maps and helpers every vnet program shares: the event ring, the loss
 * counters, and the "every type of the ABI is in BTF" anchor. */
#ifndef VNET_COMMON_BPF_H
#define VNET_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "vnet_event.h"

#ifndef VNET_RINGBUF_BYTES
#define VNET_RINGBUF_BYTES (8 << 20)
#endif

struct vnet_stats {
	__u64 v[VNET_STAT_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, VNET_RINGBUF_BYTES); /* user space may resize before load */
} vnet_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vnet_stats);
} vnet_stats SEC(".maps");

/* Types user space decodes but no program names in a signature: this anchor
 * puts them into BTF, which is where Python reads the layout from. */
struct vnet_abi {
	struct vnet_event event;
	struct vnet_sched_event sched;
	enum vnet_event_kind kind;
	enum vnet_hook hook;
	enum vnet_event_flag flag;
	enum vnet_stat stat;
};
struct vnet_abi *vnet_abi_anchor __attribute__((unused));

static __always_inline struct vnet_stats *vnet_stats_this_cpu(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&vnet_stats, &zero);
}

/* Copy one event into the ring; a full ring is counted, never silent.
 * Waking the reader per record caps throughput near 1 M/s, so wake only every
 * `wakeup_every` events per CPU; the reader also drains on a 100 ms timer. */
static __always_inline void vnet_hdr_init(struct vnet_event_hdr *hdr, __u32 probe_id, __u16 kind)
{
	hdr->ts_ns = bpf_ktime_get_ns();
	hdr->probe_id = probe_id;
	hdr->kind = kind;
	hdr->cpu = bpf_get_smp_processor_id();
}

static __always_inline void vnet_emit(struct vnet_stats *st, struct vnet_event *ev, __u32 wakeup_every)
{
	__u64 flags = 0;

	if (wakeup_every > 1 && (st->v[VNET_STAT_EMITTED] % wakeup_every) != 0)
		flags = BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(&vnet_events, ev, sizeof(*ev), flags) == 0)
		st->v[VNET_STAT_EMITTED]++;
	else
		st->v[VNET_STAT_LOST]++;
}

#endif /* VNET_COMMON_BPF_H */
