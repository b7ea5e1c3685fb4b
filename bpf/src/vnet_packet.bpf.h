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
#define VNET_IPPROTO_SCTP 132
#define VNET_IPPROTO_ICMPV6 58
#define VNET_PAYLOAD_HASH_BYTES 32
#define VNET_IPV6_MAX_EXT 4 /* extension headers walked before giving up on L4 */
#define VNET_VXLAN_PORT 4789        /* IANA */
#define VNET_VXLAN_LINUX_PORT 8472  /* Linux's default when `ip link add ... type vxlan` names none */
/* TC, direct reads: the verifier's bound on an offset into the packet. The
 * parser never reaches it: two IP headers with four extension headers each
 * (at most 2 KB apiece) and VXLAN between them stay under 17 KB. */
#define VNET_DIRECT_MAX 0xff00

/* Kernel hooks: how the parser reads the packet, chosen once per machine by the
 * loader (vnet/probes/features.py, "parse_copy" and "parse_direct"). copy 0: a
 * bpf_probe_read_kernel per header (~20 ns each). copy 1: a window on the linear
 * part's first VNET_KCOPY bytes from the network header, the headers and the
 * hashed payload loaded from there (and a probe read past it, as before):
 *   - direct 0: one read of those bytes into per-CPU scratch;
 *   - direct 1, typed hooks (tp_btf, fentry): the packet itself. Where the
 *     verifier types skb->head as read-only untrusted memory (6.18's does) a
 *     program may load from it; each load is guarded against faults as a probe
 *     read is (a faulting one reads 0), without the helper call or the copy.
 *     The pcap expression's window is the packet then too (vnet_pcap.bpf.h).
 * The same bytes every way, so the same events and pkt_ids. Read-only, so the
 * verifier walks one way only: Linux 6.1's walks the copy 6-25x longer than
 * the probe reads (docs/benchmarks.md), and refuses the loads in place; the
 * loader's probes find that out. */
struct vnet_parse_config {
	__u8 copy;
	__u8 direct; /* only with copy */
};

const volatile struct vnet_parse_config parse_cfg = {};

#define VNET_KCOPY 256

/* VNET_PAYLOAD_HASH_BYTES past the copy: a payload window read at any offset
 * inside it stays in the value (its bytes past the copy are masked off). */
struct vnet_kcopy {
	__u8 b[VNET_KCOPY + VNET_PAYLOAD_HASH_BYTES];
};

#ifndef VNET_TC_ONLY /* tc_trace parses no kernel sk_buff: no map (a descriptor per device) */
/* Per CPU and per program instance, without a lock: a program never runs
 * nested in itself on one CPU (the kernel's recursion guard skips it). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vnet_kcopy);
} vnet_kcopy_scratch SEC(".maps");
#endif

/* `net_cookie` became a plain u64 of struct net in 5.14 ("net: retire netns
 * cookie generator"); before it was a lazily set atomic64_t, which CO-RE does not
 * match to u64 here: those kernels report 0 and user space keys on ifindex. */
static __always_inline __u64 vnet_dev_netns_cookie(struct net_device *dev, bool typed)
{
	struct net *net = VNET_KREAD(typed, dev, nd_net.net);

	if (!net || !bpf_core_field_exists(net->net_cookie))
		return 0;
	return VNET_KREAD(typed, net, net_cookie);
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

/* `v` as the verifier sees it after a round trip through a stack word it does
 * not track (4-byte, not 8-byte aligned): a value with no history. An offset
 * that moves a pointer, or a helper's length, must be exact for the verifier
 * (precise), and that reaches back along everything it was computed from: the
 * parse paths' offsets and lengths would stay apart to the end of the program
 * (VXLAN's inner parse once per outer header layout), and the verifier's work
 * grows twentyfold. The caller bounds the copy itself (a check, a mask). */
static __always_inline __u32 vnet_untracked(__u32 v)
{
	volatile __u64 word = 0; /* 8-byte aligned: its upper half is not */
	volatile __u32 *half = (volatile __u32 *)&word + 1;

	*half = v;
	return *half;
}

struct vnet_cursor {
	struct __sk_buff *skb; /* TC: read through the skb helpers, or directly (`direct`) */
	const __u8 *l3;        /* kernel sk_buff: the network header's address */
	const __u8 *lin_end;   /* kernel sk_buff: the end of its linear part (head + tail) */
	const __u8 *pkt_end;   /* kernel sk_buff: the end of its bytes, page fragments included (data + len) */
	const __u8 *win;       /* kernel sk_buff, parse_cfg.copy: the linear part from l3 on, in place or copied */
	__u32 win_len;         /* ... its bytes (0..VNET_KCOPY) */
	__u32 base;            /* TC: BPF_HDR_START_NET, or _MAC when a VLAN tag is in-band */
	__u32 data_off;        /* TC: where `base` starts from skb->data (0, or 14 past an Ethernet header) */
	__u32 off;             /* of the L3 header from base (TC) or from l3 (kernel) */
	__u32 l4off;           /* of the L4 header, same origin as off */
	__u32 pay_off;         /* the payload pkt_id still hashes (vnet_finish_id), same origin as off */
	__u32 pay_len;
	__u64 h;               /* pkt_id so far: every header field it covers */
	__u8 kernel;           /* a literal at every call site: the compiler keeps one reader */
	__u8 paged;            /* kernel: a read wanted bytes that are in the skb, but not in its linear part */
	__u8 id;               /* the packet has a pkt_id (vnet_parse_l3 ran) */
	__u8 pay;              /* pay_off, pay_len are set */
	__u8 direct;           /* TC: headers are read from the packet directly instead of by the helper */
};

/* Headers (`len` a constant). Both readers see the skb's linear part only
 * (bpf_skb_load_bytes_relative stops at the tail pointer too): a kernel hook
 * that wants bytes past it that the packet has (in page fragments) says so in
 * c->paged rather than read what lies after the linear part (tailroom,
 * skb_shared_info). TC reads the linear part directly where vnet_parse_skb
 * found the packet laid out as the helper's `base` counts (the same bytes, no
 * helper call; past data_end the helper would fail too). */
static __always_inline int vnet_load(struct vnet_cursor *c, __u32 off, void *to, __u32 len)
{
	if (c->kernel) {
		/* untracked: where the verifier types skb->head as memory (tp_btf and
		 * fentry on recent kernels) this is pointer arithmetic, which would make
		 * `off` precise, and with it every offset it was computed from */
		__u32 o = vnet_untracked(off);
		const __u8 *p = c->l3 + o;

		/* headers (a constant `len`; the payload came through vnet_payload_window);
		 * win_len untracked: refined by each compare, it would keep the verifier's
		 * parse paths apart (twice the work on 6.18) */
		if (__builtin_constant_p(len) && parse_cfg.copy && o <= VNET_KCOPY - len &&
		    o + len <= vnet_untracked(c->win_len)) {
			/* in words: the verifier lets x86 and arm64 read map values unaligned */
			__builtin_memcpy(to, (const __u32 *)(c->win + o), len);
			return 0;
		}

		if (p + len > c->lin_end) {
			if (p + len <= c->pkt_end)
				c->paged = 1;
			return -1;
		}
		return bpf_probe_read_kernel(to, len, p);
	}
	if (c->direct) {
		/* Fresh packet pointers at every read: kept in the cursor, they would
		 * carry each path's checked range to the end of the program. */
		const __u8 *p = (const __u8 *)(long)c->skb->data;
		const __u8 *end = (const __u8 *)(long)c->skb->data_end;

		off = vnet_untracked(c->data_off + off);
		if (off > VNET_DIRECT_MAX)
			return -1;
		p += off;
		if (p + len > end)
			return -1;
		/* in words: the verifier lets x86 and arm64 read the packet unaligned */
		__builtin_memcpy(to, (const __u32 *)p, len);
		return 0;
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
	if (bpf_skb_load_bytes_relative(c->skb, off, to, len, c->base) == 0)
		return 0;
	if (bpf_skb_load_bytes_relative(c->skb, c->off, &a, sizeof(a), c->base) < 0 ||
	    bpf_skb_load_bytes(c->skb, c->data_off + c->off, &b, sizeof(b)) < 0 || a != b)
		return -1;
	return bpf_skb_load_bytes(c->skb, c->data_off + off, to, len);
}

/* Keep the first `n` (1..32) of the 32 bytes in `buf` and zero the rest: the
 * same words as a read of those n bytes alone into a zeroed buffer. */
static __always_inline void vnet_keep_bytes(__u64 *buf, __u32 n)
{
#pragma unroll
	for (int i = 0; i < VNET_PAYLOAD_HASH_BYTES / 8; i++) {
		__s32 keep = (__s32)n - 8 * i;

		if (keep <= 0)
			buf[i] = 0;
		else if (keep < 8)
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			buf[i] &= (1ULL << (8 * keep)) - 1;
#else
			buf[i] &= ~(~0ULL >> (8 * keep));
#endif
	}
}

/* The payload's `n` bytes at `off` without a helper call. TC, direct: where
 * the packet's linear part holds a whole 32-byte window from there. Kernel
 * hooks: where the copy holds the n bytes (parse_cfg.copy). Else -1:
 * vnet_load_payload reads exactly n bytes. */
static __always_inline int vnet_payload_window(struct vnet_cursor *c, __u32 off, __u64 *buf, __u32 n)
{
	const __u8 *p, *end;

	if (c->kernel) {
		off = vnet_untracked(off);
		if (!parse_cfg.copy || off > VNET_KCOPY || off + n > vnet_untracked(c->win_len))
			return -1;
		__builtin_memcpy(buf, (const __u64 *)(c->win + off), VNET_PAYLOAD_HASH_BYTES);
		vnet_keep_bytes(buf, n);
		return 0;
	}
	if (!c->direct)
		return -1;
	p = (const __u8 *)(long)c->skb->data;
	end = (const __u8 *)(long)c->skb->data_end;
	off = vnet_untracked(c->data_off + off);
	if (off > VNET_DIRECT_MAX)
		return -1;
	p += off;
	if (p + VNET_PAYLOAD_HASH_BYTES > end)
		return -1;
	__builtin_memcpy(buf, (const __u32 *)p, VNET_PAYLOAD_HASH_BYTES);
	vnet_keep_bytes(buf, n);
	return 0;
}

/* TC, direct: the payload's `n` (1..32) bytes where they are in the linear
 * part but fewer than 32 bytes follow them there (a short datagram: its payload
 * ends the packet, and vnet_payload_window cannot read 32), hashed into *h as
 * vnet_hash_payload hashes a zeroed buffer holding them, without a helper call
 * (~25 ns): the 32 bytes that end where the payload does, one bounds check,
 * moved down in registers by the 32 - n bytes before it. No branch on n but
 * the word select, on an untracked copy: the verifier's paths meet right after.
 * 1: hashed; 0: not this case (*h as it was). */
static __always_inline int vnet_hash_short_payload(struct vnet_cursor *c, __u64 *h, __u32 off, __u32 n)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	const __u8 *t, *end;
	__u64 w0, w1, w2, w3, a0, a1 = 0, a2 = 0, a3 = 0, x = *h;
	__u32 o, skip, r;

	if (c->kernel || !c->direct)
		return 0;
	t = (const __u8 *)(long)c->skb->data;
	end = (const __u8 *)(long)c->skb->data_end;
	/* past the bound (wrapped) if fewer than 32 bytes precede the payload's
	 * end, which a payload behind headers never has */
	o = vnet_untracked(c->data_off + off + n - VNET_PAYLOAD_HASH_BYTES);
	if (o > VNET_DIRECT_MAX)
		return 0;
	t += o;
	if (t + VNET_PAYLOAD_HASH_BYTES > end)
		return 0;
	w0 = *(const __u64 *)t;
	w1 = *(const __u64 *)(t + 8);
	w2 = *(const __u64 *)(t + 16);
	w3 = *(const __u64 *)(t + 24);
	skip = vnet_untracked(VNET_PAYLOAD_HASH_BYTES - n) & (VNET_PAYLOAD_HASH_BYTES - 1);
	r = (skip & 7) * 8;
	switch (skip >> 3) {
	case 0: a0 = w0; a1 = w1; a2 = w2; a3 = w3; break;
	case 1: a0 = w1; a1 = w2; a2 = w3; break;
	case 2: a0 = w2; a1 = w3; break;
	default: a0 = w3; break;
	}
	/* word i: bytes r/8.. of a_i, then the first of a_(i+1) (none after a3);
	 * `<< 1 << (63 - r)` is `<< (64 - r)` without a shift by 64 when r is 0 */
	x = vnet_mix(x, (a0 >> r) | ((a1 << 1) << (63 - r)));
	x = vnet_mix(x, (a1 >> r) | ((a2 << 1) << (63 - r)));
	x = vnet_mix(x, (a2 >> r) | ((a3 << 1) << (63 - r)));
	x = vnet_mix(x, a3 >> r);
	*h = vnet_mix(x, n);
	return 1;
#else
	return 0;
#endif
}

/* The payload's bytes to hash, 1..32, as ((n - 1) & 31) + 1 behind a barrier,
 * so that clang cannot fold it away: Linux 6.1's verifier does not raise the
 * lower bound to 1 after `n == 0` (6.18's does) and would refuse a possibly
 * zero-sized read. It also gives the verifier the same range for it on every
 * parse path, so that the paths' states meet again before vnet_finish_id. */
static __always_inline __u32 vnet_payload_len(__u64 n)
{
	barrier_var(n);
	return ((n - 1) & (VNET_PAYLOAD_HASH_BYTES - 1)) + 1;
}

/* Hash `n` (1..32) bytes of payload starting at `off`: two packets with equal
 * headers (unconnected UDP with DF sends IP ID 0; IPv6 has no IP ID) still get
 * distinct ids. Not for TCP (vnet_parse_l4). The last thing pkt_id mixes in:
 * vnet_finish_id does it, for packets the field filter kept. */
static __always_inline __u64 vnet_hash_payload(struct vnet_cursor *c, __u64 h, __u32 off, __u32 n)
{
	__u64 buf[VNET_PAYLOAD_HASH_BYTES / 8] = {};
	__u64 len = vnet_payload_len(n);

	if (vnet_payload_window(c, off, buf, len) < 0) {
		if (vnet_hash_short_payload(c, &h, off, len))
			return h;
		if (vnet_load_payload(c, off, buf, len) < 0)
			return h;
	}
	h = vnet_mix(h, buf[0]);
	h = vnet_mix(h, buf[1]);
	h = vnet_mix(h, buf[2]);
	h = vnet_mix(h, buf[3]);
	return vnet_mix(h, len);
}

/* The payload is the last thing the hash takes: the parser only notes where it
 * is (up to 32 of the `avail` bytes at `off`), and vnet_finish_id reads and
 * hashes it once the field filter (which looks at headers only) has kept the
 * packet: a rejected packet costs no payload read. */
static __always_inline __u64 vnet_hash_later(struct vnet_cursor *c, __u64 h, __u32 off, __u32 avail)
{
	__u64 n = avail > VNET_PAYLOAD_HASH_BYTES ? VNET_PAYLOAD_HASH_BYTES : avail;

	if (n == 0) /* nothing to hash */
		return h;
	c->pay_off = off;
	c->pay_len = vnet_payload_len(vnet_untracked(n));
	c->pay = 1;
	return h;
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
		return vnet_hash_later(c, h, off, l4_len);
	}
	if (hdr_len > l4_len)
		return h;
	return vnet_hash_later(c, h, off + hdr_len, l4_len - hdr_len);
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
				return vnet_hash_later(c, vnet_mix(h, *(__u64 *)ext), off + ext_len,
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

/* Addresses, ports and the hash of the headers from the L3 header on; `proto`
 * is the ethertype (host order). Only fields that stay the same along the path
 * enter the hash: no TTL, no TOS, no checksums. vnet_finish_id adds the payload
 * and makes it the pkt_id. */
static __always_inline void vnet_parse_l3(struct vnet_cursor *c, struct vnet_event *ev, __u16 proto, __u32 len)
{
	__u64 h = 0x9e3779b97f4a7c15ULL;

	c->pay = 0;
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
			h = vnet_hash_later(c, h, c->off + ihl, tot - ihl);
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
		h = vnet_hash_later(c, h, c->off, len > 28 ? 28 : len);
	}
	goto out;
truncated:
	if (!c->paged)
		ev->flags |= VNET_F_TRUNCATED;
out:
	c->h = h;
	c->id = 1;
}

/* pkt_id: the headers' hash (vnet_parse_l3, the inner packet's after VXLAN),
 * then the payload, read only now. A packet whose headers could not be reached
 * (a cut VLAN tag) has none: 0. */
static __always_inline void vnet_finish_id(struct vnet_cursor *c, struct vnet_event *ev)
{
	__u64 h;

	if (!c->id)
		return;
	h = c->h;
	if (c->pay)
		h = vnet_hash_payload(c, h, c->pay_off, c->pay_len);
	if (c->paged)
		ev->flags |= VNET_F_ID_PARTIAL;
	ev->pkt_id = vnet_fmix(h);
}

/* VXLAN: identify the inner packet, so that it keeps its pkt_id (and its
 * tuple, for filters and output) across encapsulation and decapsulation. The
 * outer packet's payload is not hashed yet (vnet_hash_later): the inner parse
 * replaces what the outer one noted. */
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

/* TC: fill the addressing fields of `ev` from the packet, and in `c` the hash
 * of its headers (vnet_finish_id makes it the pkt_id). */
/* decap: report VXLAN traffic as its inner packet (a load-time constant). */
/* l3: the device has no link header, skb->data is the network header (a load-time constant). */
static __always_inline void vnet_parse_skb(struct vnet_cursor *c, struct __sk_buff *skb, struct vnet_event *ev,
					   bool decap, bool l3)
{
	const __u8 *data = (const __u8 *)(long)skb->data;
	const __u8 *data_end = (const __u8 *)(long)skb->data_end;
	__u16 proto = bpf_ntohs(skb->protocol);

	*c = (struct vnet_cursor){ .skb = skb, .base = BPF_HDR_START_NET, .data_off = l3 ? 0 : 14, .kernel = 0 };
	if (skb->vlan_present) {
		ev->vlan_tci = skb->vlan_tci;
		ev->flags |= VNET_F_VLAN;
	}
	/* The headers are read from the linear part directly (no helper call) where
	 * they are where the helper's base counts from: the network header at
	 * skb->data on a device without a link header, else after the Ethernet
	 * header (tc sees the packet from its MAC header, from which an in-band
	 * VLAN tag counts too). The packet must say so: an IP version that matches
	 * the protocol, or an ethertype that does; else the helper reads, as before. */
	if (l3)
		c->direct = data + 1 <= data_end && ((proto == VNET_ETH_P_IP && (data[0] >> 4) == 4) ||
						     (proto == VNET_ETH_P_IPV6 && (data[0] >> 4) == 6));
	else
		c->direct = data + 14 <= data_end && *(const __u16 *)(data + 12) == (__u16)skb->protocol;
	if (proto == VNET_ETH_P_8021Q || proto == VNET_ETH_P_8021AD) {
		/* In-band tag (no offload): the network header may not be past it. */
		__u16 tag[2];

		c->base = BPF_HDR_START_MAC;
		c->data_off = 0;
		if (vnet_load(c, 14, tag, sizeof(tag)) < 0) {
			ev->flags |= VNET_F_TRUNCATED;
			return;
		}
		ev->vlan_tci = bpf_ntohs(tag[0]);
		ev->flags |= VNET_F_VLAN;
		proto = bpf_ntohs(tag[1]);
		c->off = 18;
	}
	vnet_parse_l3(c, ev, proto, skb->len);
	if (decap)
		vnet_decap(c, ev, skb->len);
}

/* Kernel sk_buff (tracepoints, fentry, kprobe): what the hook knows without
 * parsing (the field filter's first tests need no more: vnet_filter_early).
 * `typed`: the verifier knows skb (and so skb->dev) by its BTF type, see
 * VNET_KREAD: plain loads instead of a bpf_probe_read_kernel per field. */
static __always_inline void vnet_kernel_meta(struct sk_buff *skb, struct vnet_event *ev, bool typed)
{
	struct net_device *dev = VNET_KREAD(typed, skb, dev);

	ev->skb_addr = (__u64)skb;
	ev->len = VNET_KREAD(typed, skb, len);
	ev->mark = VNET_KREAD(typed, skb, mark);
	if (dev) {
		ev->ifindex = VNET_KREAD(typed, dev, ifindex);
		ev->netns_cookie = vnet_dev_netns_cookie(dev, typed);
	}
	if (vnet_skb_vlan_present(skb, typed)) {
		ev->vlan_tci = VNET_KREAD(typed, skb, vlan_tci);
		ev->flags |= VNET_F_VLAN;
	}
}

#ifndef VNET_TC_ONLY
/* Kernel sk_buff, after vnet_kernel_meta: the same fields and header hash as
 * vnet_parse_skb. The network header offset is unset (0 or ~0) on fresh receive
 * skbs before the stack resets it: then the L3 header follows the Ethernet header. */
static __always_inline void vnet_parse_kernel_skb(struct vnet_cursor *c, struct sk_buff *skb, struct vnet_event *ev,
						  bool decap, bool typed)
{
	const __u8 *head = VNET_KREAD(typed, skb, head);
	const __u8 *data = VNET_KREAD(typed, skb, data);
	__u16 nh = VNET_KREAD(typed, skb, network_header);
	__u16 mh = VNET_KREAD(typed, skb, mac_header);
	__u16 proto = bpf_ntohs(VNET_KREAD(typed, skb, protocol));

	__u32 tail = VNET_KREAD(typed, skb, tail);
	__u32 l3_off; /* of c->l3 from head */

	*c = (struct vnet_cursor){ .kernel = 1 };
	if (nh != 0 && nh != (__u16)~0U)
		l3_off = nh;
	else if (mh != (__u16)~0U)
		l3_off = mh + 14;
	else
		l3_off = (__u32)(data - head);
	c->lin_end = head + tail;
	c->pkt_end = data + ev->len;
	if ((proto == VNET_ETH_P_8021Q || proto == VNET_ETH_P_8021AD) && mh != (__u16)~0U) {
		__u16 tag[2];

		if (bpf_probe_read_kernel(tag, sizeof(tag), head + mh + 14) < 0) {
			ev->flags |= VNET_F_TRUNCATED;
			return;
		}
		ev->vlan_tci = bpf_ntohs(tag[0]);
		ev->flags |= VNET_F_VLAN;
		proto = bpf_ntohs(tag[1]);
		l3_off = mh + 18;
	}
	c->l3 = head + l3_off;
	if (parse_cfg.copy) {
		__u32 zero = 0, n = tail - l3_off;

		if (typed && parse_cfg.direct) { /* the packet itself: nothing to copy */
			c->win = c->l3;
			if (tail > l3_off)
				c->win_len = n > VNET_KCOPY ? VNET_KCOPY : n;
			goto parse;
		}
		/* Set on every path, and never NULL after: a cursor with and one without
		 * a window would be two families of states for the verifier to walk. */
		c->win = bpf_map_lookup_elem(&vnet_kcopy_scratch, &zero);
		if (!c->win) { /* never: one entry per CPU */
			ev->flags |= VNET_F_TRUNCATED;
			return;
		}
		if (tail > l3_off) {
			if (n > VNET_KCOPY)
				n = VNET_KCOPY;
			barrier_var(n); /* 1..VNET_KCOPY, as a helper's length wants */
			n = ((n - 1) & (VNET_KCOPY - 1)) + 1;
			if (bpf_probe_read_kernel((void *)c->win, n, c->l3) == 0)
				c->win_len = n;
		}
	}
parse:
	vnet_parse_l3(c, ev, proto, ev->len);
	if (decap)
		vnet_decap(c, ev, ev->len);
}
#endif

#endif /* VNET_PACKET_BPF_H */
