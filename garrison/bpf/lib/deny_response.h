/* SPDX-License-Identifier: Apache-2.0
 * Answers for denied connections (a garrison extension; `garrison endpoint config NAME
 * deny-response=icmp|tcp-reset`): instead of dropping silently what the L3/L4 policy of an
 * endpoint denies, send the sender what a host refusing it would:
 *   icmp       ICMP destination unreachable, code 13 (communication administratively
 *              prohibited), quoting the denied packet's IP header and its first 8 bytes
 *              beyond (RFC 792), from the denied packet's destination address;
 *   tcp-reset  for TCP, a RST as a closed port answers (RFC 793): to a segment without ACK,
 *              RST|ACK with seq 0 and ack = its seq + its length (SYN and FIN count one);
 *              to one with ACK, RST with seq = its ack. Anything else: as icmp.
 * The denied packet itself becomes the answer (rewritten in place: bpf_skb_change_tail to
 * shrink it to a RST, bpf_skb_adjust_room to open room for the ICMP headers before the
 * quoted header), so nothing is allocated, and it is redirected back the way it came:
 *   at from_container (tc ingress: it came out of the endpoint) with bpf_redirect_peer into
 *   the endpoint's own interface; no tc hook runs on the way in;
 *   at to_container (tc egress: it was entering the endpoint) with bpf_redirect to the
 *   ingress of the same host veth, marked GAR_MARK_DENY_RESPONSE so that from_container
 *   passes it without a lookup, and the host routes it to the sender as any packet of the
 *   endpoint.
 * Never answered: an ICMP message other than an echo request (never an error for an
 * error), a TCP segment carrying RST, a packet to or from a multicast or broadcast address
 * (Ethernet or IPv4: 224.0.0.0/3 includes 255.255.255.255), a packet from 0.0.0.0/8 or
 * 127.0.0.0/8, one too short to quote. And at most GAR_DENY_RESPONSE_BURST answers at once,
 * then one per GAR_DENY_RESPONSE_INTERVAL_NS, per CPU (a token bucket, Linux's own ICMP
 * rate): an answer is never larger than 28 bytes plus the denied packet's first 68, one per
 * denied packet, so a flood of denied packets cannot be turned into a larger one.
 * Checksums: IP and TCP/ICMP are computed in full here. A packet the local stack sent
 * with checksum offload (CHECKSUM_PARTIAL) keeps that state (there is no helper to clear
 * it); its receiver is local (the endpoint, or the host that sent it) and does not verify
 * it. The kernel will not cut such a packet before its L4 checksum field: its ICMP answer
 * quotes 20 bytes beyond the IP header instead of 8, and a TCP segment of it with IP options
 * is answered with ICMP instead of a RST.
 */
#ifndef GARRISON_LIB_DENY_RESPONSE_H
#define GARRISON_LIB_DENY_RESPONSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/icmp.h>
#include "../abi.h"
#include "packet.h"
#include "events.h"

#define GAR_ICMP_PKT_FILTERED 13 /* communication administratively prohibited */
#define GAR_ANSWER_TTL        64

struct gar_deny_response_budget {
	__u64 credit_ns; /* time credited to answers not yet sent, at most BURST intervals */
	__u64 last_ns;
};

/* Per CPU, not pinned: a restarted agent starts with a full bucket. */
BPF_PERCPU_ARRAY(gar_deny_response_budget, struct gar_deny_response_budget, 1);

static __always_inline int gar_deny_response_take(void)
{
	const __u64 interval = GAR_DENY_RESPONSE_INTERVAL_NS;
	const __u64 full = GAR_DENY_RESPONSE_BURST * interval;
	struct gar_deny_response_budget *b;
	__u32 zero = 0;
	__u64 now = bpf_ktime_get_ns(), credit;

	b = gar_deny_response_budget.lookup(&zero);
	if (!b)
		return 0;
	credit = b->credit_ns + (now - b->last_ns);
	if (credit > full || now < b->last_ns)
		credit = full;
	b->last_ns = now;
	if (credit < interval) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - interval;
	return 1;
}

/* The ones' complement sum of `words` 16-bit words (any byte order: the sum is stored as
 * read). */
static __always_inline __u32 gar_sum16(const void *data, const int words)
{
	const __u16 *w = data;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < words; i++)
		sum += w[i];
	return sum;
}

static __always_inline __u16 gar_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline void gar_answer_ip(struct iphdr *out, const struct iphdr *in,
					  __u8 protocol, __u16 length, __u8 tos, __u16 frag)
{
	out->version = 4;
	out->ihl = 5;
	out->tos = tos;
	out->tot_len = gar_htons(length);
	out->id = 0;
	out->frag_off = gar_htons(frag);
	out->ttl = GAR_ANSWER_TTL;
	out->protocol = protocol;
	out->check = 0;
	out->saddr = in->daddr; /* from the address the sender tried to reach */
	out->daddr = in->saddr;
	out->check = gar_fold(gar_sum16(out, 10));
}

static __always_inline int gar_answer_eth(struct __sk_buff *skb, const struct ethhdr *in)
{
	struct ethhdr out;

	__builtin_memcpy(out.h_dest, in->h_source, ETH_ALEN);
	__builtin_memcpy(out.h_source, in->h_dest, ETH_ALEN);
	out.h_proto = in->h_proto;
	return bpf_skb_store_bytes(skb, 0, &out, sizeof(out), 0);
}

struct gar_answer_tcp {
	struct iphdr ip;
	struct tcphdr tcp;
};

/* The denied TCP segment becomes the RST (eth + 20 + 20 bytes). Returns 0, -1 (failed), or
 * 1: this one cannot be cut to a RST, answer with ICMP (a segment with IP options the local
 * stack sent with checksum offload: the kernel keeps a CHECKSUM_PARTIAL packet at least as
 * long as its checksum field's end). */
static __always_inline int gar_answer_rst(struct __sk_buff *skb, const struct ethhdr *eth,
					  const struct iphdr *ip)
{
	struct gar_answer_tcp a = {};
	struct tcphdr th;
	__u32 hlen = ip->ihl * 4, len = gar_ntohs(ip->tot_len), seglen = 0, sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN + hlen, &th, sizeof(th)) < 0)
		return -1;
	if (len > hlen + th.doff * 4)
		seglen = len - hlen - th.doff * 4;
	gar_answer_ip(&a.ip, ip, IPPROTO_TCP, sizeof(a), 0, GAR_IP_DF);
	a.tcp.source = th.dest;
	a.tcp.dest = th.source;
	a.tcp.doff = 5;
	a.tcp.rst = 1;
	if (th.ack) {
		a.tcp.seq = th.ack_seq;
	} else {
		a.tcp.ack = 1;
		a.tcp.ack_seq = gar_htonl(gar_ntohl(th.seq) + seglen + th.syn + th.fin);
	}
	/* pseudo header: addresses, protocol, TCP length */
	sum = gar_sum16(&a.ip.saddr, 4) + gar_htons(IPPROTO_TCP) + gar_htons(sizeof(a.tcp));
	a.tcp.check = gar_fold(sum + gar_sum16(&a.tcp, sizeof(a.tcp) / 2));

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(a), 0) < 0)
		return hlen > sizeof(*ip) ? 1 : -1;
	if (gar_answer_eth(skb, eth) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN, &a, sizeof(a), 0) < 0 ? -1 : 0;
}

struct gar_answer_icmp {
	struct iphdr ip;
	struct icmphdr icmp;
};

/* The denied packet becomes the ICMP error: 28 bytes of new headers opened after the
 * Ethernet header, the packet cut after what is quoted: its IP header and 8 more bytes, or
 * 20 when the kernel refuses that cut (a packet the local stack sent with checksum offload,
 * CHECKSUM_PARTIAL, is kept at least as long as its L4 checksum field's end: 18 bytes into
 * TCP). RFC 1812 allows quoting more than RFC 792's 8 bytes. */
static __always_inline int gar_answer_icmp(struct __sk_buff *skb, const struct ethhdr *eth,
					   const struct iphdr *ip)
{
	struct gar_answer_icmp a = {};
	__u32 quoted[15 + 2] = {}, more[3] = {}; /* the IP header (options too), 8 + 12 bytes */
	__u32 hlen = ip->ihl * 4, len = gar_ntohs(ip->tot_len), qlen = hlen + 8, sum;
	int have_more = len >= hlen + 20 && skb->len >= ETH_HLEN + hlen + 20;

	if (len < hlen + 8 || skb->len < ETH_HLEN + hlen + 8)
		return -1;
	__builtin_memcpy(quoted, ip, sizeof(*ip));
#pragma unroll
	for (int i = 0; i < 10; i++) {
		if (sizeof(*ip) + i * 4 < hlen &&
		    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*ip) + i * 4, &quoted[5 + i], 4) < 0)
			return -1;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN + hlen, &quoted[15], 8) < 0)
		return -1;
	if (have_more && bpf_skb_load_bytes(skb, ETH_HLEN + hlen + 8, more, sizeof(more)) < 0)
		return -1;

	if (bpf_skb_adjust_room(skb, sizeof(a), BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;
	/* the words not loaded are zero and add nothing */
	sum = gar_sum16(quoted, sizeof(quoted) / 2);
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(a) + qlen, 0) < 0) {
		if (!have_more)
			return -1;
		qlen = hlen + 20;
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(a) + qlen, 0) < 0)
			return -1;
		sum += gar_sum16(more, sizeof(more) / 2);
	}
	gar_answer_ip(&a.ip, ip, IPPROTO_ICMP, sizeof(a) + qlen, 0xc0, 0);
	a.icmp.type = ICMP_DEST_UNREACH;
	a.icmp.code = GAR_ICMP_PKT_FILTERED;
	a.icmp.checksum = gar_fold(sum + gar_sum16(&a.icmp, sizeof(a.icmp) / 2));
	if (gar_answer_eth(skb, eth) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN, &a, sizeof(a), 0) < 0 ? -1 : 0;
}

static __always_inline int gar_unanswerable_addr(__be32 addr, int source)
{
	__u8 first = ((const __u8 *)&addr)[0];

	if (first >= 224) /* multicast, reserved, limited broadcast */
		return 1;
	return source && (first == 0 || first == 127);
}

/* Answer the denied packet when its endpoint asks for it (`ep_flags`, GAR_EP_DENY_RESPONSE_*)
 * and it may be answered. Returns the GAR_EVENT_F_DENY_RESPONSE_* flag of the answer on its
 * way (the caller returns TC_ACT_REDIRECT), or 0: nothing was sent and the caller drops the
 * packet (it may be half rewritten then). */
static __always_inline __u8 gar_deny_response(struct __sk_buff *skb,
					      const struct gar_packet *pkt, __u32 ep_flags,
					      __u8 obs)
{
	__u32 mode = ep_flags & (GAR_EP_DENY_RESPONSE_ICMP | GAR_EP_DENY_RESPONSE_TCP_RESET);
	struct ethhdr eth;
	struct iphdr ip;
	__u8 sent;
	long rc;

	if (!mode)
		return 0;
	if (pkt->tuple.protocol == IPPROTO_ICMP && pkt->dport != GAR_ICMP_ECHO_REQUEST)
		return 0;
	if (pkt->tuple.protocol == IPPROTO_TCP && (pkt->tcp_flags & GAR_TCP_RST))
		return 0;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return 0;
	if ((eth.h_dest[0] & 1) || gar_unanswerable_addr(ip.daddr, 0) ||
	    gar_unanswerable_addr(ip.saddr, 1))
		return 0;
	if (!gar_deny_response_take()) {
		gar_count(obs, GAR_COUNT_DENY_RESPONSE_LIMITED, pkt->length);
		return 0;
	}
	sent = GAR_EVENT_F_DENY_RESPONSE_ICMP;
	if (pkt->tuple.protocol == IPPROTO_TCP && (mode & GAR_EP_DENY_RESPONSE_TCP_RESET)) {
		rc = gar_answer_rst(skb, &eth, &ip);
		if (rc < 0)
			return 0;
		if (rc == 0)
			sent = GAR_EVENT_F_DENY_RESPONSE_TCP_RESET;
	}
	if (sent == GAR_EVENT_F_DENY_RESPONSE_ICMP && gar_answer_icmp(skb, &eth, &ip) < 0)
		return 0;
	if (obs == GAR_OBS_FROM_CONTAINER) {
		rc = bpf_redirect_peer(skb->ifindex, 0);
	} else {
		skb->mark = (skb->mark & ~GAR_MARK_MASK) | GAR_MARK_DENY_RESPONSE;
		rc = bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	}
	if (rc != TC_ACT_REDIRECT)
		return 0;
	gar_count(obs, GAR_COUNT_DENY_RESPONSE_SENT, pkt->length);
	return sent;
}

#endif
