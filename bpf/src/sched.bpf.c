// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Scheduler probe: run-queue wait of chosen threads (vCPU threads, vhost and
 * netback workers, applications): the time from becoming runnable (wakeup, or
 * preemption while still runnable) to getting a CPU. Twins: tp_btf and raw_tp;
 * the loader keeps one set. */
#include "vnet_common.bpf.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define VNET_TASK_RUNNING 0

struct vnet_sched_config {
	__u32 probe_id;
	__u32 wakeup_every; /* a wakeup check every N events per CPU (vnet_wakeup_flags); 0 or 1: each event */
	__u32 wakeup_bytes; /* ... forcing a wakeup when this much is unread in the ring; 0: always */
	__u64 min_runq_ns;  /* report only waits at least this long */
	__u8 watch_all;     /* every thread, not only the tgids in vnet_sched_watch */
};

const volatile struct vnet_sched_config sched_cfg = {};

/* tgids to watch, filled by user space before attach */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} vnet_sched_watch SEC(".maps");

/* tid -> when it became runnable */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} vnet_sched_ready SEC(".maps");

/* task_struct.state became __state in 5.14 ("sched: Change task_struct::state"). */
struct task_struct___pre_5_14 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline long vnet_task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre_5_14 *)t, state);
}

static __always_inline bool vnet_watched(struct task_struct *t)
{
	__u32 tgid;

	if (sched_cfg.watch_all)
		return true;
	tgid = BPF_CORE_READ(t, tgid);
	return bpf_map_lookup_elem(&vnet_sched_watch, &tgid) != NULL;
}

static __always_inline void vnet_ready(struct task_struct *t)
{
	__u32 tid;
	__u64 now;

	if (!t || !vnet_watched(t))
		return;
	tid = BPF_CORE_READ(t, pid);
	now = bpf_ktime_get_ns();
	bpf_map_update_elem(&vnet_sched_ready, &tid, &now, BPF_ANY);
}

static __always_inline void vnet_switch(struct task_struct *prev, struct task_struct *next)
{
	struct vnet_sched_event ev = {};
	struct vnet_stats *st;
	__u64 *since;
	__u32 tid;

	/* Preempted while runnable: it waits in the run queue from now. */
	if (prev && vnet_task_state(prev) == VNET_TASK_RUNNING)
		vnet_ready(prev);
	if (!next)
		return;
	tid = BPF_CORE_READ(next, pid);
	since = bpf_map_lookup_elem(&vnet_sched_ready, &tid);
	if (!since)
		return;
	st = vnet_stats_this_cpu(sched_cfg.probe_id);
	if (!st)
		return;
	vnet_hdr_init(&ev.hdr, sched_cfg.probe_id, VNET_KIND_SCHED);
	ev.runq_ns = ev.hdr.ts_ns - *since;
	bpf_map_delete_elem(&vnet_sched_ready, &tid);
	if (ev.runq_ns < sched_cfg.min_runq_ns)
		return;
	st->v[VNET_STAT_SEEN]++;
	ev.pid = tid;
	ev.tgid = BPF_CORE_READ(next, tgid);
	BPF_CORE_READ_STR_INTO(&ev.comm, next, comm);
	if (prev) {
		ev.prev_pid = BPF_CORE_READ(prev, pid);
		BPF_CORE_READ_STR_INTO(&ev.prev_comm, prev, comm);
	}
	if (bpf_ringbuf_output(&vnet_events, &ev, sizeof(ev),
			       vnet_wakeup_flags(st, sched_cfg.wakeup_every, sched_cfg.wakeup_bytes, sizeof(ev))) == 0)
		st->v[VNET_STAT_EMITTED]++;
	else
		st->v[VNET_STAT_LOST]++;
}

SEC("tp_btf/sched_wakeup")
int vnet_tp_btf_sched_wakeup(__u64 *ctx)
{
	vnet_ready((struct task_struct *)ctx[0]);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int vnet_tp_btf_sched_wakeup_new(__u64 *ctx)
{
	vnet_ready((struct task_struct *)ctx[0]);
	return 0;
}

SEC("tp_btf/sched_switch")
int vnet_tp_btf_sched_switch(__u64 *ctx)
{
	vnet_switch((struct task_struct *)ctx[1], (struct task_struct *)ctx[2]);
	return 0;
}

SEC("raw_tp/sched_wakeup")
int vnet_raw_tp_sched_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_ready((struct task_struct *)ctx->args[0]);
	return 0;
}

SEC("raw_tp/sched_wakeup_new")
int vnet_raw_tp_sched_wakeup_new(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_ready((struct task_struct *)ctx->args[0]);
	return 0;
}

SEC("raw_tp/sched_switch")
int vnet_raw_tp_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_switch((struct task_struct *)ctx->args[1], (struct task_struct *)ctx->args[2]);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
