/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* tcpdump expressions. User space compiles the expression with libpcap,
 * translates the classic BPF into eBPF (vnet/tcpdump/translate.py) and, when
 * libbpf prepares each program for load, replaces the bodies of the two stubs
 * below with it (vnet/binding/splice.py). The expression sees
 * the packet as a capture on that device would: from the Ethernet header on,
 * with a VLAN tag the kernel moved into the skb put back; or from the IP header
 * where the hook sees L3 only. A packet it rejects costs no parse, no event. */
#ifndef VNET_PCAP_BPF_H
#define VNET_PCAP_BPF_H

#include "vnet_packet.bpf.h" /* parse_cfg: how kernel hooks read the packet */
#include <bpf/bpf_core_read.h>

#define VNET_ARPHRD_ETHER 1
#define VNET_ARPHRD_LOOPBACK 772 /* a zeroed Ethernet header, as tcpdump -i lo sees it */
#define VNET_PCAP_TAG_COPY 256   /* bytes after the MAC addresses copied with a VLAN tag put back */

struct vnet_pcap_copy {
	__u8 b[16 + VNET_PCAP_TAG_COPY];
};
_Static_assert(VNET_PCAP_WINDOW <= sizeof(struct vnet_pcap_copy), "the window is a copy's first bytes");

/* Per CPU and per program instance, without a lock: a program never runs
 * nested in itself on one CPU (the kernel's recursion guard skips it). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vnet_pcap_copy);
} vnet_pcap_scratch SEC(".maps");

/* The stubs. Their bodies never reach the kernel: they keep every argument
 * alive and the result opaque, so that the compiler passes each argument in
 * its register (r1..r4) and cannot assume what the spliced code returns. */
static __noinline int vnet_pcap_direct(struct __sk_buff *skb, void *data, void *data_end, __u32 wirelen)
{
	int verdict = 1;

	asm volatile("" : "+r"(verdict) : "r"(skb), "r"(data), "r"(data_end), "r"(wirelen));
	return verdict;
}

/* `win`: scratch memory holding the first min(caplen, VNET_PCAP_WINDOW) bytes
 * of `data` (or `data` itself, when that is the scratch copy). */
static __noinline int vnet_pcap_probe(const void *data, __u32 caplen, __u32 wirelen, __u32 l2, const void *win)
{
	int verdict = 2;

	asm volatile("" : "+r"(verdict) : "r"(data), "r"(caplen), "r"(wirelen), "r"(l2), "r"(win));
	return verdict;
}

/* A per-CPU copy of the packet's first bytes: the window the expression's
 * loads read (kernel hooks), or the bytes with a VLAN tag the kernel keeps in
 * the skb put back between the MAC addresses and the rest. */
static __always_inline struct vnet_pcap_copy *vnet_pcap_scratch_buf(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&vnet_pcap_scratch, &zero);
}

/* 1..VNET_PCAP_TAG_COPY, restated behind a barrier: Linux 6.1's verifier wants
 * a lower bound it can see on a helper's length (see vnet_hash_payload). */
static __always_inline __u32 vnet_pcap_copy_len(__u32 n)
{
	if (n > VNET_PCAP_TAG_COPY)
		n = VNET_PCAP_TAG_COPY;
	barrier_var(n);
	return ((n - 1) & (VNET_PCAP_TAG_COPY - 1)) + 1;
}

/* TC: user space spliced the program for the device's link type into the
 * direct stub; a packet with its VLAN tag in the skb goes through a copy. */
static __always_inline bool vnet_pcap_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct vnet_pcap_copy *c;
	__u32 rest, n, l2;

	if (!skb->vlan_present)
		return vnet_pcap_direct(skb, data, data_end, skb->len);
	c = vnet_pcap_scratch_buf();
	if (!c || skb->len < 12 || bpf_skb_load_bytes(skb, 0, c->b, 12) < 0)
		return false;
	*(__u16 *)&c->b[12] = skb->vlan_proto; /* network order already */
	*(__u16 *)&c->b[14] = bpf_htons(skb->vlan_tci);
	rest = skb->len - 12;
	n = 0;
	if (rest) {
		n = vnet_pcap_copy_len(rest);
		if (bpf_skb_load_bytes(skb, 12, &c->b[16], n) < 0)
			return false;
	}
	l2 = 1;
	barrier_var(l2); /* a literal would be folded into the stub, whose body is replaced */
	return vnet_pcap_probe(c->b, 16 + n, skb->len + 4, l2, c->b);
}

/* Kernel sk_buff (tracepoints, fentry, kprobe): where a capture at this hook
 * starts. The Ethernet view when the device has Ethernet headers and the skb's
 * MAC header is set and sits right before its network header (receive and
 * transmit paths alike); else the network header on. Only the linear part is
 * readable here: `caplen` of the `wirelen` bytes from `start`. */
struct vnet_skb_view {
	const __u8 *start;
	__u32 caplen;
	__u32 wirelen;
	bool l2;
};

static __always_inline bool vnet_kernel_view(struct sk_buff *skb, struct vnet_skb_view *v, bool typed)
{
	const __u8 *head = VNET_KREAD(typed, skb, head);
	__u32 data_off = (__u32)((const __u8 *)VNET_KREAD(typed, skb, data) - head);
	__u32 len = VNET_KREAD(typed, skb, len);
	__u32 tail = VNET_KREAD(typed, skb, tail);
	__u16 mh = VNET_KREAD(typed, skb, mac_header);
	__u16 nh = VNET_KREAD(typed, skb, network_header);
	struct net_device *dev = VNET_KREAD(typed, skb, dev);
	bool nh_set = nh != 0 && nh != (__u16)~0U;
	bool l2 = false;
	__u32 start;

	if (mh != (__u16)~0U && mh <= data_off && (!nh_set || nh >= mh + 14)) {
		__u16 type = dev ? VNET_KREAD(typed, dev, type) : VNET_ARPHRD_ETHER;

		l2 = type == VNET_ARPHRD_ETHER || type == VNET_ARPHRD_LOOPBACK;
	}
	start = l2 ? mh : (nh_set ? nh : data_off);
	if (start > data_off + len || tail < start)
		return false;
	v->start = head + start;
	v->wirelen = data_off + len - start;
	v->caplen = tail - start;
	if (v->caplen > v->wirelen)
		v->caplen = v->wirelen;
	v->l2 = l2;
	return true;
}

/* The expression on that view (`typed`: see VNET_KREAD). */
static __always_inline bool vnet_pcap_kernel(struct sk_buff *skb, bool typed)
{
	struct vnet_skb_view v;
	struct vnet_pcap_copy *c;
	__u32 rest, n;
	bool l2, tagged;

	if (!vnet_kernel_view(skb, &v, typed))
		return false;
	l2 = v.l2;
	tagged = l2 && vnet_skb_vlan_present(skb, typed);
	/* The expression's loads read the packet in place where the verifier
	 * allows it (parse_cfg.direct: no copy at all) ... */
	if (!tagged && typed && parse_cfg.direct)
		return vnet_pcap_probe(v.start, v.caplen, v.wirelen, l2, v.start);
	c = vnet_pcap_scratch_buf();
	if (!c)
		return false;
	if (!tagged) {
		/* ... else one copy of the bytes most expressions look at, instead
		 * of a bpf_probe_read_kernel per load (~20 ns each). */
		n = v.caplen > VNET_PCAP_WINDOW ? VNET_PCAP_WINDOW : v.caplen;
		if (n) {
			barrier_var(n); /* 1..VNET_PCAP_WINDOW to Linux 6.1's verifier too */
			n = ((n - 1) & (VNET_PCAP_WINDOW - 1)) + 1;
			if (bpf_probe_read_kernel(c->b, n, v.start) < 0)
				return false;
		}
		return vnet_pcap_probe(v.start, v.caplen, v.wirelen, l2, c->b);
	}

	/* The tag is in the skb, not in the bytes: put it back. */
	if (v.caplen < 12 || bpf_probe_read_kernel(c->b, 12, v.start) < 0)
		return false;
	*(__u16 *)&c->b[12] = VNET_KREAD(typed, skb, vlan_proto);
	*(__u16 *)&c->b[14] = bpf_htons(VNET_KREAD(typed, skb, vlan_tci));
	rest = v.caplen - 12;
	n = 0;
	if (rest) {
		n = vnet_pcap_copy_len(rest);
		if (bpf_probe_read_kernel(&c->b[16], n, v.start + 12) < 0)
			return false;
	}
	l2 = true;
	barrier_var(l2);
	return vnet_pcap_probe(c->b, 16 + n, v.wirelen + 4, l2, c->b);
}

#endif /* VNET_PCAP_BPF_H */
