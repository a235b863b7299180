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
 * No socket: the caller drops (fail closed) with GAR_DROP_PROXY_NOT_LISTENING. */
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

#endif
