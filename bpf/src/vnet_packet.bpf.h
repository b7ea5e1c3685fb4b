/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Header parsing and the packet fingerprint (pkt_id), for programs that see a
 * `struct __sk_buff` (TC) and for those that see a kernel `struct sk_buff *`
 * (tracepoints, fentry, kprobe). Offsets are relative to the network header, so
 * L2 devices (veth, bridge ports) and L3 devices (tun) parse the same way, and
 * both kinds of hook compute the same pkt_id for the same packet. */
#ifndef VNET_PACKET_BPF_H
#define VNET_PACKET_BPF_H

#include "vnet_common.bpf.h"
#include <bpf/bpf_core_read.h>

#define VNET_ETH_P_IP 0x0800
#define VNET_ETH_P_IPV6 0x86DD
#define VNET_ETH_P_8021Q 0x8100
#define VNET_ETH_P_8021AD 0x88A8
#define VNET_IPPROTO_ICMP 1
#define VNET_IPPROTO_TCP 6
#define VNET_IPPROTO_UDP 17
#define VNET_IPPROTO_ICMPV6 58
#define VNET_PAYLOAD_HASH_BYTES 32
#define VNET_IPV6_MAX_EXT 4 /* extension headers walked before giving up on L4 */
#define VNET_VXLAN_PORT 4789        /* IANA */
#define VNET_VXLAN_LINUX_PORT 8472  /* Linux's default when `ip link add ... type vxlan` names none */

/* `net_cookie` became a plain u64 of struct net in 5.14 ("net: retire netns
 * cookie generator"); before it was a lazily set atomic64_t, which CO-RE does not
 * match to u64 here: those kernels report 0 and user space keys on ifindex. */
static __always_inline __u64 vnet_dev_netns_cookie(struct net_device *dev)
{
	struct net *net = BPF_CORE_READ(dev, nd_net.net);

	if (!net || !bpf_core_field_exists(net->net_cookie))
		return 0;
	return BPF_CORE_READ(net, net_cookie);
}

/* Murmur3-style 64-bit mixing: cheap, no tables, good avalanche. */
static __always_inline __u64 vnet_mix(__u64 h, __u64 k)
{
	k *= 0x87c37b91114253d5ULL;
	k = (k << 31) | (k >> 33);
	k *= 0x4cf5ad432745937fULL;
	h ^= k;
	h = (h << 27) | (h >> 37);
	return h * 5 + 0x52dce729;
}

static __always_inline __u64 vnet_fmix(__u64 h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

struct vnet_cursor {
	struct __sk_buff *skb; /* TC: read through the skb helpers */
	const __u8 *l3;        /* kernel sk_buff: the network header's address */
	const __u8 *lin_end;   /* kernel sk_buff: the end of its linear part (head + tail) */
	const __u8 *pkt_end;   /* kernel sk_buff: the end of its bytes, page fragments included (data + len) */
	__u32 base;            /* TC: BPF_HDR_START_NET, or _MAC when a VLAN tag is in-band */
	__u32 data_off;        /* TC: where `base` starts from skb->data (0, or 14 past an Ethernet header) */
	__u32 off;             /* of the L3 header from base (TC) or from l3 (kernel) */
	__u32 l4off;           /* of the L4 header, same origin as off */
	__u8 kernel;           /* a literal at every call site: the compiler keeps one reader */
	__u8 paged;            /* kernel: a read wanted bytes that are in the skb, but not in its linear part */
};

/* Headers. Both readers see the skb's linear part only (bpf_skb_load_bytes_relative
 * stops at the tail pointer too): a kernel hook that wants bytes past it that the
 * packet has (in page fragments) says so in c->paged rather than read what lies
 * after the linear part (tailroom, skb_shared_info). */
static __always_inline int vnet_load(struct vnet_cursor *c, __u32 off, void *to, __u32 len)
{
	if (c->kernel) {
		const __u8 *p = c->l3 + off;

		if (p + len > c->lin_end) {
			if (p + len <= c->pkt_end)
				c->paged = 1;
			return -1;
		}
		return bpf_probe_read_kernel(to, len, p);
	}
	return bpf_skb_load_bytes_relative(c->skb, off, to, len, c->base);
}

/* Payload to hash. TC reads it wherever it is: from the linear part, else with
 * bpf_skb_load_bytes, which goes into page fragments and counts from skb->data,
 * where `base` is c->data_off bytes on. That offset is checked on the packet
 * itself: the L3 header's first bytes must read the same both ways. A kernel
 * hook reads the linear part only (vnet_load), and flags the event when the
 * bytes are past it: never a hash of what lies after the linear part. */
static __always_inline int vnet_load_payload(struct vnet_cursor *c, __u32 off, void *to, __u32 len)
{
	__u32 a, b;

	if (c->kernel)
		return vnet_load(c, off, to, len);
	if (vnet_load(c, off, to, len) == 0)
		return 0;
	if (bpf_skb_load_bytes_relative(c->skb, c->off, &a, sizeof(a), c->base) < 0 ||
	    bpf_skb_load_bytes(c->skb, c->data_off + c->off, &b, sizeof(b)) < 0 || a != b)
		return -1;
	return bpf_skb_load_bytes(c->skb, c->data_off + off, to, len);
}

/* Hash up to 32 bytes of payload starting at `off`: two packets with equal
 * headers (unconnected UDP with DF sends IP ID 0; IPv6 has no IP ID) still get
 * distinct ids. Not for TCP (vnet_parse_l4). */
static __always_inline __u64 vnet_hash_payload(struct vnet_cursor *c, __u64 h, __u32 off, __u32 avail)
{
	__u64 buf[VNET_PAYLOAD_HASH_BYTES / 8] = {};
	__u64 n = avail > VNET_PAYLOAD_HASH_BYTES ? VNET_PAYLOAD_HASH_BYTES : avail;

	if (n == 0)
		return h;
	/* Restate 1..32 as ((n - 1) & 31) + 1 behind a barrier, so that clang cannot
	 * fold it away: Linux 6.1's verifier does not raise the lower bound to 1
	 * after `n == 0` (6.18's does) and would refuse a possibly zero-sized read. */
	barrier_var(n);
	n = ((n - 1) & (VNET_PAYLOAD_HASH_BYTES - 1)) + 1;
	if (vnet_load_payload(c, off, buf, n) < 0)
		return h;
	h = vnet_mix(h, buf[0]);
	h = vnet_mix(h, buf[1]);
	h = vnet_mix(h, buf[2]);
	h = vnet_mix(h, buf[3]);
	return vnet_mix(h, n);
}

/* L4 fields into the event and the hash. `l4_len` is the L4 header plus
 * payload length taken from the IP header (invariant), not from skb->len. */
static __always_inline __u64 vnet_parse_l4(struct vnet_cursor *c, struct vnet_event *ev, __u64 h,
					   __u32 off, __u32 l4_len)
{
	__u32 hdr_len = 0;

	c->l4off = off;
	if (ev->l4_proto == VNET_IPPROTO_TCP) {
		struct tcphdr th;

		if (vnet_load(c, off, &th, sizeof(th)) < 0)
			goto truncated;
		ev->sport = bpf_ntohs(th.source);
		ev->dport = bpf_ntohs(th.dest);
		ev->tcp_seq = bpf_ntohl(th.seq);
		ev->tcp_ack = bpf_ntohl(th.ack_seq);
		ev->tcp_flags = ((__u8 *)&th)[13];
		ev->flags |= VNET_F_PORTS;
		/* No payload: sequence and acknowledgement numbers, flags, ports and the IP ID
		 * or length tell segments apart, and a kernel hook could not read it anyway:
		 * TCP sends from page fragments, which stay that way to the receiving socket. */
		h = vnet_mix(h, ((__u64)th.source << 16) | th.dest);
		h = vnet_mix(h, ((__u64)th.seq << 32) | th.ack_seq);
		return vnet_mix(h, ev->tcp_flags);
	} else if (ev->l4_proto == VNET_IPPROTO_UDP) {
		struct udphdr uh;

		if (vnet_load(c, off, &uh, sizeof(uh)) < 0)
			goto truncated;
		ev->sport = bpf_ntohs(uh.source);
		ev->dport = bpf_ntohs(uh.dest);
		ev->flags |= VNET_F_PORTS;
		hdr_len = sizeof(uh);
		/* The UDP checksum is left out: offloads fill it in after the sender's hooks. */
		h = vnet_mix(h, ((__u64)uh.source << 32) | ((__u64)uh.dest << 16) | uh.len);
	} else if (ev->l4_proto == VNET_IPPROTO_ICMP || ev->l4_proto == VNET_IPPROTO_ICMPV6) {
		__u8 ih[8];

		if (vnet_load(c, off, ih, sizeof(ih)) < 0)
			goto truncated;
		ev->sport = ((__u16)ih[4] << 8) | ih[5]; /* echo id */
		ev->dport = ((__u16)ih[0] << 8) | ih[1]; /* type, code */
		hdr_len = sizeof(ih);
		h = vnet_mix(h, *(__u64 *)ih & ~0xffff0000ULL); /* all but the checksum */
	} else {
		return vnet_hash_payload(c, h, off, l4_len);
	}
	if (hdr_len > l4_len)
		return h;
	return vnet_hash_payload(c, h, off + hdr_len, l4_len - hdr_len);
truncated:
	if (!c->paged)
		ev->flags |= VNET_F_TRUNCATED;
	return h;
}

/* Walk IPv6 extension headers (hop-by-hop, routing, fragment, destination
 * options, AH) to the transport header; they are invariant, so they stay out of
 * the hash except through payload_len. */
static __always_inline __u64 vnet_parse_ipv6_ext(struct vnet_cursor *c, struct vnet_event *ev, __u64 h,
						 __u32 off, __u32 len)
{
	__u8 nh = ev->l4_proto;

#pragma unroll
	for (int i = 0; i < VNET_IPV6_MAX_EXT; i++) {
		__u8 ext[8];
		__u32 ext_len;

		if (nh != 0 && nh != 43 && nh != 44 && nh != 60 && nh != 51)
			break;
		if (vnet_load(c, off, ext, sizeof(ext)) < 0) {
			if (!c->paged)
				ev->flags |= VNET_F_TRUNCATED;
			return h;
		}
		if (nh == 44) {
			ext_len = 8;
			if ((((__u16)ext[2] << 8 | ext[3]) & 0xfff8) != 0) {
				/* A later fragment carries no L4 header. */
				ev->l4_proto = ext[0];
				ev->flags |= VNET_F_FRAGMENT;
				return vnet_hash_payload(c, vnet_mix(h, *(__u64 *)ext), off + ext_len,
							 len > ext_len ? len - ext_len : 0);
			}
		} else if (nh == 51) {
			ext_len = ((__u32)ext[1] + 2) * 4;
		} else {
			ext_len = ((__u32)ext[1] + 1) * 8;
		}
		if (ext_len > len)
			return h;
		nh = ext[0];
		off += ext_len;
		len -= ext_len;
	}
	ev->l4_proto = nh;
	return vnet_parse_l4(c, ev, h, off, len);
}

/* Addresses, ports and pkt_id from the L3 header on; `proto` is the ethertype
 * (host order). Only fields that stay the same along the path enter the hash:
 * no TTL, no TOS, no checksums. */
static __always_inline void vnet_parse_l3(struct vnet_cursor *c, struct vnet_event *ev, __u16 proto, __u32 len)
{
	__u64 h = 0x9e3779b97f4a7c15ULL;

	ev->eth_proto = proto;
	h = vnet_mix(h, proto);

	if (proto == VNET_ETH_P_IP) {
		struct iphdr ip;
		__u32 ihl, tot;

		if (vnet_load(c, c->off, &ip, sizeof(ip)) < 0)
			goto truncated;
		ev->flags |= VNET_F_IPV4;
		ev->l4_proto = ip.protocol;
		ev->ttl = ip.ttl;
		ev->ip_id = bpf_ntohs(ip.id);
		__builtin_memcpy(ev->saddr, &ip.saddr, 4);
		__builtin_memcpy(ev->daddr, &ip.daddr, 4);
		h = vnet_mix(h, ((__u64)ip.saddr << 32) | ip.daddr);
		h = vnet_mix(h, ((__u64)ip.protocol << 48) | ((__u64)ip.id << 32) |
				    ((__u64)ip.frag_off << 16) | ip.tot_len);
		ihl = ip.ihl * 4;
		tot = bpf_ntohs(ip.tot_len);
		if (ihl < sizeof(ip) || tot < ihl)
			goto out;
		if (bpf_ntohs(ip.frag_off) & 0x1fff) {
			/* A later fragment carries no L4 header: hash its data instead. */
			ev->flags |= VNET_F_FRAGMENT;
			h = vnet_hash_payload(c, h, c->off + ihl, tot - ihl);
			goto out;
		}
		h = vnet_parse_l4(c, ev, h, c->off + ihl, tot - ihl);
	} else if (proto == VNET_ETH_P_IPV6) {
		struct ipv6hdr ip6;
		__u32 flow;

		if (vnet_load(c, c->off, &ip6, sizeof(ip6)) < 0)
			goto truncated;
		ev->flags |= VNET_F_IPV6;
		ev->l4_proto = ip6.nexthdr;
		ev->ttl = ip6.hop_limit;
		__builtin_memcpy(ev->saddr, &ip6.saddr, 16);
		__builtin_memcpy(ev->daddr, &ip6.daddr, 16);
		flow = bpf_ntohl(*(__u32 *)&ip6) & 0xfffff;
		h = vnet_mix(h, *(__u64 *)&ev->saddr[0]);
		h = vnet_mix(h, *(__u64 *)&ev->saddr[8]);
		h = vnet_mix(h, *(__u64 *)&ev->daddr[0]);
		h = vnet_mix(h, *(__u64 *)&ev->daddr[8]);
		h = vnet_mix(h, ((__u64)flow << 32) | ((__u64)ip6.nexthdr << 16) | ip6.payload_len);
		h = vnet_parse_ipv6_ext(c, ev, h, c->off + sizeof(ip6), bpf_ntohs(ip6.payload_len));
	} else {
		/* ARP and friends: the first bytes of the L3 header identify them. */
		h = vnet_hash_payload(c, h, c->off, len > 28 ? 28 : len);
	}
	goto out;
truncated:
	if (!c->paged)
		ev->flags |= VNET_F_TRUNCATED;
out:
	if (c->paged)
		ev->flags |= VNET_F_ID_PARTIAL;
	ev->pkt_id = vnet_fmix(h);
}

/* VXLAN: identify the inner packet, so that it keeps its pkt_id (and its
 * tuple, for filters and output) across encapsulation and decapsulation. */
static __always_inline void vnet_decap(struct vnet_cursor *c, struct vnet_event *ev, __u32 len)
{
	__u8 vx[8];
	__u16 inner;
	__u32 off = c->l4off + 8;

	if (!(ev->flags & VNET_F_PORTS) || ev->l4_proto != VNET_IPPROTO_UDP ||
	    (ev->dport != VNET_VXLAN_PORT && ev->dport != VNET_VXLAN_LINUX_PORT))
		return;
	if (vnet_load(c, off, vx, sizeof(vx)) < 0 || !(vx[0] & 0x08) || /* the I flag: a valid VNI */
	    vnet_load(c, off + 8 + 12, &inner, sizeof(inner)) < 0) {
		if (c->paged) /* tc would have seen the inner packet: its id may differ */
			ev->flags |= VNET_F_ID_PARTIAL;
		return;
	}
	c->paged = 0; /* the id is the inner packet's alone */
	ev->flags = (ev->flags & VNET_F_VLAN) | VNET_F_ENCAP;
	ev->vni = (__u32)vx[4] << 16 | (__u32)vx[5] << 8 | vx[6];
	ev->l4_proto = ev->tcp_flags = ev->ttl = 0;
	ev->sport = ev->dport = ev->ip_id = 0;
	ev->tcp_seq = ev->tcp_ack = 0;
	__builtin_memset(ev->saddr, 0, sizeof(ev->saddr));
	__builtin_memset(ev->daddr, 0, sizeof(ev->daddr));
	c->off = off + 8 + 14; /* VXLAN header, inner Ethernet header */
	vnet_parse_l3(c, ev, bpf_ntohs(inner), len);
}

/* TC: fill the addressing fields and pkt_id of `ev` from the packet. */
/* decap: report VXLAN traffic as its inner packet (a load-time constant). */
/* l3: the device has no link header, skb->data is the network header (a load-time constant). */
static __always_inline void vnet_parse_skb(struct __sk_buff *skb, struct vnet_event *ev, bool decap, bool l3)
{
	struct vnet_cursor c = { .skb = skb, .base = BPF_HDR_START_NET, .data_off = l3 ? 0 : 14, .kernel = 0 };
	__u16 proto = bpf_ntohs(skb->protocol);

	if (skb->vlan_present) {
		ev->vlan_tci = skb->vlan_tci;
		ev->flags |= VNET_F_VLAN;
	}
	if (proto == VNET_ETH_P_8021Q || proto == VNET_ETH_P_8021AD) {
		/* In-band tag (no offload): the network header may not be past it. */
		__u16 tag[2];

		c.base = BPF_HDR_START_MAC;
		c.data_off = 0;
		if (vnet_load(&c, 14, tag, sizeof(tag)) < 0) {
			ev->flags |= VNET_F_TRUNCATED;
			return;
		}
		ev->vlan_tci = bpf_ntohs(tag[0]);
		ev->flags |= VNET_F_VLAN;
		proto = bpf_ntohs(tag[1]);
		c.off = 18;
	}
	vnet_parse_l3(&c, ev, proto, skb->len);
	if (decap)
		vnet_decap(&c, ev, skb->len);
}

/* Kernel sk_buff (tracepoints, fentry, kprobe): the same fields and pkt_id.
 * The network header offset is unset (0 or ~0) on fresh receive skbs before
 * the stack resets it: then the L3 header follows the Ethernet header. */
static __always_inline void vnet_parse_kernel_skb(struct sk_buff *skb, struct vnet_event *ev, bool decap)
{
	struct vnet_cursor c = { .kernel = 1 };
	const __u8 *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u16 mh = BPF_CORE_READ(skb, mac_header);
	__u16 proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	struct net_device *dev = BPF_CORE_READ(skb, dev);

	ev->skb_addr = (__u64)skb;
	ev->len = BPF_CORE_READ(skb, len);
	ev->mark = BPF_CORE_READ(skb, mark);
	if (dev) {
		ev->ifindex = BPF_CORE_READ(dev, ifindex);
		ev->netns_cookie = vnet_dev_netns_cookie(dev);
	}
	if (vnet_skb_vlan_present(skb)) {
		ev->vlan_tci = BPF_CORE_READ(skb, vlan_tci);
		ev->flags |= VNET_F_VLAN;
	}
	if (nh != 0 && nh != (__u16)~0U)
		c.l3 = head + nh;
	else if (mh != (__u16)~0U)
		c.l3 = head + mh + 14;
	else
		c.l3 = BPF_CORE_READ(skb, data);
	c.lin_end = head + BPF_CORE_READ(skb, tail);
	c.pkt_end = (const __u8 *)BPF_CORE_READ(skb, data) + ev->len;
	if ((proto == VNET_ETH_P_8021Q || proto == VNET_ETH_P_8021AD) && mh != (__u16)~0U) {
		__u16 tag[2];

		if (bpf_probe_read_kernel(tag, sizeof(tag), head + mh + 14) < 0) {
			ev->flags |= VNET_F_TRUNCATED;
			return;
		}
		ev->vlan_tci = bpf_ntohs(tag[0]);
		ev->flags |= VNET_F_VLAN;
		proto = bpf_ntohs(tag[1]);
		c.l3 = head + mh + 18;
	}
	vnet_parse_l3(&c, ev, proto, ev->len);
	if (decap)
		vnet_decap(&c, ev, ev->len);
}

#endif /* VNET_PACKET_BPF_H */
