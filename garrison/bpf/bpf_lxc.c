/* SPDX-License-Identifier: Apache-2.0
 * garrison's endpoint programs, attached to the host-side veth of every endpoint:
 *   from_container  tc ingress: packets leaving the endpoint
 *   to_container    tc egress:  packets entering the endpoint
 *   from_netdev     tc ingress of the node's underlay device (several nodes, garrison/cluster):
 *                   packets from other nodes; steers them to the proxy (new connections an
 *                   ingress L7 rule redirects, and replies to the proxy's transparent
 *                   upstream connections), nothing else
 * One compiled object serves every endpoint; the endpoint is found by skb->ifindex (the host
 * veth) in gar_endpoints.
 *
 * Where each policy is applied (endpoints on one node):
 *   - a new connection's first packet is judged at from_container of its source: the source's
 *     egress policy, and when the destination is a local endpoint (ipcache flag) the
 *     destination's ingress policy too, as Cilium does for local delivery. That is the only
 *     hook where a redirect to the proxy can happen for either side: bpf_sk_assign works at tc
 *     ingress, and the proxy lives in the host namespace. If either side's winning entry
 *     redirects, the connection goes to the proxy (the egress side's proxy port first); the
 *     proxy then applies L7 for both sides and opens its own upstream connection, marked
 *     GAR_MARK_PROXY_UPSTREAM (see abi.h for what that mark means).
 *   - at to_container a connection whose ingress was already judged passes through its
 *     conntrack entry; one from a source that is not a local endpoint (the host, or an
 *     address outside the node) is judged there by the destination's ingress policy. A
 *     redirect is not possible at that hook: such a connection is dropped with
 *     GAR_DROP_PROXY_REDIRECT_UNSUPPORTED (fail closed).
 *   - several nodes: a connection from another node's endpoint whose ingress rule here
 *     redirects is judged and steered at from_netdev, the tc ingress hook it crosses on this
 *     node (where bpf_sk_assign works); its later packets go to the same proxy socket there.
 *     A local endpoint's connection that an egress L7 rule redirects toward another node's
 *     endpoint is judged at from_container as above; the proxy's upstream connection leaves
 *     from the endpoint's own address (transparent, so the other node judges the endpoint's
 *     identity) and crosses none of this node's programs on the way out; its replies are
 *     handed to it at from_netdev (lib/proxy.h, gar_proxy_upstream_reply).
 *     Everything else passes from_netdev untouched and is judged at to_container as above,
 *     but for a packet claiming a local endpoint's address: forged on the underlay, dropped
 *     (GAR_DROP_INVALID_SOURCE_IP).
 * Every new connection produces a policy-verdict event per side judged; every dropped
 * packet a drop event; audit mode (per endpoint) logs the verdict and drops nothing.
 * Policies in audit mode (per policy, GAR_EP_POLICY_AUDIT): a connection the enforced
 * policy allows is also looked up in the side's what-if state (lib/policy.h); if that denies
 * it, it passes all the same and its verdict event says AUDIT.
 * A new connection a side's L3/L4 policy denies is answered instead of dropped silently
 * when that side's endpoint asks for it (deny-response: lib/deny_response.h); its drop
 * event names the answer.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "abi.h"
#include "lib/config.h"
#include "lib/packet.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/proxy.h"
#include "lib/events.h"
#include "lib/deny_response.h"

struct gar_ctx {
	__u8 obs;         /* GAR_OBS_* */
	__u32 ifindex;    /* the host veth this program runs on */
	struct gar_packet pkt;
};

static __always_inline int gar_pass(struct gar_ctx *c)
{
	gar_count(c->obs, GAR_COUNT_FORWARDED, c->pkt.length);
	return TC_ACT_OK;
}

static __always_inline int gar_drop(struct gar_ctx *c, __u32 ifindex, __u32 src, __u32 dst,
				    __u8 direction, __u8 reason, __u8 match_type, __u8 flags)
{
	gar_emit(GAR_EVENT_DROP, c->obs, &c->pkt, ifindex, src, dst, direction, reason,
		 match_type, flags, 0);
	gar_count(c->obs, reason, c->pkt.length);
	return TC_ACT_SHOT;
}

/* A new connection one side's policy denied: answered when the denying endpoint asks for
 * it (`ep_flags`: its GAR_EP_DENY_RESPONSE_*), else dropped; the drop event and counter
 * either way, the event flagged with the answer sent. */
static __always_inline int gar_deny(struct gar_ctx *c, struct __sk_buff *skb, __u32 ep_flags,
				    __u32 ifindex, __u32 src, __u32 dst, __u8 direction,
				    const struct gar_verdict *v)
{
	__u8 answer = gar_deny_response(skb, &c->pkt, ep_flags, c->obs);

	gar_emit(GAR_EVENT_DROP, c->obs, &c->pkt, ifindex, src, dst, direction, v->reason,
		 v->match_type, answer, 0);
	gar_count(c->obs, v->reason, c->pkt.length);
	return answer ? TC_ACT_REDIRECT : TC_ACT_SHOT;
}

/* One side's policy for a new connection, with its verdict event. Returns whether the packet
 * may go on: allowed, or audit mode. */
static __always_inline int gar_judge(struct gar_ctx *c, const struct gar_endpoint *ep,
				     __u32 ep_ifindex, __u8 direction, __u32 remote,
				     struct gar_verdict *v)
{
	__u32 enforced_flag = direction == GAR_DIR_INGRESS ? GAR_EP_INGRESS_ENFORCED
							    : GAR_EP_EGRESS_ENFORCED;
	__u32 audit_enforced_flag = direction == GAR_DIR_INGRESS ? GAR_EP_AUDIT_INGRESS_ENFORCED
								  : GAR_EP_AUDIT_EGRESS_ENFORCED;
	int audit = ep->flags & GAR_EP_AUDIT;
	struct gar_verdict what_if;
	__u8 flags = 0, reason, match_type;

	*v = gar_policy_lookup(ep->identity, direction, remote, c->pkt.tuple.protocol,
			       c->pkt.dport, c->pkt.any_port, ep->flags & enforced_flag,
			       ep->flags & GAR_EP_TIERS, GAR_POLICY_MAP_ENFORCED);
	reason = v->reason;
	match_type = v->match_type;
	if (v->allowed)
		flags |= GAR_EVENT_F_ALLOWED;
	if (v->redirect)
		flags |= GAR_EVENT_F_REDIRECT;
	if (audit)
		flags |= GAR_EVENT_F_AUDIT;
	if (v->allowed && (ep->flags & GAR_EP_POLICY_AUDIT)) {
		/* an audited policy would deny what the enforced ones allow: it passes, recorded
		 * AUDIT with the what-if lookup's reason and match type */
		what_if = gar_policy_lookup(ep->identity, direction, remote, c->pkt.tuple.protocol,
					    c->pkt.dport, c->pkt.any_port,
					    ep->flags & audit_enforced_flag,
					    ep->flags & GAR_EP_AUDIT_TIERS, GAR_POLICY_MAP_WHAT_IF);
		if (!what_if.allowed) {
			flags = (flags & ~GAR_EVENT_F_ALLOWED) | GAR_EVENT_F_AUDIT;
			reason = what_if.reason;
			match_type = what_if.match_type;
			gar_count(c->obs, GAR_COUNT_AUDITED, c->pkt.length);
		} else if (what_if.redirect && !v->redirect) {
			/* only the audited policies have L7 rules here: the proxy audits them */
			v->redirect = GAR_REDIRECT_WHAT_IF;
			v->proxy_port = what_if.proxy_port;
			flags |= GAR_EVENT_F_REDIRECT;
		}
	}
	gar_emit(GAR_EVENT_POLICY_VERDICT, c->obs, &c->pkt, ep_ifindex,
		 direction == GAR_DIR_EGRESS ? ep->identity : remote,
		 direction == GAR_DIR_EGRESS ? remote : ep->identity, direction, reason,
		 match_type, flags, v->proxy_port);
	if (!v->allowed && audit)
		gar_count(c->obs, GAR_COUNT_AUDITED, c->pkt.length);
	return v->allowed || audit;
}

/* Steer to the proxy; fail closed unless the deciding side is in audit mode. */
static __always_inline int gar_redirect(struct gar_ctx *c, struct __sk_buff *skb, __u32 src,
					__u32 dst, __u16 proxy_port, int audit)
{
	int reason = gar_proxy_assign(skb, &c->pkt.tuple, proxy_port);

	if (!reason) {
		gar_count(c->obs, GAR_COUNT_REDIRECTED, c->pkt.length);
		return TC_ACT_OK;
	}
	if (audit) {
		gar_emit(GAR_EVENT_DROP, c->obs, &c->pkt, c->ifindex, src, dst, 0, reason,
			 GAR_MATCH_NONE, GAR_EVENT_F_AUDIT, proxy_port);
		gar_count(c->obs, GAR_COUNT_AUDITED, c->pkt.length);
		return TC_ACT_OK;
	}
	gar_emit(GAR_EVENT_DROP, c->obs, &c->pkt, c->ifindex, src, dst, 0, reason,
		 GAR_MATCH_NONE, GAR_EVENT_F_REDIRECT, proxy_port);
	gar_count(c->obs, reason, c->pkt.length);
	return TC_ACT_SHOT;
}

int from_container(struct __sk_buff *skb)
{
	struct gar_ctx c = { .obs = GAR_OBS_FROM_CONTAINER, .ifindex = skb->ifindex };
	struct gar_verdict egress = {}, ingress = {};
	struct gar_ipcache_value *dst_info;
	struct gar_endpoint *ep, *dst_ep;
	struct gar_ct_entry *ct;
	__u32 dst_id, dst_ifindex;
	__u16 ct_flags = GAR_CT_EGRESS_DONE, proxy_port = 0;
	int rc, dir, redirect = 0, redirect_audit = 0;
	__u64 now;

	rc = gar_parse(skb, &c.pkt);
	if (rc == GAR_PARSE_PASS)
		return gar_pass(&c);
	/* to_container's answer to a denied packet, on its way to the sender (abi.h) */
	if ((skb->mark & GAR_MARK_MASK) == GAR_MARK_DENY_RESPONSE) {
		skb->mark &= ~GAR_MARK_MASK;
		return gar_pass(&c);
	}
	ep = gar_endpoint_of(c.ifindex);
	if (!ep)
		return gar_drop(&c, c.ifindex, 0, 0, 0, GAR_DROP_NO_ENDPOINT_CONFIG,
				GAR_MATCH_NONE, 0);
	if (rc != GAR_PARSE_IPV4)
		return gar_drop(&c, c.ifindex, ep->identity, 0, 0, rc, GAR_MATCH_NONE, 0);
	/* the event names the sender (ifindex, identity) beside the address it claimed */
	if (c.pkt.tuple.saddr != ep->ipv4)
		return gar_drop(&c, c.ifindex, ep->identity, 0, 0, GAR_DROP_INVALID_SOURCE_IP,
				GAR_MATCH_NONE, 0);

	now = bpf_ktime_get_ns();
	if (gar_ct_related(skb, &c.pkt, now))
		return gar_pass(&c);
	ct = gar_ct_lookup(&c.pkt, now, &dir);
	if (ct) {
		gar_ct_update(ct, &c.pkt, dir, now);
		if (dir == GAR_CT_ORIGINAL && (ct->flags & GAR_CT_REDIRECT))
			return gar_redirect(&c, skb, ct->src_identity, ct->dst_identity,
					    ct->proxy_port, ct->flags & GAR_CT_AUDIT);
		return gar_pass(&c);
	}

	/* A new connection: the source's egress policy ... */
	dst_info = gar_ipcache_lookup(c.pkt.tuple.daddr);
	dst_id = gar_identity_of(dst_info);
	if (!gar_judge(&c, ep, c.ifindex, GAR_DIR_EGRESS, dst_id, &egress))
		return gar_deny(&c, skb, ep->flags, c.ifindex, ep->identity, dst_id,
				GAR_DIR_EGRESS, &egress);
	if (!egress.allowed)
		ct_flags |= GAR_CT_AUDIT;
	if (egress.redirect) {
		redirect = egress.redirect;
		proxy_port = egress.proxy_port;
		redirect_audit = (ep->flags & GAR_EP_AUDIT) ||
				 egress.redirect == GAR_REDIRECT_WHAT_IF;
	}

	/* ... and a local destination's ingress policy, here where a redirect still works. */
	if (dst_info && (dst_info->flags & GAR_IPCACHE_LOCAL_ENDPOINT)) {
		dst_ifindex = dst_info->ifindex;
		dst_ep = gar_endpoint_of(dst_ifindex);
		if (dst_ep) {
			if (!gar_judge(&c, dst_ep, dst_ifindex, GAR_DIR_INGRESS, ep->identity,
				       &ingress))
				return gar_deny(&c, skb, dst_ep->flags, dst_ifindex, ep->identity,
						dst_id, GAR_DIR_INGRESS, &ingress);
			ct_flags |= GAR_CT_INGRESS_DONE;
			if (!ingress.allowed)
				ct_flags |= GAR_CT_AUDIT;
			/* the egress side's redirect first, unless only its audited
			 * policies redirect and the ingress side's enforced ones do */
			if (ingress.redirect &&
			    (!redirect || (redirect == GAR_REDIRECT_WHAT_IF &&
					   ingress.redirect == GAR_REDIRECT_ENFORCED))) {
				redirect = ingress.redirect;
				proxy_port = ingress.proxy_port;
				redirect_audit = (dst_ep->flags & GAR_EP_AUDIT) ||
						 ingress.redirect == GAR_REDIRECT_WHAT_IF;
			}
		}
	}

	if (redirect) {
		ct_flags |= GAR_CT_REDIRECT;
		if (redirect_audit)
			ct_flags |= GAR_CT_AUDIT;
	}
	rc = gar_ct_create(&c.pkt, now, ep->identity, dst_id, ct_flags, proxy_port);
	if (rc)
		return gar_drop(&c, c.ifindex, ep->identity, dst_id, 0, rc, GAR_MATCH_NONE, 0);
	if (redirect)
		return gar_redirect(&c, skb, ep->identity, dst_id, proxy_port, redirect_audit);
	return gar_pass(&c);
}

int to_container(struct __sk_buff *skb)
{
	struct gar_ctx c = { .obs = GAR_OBS_TO_CONTAINER, .ifindex = skb->ifindex };
	struct gar_verdict ingress = {};
	struct gar_endpoint *ep;
	struct gar_ct_entry *ct;
	__u32 src_id;
	__u16 ct_flags = GAR_CT_INGRESS_DONE;
	int rc, dir;
	__u64 now;

	rc = gar_parse(skb, &c.pkt);
	if (rc == GAR_PARSE_PASS)
		return gar_pass(&c);
	ep = gar_endpoint_of(c.ifindex);
	if (!ep)
		return gar_drop(&c, c.ifindex, 0, 0, 0, GAR_DROP_NO_ENDPOINT_CONFIG,
				GAR_MATCH_NONE, 0);
	if (rc != GAR_PARSE_IPV4)
		return gar_drop(&c, c.ifindex, 0, ep->identity, 0, rc, GAR_MATCH_NONE, 0);

	now = bpf_ktime_get_ns();
	if (gar_ct_related(skb, &c.pkt, now))
		return gar_pass(&c);
	ct = gar_ct_lookup(&c.pkt, now, &dir);
	if (ct) {
		gar_ct_update(ct, &c.pkt, dir, now);
		if (dir == GAR_CT_REPLY || (ct->flags & GAR_CT_INGRESS_DONE))
			return gar_pass(&c);
		/* tracked, but this endpoint's ingress was not judged at the source */
	} else if ((skb->mark & GAR_MARK_MASK) == GAR_MARK_PROXY_UPSTREAM) {
		src_id = gar_identity_of(gar_ipcache_lookup(c.pkt.tuple.saddr));
		rc = gar_ct_create(&c.pkt, now, src_id, ep->identity,
				   GAR_CT_INGRESS_DONE | GAR_CT_PROXY_UPSTREAM, 0);
		if (rc)
			return gar_drop(&c, c.ifindex, src_id, ep->identity, 0, rc,
					GAR_MATCH_NONE, 0);
		return gar_pass(&c);
	}

	src_id = gar_identity_of(gar_ipcache_lookup(c.pkt.tuple.saddr));
	if (!gar_judge(&c, ep, c.ifindex, GAR_DIR_INGRESS, src_id, &ingress))
		return gar_deny(&c, skb, ep->flags, c.ifindex, src_id, ep->identity,
				GAR_DIR_INGRESS, &ingress);
	if (!ingress.allowed)
		ct_flags |= GAR_CT_AUDIT;
	/* a redirect only the audited policies ask for cannot happen here: it passes */
	if (ingress.redirect == GAR_REDIRECT_ENFORCED) {
		if (!(ep->flags & GAR_EP_AUDIT))
			return gar_drop(&c, c.ifindex, src_id, ep->identity, GAR_DIR_INGRESS,
					GAR_DROP_PROXY_REDIRECT_UNSUPPORTED,
					ingress.match_type, GAR_EVENT_F_REDIRECT);
		gar_emit(GAR_EVENT_DROP, c.obs, &c.pkt, c.ifindex, src_id, ep->identity,
			 GAR_DIR_INGRESS, GAR_DROP_PROXY_REDIRECT_UNSUPPORTED, ingress.match_type,
			 GAR_EVENT_F_AUDIT | GAR_EVENT_F_REDIRECT, ingress.proxy_port);
		gar_count(c.obs, GAR_COUNT_AUDITED, c.pkt.length);
		ct_flags |= GAR_CT_AUDIT;
	}
	if (ct) {
		ct->flags |= ct_flags;
		return gar_pass(&c);
	}
	rc = gar_ct_create(&c.pkt, now, src_id, ep->identity, ct_flags, 0);
	if (rc)
		return gar_drop(&c, c.ifindex, src_id, ep->identity, 0, rc, GAR_MATCH_NONE, 0);
	return gar_pass(&c);
}

int from_netdev(struct __sk_buff *skb)
{
	/* Its events describe packets on their way into an endpoint: to_container's. */
	struct gar_ctx c = { .obs = GAR_OBS_TO_CONTAINER, .ifindex = skb->ifindex };
	struct gar_ipcache_value *dst_info, *src_info;
	struct gar_verdict ingress;
	struct gar_endpoint *ep;
	struct gar_ct_entry *ct;
	__u32 src_id, dst_ifindex;
	__u16 ct_flags = GAR_CT_INGRESS_DONE | GAR_CT_REDIRECT;
	int rc, dir, audit;
	__u64 now;

	if (gar_parse(skb, &c.pkt) != GAR_PARSE_IPV4)
		return TC_ACT_OK;
	/* A local endpoint's packets leave through its own veth, never in from another node: one
	 * arriving here with its address is forged on the underlay, and would pass to_container
	 * as that endpoint (its identity, its connections' conntrack entries). */
	src_info = gar_ipcache_lookup(c.pkt.tuple.saddr);
	if (src_info && (src_info->flags & GAR_IPCACHE_LOCAL_ENDPOINT))
		return gar_drop(&c, c.ifindex, 0, 0, 0, GAR_DROP_INVALID_SOURCE_IP,
				GAR_MATCH_NONE, 0);
	/* Only connections to local endpoints can need steering; to_container judges the rest. */
	if (c.pkt.tuple.protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	dst_info = gar_ipcache_lookup(c.pkt.tuple.daddr);
	if (!dst_info || !(dst_info->flags & GAR_IPCACHE_LOCAL_ENDPOINT))
		return TC_ACT_OK;
	dst_ifindex = dst_info->ifindex;
	ep = gar_endpoint_of(dst_ifindex);
	if (!ep)
		return TC_ACT_OK;

	/* A reply to the proxy's transparent upstream connection (an egress L7 rule of a local
	 * endpoint toward this remote one): the proxy's socket, before any conntrack entry of
	 * the endpoint's own, which may share the tuple. */
	rc = gar_proxy_upstream_reply(skb, &c.pkt.tuple);
	if (rc > 0) {
		gar_count(c.obs, GAR_COUNT_REDIRECTED, c.pkt.length);
		return TC_ACT_OK;
	}
	if (rc < 0)
		return gar_drop(&c, dst_ifindex, 0, ep->identity, 0, -rc, GAR_MATCH_NONE, 0);

	now = bpf_ktime_get_ns();
	ct = gar_ct_lookup(&c.pkt, now, &dir);
	if (ct) {
		if (dir != GAR_CT_ORIGINAL || !(ct->flags & GAR_CT_REDIRECT))
			return TC_ACT_OK;
		gar_ct_update(ct, &c.pkt, dir, now);
		return gar_redirect(&c, skb, ct->src_identity, ct->dst_identity, ct->proxy_port,
				    ct->flags & GAR_CT_AUDIT);
	}

	src_id = gar_identity_of(src_info);
	ingress = gar_policy_lookup(ep->identity, GAR_DIR_INGRESS, src_id, c.pkt.tuple.protocol,
				    c.pkt.dport, c.pkt.any_port,
				    ep->flags & GAR_EP_INGRESS_ENFORCED, ep->flags & GAR_EP_TIERS,
				    GAR_POLICY_MAP_ENFORCED);
	if (!ingress.allowed || !ingress.redirect)
		return TC_ACT_OK; /* to_container's decision, with its verdict event */
	gar_judge(&c, ep, dst_ifindex, GAR_DIR_INGRESS, src_id, &ingress);
	audit = ep->flags & GAR_EP_AUDIT;
	if (audit)
		ct_flags |= GAR_CT_AUDIT;
	rc = gar_ct_create(&c.pkt, now, src_id, ep->identity, ct_flags, ingress.proxy_port);
	if (rc)
		return gar_drop(&c, dst_ifindex, src_id, ep->identity, 0, rc, GAR_MATCH_NONE, 0);
	return gar_redirect(&c, skb, src_id, ep->identity, ingress.proxy_port, audit);
}
