/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The event ABI shared by every vnet program and by user space.
 *
 * Python never copies these offsets: it reads `struct vnet_event`, the enums and
 * the config structs from each object's BTF (vnet/binding/btf.py). Keep every
 * type here referenced by a program so that clang emits it into BTF.
 */
#ifndef VNET_EVENT_H
#define VNET_EVENT_H

/* Which kind of hook took the event (the probe itself is named by probe_id). */
enum vnet_hook {
	VNET_HOOK_TC_INGRESS = 1,
	VNET_HOOK_TC_EGRESS = 2,
	VNET_HOOK_TP_BTF = 3,
	VNET_HOOK_RAW_TP = 4,
	VNET_HOOK_TRACEPOINT = 5,
	VNET_HOOK_FENTRY = 6,
	VNET_HOOK_KPROBE = 7,
};

/* What a record in the ring is; every record starts with struct vnet_event_hdr. */
enum vnet_event_kind {
	VNET_KIND_PACKET = 1,      /* struct vnet_event */
	VNET_KIND_SCHED = 2,       /* struct vnet_sched_event */
	VNET_KIND_PACKET_MORE = 3, /* struct vnet_event_more: a packet event with the fields few events have */
};

/* vnet_event.flags */
enum vnet_event_flag {
	VNET_F_IPV4 = 1 << 0,
	VNET_F_IPV6 = 1 << 1,
	VNET_F_PORTS = 1 << 2,     /* sport/dport are valid */
	VNET_F_FRAGMENT = 1 << 3,  /* non-first IP fragment: no L4 header */
	VNET_F_VLAN = 1 << 4,      /* vlan_tci is valid */
	VNET_F_TRUNCATED = 1 << 5, /* headers ran past the packet end */
	VNET_F_NO_SKB = 1 << 6,    /* a function probe without a packet argument */
	VNET_F_ENCAP = 1 << 7,     /* VXLAN: the fields and pkt_id are the inner packet's; vni is set */
	VNET_F_SNAP_L3 = 1 << 8,   /* the captured bytes start at the IP header (no link header at this hook) */
	VNET_F_ID_PARTIAL = 1 << 9, /* kernel hook: bytes pkt_id hashes at tc (payload, or headers) are in page
				     * fragments, past the skb's linear part: left out, so the id may differ */
};

/* Snap-length capture (config `snaplen` > 0): every packet record is then
 * struct vnet_event_more followed by VNET_SNAP_MAX bytes, of which the first
 * snap_len are the packet as tcpdump would capture it at that hook. */
enum vnet_snap {
	VNET_SNAP_MAX = 256,
};

/* tcpdump expressions at kernel hooks (vnet_pcap_probe): the first
 * VNET_PCAP_WINDOW bytes of the packet are copied once, and the expression's
 * loads within them read that copy (vnet/tcpdump/translate.py). */
enum vnet_pcap {
	VNET_PCAP_WINDOW = 128,
};

/* The packet filter's `f_on` (struct vnet_filter). */
enum vnet_filter_on {
	VNET_FILTER_ON = 1,      /* some criterion is set */
	VNET_FILTER_ON_PCAP = 2, /* ... and the tuple criteria are implied by the tcpdump expression
				  * (vnet/tcpdump/prejudge.py): a cheaper first test of it on plain
				  * packets (step 2a), not applied to the parsed (VXLAN: inner) packet */
};

/* What the first test of plain packets (step 2a, vnet_filter_plain_may_keep)
 * leaves to the rest of the filter, besides what is not plain. */
enum vnet_plain_test {
	VNET_PLAIN_SCTP_PORTS_LATER = 1, /* an SCTP packet where ports are criteria: libpcap's `port` is
					  * SCTP's too, and with this vnet/tcpdump/prejudge.py can derive
					  * a port criterion from `port 53` (the field filters' ports are
					  * TCP's and UDP's: their parse rejects the packet) */
};

/* Indexes of the per-CPU `vnet_stats` array: every loss is counted. */
enum vnet_stat {
	VNET_STAT_SEEN = 0,     /* packets the program ran on */
	VNET_STAT_EMITTED = 1,  /* events committed to the ring */
	VNET_STAT_LOST = 2,     /* ring full: event dropped, counted here */
	VNET_STAT_FILTERED = 3, /* packets the in-kernel filter left out (on purpose) */
	VNET_STAT_MAX = 4,
};

/* Every record is sized so that, with the ring's 8-byte header, it fills whole
 * 64-byte cache lines (the line_pad members; tests/unit/test_btf_layout.py checks
 * it against BTF): then every record starts on a line and the program's stores
 * never share a line with a record the reader's CPU is reading. A 120-byte record
 * written at a line's offset 56 touches three lines, at offset 0 two. */
enum vnet_ring_line {
	VNET_RING_LINE = 64,
};

/* The common head of every ring record. */
struct vnet_event_hdr {
	__u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 probe_id;     /* which attachment: set per program instance by user space */
	__u16 kind;         /* enum vnet_event_kind */
	__u16 cpu;
};

struct vnet_event {
	struct vnet_event_hdr hdr;
	__u64 pkt_id;       /* fingerprint of fields invariant along the path */
	__u64 skb_addr;     /* tells clones and retransmissions apart on one host; 0 at tc */
	__u64 netns_cookie; /* 0 where the hook cannot tell (tc: user space knows it) */
	__u32 ifindex;      /* skb->dev; 0 when the skb has no device yet */
	__u32 len;          /* skb->len at the hook */
	__u32 mark;         /* skb->mark */
	__u32 tcp_seq;      /* host order; valid for TCP */
	__u32 tcp_ack;
	__u32 vni;          /* VXLAN network identifier, with VNET_F_ENCAP. Here, it keeps the fields below at
			     * the offsets (mod 8) Linux 6.1's verifier prunes well: 4 bytes earlier, they cost
			     * it 1.4-1.6x the work (tests/unit/test_btf_layout.py) */
	__u16 hook;         /* enum vnet_hook */
	__u16 eth_proto;    /* host order, e.g. 0x0800 */
	__u16 flags;        /* enum vnet_event_flag */
	__u16 sport;        /* host order; ICMP: id */
	__u16 dport;        /* host order; ICMP: type << 8 | code */
	__u16 ip_id;        /* IPv4 identification, host order */
	__u16 vlan_tci;
	__u8 l4_proto;      /* IPPROTO_*; for IPv6 the last next-header seen */
	__u8 tcp_flags;
	__u8 ttl;           /* IPv4 ttl / IPv6 hop limit */
	__u8 pad;
	__u16 snap_len;     /* packet bytes captured after the record's struct (0..VNET_SNAP_MAX) */
	__u8 saddr[16];     /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u8 line_pad[4];   /* to 120 bytes: two lines in the ring */
};

/* The fields most packet events leave zero, in a record of their own kind so
 * that the others stay two cache lines in the ring (they made every record two
 * and a half): drops, socket probes (the task), snap captures. */
struct vnet_event_more {
	struct vnet_event ev;
	__u32 pid;          /* current tgid where the probe records it (socket probes, drops), else 0 */
	__u32 reason;       /* drop reason (enum skb_drop_reason of the running kernel) */
	__u32 snap_wire;    /* with snap_len: the packet's length from where those bytes start (pcap's wire length) */
	char comm[16];      /* current task where pid is set */
	__u8 line_pad_more[36]; /* to 184 bytes: three lines in the ring (and a snap record, VNET_SNAP_MAX more, seven) */
};

/* A watched thread got a CPU: how long it waited runnable in the run queue,
 * and who ran on that CPU just before it. */
struct vnet_sched_event {
	struct vnet_event_hdr hdr;
	__u64 runq_ns;      /* wakeup (or preemption) -> on CPU */
	__u32 pid;          /* the thread (kernel pid = tid) */
	__u32 tgid;         /* its process */
	__u32 prev_pid;     /* the thread it replaced on this CPU */
	__u32 pad;
	char comm[16];
	char prev_comm[16];
	__u8 line_pad[48];  /* to 120 bytes: two lines in the ring */
};

/* Per-CPU event areas (vnet_common.bpf.h, vnet_area_emit): packet events go to
 * an area only their own CPU writes, in the ring's record framing, without the
 * ring's lock. A CPU's area is `area_chunks` elements of the vnet_areas array
 * from its vnet_area_pos.first_chunk on, one stretch of memory to a reader; a
 * record never crosses a chunk's end, where the verifier bounds a program's
 * writes (what is left of the chunk becomes a discarded record). */
enum vnet_area {
	VNET_AREA_CHUNK = 1 << 20, /* bytes of a chunk (an element of vnet_areas) */
	VNET_AREA_BUSY = 1,        /* vnet_area_pos.busy: a program of this CPU is writing */
	VNET_AREA_NONE = 2,        /* ... this CPU has no area (it was offline at the start) */
};

/* One CPU's positions in its area: free-running byte counts, as the ring's; the
 * producer's and the reader's in lines of their own. */
struct vnet_area_pos {
	__u64 prod;          /* written by this CPU's programs: the records before it are complete */
	__u64 busy;          /* enum vnet_area, 0: free. Not free: the event goes to the ring (a program
			      * nested in another, an interrupt, finds it busy) */
	__u32 first_chunk;   /* set by user space: the index of this CPU's first chunk in vnet_areas */
	__u32 pad;
	__u64 line_pad[5];
	__u64 cons;          /* written by the reader: the records before it may be overwritten */
	__u64 line_pad_cons[7];
};

#endif /* VNET_EVENT_H */
