/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Maps and helpers every vnet program shares: the event ring, the loss
 * counters, and the "every type of the ABI is in BTF" anchor. */
#ifndef VNET_COMMON_BPF_H
#define VNET_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "vnet_event.h"

#ifndef VNET_RINGBUF_BYTES
#define VNET_RINGBUF_BYTES (8 << 20)
#endif

/* Whether a kernel sk_buff holds a VLAN tag outside its bytes (hardware-
 * accelerated VLAN: vlan_proto, vlan_tci), as the kernel's skb_vlan_tag_present.
 * Linux 6.1 and earlier say so with the bit vlan_present, and clearing the tag
 * (__vlan_hwaccel_clear_tag: the tag pushed into the packet when the device
 * cannot insert it, or taken by the VLAN device on receive) clears only that bit,
 * leaving vlan_proto and vlan_tci as they were. Later kernels have no bit and
 * clear both fields ("net: remove skb->vlan_present"): a tag is there while
 * vlan_proto is set. */
struct sk_buff___vlan_present_bit {
	__u8 vlan_present : 1;
} __attribute__((preserve_access_index));

/* A field of a kernel object (CO-RE relocated): a plain load where the verifier
 * knows the pointer's BTF type (tp_btf and fentry arguments, and the pointers
 * read through them: skb->dev, dev->nd_net.net), else one bpf_probe_read_kernel
 * (raw_tp, classic tracepoint and kprobe programs see an untyped address).
 * `typed` is a literal at every call site: the compiler keeps one of the two. */
#define VNET_KREAD(typed, p, field) ((typed) ? (p)->field : BPF_CORE_READ(p, field))

static __always_inline bool vnet_skb_vlan_present(struct sk_buff *skb, bool typed)
{
	if (bpf_core_field_exists(struct sk_buff___vlan_present_bit, vlan_present))
		return typed ? BPF_CORE_READ_BITFIELD((struct sk_buff___vlan_present_bit *)skb, vlan_present)
			     : BPF_CORE_READ_BITFIELD_PROBED((struct sk_buff___vlan_present_bit *)skb, vlan_present);
	return VNET_KREAD(typed, skb, vlan_proto) != 0;
}

struct vnet_stats {
	__u64 v[VNET_STAT_MAX];
};

struct vnet_ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, VNET_RINGBUF_BYTES); /* user space may resize before load */
};

/* The ring, or the first of several: */
struct vnet_ring vnet_events SEC(".maps");

/* ... where user space gives each CPU its own (or a CPU a share of one): the
 * ring of CPU i at slot i. One ring's lock, taken by every CPU that emits at
 * once, costs more than the rest of a program on a busy switch. An empty slot
 * (user space made no more rings, or left this CPU out) means vnet_events.
 * The slots' type is a page-sized ring: libbpf makes one to create the array
 * with (and frees it), and the kernel does not compare a ring's size with it. */
struct vnet_ring_slot {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1); /* user space: one slot per possible CPU */
	__type(key, __u32);
	__array(values, struct vnet_ring_slot);
} vnet_rings SEC(".maps");

enum vnet_limit {
	VNET_MAX_PROBES = 128, /* object instances (probe_ids) in one trace */
};

/* Per CPU and per probe: each instance counts at its probe_id, so a trace can
 * say which probe saw, emitted, lost or filtered how much. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VNET_MAX_PROBES);
	__type(key, __u32);
	__type(value, struct vnet_stats);
} vnet_stats SEC(".maps");

/* Per-CPU event areas (enum vnet_area): user space sizes both arrays (max_entries:
 * online CPUs * area_chunks chunks, one vnet_area_pos per possible CPU), says
 * where each CPU's area starts (or that it has none) and maps them. */
struct vnet_area_chunk {
	__u64 w[VNET_AREA_CHUNK / 8];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct vnet_area_chunk);
} vnet_areas SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct vnet_area_pos);
} vnet_area_pos SEC(".maps");

/* Aggregation mode: numbers kept in the kernel instead of per-packet events.
 * A "point" is probe_id * VNET_AGG_HOOKS + hook, so a device probe's ingress
 * and egress count apart. */
enum vnet_agg {
	VNET_AGG_ON = 1,        /* config `aggregate`: keep numbers in maps */
	VNET_AGG_AND_EVENTS = 2, /* ... and still emit events (to check the numbers against them) */
	VNET_AGG_HOOKS = 8,     /* points per probe: room for every enum vnet_hook value */
	VNET_AGG_POINT_BITS = 10, /* a point fits in this many bits */
	VNET_AGG_POINTS = 1 << VNET_AGG_POINT_BITS, /* probes * hooks */
	VNET_AGG_WAYS = 4,      /* packets per set of vnet_agg_last */
	VNET_AGG_SETS = 16384,  /* sets of vnet_agg_last: room for 65536 packets between hooks */
};

/* Per point and per CPU (user space sums the CPUs). */
struct vnet_agg_point {
	__u64 packets;
	__u64 bytes;
	__u64 first;     /* packets with no earlier hop to pair with: where they enter the traced path (or have
			  * no pkt_id), else a hop lost (table conflict, see vnet_agg_last): never silent */
	__u64 hist_lost; /* pairs not counted in a histogram because vnet_agg_hist was full */
};

/* Where each packet was last seen, for the time to its next point. Every
 * packet is new to the table, so this is no hash map (an LRU hash insert per
 * packet, with its locks and list bookkeeping, cost more than the rest of the
 * program): a plain array of 4-way sets indexed by bits of pkt_id, written
 * without locks. A new packet goes first in its set and pushes the set's
 * oldest entry out (vnet_aggregate); its next hop finds it on any CPU: the
 * table is shared, not per CPU, so a packet that moves to another CPU (RPS, a
 * vhost or backlog thread) is still paired. A hop whose entry was pushed out
 * meanwhile (4 newer packets in its set) counts as `first` at its point, as a
 * packet entering the traced path does: never silently. Lock-free writes race
 * only when two CPUs write one set at once: one entry may be lost (counted the
 * same way), and a read torn by a concurrent write never matches, since `tag`
 * binds the pkt_id to `when` (tag ^ when == pkt_id). */
struct vnet_agg_way {
	__u64 tag;   /* pkt_id ^ when */
	__u64 when;  /* (ts_ns << VNET_AGG_POINT_BITS) | point; 0: empty */
};

struct vnet_agg_set {
	struct vnet_agg_way way[VNET_AGG_WAYS];
};

/* A latency histogram cell: packets that went from one point to the next
 * in [2^bucket, 2^(bucket+1)) ns. */
struct vnet_agg_key {
	__u16 from;
	__u16 to;
	__u32 bucket;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VNET_AGG_POINTS);
	__type(key, __u32);
	__type(value, struct vnet_agg_point);
} vnet_agg_points SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VNET_AGG_SETS); /* user space makes it 1 set when not aggregating */
	__type(key, __u32);
	__type(value, struct vnet_agg_set);
} vnet_agg_last SEC(".maps");

/* Per CPU: no atomic add on a cache line every CPU writes; user space sums. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct vnet_agg_key);
	__type(value, __u64);
} vnet_agg_hist SEC(".maps");

/* Types user space decodes but no program names in a signature: this anchor
 * puts them into BTF, which is where Python reads the layout from. */
struct vnet_abi {
	struct vnet_event event;
	struct vnet_event_more event_more;
	struct vnet_agg_key agg_key;
	struct vnet_agg_set agg_set;
	enum vnet_agg agg;
	struct vnet_sched_event sched;
	enum vnet_event_kind kind;
	enum vnet_hook hook;
	enum vnet_event_flag flag;
	enum vnet_stat stat;
	enum vnet_limit limit;
	enum vnet_snap snap;
	enum vnet_pcap pcap;
	enum vnet_filter_on filter_on;
	enum vnet_plain_test plain_test;
	enum vnet_ring_line ring_line;
	struct vnet_area_pos area_pos;
	enum vnet_area area;
};
struct vnet_abi *vnet_abi_anchor __attribute__((unused));

/* A probe_id past the table (user space keeps within it) counts at 0: never nowhere. */
static __always_inline struct vnet_stats *vnet_stats_this_cpu(__u32 probe_id)
{
	struct vnet_stats *st = bpf_map_lookup_elem(&vnet_stats, &probe_id);
	__u32 zero = 0;

	return st ? st : bpf_map_lookup_elem(&vnet_stats, &zero);
}

static __always_inline __u32 vnet_log2(__u64 v)
{
	__u32 r = 0;

	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) r += 1;
	return r;
}

/* Count the packet at its point, and the time since its previous point into
 * that segment's log2 histogram; no event is emitted. A packet found in its
 * set is updated in place; a new one goes first in the set, the others move
 * down one way and the last (the longest in the table) drops out. No way is
 * chosen by a computed index: constant offsets only, so that the verifier does
 * not tell paths apart by it (Linux 6.1's 1M-instruction limit). */
static __always_inline void vnet_aggregate(struct vnet_event *ev)
{
	__u32 point = (ev->hdr.probe_id * VNET_AGG_HOOKS + (ev->hook & (VNET_AGG_HOOKS - 1))) & (VNET_AGG_POINTS - 1);
	struct vnet_agg_point *pt = bpf_map_lookup_elem(&vnet_agg_points, &point);
	__u64 id = ev->pkt_id, when = (ev->hdr.ts_ns << VNET_AGG_POINT_BITS) | point, prev = 0, ns;
	__u32 set_idx = (__u32)(id >> 32) & (VNET_AGG_SETS - 1); /* not the low bits: --sample keeps id % N == 0 */
	struct vnet_agg_set *set;
	bool found = false;
	__u32 from;

	if (!pt)
		return;
	pt->packets++;
	pt->bytes += ev->len;
	set = bpf_map_lookup_elem(&vnet_agg_last, &set_idx);
	if (!id || (ev->flags & VNET_F_NO_SKB) || !set) { /* no packet to follow */
		pt->first++;
		return;
	}
#pragma unroll
	for (int i = 0; i < VNET_AGG_WAYS; i++) {
		__u64 seen = set->way[i].when;

		if (seen && (set->way[i].tag ^ seen) == id) {
			set->way[i].when = when;
			set->way[i].tag = id ^ when;
			prev = seen;
			found = true;
			break;
		}
	}
	if (!found) {
#pragma unroll
		for (int i = VNET_AGG_WAYS - 1; i > 0; i--)
			set->way[i] = set->way[i - 1];
		set->way[0].when = when;
		set->way[0].tag = id ^ when;
		pt->first++;
		return;
	}
	from = prev & (VNET_AGG_POINTS - 1);
	/* both times mod 2^54 ns (208 days): the difference is exact */
	ns = ((when >> VNET_AGG_POINT_BITS) - (prev >> VNET_AGG_POINT_BITS)) & ((1ULL << (64 - VNET_AGG_POINT_BITS)) - 1);
	if (from != point && !(ns >> (63 - VNET_AGG_POINT_BITS))) { /* not the same point, not back in time */
		struct vnet_agg_key key = { .from = from, .to = point, .bucket = vnet_log2(ns) };
		__u64 one = 1, *count = bpf_map_lookup_elem(&vnet_agg_hist, &key);

		if (!count && bpf_map_update_elem(&vnet_agg_hist, &key, &one, BPF_NOEXIST) == 0)
			return;
		if (!count) /* another program made the cell first, or the map is full */
			count = bpf_map_lookup_elem(&vnet_agg_hist, &key);
		if (count)
			(*count)++;
		else
			pt->hist_lost++;
	}
}

/* The current task's pid (tgid) and name. Typed hooks (tp_btf, fentry) load both
 * from the task itself, the name as two words (the kernel keeps it NUL-terminated):
 * every helper call is a call and a return thunk on mitigated CPUs, and the name
 * helper also copies and pads the string (~40 ns of a drop event). */
static __always_inline void vnet_current_task(struct vnet_event_more *m, bool typed)
{
	if (typed) {
		struct task_struct *t = bpf_get_current_task_btf();

		m->pid = t->tgid;
		__builtin_memcpy(m->comm, t->comm, sizeof(m->comm));
	} else {
		m->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(m->comm, sizeof(m->comm));
	}
}

static __always_inline void vnet_hdr_init(struct vnet_event_hdr *hdr, __u32 probe_id, __u16 kind, __u64 now)
{
	hdr->ts_ns = now;
	hdr->probe_id = probe_id;
	hdr->kind = kind;
	hdr->cpu = bpf_get_smp_processor_id();
}

/* The ring this CPU writes to (vnet_rings). */
static __always_inline void *vnet_ring(__u32 cpu)
{
	void *ring = bpf_map_lookup_elem(&vnet_rings, &cpu);

	return ring ? ring : (void *)&vnet_events;
}

/* Whether committing a record to `ring` wakes the reader. A wakeup per record caps the
 * ring near 1 M records/s and costs the reader a wakeup per record, and every
 * reader drains on a timer anyway (20 ms for the recorder and the agent, at
 * most 100 ms when printing), so records go without one (BPF_RB_NO_WAKEUP)
 * except at a check, every `wakeup_every`-th record per CPU and probe, the
 * first one included:
 *   - the unread data (bpf_ringbuf_query) has just passed `wakeup_bytes`, i.e.
 *     is in [wakeup_bytes, wakeup_bytes + wakeup_every records): force a wakeup
 *     (BPF_RB_FORCE_WAKEUP), so that the reader drains before the ring fills,
 *     sooner than its timer. Only as the fill crosses the mark: a forced wakeup
 *     is an irq_work, on a VM a self-IPI of several us, and a reader that
 *     lags far behind (or is stopped) must not make every check pay one;
 *   - else the kernel's adaptive wakeup (flags 0): it wakes the reader only if
 *     the reader has read everything before this record, i.e. waits idle: so
 *     the first event of a trace reaches `vnet trace -c 1` without its timer.
 * wakeup_bytes 0: a forced wakeup at every check; wakeup_every 0 or 1: every
 * record is a check. `size`: the record's bytes in the ring. (The kernel
 * selftests' ring-buffer benchmark wakes its reader the same way: when the
 * unread data passes a size.) */
static __always_inline __u64 vnet_wakeup_flags(void *ring, struct vnet_stats *st, __u32 wakeup_every,
					       __u32 wakeup_bytes, __u32 size)
{
	__u64 avail, window = (wakeup_every > 1 ? wakeup_every : 1) * (__u64)(size + 8);

	if (wakeup_every > 1 && (st->v[VNET_STAT_EMITTED] % wakeup_every) != 0)
		return BPF_RB_NO_WAKEUP;
	if (!wakeup_bytes)
		return BPF_RB_FORCE_WAKEUP;
	avail = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
	if (avail >= wakeup_bytes && avail - wakeup_bytes < window)
		return BPF_RB_FORCE_WAKEUP;
	return 0;
}

/* The reader asked to be woken: an empty record discarded in this CPU's ring
 * wakes whoever waits on the rings (it skips discarded records). */
static __always_inline void vnet_area_doorbell(__u32 cpu)
{
	void *d = bpf_ringbuf_reserve(vnet_ring(cpu), 8, 0);

	if (d)
		bpf_ringbuf_discard(d, BPF_RB_FORCE_WAKEUP);
}

/* Write one event into this CPU's area, in the ring's framing (an 8-byte header,
 * the record, padding to 8 bytes). No lock and no atomic: only this CPU writes
 * its area, and `busy` tells a program that interrupted another one on this CPU
 * (the only way two meet here: the programs that write areas cannot be
 * preempted) to use the ring instead: false then, else the event is written or
 * counted lost (a full area). The wakeups follow vnet_wakeup_flags: at a check,
 * a doorbell when the unread bytes just passed `wakeup_bytes`, or when the
 * reader had read everything (it may be waiting). */
static __always_inline bool vnet_area_emit(struct vnet_stats *st, const struct vnet_event *ev, __u32 size,
					   __u32 chunks, __u32 wakeup_every, __u32 wakeup_bytes)
{
	__u32 cpu = ev->hdr.cpu, idx;
	struct vnet_area_pos *p = bpf_map_lookup_elem(&vnet_area_pos, &cpu);
	__u64 len = (size + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL, pos, cons, within, skip = 0, unread;
	__u64 emitted = st->v[VNET_STAT_EMITTED];
	const __u64 *src = (const __u64 *)ev;
	struct vnet_area_chunk *a;
	bool bell = false;

	asm volatile("" :: "r"(src) : "memory"); /* the record stays in memory: no copy of it in registers */
	if (!p || p->busy)
		return false;
	p->busy = VNET_AREA_BUSY;
	asm volatile("" ::: "memory");
	pos = p->prod;
	cons = *(volatile __u64 *)&p->cons;
	within = pos & (VNET_AREA_CHUNK - 1);
	if (within + len > VNET_AREA_CHUNK)
		skip = VNET_AREA_CHUNK - within;
	if (pos + skip + len - cons > (__u64)chunks * VNET_AREA_CHUNK)
		goto lost;
	if (skip) { /* the rest of this chunk: a discarded record */
		idx = p->first_chunk + ((pos / VNET_AREA_CHUNK) & (chunks - 1));
		a = bpf_map_lookup_elem(&vnet_areas, &idx);
		if (!a)
			goto lost;
		a->w[(within / 8) & (VNET_AREA_CHUNK / 8 - 1)] = (skip - BPF_RINGBUF_HDR_SZ) | BPF_RINGBUF_DISCARD_BIT;
		within = 0;
	}
	idx = p->first_chunk + (((pos + skip) / VNET_AREA_CHUNK) & (chunks - 1));
	a = bpf_map_lookup_elem(&vnet_areas, &idx);
	if (!a)
		goto lost;
	within /= 8;
	asm volatile("" : "+r"(within)); /* a bound clang cannot drop, for the verifier: never true */
	if (within > (VNET_AREA_CHUNK - len) / 8)
		goto lost;
	a->w[within] = size;
	if (size == sizeof(struct vnet_event)) {
#pragma unroll
		for (int i = 0; i < sizeof(struct vnet_event) / 8; i++)
			*(volatile __u64 *)&a->w[within + 1 + i] = *(volatile const __u64 *)&src[i];
	} else {
#pragma unroll
		for (int i = 0; i < sizeof(struct vnet_event_more) / 8; i++)
			*(volatile __u64 *)&a->w[within + 1 + i] = *(volatile const __u64 *)&src[i];
	}
	/* x86 keeps stores in order: the record is there before prod says so (user space
	 * turns the areas on for x86 only) */
	asm volatile("" ::: "memory");
	*(volatile __u64 *)&p->prod = pos + skip + len;
	st->v[VNET_STAT_EMITTED]++;
	if (wakeup_every <= 1 || emitted % wakeup_every == 0) {
		unread = pos + skip + len - cons;
		bell = !wakeup_bytes || cons == pos ||
		       (unread >= wakeup_bytes && unread - wakeup_bytes < (wakeup_every > 1 ? wakeup_every : 1) * len);
	}
	asm volatile("" ::: "memory");
	p->busy = 0;
	if (bell)
		vnet_area_doorbell(cpu);
	return true;
lost:
	st->v[VNET_STAT_LOST]++;
	asm volatile("" ::: "memory");
	p->busy = 0;
	return true;
}

/* Copy one event into this CPU's area (area_chunks, a load-time constant: 0 when
 * there are none) or, where it cannot go there, the ring: the struct
 * vnet_event_more that `ev` heads where `more` (a load-time constant), else the
 * event alone; a full area or ring is counted, never silent. */
static __always_inline void vnet_emit(struct vnet_stats *st, struct vnet_event *ev, bool more,
				      __u32 wakeup_every, __u32 wakeup_bytes, __u32 area_chunks)
{
	__u32 size = more ? sizeof(struct vnet_event_more) : sizeof(*ev);
	void *ring;

	ev->hdr.kind = more ? VNET_KIND_PACKET_MORE : VNET_KIND_PACKET;
	if (area_chunks && vnet_area_emit(st, ev, size, area_chunks, wakeup_every, wakeup_bytes))
		return;
	ring = vnet_ring(ev->hdr.cpu);
	if (bpf_ringbuf_output(ring, ev, size, vnet_wakeup_flags(ring, st, wakeup_every, wakeup_bytes, size)) == 0)
		st->v[VNET_STAT_EMITTED]++;
	else
		st->v[VNET_STAT_LOST]++;
}

#endif /* VNET_COMMON_BPF_H */
