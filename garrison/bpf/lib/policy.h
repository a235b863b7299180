/* SPDX-License-Identifier: Apache-2.0
 * The L3/L4 policy lookup for one side (an endpoint's ingress or egress) of a new connection.
 *
 * The model is garrison.policies.mapstate.lookup(); garrison.bpf.policymap writes its
 * MapState into gar_policy, and tests/privileged/test_datapath_precedence.py proves the two
 * agree. The map holds, per (endpoint identity, direction, deny|allow, remote identity or 0,
 * protocol or 0), a port LPM: a single port is a /16 over the port bits, a range is the aligned
 * blocks it splits into, any port is /0. One LPM lookup for a (remote, protocol) pair returns
 * the narrowest entry covering the port, or that pair's any-port entry.
 *
 * ClusterNetworkPolicy rules are entries of their tier (key field `tier`: Admin, Baseline),
 * each with its action (GAR_POLICY_ACCEPT / DENY / PASS) and order (priority, then place in
 * its policy; in `proxy_port`). The resolver made the port ranges of each (tier, remote,
 * protocol) disjoint apart from the any-port entry and put the first rule over both into
 * each, so one LPM lookup per pair yields the first rule there. An endpoint without tier
 * entries (no GAR_EP_TIERS) skips steps 0 and 4.
 *
 * Lookup order:
 *   0. Admin tier: the four LPM lookups of step 1 in the Admin entries; the lowest rank
 *      (order << 2 | Deny 0, Pass 1, Accept 2) decides: Accept -> allow, Deny -> DROP
 *      POLICY_DENY, Pass or no hit -> step 1. The match type is the hit's class (step 2).
 *   1. Deny: four LPM lookups in the deny entries, for (remote, proto), (remote, any proto),
 *      (any identity, proto), (any identity, any proto). Any hit -> DROP POLICY_DENY, whatever
 *      allow exists (deny wins over allow, whatever the specificity). The reported match type
 *      is that of the most precedent hit, ranked as in step 2.
 *   2. Allow: the same four lookups in the allow entries; the most precedent hit decides.
 *      Precedence (lower rank wins), the order of POLICY-SEMANTICS.md:
 *        class 1 remote identity + port     (L3-L4)
 *        class 2 any identity + port        (L4-only)
 *        class 3 remote identity + protocol, any port (L3-proto)
 *        class 4 any identity + protocol, any port    (proto-only)
 *        class 5 remote identity, any protocol and port (L3-only)
 *        class 6 any identity, anything     (all)
 *      within classes 1 and 2: the smaller port block first (a longer prefix), then a
 *      specific protocol before protocol any. A winning entry with GAR_POLICY_REDIRECT sends
 *      the connection to its proxy port.
 *      A port entry of protocol any covers TCP, UDP and SCTP only: for ICMP (whose type
 *      stands in the port) the two protocol-any lookups ask for port 0, which only an
 *      any-port entry covers (struct gar_packet's any_port).
 *   3. No hit: DROP POLICY_DENIED (match type none) if the direction is enforced (a
 *      NetworkPolicy-tier rule selects the endpoint in it, or enforcement `always`).
 *   4. Baseline tier, as step 0: Accept -> allow, Deny -> DROP POLICY_DENY, Pass or no hit ->
 *      step 5.
 *   5. Allow (match type none).
 * Audit mode does not change the verdict computed here; the caller logs and passes.
 *
 * Policies in audit mode (garrison.io/audit): the same steps 0-5 run over a second map,
 * gar_policy_audit, which holds the what-if state (every policy enforced, the audited ones
 * too) of the identities an audited policy selects (GAR_EP_POLICY_AUDIT), with that state's
 * own enforcement and tier bits (GAR_EP_AUDIT_*). The caller (bpf_lxc.c, gar_judge) asks it
 * only when gar_policy allowed: allowed there and denied here -> the connection passes as
 * gar_policy decided (its redirect included), and its verdict event says AUDIT with this
 * lookup's match type and reason; allowed in both, and only the what-if entry redirects ->
 * the connection goes to the proxy (GAR_REDIRECT_WHAT_IF: it audits the L7 rules, and a
 * failed redirect passes). The what-if lookup never allows what gar_policy denies.
 */
#ifndef GARRISON_LIB_POLICY_H
#define GARRISON_LIB_POLICY_H

#include "../abi.h"
#include "config.h"
#include "packet.h"

#ifndef GAR_POLICY_MAX
#define GAR_POLICY_MAX 262144
#endif

BPF_TABLE_PINNED("lpm_trie", struct gar_policy_key, struct gar_policy_value, gar_policy,
		 GAR_POLICY_MAX, GAR_PIN(gar_policy), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct gar_policy_key, struct gar_policy_value, gar_policy_audit,
		 GAR_POLICY_MAX, GAR_PIN(gar_policy_audit), BPF_F_NO_PREALLOC);

/* Which map a lookup reads (`what_if`): the enforced entries, or the what-if state. */
#define GAR_POLICY_MAP_ENFORCED 0
#define GAR_POLICY_MAP_WHAT_IF  1

static __always_inline struct gar_policy_value *gar_policy_get(struct gar_policy_key *key,
							       int what_if)
{
	if (what_if)
		return gar_policy_audit.lookup(key);
	return gar_policy.lookup(key);
}

struct gar_verdict {
	__u8 allowed;
	__u8 match_type; /* GAR_MATCH_* */
	__u8 reason;     /* GAR_DROP_POLICY_DENY / GAR_DROP_POLICY_DENIED when not allowed */
	__u8 redirect;   /* allowed and steered to proxy_port: GAR_REDIRECT_* */
	__u16 proxy_port;
};

/* gar_verdict.redirect: the enforced entry redirects, or (bpf_lxc.c) only the what-if state
 * of a policy in audit mode does: then the proxy audits its L7 rules over an allow-all rule
 * set, and a failed redirect passes instead of failing closed (audit changes no verdict). */
#define GAR_REDIRECT_ENFORCED 1
#define GAR_REDIRECT_WHAT_IF  2

#define GAR_RANK_NONE 0xffffffff

/* Step 2's precedence as one number: class << 8 | (16 - port prefix bits) << 1 | proto any. */
static __always_inline __u32 gar_policy_rank(const struct gar_policy_value *v, int has_id,
					     int has_proto)
{
	if (v->port_prefixlen)
		return ((has_id ? 1 : 2) << 8) | ((16 - (v->port_prefixlen & 0x1f)) << 1) |
		       (has_proto ? 0 : 1);
	if (has_proto)
		return (has_id ? 3 : 4) << 8;
	return (has_id ? 5 : 6) << 8;
}

/* Classes 1-6 to GAR_MATCH_L3_L4, L4_ONLY, L3_PROTO, PROTO_ONLY, L3_ONLY, ALL; anything else
 * (GAR_RANK_NONE) to GAR_MATCH_NONE. A table in a constant, one nibble per class, not an
 * if-chain: every constant an if-chain returns is a state of its own for the verifier, and
 * from_container carried them through up to four lookups: 946k of the million instructions
 * the verifier may process, 587k so (to_container 301k, 171k). */
#define GAR_MATCH_TYPE_OF_CLASS 0x04165320U

static __always_inline __u8 gar_match_type(__u32 rank)
{
	return (GAR_MATCH_TYPE_OF_CLASS >> (((rank >> 8) & 7) * 4)) & 0xf;
}

struct gar_policy_best {
	__u32 rank;
	struct gar_policy_value value;
};

/* One LPM lookup; keeps it in *best when it outranks what is there. */
static __always_inline void gar_policy_probe(struct gar_policy_key *key, __u32 remote,
					     __u8 proto, struct gar_policy_best *best,
					     int what_if)
{
	struct gar_policy_value *v;
	__u32 rank;

	key->remote_identity = remote;
	key->protocol = proto;
	v = gar_policy_get(key, what_if);
	if (!v)
		return;
	rank = gar_policy_rank(v, remote != GAR_IDENTITY_ANY, proto != 0);
	if (rank < best->rank) {
		best->rank = rank;
		best->value = *v;
	}
}

/* Steps 1 and 2 for one kind of entry (deny or allow): the most precedent hit. The entries
 * of protocol ANY are probed with `any_port` (network order): see gar_policy_lookup. */
static __always_inline void gar_policy_search(struct gar_policy_key *key, __u32 remote,
					      __u8 proto, __be16 any_port,
					      struct gar_policy_best *best, int what_if)
{
	__be16 port = key->dport;

	/* the four ranks differ (identity and protocol are in them): the order is free */
	best->rank = GAR_RANK_NONE;
	gar_policy_probe(key, remote, proto, best, what_if);
	gar_policy_probe(key, GAR_IDENTITY_ANY, proto, best, what_if);
	key->dport = any_port;
	gar_policy_probe(key, remote, 0, best, what_if);
	gar_policy_probe(key, GAR_IDENTITY_ANY, 0, best, what_if);
	key->dport = port;
}

/* Steps 0 and 4: the first rule of one ClusterNetworkPolicy tier over the four lookups. */
struct gar_tier_best {
	__u32 rank;  /* order << 2 | action rank */
	__u32 cls;   /* gar_policy_rank() of the hit, for its match type */
	__u8 flags;  /* GAR_POLICY_ACCEPT / DENY / PASS */
};

static __always_inline void gar_tier_probe(struct gar_policy_key *key, __u32 remote, __u8 proto,
					   struct gar_tier_best *best, int what_if)
{
	struct gar_policy_value *v;
	__u32 rank;

	key->remote_identity = remote;
	key->protocol = proto;
	v = gar_policy_get(key, what_if);
	if (!v)
		return;
	rank = (__u32)v->proxy_port << 2;
	if (v->flags & GAR_POLICY_PASS)
		rank |= 1;
	else if (v->flags & GAR_POLICY_ACCEPT)
		rank |= 2;
	if (rank < best->rank) {
		best->rank = rank;
		best->cls = gar_policy_rank(v, remote != GAR_IDENTITY_ANY, proto != 0);
		best->flags = v->flags;
	}
}

/* 1 when the tier decided (*verdict filled in), 0 on Pass or no hit. */
static __always_inline int gar_policy_tier(struct gar_policy_key *key, __u8 tier, __u32 remote,
					   __u8 proto, __be16 any_port,
					   struct gar_verdict *verdict, int what_if)
{
	struct gar_tier_best best = { .rank = GAR_RANK_NONE };
	__be16 port = key->dport;

	key->tier = tier;
	key->deny = 0;
	gar_tier_probe(key, remote, proto, &best, what_if);
	key->dport = any_port;
	gar_tier_probe(key, remote, 0, &best, what_if);
	key->dport = port;
	gar_tier_probe(key, GAR_IDENTITY_ANY, proto, &best, what_if);
	key->dport = any_port;
	gar_tier_probe(key, GAR_IDENTITY_ANY, 0, &best, what_if);
	key->dport = port;
	key->tier = GAR_POLICY_TIER_NETWORKPOLICY;
	if (best.rank == GAR_RANK_NONE || (best.flags & GAR_POLICY_PASS))
		return 0;
	verdict->match_type = gar_match_type(best.cls);
	if (best.flags & GAR_POLICY_ACCEPT)
		verdict->allowed = 1;
	else
		verdict->reason = GAR_DROP_POLICY_DENY;
	return 1;
}

/* `port`: the destination port (TCP, UDP, SCTP) or ICMP type (host order); `any_port`: the
 * port the entries of protocol ANY are probed with, struct gar_packet's: the port itself for
 * TCP, UDP and SCTP, else 0 — a port rule of protocol ANY names a TCP, UDP or SCTP port,
 * never an ICMP type, and port 0 is covered by no port entry (ranges start at 1), only by
 * an any-port one. */
static __always_inline struct gar_verdict gar_policy_lookup(__u32 endpoint_identity,
							    __u8 direction, __u32 remote,
							    __u8 proto, __u16 port, __u16 any_port,
							    int enforced, int tiers, int what_if)
{
	struct gar_verdict verdict = {};
	struct gar_policy_best best = {};
	struct gar_policy_key key = {
		.prefixlen = GAR_POLICY_FULL_BITS,
		.endpoint_identity = endpoint_identity,
		.direction = direction,
		.deny = 1,
		.dport = gar_htons(port),
	};
	__be16 any_port_be = gar_htons(any_port);

	if (remote == GAR_IDENTITY_ANY) /* never an ipcache answer; keep the classes apart */
		remote = GAR_IDENTITY_WORLD;

	/* 0. Admin tier (`tiers`: GAR_EP_TIERS, the endpoint has tier entries; else skipped) */
	if (tiers &&
	    gar_policy_tier(&key, GAR_POLICY_TIER_ADMIN, remote, proto, any_port_be, &verdict,
			    what_if))
		return verdict;
	key.deny = 1;
	/* 1. any deny */
	gar_policy_search(&key, remote, proto, any_port_be, &best, what_if);
	if (best.rank != GAR_RANK_NONE) {
		verdict.match_type = gar_match_type(best.rank);
		verdict.reason = GAR_DROP_POLICY_DENY;
		return verdict;
	}
	/* 2. the most precedent allow */
	key.deny = 0;
	gar_policy_search(&key, remote, proto, any_port_be, &best, what_if);
	if (best.rank != GAR_RANK_NONE) {
		verdict.allowed = 1;
		verdict.match_type = gar_match_type(best.rank);
		if (best.value.flags & GAR_POLICY_REDIRECT) {
			verdict.redirect = GAR_REDIRECT_ENFORCED;
			verdict.proxy_port = best.value.proxy_port;
		}
		return verdict;
	}
	/* 3. nothing matched */
	verdict.match_type = GAR_MATCH_NONE;
	if (enforced) {
		verdict.reason = GAR_DROP_POLICY_DENIED;
		return verdict;
	}
	/* 4. Baseline tier */
	if (tiers &&
	    gar_policy_tier(&key, GAR_POLICY_TIER_BASELINE, remote, proto, any_port_be,
			    &verdict, what_if))
		return verdict;
	/* 5. nothing decided */
	verdict.allowed = 1;
	return verdict;
}

#endif
