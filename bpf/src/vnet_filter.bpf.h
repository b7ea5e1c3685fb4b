/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Which packets make events. The same struct sits in every packet program's
 * read-only config, so the verifier sees constants and prunes unused tests;
 * a packet that does not match costs the header parse and these compares (a
 * plain IP packet, at tc and where kernel hooks read the packet in place, the
 * compares alone): no payload read, no time stamp, no event. */
#ifndef VNET_FILTER_BPF_H
#define VNET_FILTER_BPF_H

#include "vnet_packet.bpf.h"
#include "vnet_snap.bpf.h"

struct vnet_filter {
	__u8 f_on;         /* enum vnet_filter_on; 0: no criterion */
	__u8 f_l4_proto;   /* IPPROTO_*; 0: any */
	__u8 f_family;     /* 4 or 6; 0: any */
	__u8 f_src_bits;   /* prefix lengths; 0: any address */
	__u8 f_dst_bits;
	__u8 f_host_bits;  /* source or destination */
	__u16 f_sport;     /* 0: any */
	__u16 f_dport;
	__u16 f_port;      /* source or destination */
	__u8 f_outer;      /* VXLAN: report, identify and filter the outer packet, not the inner one */
	__u8 f_pcap;       /* run the tcpdump expression spliced into the vnet_pcap_* stubs, before any parsing */
	__u32 f_len_min;   /* skb->len bounds; f_len_max 0: no upper bound */
	__u32 f_len_max;
	__u32 f_sample;    /* keep packets whose pkt_id % f_sample == 0 (the same at every hook and host); 0/1: all */
	__u32 f_ifindex[4]; /* the packet's device is one of these (0: unused slot); all 0: any */
	__u64 f_netns;     /* netns cookie of the packet's device; 0: any (tc hooks, which report 0, pass) */
	__u8 f_src[16];    /* IPv4 in the first 4 bytes */
	__u8 f_dst[16];
	__u8 f_host[16];
	/* Sets, tested by step 2a alone (vnet/tcpdump/prejudge.py derives them from an expression:
	 * `tcp or udp`, `port 80 or port 443`, `host A or net B`, `not port 22`, `not net C`); 0:
	 * an unused slot, all 0: any */
	__u16 f_ports[4];  /* the source or destination port is one of these */
	__u8 f_l4_protos[4];
	__u32 f_hosts_v4[4]; /* an IPv4 packet whose source or destination is one of these (network order) */
	__u8 f_hosts_v6[64] __attribute__((aligned(8))); /* the same for IPv6: 4 addresses of 16 bytes */
	__u16 f_not_ports[4]; /* a TCP or UDP packet to or from one of these ports is left out (`not port 22`) */
	__u32 f_not_hosts_v4[4]; /* an IPv4 packet from or to one of these is left out (`not host 10.0.0.5`) */
	/* ... each IPv4 slot's mask (network order; 0: the whole address): prefixes, `net 10.0.0.0/8` */
	__u32 f_hosts_v4_mask[4];
	__u32 f_not_hosts_v4_mask[4];
};

static __always_inline bool vnet_prefix_match(const __u8 *addr, const volatile __u8 *prefix, __u32 bits)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u32 take = bits > 8 ? 8 : bits;
		__u8 mask = (__u8)(0xff00 >> take);

		if (take == 0)
			return true;
		if ((addr[i] ^ prefix[i]) & mask)
			return false;
		bits -= take;
	}
	return true;
}

/* A set's unused slots are 0 and tested after its first: read-only config, so
 * the verifier knows them and drops their compares. One definition per type. */
#define VNET_DEFINE_SET_TEST(name, type)									\
	static __always_inline bool name(const volatile type *set, type v)				\
	{												\
		type s1 = set[1], s2 = set[2], s3 = set[3];						\
													\
		return v == set[0] || (s1 && v == s1) || (s2 && v == s2) || (s3 && v == s3);		\
	}

VNET_DEFINE_SET_TEST(vnet_port_in, __u16)
VNET_DEFINE_SET_TEST(vnet_proto_in, __u8)

/* Either of a packet's two values (its ports) is in `set`; IPv4 addresses: vnet_either_v4_in. */
#define VNET_EITHER_IN(test, set, a, b) (test((set), (a)) || test((set), (b)))

/* IPv4 prefixes: slot i is in use where set[i] is not 0, and holds the addresses `v` with
 * v & mask[i] == set[i] (both as the 4 bytes load from the packet; mask 0: the whole address). */
static __always_inline bool vnet_v4_slot(const volatile __u32 *set, const volatile __u32 *mask, int i, __u32 v)
{
	__u32 m = mask[i];

	return (v & (m ? m : ~0U)) == set[i];
}

static __always_inline bool vnet_v4_in(const volatile __u32 *set, const volatile __u32 *mask, __u32 v)
{
	return vnet_v4_slot(set, mask, 0, v) || (set[1] && vnet_v4_slot(set, mask, 1, v)) ||
	       (set[2] && vnet_v4_slot(set, mask, 2, v)) || (set[3] && vnet_v4_slot(set, mask, 3, v));
}

/* The source or the destination of an IPv4 packet is in the prefixes. */
static __always_inline bool vnet_either_v4_in(const volatile __u32 *set, const volatile __u32 *mask,
					      const __u8 *saddr, const __u8 *daddr)
{
	return vnet_v4_in(set, mask, *(const __u32 *)saddr) || vnet_v4_in(set, mask, *(const __u32 *)daddr);
}

/* An IPv6 address slot, as two words; all 0: unused (an address set never holds `::`). */
static __always_inline __u64 vnet_v6_word(const volatile __u8 *set, int slot, int half)
{
	return *(const volatile __u64 *)(set + 16 * slot + 8 * half);
}

static __always_inline bool vnet_v6_used(const volatile __u8 *set, int slot)
{
	return vnet_v6_word(set, slot, 0) || vnet_v6_word(set, slot, 1);
}

static __always_inline bool vnet_addr_v6_in(const volatile __u8 *set, const __u8 *addr)
{
	__u64 hi = *(const __u64 *)addr, lo = *(const __u64 *)(addr + 8);

#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (i && !vnet_v6_used(set, i))
			return false;
		if (hi == vnet_v6_word(set, i, 0) && lo == vnet_v6_word(set, i, 1))
			return true;
	}
	return false;
}

/* f_hosts_v4 and f_hosts_v6 together: an IPv4 packet needs an address of the
 * first, an IPv6 one of the second (an empty one rejects its whole family). */
static __always_inline bool vnet_hosts_in(const volatile struct vnet_filter *f, __u16 flags, const __u8 *saddr,
					  const __u8 *daddr)
{
	if (flags & VNET_F_IPV4)
		return f->f_hosts_v4[0] && vnet_either_v4_in(f->f_hosts_v4, f->f_hosts_v4_mask, saddr, daddr);
	return vnet_v6_used(f->f_hosts_v6, 0) &&
	       (vnet_addr_v6_in(f->f_hosts_v6, saddr) || vnet_addr_v6_in(f->f_hosts_v6, daddr));
}

/* The filter in three steps, each as early as what it looks at is known, so
 * that a packet it rejects costs as little as possible (for plain packets,
 * step 2 goes first: 2a); together they are one conjunction, so the order
 * changes nothing but the cost. Events without a packet (function-call
 * probes) always pass. */

/* 1. Before parsing: what the hook knows of the packet without reading it. */
static __always_inline bool vnet_filter_early(const volatile struct vnet_filter *f, const struct vnet_event *ev)
{
	if (!f->f_on || (ev->flags & VNET_F_NO_SKB))
		return true;
	if (ev->len < f->f_len_min || (f->f_len_max && ev->len > f->f_len_max))
		return false;
	if (f->f_netns && ev->netns_cookie && ev->netns_cookie != f->f_netns)
		return false;
	if (f->f_ifindex[0] && ev->ifindex != f->f_ifindex[0] && ev->ifindex != f->f_ifindex[1] &&
	    ev->ifindex != f->f_ifindex[2] && ev->ifindex != f->f_ifindex[3])
		return false;
	return true;
}

/* The criteria on the packet's own fields, wherever they were read from: in
 * a function returning bool, `return false` for a packet they reject. A macro,
 * so that each field is read only where it is tested (a function's arguments
 * would all be loaded first: other code at every kernel hook). */
#define VNET_FILTER_TUPLE_OR_RETURN(f, flags, ports, l4_proto, sport, dport, saddr, daddr)			\
	do {													\
		if ((f)->f_family == 4 && !((flags) & VNET_F_IPV4))						\
			return false;										\
		if ((f)->f_family == 6 && !((flags) & VNET_F_IPV6))						\
			return false;										\
		if ((f)->f_l4_proto && (l4_proto) != (f)->f_l4_proto)						\
			return false;										\
		if ((f)->f_sport && (!(ports) || (sport) != (f)->f_sport))					\
			return false;										\
		if ((f)->f_dport && (!(ports) || (dport) != (f)->f_dport))					\
			return false;										\
		if ((f)->f_port && (!(ports) || ((sport) != (f)->f_port && (dport) != (f)->f_port)))		\
			return false;										\
		if ((f)->f_src_bits && !vnet_prefix_match(saddr, (f)->f_src, (f)->f_src_bits))			\
			return false;										\
		if ((f)->f_dst_bits && !vnet_prefix_match(daddr, (f)->f_dst, (f)->f_dst_bits))			\
			return false;										\
		if ((f)->f_host_bits && !vnet_prefix_match(saddr, (f)->f_host, (f)->f_host_bits) &&		\
		    !vnet_prefix_match(daddr, (f)->f_host, (f)->f_host_bits))					\
			return false;										\
	} while (0)

/* Whether the field filter has a criterion VNET_FILTER_TUPLE_OR_RETURN tests. */
static __always_inline bool vnet_filter_has_tuple(const volatile struct vnet_filter *f)
{
	return f->f_family || f->f_l4_proto || f->f_sport || f->f_dport || f->f_port || f->f_src_bits ||
	       f->f_dst_bits || f->f_host_bits;
}

/* The loader sets VNET_FILTER_ON_PCAP only with criteria: one load says so, where the chain
 * after it costs a reject a load per kind of criterion. */
static __always_inline bool vnet_filter_on_fields(const volatile struct vnet_filter *f)
{
	return f->f_on == VNET_FILTER_ON_PCAP ||
	       (f->f_on && (vnet_filter_has_tuple(f) || f->f_ports[0] || f->f_l4_protos[0] ||
			    f->f_hosts_v4[0] || vnet_v6_used(f->f_hosts_v6, 0) || f->f_not_ports[0] ||
			    f->f_not_hosts_v4[0]));
}

/* Whether the kernel keeps the packet's VLAN tag in the sk_buff (`tc`: a TC context). */
static __always_inline bool vnet_tag_in_skb(void *skb, bool tc)
{
#ifndef VNET_TC_ONLY
	if (!tc)
		return vnet_skb_vlan_present(skb, true);
#endif
	return ((struct __sk_buff *)skb)->vlan_present;
}

/* 2a. First thing, for the packets most traffic is: plain IPv4 or IPv6 (no
 * in-band VLAN tag, no IPv6 extension header, not a later fragment, not VXLAN
 * the parse would look into), read from the bytes the parse reads, without its
 * hashing and bookkeeping. False: the field filter rejects the fields the parse
 * would have found (tests/kernel/test_tc_event_oracle.py and
 * test_tcpdump_expressions.py hold both ways to the same packets). True for anything else: the parse
 * decides (step 2). Callers ask only where the filter has such criteria
 * (vnet_filter_on_fields), and put it first: the rest of the program keeps the
 * layout it had without it (placed after step 1, it moved clang's layout of
 * the whole program and Linux 6.1's verifier walked that twice as long).
 *
 * The L3 header starts at `ip`, its ethertype is `proto` (network order), and
 * the bytes before `end` are the ones the parse reads: TC, the packet's linear
 * part (the verifier checks these bounds); kernel hooks, the sk_buff's linear
 * part read in place (parse_cfg.direct: loads the kernel guards as it guards a
 * probe read). */
static __always_inline bool vnet_filter_plain_may_keep(const volatile struct vnet_filter *f, const __u8 *ip,
						       const __u8 *end, __u32 proto, bool decap, void *skb, bool tc)
{
	const __u8 *l4, *saddr, *daddr;
	__u16 flags, sport = 0, dport = 0;
	__u8 l4_proto;

	if (proto == bpf_htons(VNET_ETH_P_IP)) {
		__u32 ihl;

		if (ip + 20 > end)
			return true;
		ihl = (ip[0] & 0xf) * 4;
		if (ihl < 20 || bpf_ntohs(*(const __u16 *)(ip + 2)) < ihl || (*(const __u16 *)(ip + 6) & bpf_htons(0x1fff)))
			return true;
		/* the prefixes are compared in the packet: an IPv4 one, no longer than the address */
		if (f->f_src_bits > 32 || f->f_dst_bits > 32 || f->f_host_bits > 32)
			return true;
		flags = VNET_F_IPV4;
		l4_proto = ip[9];
		saddr = ip + 12;
		daddr = ip + 16;
		l4 = ip + ihl;
	} else if (proto == bpf_htons(VNET_ETH_P_IPV6)) {
		if (ip + 40 > end)
			return true;
		l4_proto = ip[6];
		if (l4_proto == 0 || l4_proto == 43 || l4_proto == 44 || l4_proto == 60 || l4_proto == 51)
			return true;
		flags = VNET_F_IPV6;
		saddr = ip + 8;
		daddr = ip + 24;
		l4 = ip + 40;
	} else {
		return true;
	}
	if (l4_proto == VNET_IPPROTO_TCP || l4_proto == VNET_IPPROTO_UDP) {
		if (l4 + (l4_proto == VNET_IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)) > end)
			return true;
		sport = bpf_ntohs(*(const __u16 *)l4);
		dport = bpf_ntohs(*(const __u16 *)(l4 + 2));
		flags |= VNET_F_PORTS;
		if (decap && l4_proto == VNET_IPPROTO_UDP && (dport == VNET_VXLAN_PORT || dport == VNET_VXLAN_LINUX_PORT))
			return true;
	} else if (l4_proto == VNET_IPPROTO_SCTP &&
		   (f->f_sport || f->f_dport || f->f_port || f->f_ports[0] || f->f_not_ports[0])) {
		return true; /* VNET_PLAIN_SCTP_PORTS_LATER */
	}
	VNET_FILTER_TUPLE_OR_RETURN(f, flags, flags & VNET_F_PORTS, l4_proto, sport, dport, saddr, daddr);
	if (f->f_l4_protos[0] && !vnet_proto_in(f->f_l4_protos, l4_proto))
		return false;
	if (f->f_ports[0] && (!(flags & VNET_F_PORTS) || !VNET_EITHER_IN(vnet_port_in, f->f_ports, sport, dport)))
		return false;
	/* (to the expression a packet whose tag the kernel keeps in the sk_buff is 802.1Q, neither TCP,
	 * UDP nor IPv4: these exclusions say nothing of it) */
	if (f->f_not_ports[0] && (flags & VNET_F_PORTS) &&
	    VNET_EITHER_IN(vnet_port_in, f->f_not_ports, sport, dport) && !vnet_tag_in_skb(skb, tc))
		return false;
	if ((f->f_hosts_v4[0] || vnet_v6_used(f->f_hosts_v6, 0)) && !vnet_hosts_in(f, flags, saddr, daddr))
		return false;
	if (f->f_not_hosts_v4[0] && (flags & VNET_F_IPV4) &&
	    vnet_either_v4_in(f->f_not_hosts_v4, f->f_not_hosts_v4_mask, saddr, daddr) && !vnet_tag_in_skb(skb, tc))
		return false;
	return true;
}

/* TC: the IP header after the Ethernet header, or at skb->data on a device
 * without one (l3), where vnet_parse_skb reads it directly. */
static __always_inline bool vnet_filter_tc_may_keep(const volatile struct vnet_filter *f, struct __sk_buff *skb,
						    bool l3, bool decap)
{
	const __u8 *data = (const __u8 *)(long)skb->data;
	const __u8 *end = (const __u8 *)(long)skb->data_end;
	const __u8 *ip = data + (l3 ? 0 : 14);
	__u32 proto = skb->protocol; /* network order */

	if (l3) {
		if (ip + 1 > end || ip[0] >> 4 != (proto == bpf_htons(VNET_ETH_P_IP) ? 4 : 6))
			return true;
	} else if (ip > end || *(const __u16 *)(data + 12) != (__u16)proto) {
		return true;
	}
	return vnet_filter_plain_may_keep(f, ip, end, proto, decap, skb, true);
}

#ifndef VNET_TC_ONLY
/* Kernel hooks that read the packet in place (typed, parse_cfg.copy and
 * .direct): the network header as vnet_parse_kernel_skb finds it. */
static __always_inline bool vnet_filter_kernel_may_keep(const volatile struct vnet_filter *f, struct sk_buff *skb,
							bool decap)
{
	const __u8 *head = skb->head;
	__u16 nh = skb->network_header;
	__u16 mh = skb->mac_header;
	__u32 tail = skb->tail, l3_off;

	if (nh != 0 && nh != (__u16)~0U)
		l3_off = nh;
	else if (mh != (__u16)~0U)
		l3_off = mh + 14;
	else
		l3_off = (__u32)(skb->data - head);
	return vnet_filter_plain_may_keep(f, head + l3_off, head + tail, skb->protocol, decap, skb, false);
}
#endif

/* A packet step 2a rejected: counted as any the filter leaves out. */
static __always_inline void vnet_rejected_first(__u32 probe_id)
{
	struct vnet_stats *st = vnet_stats_this_cpu(probe_id);

	if (st) {
		st->v[VNET_STAT_SEEN]++;
		st->v[VNET_STAT_FILTERED]++;
	}
}

#ifndef VNET_TC_ONLY
/* Step 2a at kernel hooks, where it applies: typed ones reading the packet in place (parse_cfg). */
static __always_inline bool vnet_kernel_rejects_first(const volatile struct vnet_filter *f, struct sk_buff *skb,
						      bool typed)
{
	return typed && skb && parse_cfg.copy && parse_cfg.direct && vnet_filter_on_fields(f) &&
	       !vnet_filter_kernel_may_keep(f, skb, !f->f_outer);
}
#endif

/* 2. After parsing the headers (the inner packet's, for VXLAN), before the
 * payload is read for pkt_id and before any other per-event work. */
static __always_inline bool vnet_filter_fields(const volatile struct vnet_filter *f, const struct vnet_event *ev)
{
	bool ports = ev->flags & VNET_F_PORTS;

	if (f->f_on != VNET_FILTER_ON || (ev->flags & VNET_F_NO_SKB))
		return true;
	VNET_FILTER_TUPLE_OR_RETURN(f, ev->flags, ports, ev->l4_proto, ev->sport, ev->dport, ev->saddr, ev->daddr);
	return true;
}

/* 3. Sampling, on the finished pkt_id (vnet_finish_id). */
static __always_inline bool vnet_filter_sample(const volatile struct vnet_filter *f, const struct vnet_event *ev)
{
	if (!f->f_on || (ev->flags & VNET_F_NO_SKB))
		return true;
	return !(f->f_sample > 1 && ev->pkt_id % f->f_sample != 0);
}

/* Whether a packet that reached the parse may still be left out: by the field
 * filter's tuple (vnet_filter_fields) or by `--sample` (vnet_filter_sample). */
static __always_inline bool vnet_filter_after_parse(const volatile struct vnet_filter *f)
{
	return (f->f_on == VNET_FILTER_ON && vnet_filter_has_tuple(f)) || (f->f_on && f->f_sample > 1);
}

/* The event's time stamp, read before the parse where nothing after it leaves the
 * packet out: the clock read (rdtscp, which waits for the loads before it) costs
 * 15-25 ns less there than after the parse and the pkt_id's hash. Where a filter
 * may still reject, after it, so that its rejects do not pay for a clock.
 * vnet_stamp_early() before the parse, vnet_stamp_kept() with what it returned. */
static __always_inline __u64 vnet_stamp_early(const volatile struct vnet_filter *f)
{
	return vnet_filter_after_parse(f) ? 0 : bpf_ktime_get_ns();
}

static __always_inline __u64 vnet_stamp_kept(const volatile struct vnet_filter *f, __u64 early)
{
	return vnet_filter_after_parse(f) ? bpf_ktime_get_ns() : early;
}

/* A packet the filter (or the tcpdump expression) leaves out is counted as such. */
static __always_inline void vnet_filtered(struct vnet_stats *st)
{
	st->v[VNET_STAT_FILTERED]++;
}

/* The common end of every packet program, for a packet the filter kept: it
 * becomes numbers (aggregation), an event, or both; the event alone or, with
 * `snaplen` (a load-time constant), with the packet's first bytes. `more` (a
 * constant: drops, socket probes with the task): `ev` is the head of a struct
 * vnet_event_more the program filled, and the record is all of it. */
static __always_inline void vnet_deliver(struct vnet_stats *st, struct vnet_event *ev, bool more, __u8 aggregate,
					 __u32 wakeup_every, __u32 wakeup_bytes, void *skb, bool tc, bool l3,
					 __u32 snaplen, bool typed, __u32 area_chunks)
{
	if (aggregate & VNET_AGG_ON)
		vnet_aggregate(ev);
	if ((aggregate & VNET_AGG_ON) && !(aggregate & VNET_AGG_AND_EVENTS))
		return;
	if (snaplen)
		vnet_emit_snap(st, ev, more, skb, tc, l3, snaplen, wakeup_every, wakeup_bytes, typed);
	else
		vnet_emit(st, ev, more, wakeup_every, wakeup_bytes, area_chunks);
}

#endif /* VNET_FILTER_BPF_H */
