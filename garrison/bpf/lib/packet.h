/* SPDX-License-Identifier: Apache-2.0
 * Reading the headers a decision needs: Ethernet, IPv4, the first bytes of TCP/UDP/SCTP/ICMP.
 * bpf_skb_load_bytes copes with non-linear skbs, so nothing here depends on how the kernel
 * laid the packet out. */
#ifndef GARRISON_LIB_PACKET_H
#define GARRISON_LIB_PACKET_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include "../abi.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define gar_htons(x) ((__be16)__builtin_bswap16(x))
#define gar_ntohs(x) ((__u16)__builtin_bswap16(x))
#define gar_htonl(x) ((__be32)__builtin_bswap32(x))
#define gar_ntohl(x) ((__u32)__builtin_bswap32(x))
#else
#define gar_htons(x) ((__be16)(x))
#define gar_ntohs(x) ((__u16)(x))
#define gar_htonl(x) ((__be32)(x))
#define gar_ntohl(x) ((__u32)(x))
#endif

#define GAR_IP_DF     0x4000
#define GAR_IP_MF     0x2000
#define GAR_IP_OFFSET 0x1fff
#define GAR_ICMP_ECHO_REPLY   0
#define GAR_ICMP_ECHO_REQUEST 8
/* ICMP types by bit: the queries with an identifier (echo 8, timestamp 13, information 15,
 * address mask 17) and their replies (0, 14, 16, 18) */
#define GAR_ICMP_QUERIES        ((1U << 8) | (1U << 13) | (1U << 15) | (1U << 17))
#define GAR_ICMP_QUERY_REPLIES  ((1U << 0) | (1U << 14) | (1U << 16) | (1U << 18))

#define GAR_TCP_FIN 0x01
#define GAR_TCP_SYN 0x02
#define GAR_TCP_RST 0x04
#define GAR_TCP_ACK 0x10

enum gar_parse {
	GAR_PARSE_IPV4 = 0, /* tuple filled in */
	GAR_PARSE_PASS = 1, /* not IP but harmless (ARP): pass without a decision */
	/* anything else: a GAR_DROP_* reason */
};

struct gar_packet {
	struct gar_ct_key tuple; /* ports network order; ICMP: see gar_parse */
	__u16 sport;             /* host order, for events */
	__u16 dport;             /* host order: the port policy looks up (ICMP: type) */
	__u16 any_port;          /* the port entries of protocol ANY are looked up with: dport
				  * for TCP, UDP and SCTP, else 0 (lib/policy.h) */
	__u16 l4off;             /* where the transport header starts */
	__u8 tcp_flags;
	__u8 pad;
	__u32 length;
};

static __always_inline int gar_parse(struct __sk_buff *skb, struct gar_packet *pkt)
{
	struct iphdr ip;
	__u8 l4[14];
	__u32 l4off;

	pkt->length = skb->len;
	if (skb->protocol == gar_htons(ETH_P_ARP))
		return GAR_PARSE_PASS;
	if (skb->protocol != gar_htons(ETH_P_IP))
		return GAR_DROP_UNSUPPORTED_L3;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return GAR_DROP_INVALID_PACKET;
	if (ip.ihl < 5 || ip.version != 4)
		return GAR_DROP_INVALID_PACKET;
	/* before the fragment check: a fragment's drop event names its addresses */
	pkt->tuple.saddr = ip.saddr;
	pkt->tuple.daddr = ip.daddr;
	pkt->tuple.protocol = ip.protocol;
	if (ip.frag_off & gar_htons(GAR_IP_MF | GAR_IP_OFFSET))
		return GAR_DROP_FRAGMENT;
	l4off = ETH_HLEN + ip.ihl * 4;
	pkt->l4off = l4off;

	switch (ip.protocol) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, l4off, l4, 14) < 0)
			return GAR_DROP_INVALID_PACKET;
		pkt->tcp_flags = l4[13];
		/* fall through */
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (ip.protocol != IPPROTO_TCP && bpf_skb_load_bytes(skb, l4off, l4, 4) < 0)
			return GAR_DROP_INVALID_PACKET;
		__builtin_memcpy(&pkt->tuple.sport, &l4[0], 2);
		__builtin_memcpy(&pkt->tuple.dport, &l4[2], 2);
		pkt->sport = gar_ntohs(pkt->tuple.sport);
		pkt->dport = gar_ntohs(pkt->tuple.dport);
		pkt->any_port = pkt->dport;
		break;
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, l4off, l4, 8) < 0)
			return GAR_DROP_INVALID_PACKET;
		pkt->dport = l4[0]; /* type: what icmps rules name */
		/* The conntrack tuple (abi.h): a query (echo, timestamp, information, address
		 * mask request) (id, 0), a query's reply (0, id), the request's reversed tuple;
		 * anything else (0x100 | type, 0x200 | code), whose reverse is no original tuple
		 * of any kind. So a reply passes as one, and a request or message from the other
		 * side is judged as new: an echo request from the peer with the identifier of
		 * ours is no reply (it was, when both directions shared (id, id)). */
		{
			/* without branches: a branch here splits every later state of the
			 * verifier's walk through from_container in two */
			__u32 t = l4[0], id = (__u32)l4[4] << 8 | l4[5];
			__u32 low = 1 ^ (((t >> 5) | (t >> 6) | (t >> 7)) & 1); /* t < 32 */
			__u32 query = (GAR_ICMP_QUERIES >> (t & 31)) & low;
			__u32 reply = (GAR_ICMP_QUERY_REPLIES >> (t & 31)) & low;
			__u32 other = 1 ^ query ^ reply;
			__u32 sport = (id & -query) | ((0x100 | t) & -other);
			__u32 dport = (id & -reply) | ((0x200 | l4[1]) & -other);

			pkt->tuple.sport = gar_htons((__u16)sport);
			pkt->tuple.dport = gar_htons((__u16)dport);
			pkt->sport = id & -(query | reply);
		}
		break;
	default:
		break; /* no ports: tracked and judged by protocol alone */
	}
	return GAR_PARSE_IPV4;
}

static __always_inline void gar_reverse(const struct gar_ct_key *t, struct gar_ct_key *r)
{
	r->saddr = t->daddr;
	r->daddr = t->saddr;
	r->sport = t->dport;
	r->dport = t->sport;
	r->protocol = t->protocol;
}

#endif
