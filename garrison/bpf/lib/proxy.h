/* SPDX-License-Identifier: Apache-2.0
 * Steering a connection to the node-local proxy, at tc ingress of a host-side veth.
 *
 * The packet keeps its original addresses; it is assigned to a proxy socket in the host
 * network namespace and marked GAR_MARK_TO_PROXY, so the fwmark rule routes it to the local
 * table (ip rule fwmark 0x200/0xf00 lookup 2004; local 0.0.0.0/0 dev lo table 2004) instead
 * of forwarding it. The socket:
 *   1. an established (or half-open) proxy socket for the original tuple
 *      (bpf_skc_lookup_tcp also returns request sockets, which the handshake's ACK needs);
 *      a listener found this way is some host service on the original port, never the proxy,
 *      so it is skipped;
 *   2. else the proxy's listener on 127.0.0.1:<proxy port> (an IP_TRANSPARENT socket: the
 *      connection it accepts has the original destination as its local address).
 * No socket: the caller drops (fail closed) with GAR_DROP_PROXY_NOT_LISTENING.
 *
 * The other way, at tc ingress of a cluster node's underlay device (from_netdev): the replies
 * to the proxy's transparent upstream connections. An egress L7 rule toward another node's
 * endpoint sends the proxy's upstream connection from the client endpoint's address
 * (IP_TRANSPARENT, garrison/proxy/sockets.py), so the destination node judges it by the
 * client's identity; its replies come back addressed to that local endpoint and would be
 * forwarded into the endpoint's veth. gar_proxy_upstream_reply hands them to the upstream
 * socket instead: an established (or connecting) socket in this, the host's, network
 * namespace for the reply's tuple, carrying GAR_MARK_PROXY_UPSTREAM as its SO_MARK (the
 * socket's mark, set with CAP_NET_ADMIN: the packet's own mark means nothing here, it comes
 * from another node). The endpoint's own sockets live in its own namespace, so a host socket
 * for that tuple is the proxy's; one without the mark (some other host service) is not
 * taken. Anything else is not touched: the packet goes on to the endpoint's to_container
 * and its policy, as before. */
#ifndef GARRISON_LIB_PROXY_H
#define GARRISON_LIB_PROXY_H

#include "../abi.h"
#include "packet.h"

static __always_inline int gar_proxy_assign(struct __sk_buff *skb, const struct gar_ct_key *t,
					    __u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	long err;

	if (t->protocol != IPPROTO_TCP)
		return GAR_DROP_PROXY_REDIRECT_UNSUPPORTED;
	tuple.ipv4.saddr = t->saddr;
	tuple.ipv4.daddr = t->daddr;
	tuple.ipv4.sport = t->sport;
	tuple.ipv4.dport = t->dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			goto assign;
		bpf_sk_release(sk);
	}
	if (!proxy_port)
		return GAR_DROP_PROXY_NOT_LISTENING;
	tuple.ipv4.daddr = gar_htonl(GAR_PROXY_LISTEN_ADDR);
	tuple.ipv4.dport = gar_htons(proxy_port);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return GAR_DROP_PROXY_NOT_LISTENING;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return GAR_DROP_PROXY_NOT_LISTENING;
	}
assign:
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return GAR_DROP_PROXY_ASSIGN_FAILED;
	skb->mark = (skb->mark & ~GAR_MARK_MASK) | GAR_MARK_TO_PROXY;
	return 0;
}

/* 1: assigned to the proxy's upstream socket (marked GAR_MARK_TO_PROXY, routed locally);
 * 0: no such socket, the packet goes its usual way; < 0: -reason, the socket exists but the
 * kernel refused the assignment (the caller drops: it is the proxy's, never the endpoint's). */
static __always_inline int gar_proxy_upstream_reply(struct __sk_buff *skb,
						    const struct gar_ct_key *t)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk, *full;
	long err;

	if (t->protocol != IPPROTO_TCP)
		return 0;
	tuple.ipv4.saddr = t->saddr;
	tuple.ipv4.daddr = t->daddr;
	tuple.ipv4.sport = t->sport;
	tuple.ipv4.dport = t->dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	if (sk->state == BPF_TCP_LISTEN)
		goto not_ours;
	full = bpf_sk_fullsock(sk); /* NULL for time-wait and request sockets */
	if (!full || (full->mark & GAR_MARK_MASK) != GAR_MARK_PROXY_UPSTREAM)
		goto not_ours;
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return -GAR_DROP_PROXY_ASSIGN_FAILED;
	skb->mark = (skb->mark & ~GAR_MARK_MASK) | GAR_MARK_TO_PROXY;
	return 1;
not_ours:
	bpf_sk_release(sk);
	return 0;
}

#endif
