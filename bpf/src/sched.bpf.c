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

/* Watched processes, one bit per tgid (PID_MAX_LIMIT on 64-bit: 2^22), set by
 * user space before attach. Every context switch and wakeup of the host asks,
 * so it is an array lookup the verifier inlines, not a hash lookup (a helper
 * call and a hash): a thread nobody watches costs a few loads. */
#define VNET_SCHED_PID_LIMIT (1 << 22)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VNET_SCHED_PID_LIMIT / 64);
	__type(key, __u32);
	__type(value, __u64);
} vnet_sched_watch SEC(".maps");

/* tid -> when it became runnable, 0 once it ran (watched threads only) */
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

/* `typed`: the verifier knows the task by its BTF type (tp_btf): plain loads
 * (VNET_KREAD), where raw_tp reads through bpf_probe_read_kernel. */
static __always_inline long vnet_task_state(struct task_struct *t, bool typed)
{
	if (bpf_core_field_exists(t->__state))
		return VNET_KREAD(typed, t, __state);
	return VNET_KREAD(typed, (struct task_struct___pre_5_14 *)t, state);
}

static __always_inline bool vnet_watched(struct task_struct *t, bool typed)
{
	__u32 tgid, word;
	__u64 *bits;

	if (sched_cfg.watch_all)
		return true;
	tgid = VNET_KREAD(typed, t, tgid);
	word = tgid / 64;
	bits = bpf_map_lookup_elem(&vnet_sched_watch, &word);
	return bits && ((*bits >> (tgid % 64)) & 1);
}

/* The thread's entry is written in place once it has one: a lookup (which the
 * verifier inlines), where an update takes the bucket's lock and swaps nodes. */
static __always_inline void vnet_ready(struct task_struct *t, bool typed)
{
	__u64 now, *slot;
	__u32 tid;

	if (!t || !vnet_watched(t, typed))
		return;
	tid = VNET_KREAD(typed, t, pid);
	now = bpf_ktime_get_ns();
	slot = bpf_map_lookup_elem(&vnet_sched_ready, &tid);
	if (slot)
		*slot = now;
	else
		bpf_map_update_elem(&vnet_sched_ready, &tid, &now, BPF_ANY);
}

static __always_inline void vnet_task_comm(char *dst, struct task_struct *t, bool typed)
{
	if (typed) /* the kernel keeps it NUL-terminated and padded */
		__builtin_memcpy(dst, t->comm, sizeof(t->comm));
	else
		BPF_CORE_READ_STR_INTO((char (*)[16])dst, t, comm);
}

/* `next` got the CPU: if it waited runnable (vnet_ready), the event. */
static __always_inline void vnet_ran(struct task_struct *prev, struct task_struct *next, __u32 tid, __u64 since,
				     bool typed)
{
	struct vnet_sched_event ev = {};
	struct vnet_stats *st;
	void *ring;

	st = vnet_stats_this_cpu(sched_cfg.probe_id);
	if (!st)
		return;
	vnet_hdr_init(&ev.hdr, sched_cfg.probe_id, VNET_KIND_SCHED, bpf_ktime_get_ns());
	ev.runq_ns = ev.hdr.ts_ns - since;
	if (ev.runq_ns < sched_cfg.min_runq_ns)
		return;
	st->v[VNET_STAT_SEEN]++;
	ev.pid = tid;
	ev.tgid = VNET_KREAD(typed, next, tgid);
	vnet_task_comm(ev.comm, next, typed);
	if (prev) {
		ev.prev_pid = VNET_KREAD(typed, prev, pid);
		vnet_task_comm(ev.prev_comm, prev, typed);
	}
	ring = vnet_ring(ev.hdr.cpu);
	if (bpf_ringbuf_output(ring, &ev, sizeof(ev),
			       vnet_wakeup_flags(ring, st, sched_cfg.wakeup_every, sched_cfg.wakeup_bytes, sizeof(ev))) == 0)
		st->v[VNET_STAT_EMITTED]++;
	else
		st->v[VNET_STAT_LOST]++;
}

static __always_inline void vnet_switch(struct task_struct *prev, struct task_struct *next, bool typed)
{
	__u64 *since, when;
	__u32 tid;

	/* Preempted while runnable: it waits in the run queue from now. */
	if (prev && vnet_task_state(prev, typed) == VNET_TASK_RUNNING)
		vnet_ready(prev, typed);
	/* Only a watched thread can have waited (vnet_ready): the others stop here. */
	if (!next || !vnet_watched(next, typed))
		return;
	tid = VNET_KREAD(typed, next, pid);
	since = bpf_map_lookup_elem(&vnet_sched_ready, &tid);
	if (!since || !*since)
		return;
	when = *since;
	*since = 0; /* used: kept for the next wakeup to write in place, not deleted */
	vnet_ran(prev, next, tid, when, typed);
}

SEC("tp_btf/sched_wakeup")
int vnet_tp_btf_sched_wakeup(__u64 *ctx)
{
	vnet_ready((struct task_struct *)ctx[0], true);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int vnet_tp_btf_sched_wakeup_new(__u64 *ctx)
{
	vnet_ready((struct task_struct *)ctx[0], true);
	return 0;
}

SEC("tp_btf/sched_switch")
int vnet_tp_btf_sched_switch(__u64 *ctx)
{
	vnet_switch((struct task_struct *)ctx[1], (struct task_struct *)ctx[2], true);
	return 0;
}

SEC("raw_tp/sched_wakeup")
int vnet_raw_tp_sched_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_ready((struct task_struct *)ctx->args[0], false);
	return 0;
}

SEC("raw_tp/sched_wakeup_new")
int vnet_raw_tp_sched_wakeup_new(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_ready((struct task_struct *)ctx->args[0], false);
	return 0;
}

SEC("raw_tp/sched_switch")
int vnet_raw_tp_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
	vnet_switch((struct task_struct *)ctx->args[1], (struct task_struct *)ctx->args[2], false);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
