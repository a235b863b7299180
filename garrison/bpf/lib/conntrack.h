/* SPDX-License-Identifier: Apache-2.0
 * Connection tracking: one node-wide LRU table keyed by a connection's original tuple.
 * A connection is judged by policy once, when its first packet has no entry; every later
 * packet of either direction finds the entry and passes. Replies pass because their reversed
 * tuple is the original; a new connection from the other side has a tuple of its own and is
 * judged by policy. Entries expire (expires_ns, CLOCK_MONOTONIC) after the timeout of their
 * TCP state; garbage collection deletes expired entries from Python (garrison.bpf.maps), and
 * an expired entry found here is ignored, so a late packet is judged again. */
#ifndef GARRISON_LIB_CONNTRACK_H
#define GARRISON_LIB_CONNTRACK_H

#include "../abi.h"
#include "config.h"
#include "packet.h"

#ifndef GAR_CT_MAX
#define GAR_CT_MAX 131072
#endif

BPF_TABLE_PINNED("lru_hash", struct gar_ct_key, struct gar_ct_entry, gar_ct, GAR_CT_MAX,
		 GAR_PIN(gar_ct));

enum gar_ct_dir {
	GAR_CT_NEW = 0,
	GAR_CT_ORIGINAL = 1,
	GAR_CT_REPLY = 2,
};

static __always_inline struct gar_ct_entry *gar_ct_lookup(const struct gar_packet *pkt,
							  __u64 now, int *dir)
{
	struct gar_ct_key reversed = {};
	struct gar_ct_entry *entry;

	entry = gar_ct.lookup((struct gar_ct_key *)&pkt->tuple);
	if (entry && entry->expires_ns > now) {
		*dir = GAR_CT_ORIGINAL;
		return entry;
	}
	gar_reverse(&pkt->tuple, &reversed);
	entry = gar_ct.lookup(&reversed);
	if (entry && entry->expires_ns > now) {
		*dir = GAR_CT_REPLY;
		return entry;
	}
	*dir = GAR_CT_NEW;
	return 0;
}

static __always_inline __u64 gar_ct_lifetime(__u16 flags, __u8 proto)
{
	__u32 zero = 0;
	struct gar_config *cfg = gar_config.lookup(&zero);
	__u32 syn = 0, tcp = 0, close = 0, other = 0;

	if (cfg) {
		syn = cfg->ct_timeout_syn_s;
		tcp = cfg->ct_timeout_tcp_s;
		close = cfg->ct_timeout_close_s;
		other = cfg->ct_timeout_other_s;
	}
	if (proto != IPPROTO_TCP)
		return gar_seconds(other, GAR_CT_TIMEOUT_OTHER_S_DEFAULT);
	if ((flags & GAR_CT_RST) || (flags & (GAR_CT_FIN_ORIG | GAR_CT_FIN_REPLY)) ==
					    (GAR_CT_FIN_ORIG | GAR_CT_FIN_REPLY))
		return gar_seconds(close, GAR_CT_TIMEOUT_CLOSE_S_DEFAULT);
	if (flags & GAR_CT_ESTABLISHED)
		return gar_seconds(tcp, GAR_CT_TIMEOUT_TCP_S_DEFAULT);
	return gar_seconds(syn, GAR_CT_TIMEOUT_SYN_S_DEFAULT);
}

/* The TCP state machine, as far as timeouts need it. */
static __always_inline __u16 gar_ct_next_flags(__u16 flags, __u8 tcp, int dir)
{
	if (dir == GAR_CT_REPLY) {
		flags |= GAR_CT_SEEN_REPLY;
		if (tcp & GAR_TCP_FIN)
			flags |= GAR_CT_FIN_REPLY;
	} else {
		if ((tcp & GAR_TCP_ACK) && !(tcp & GAR_TCP_SYN) && (flags & GAR_CT_SEEN_REPLY))
			flags |= GAR_CT_ESTABLISHED;
		if (tcp & GAR_TCP_FIN)
			flags |= GAR_CT_FIN_ORIG;
	}
	if (tcp & GAR_TCP_RST)
		flags |= GAR_CT_RST;
	return flags;
}

static __always_inline void gar_ct_update(struct gar_ct_entry *entry,
					  const struct gar_packet *pkt, int dir, __u64 now)
{
	__u16 flags = gar_ct_next_flags(entry->flags, pkt->tcp_flags, dir);
	__u64 expires;

	if (dir == GAR_CT_REPLY) {
		entry->packets_reply++;
		if ((entry->tcp_flags_reply | pkt->tcp_flags) != entry->tcp_flags_reply)
			entry->tcp_flags_reply |= pkt->tcp_flags;
	} else {
		entry->packets_orig++;
		if ((entry->tcp_flags_orig | pkt->tcp_flags) != entry->tcp_flags_orig)
			entry->tcp_flags_orig |= pkt->tcp_flags;
	}
	if (flags != entry->flags)
		entry->flags = flags;
	expires = now + gar_ct_lifetime(flags, pkt->tuple.protocol);
	/* a write per packet would bounce the cache line between CPUs: once a second is plenty */
	if (expires > entry->expires_ns + 1000000000ULL || expires < entry->expires_ns)
		entry->expires_ns = expires;
}

/* ICMP errors (destination unreachable 3, time exceeded 11, parameter problem 12) quote the
 * IP header and first 8 bytes of the packet they answer. One that the packet's own
 * destination sends back to its source, about a connection the table holds (either
 * direction), is related to that connection and passes as its replies do (netfilter's and
 * Cilium's RELATED): a UDP client gets its port unreachable, whatever its ingress policy
 * says of ICMP. An error from anyone else (a router on the way, or a peer quoting some
 * other connection) is judged by policy as any ICMP message is. Quoted protocols: TCP, UDP,
 * SCTP and an echo request. */
#define GAR_ICMP_ERRORS ((1U << 3) | (1U << 11) | (1U << 12))

static __always_inline int gar_ct_related(struct __sk_buff *skb, const struct gar_packet *pkt,
					  __u64 now)
{
	struct gar_ct_key quoted = {}, reversed = {};
	struct gar_ct_entry *entry;
	struct iphdr ip;
	__u8 l4[8];

	if (pkt->tuple.protocol != IPPROTO_ICMP || pkt->dport >= 32 ||
	    !((1U << pkt->dport) & GAR_ICMP_ERRORS))
		return 0;
	if (bpf_skb_load_bytes(skb, pkt->l4off + 8, &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.version != 4 || ip.ihl < 5 || (ip.frag_off & gar_htons(GAR_IP_OFFSET)) ||
	    ip.saddr != pkt->tuple.daddr || ip.daddr != pkt->tuple.saddr)
		return 0;
	if (bpf_skb_load_bytes(skb, pkt->l4off + 8 + ip.ihl * 4, l4, 8) < 0)
		return 0;
	quoted.saddr = ip.saddr;
	quoted.daddr = ip.daddr;
	quoted.protocol = ip.protocol;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP ||
	    ip.protocol == IPPROTO_SCTP) {
		__builtin_memcpy(&quoted.sport, &l4[0], 2);
		__builtin_memcpy(&quoted.dport, &l4[2], 2);
	} else if (ip.protocol == IPPROTO_ICMP && l4[0] == GAR_ICMP_ECHO_REQUEST) {
		__builtin_memcpy(&quoted.sport, &l4[4], 2); /* a query's tuple: gar_parse */
	} else {
		return 0;
	}
	entry = gar_ct.lookup(&quoted);
	if (entry && entry->expires_ns > now)
		return 1;
	gar_reverse(&quoted, &reversed);
	entry = gar_ct.lookup(&reversed);
	return entry && entry->expires_ns > now;
}

/* A new entry for a connection policy has admitted; returns 0 or a drop reason. */
static __always_inline int gar_ct_create(const struct gar_packet *pkt, __u64 now,
					 __u32 src_identity, __u32 dst_identity, __u16 flags,
					 __u16 proxy_port)
{
	struct gar_ct_entry entry = {
		.packets_orig = 1,
		.src_identity = src_identity,
		.dst_identity = dst_identity,
		.proxy_port = proxy_port,
		.tcp_flags_orig = pkt->tcp_flags,
	};

	entry.flags = gar_ct_next_flags(flags, pkt->tcp_flags, GAR_CT_ORIGINAL);
	entry.expires_ns = now + gar_ct_lifetime(entry.flags, pkt->tuple.protocol);
	if (gar_ct.update((struct gar_ct_key *)&pkt->tuple, &entry) < 0)
		return GAR_DROP_CT_INSERT_FAILED;
	return 0;
}

#endif
