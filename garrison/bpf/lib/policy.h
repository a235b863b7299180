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
 * Lookup order:
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
 *   3. No hit: DROP POLICY_DENIED (match type none) if the direction is enforced, else allow
 *      (match type none).
 * Audit mode does not change the verdict computed here; the caller logs and passes.
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

struct gar_verdict {
	__u8 allowed;
	__u8 match_type; /* GAR_MATCH_* */
	__u8 reason;     /* GAR_DROP_POLICY_DENY / GAR_DROP_POLICY_DENIED when not allowed */
	__u8 redirect;   /* allowed and steered to proxy_port */
	__u16 proxy_port;
};

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

static __always_inline __u8 gar_match_type(__u32 rank)
{
	__u32 class = rank >> 8;

	/* an if-chain, not a switch: a jump table would be an indirect jump */
	if (class == 1)
		return GAR_MATCH_L3_L4;
	if (class == 2)
		return GAR_MATCH_L4_ONLY;
	if (class == 3)
		return GAR_MATCH_L3_PROTO;
	if (class == 4)
		return GAR_MATCH_PROTO_ONLY;
	if (class == 5)
		return GAR_MATCH_L3_ONLY;
	if (class == 6)
		return GAR_MATCH_ALL;
	return GAR_MATCH_NONE;
}

struct gar_policy_best {
	__u32 rank;
	struct gar_policy_value value;
};

/* One LPM lookup; keeps it in *best when it outranks what is there. */
static __always_inline void gar_policy_probe(struct gar_policy_key *key, __u32 remote,
					     __u8 proto, struct gar_policy_best *best)
{
	struct gar_policy_value *v;
	__u32 rank;

	key->remote_identity = remote;
	key->protocol = proto;
	v = gar_policy.lookup(key);
	if (!v)
		return;
	rank = gar_policy_rank(v, remote != GAR_IDENTITY_ANY, proto != 0);
	if (rank < best->rank) {
		best->rank = rank;
		best->value = *v;
	}
}

/* Steps 1 and 2 for one kind of entry (deny or allow): the most precedent hit. */
static __always_inline void gar_policy_search(struct gar_policy_key *key, __u32 remote,
					      __u8 proto, struct gar_policy_best *best)
{
	best->rank = GAR_RANK_NONE;
	gar_policy_probe(key, remote, proto, best);
	gar_policy_probe(key, remote, 0, best);
	gar_policy_probe(key, GAR_IDENTITY_ANY, proto, best);
	gar_policy_probe(key, GAR_IDENTITY_ANY, 0, best);
}

static __always_inline struct gar_verdict gar_policy_lookup(__u32 endpoint_identity,
							    __u8 direction, __u32 remote,
							    __u8 proto, __u16 port, int enforced)
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

	if (remote == GAR_IDENTITY_ANY) /* never an ipcache answer; keep the classes apart */
		remote = GAR_IDENTITY_WORLD;

	/* 1. any deny */
	gar_policy_search(&key, remote, proto, &best);
	if (best.rank != GAR_RANK_NONE) {
		verdict.match_type = gar_match_type(best.rank);
		verdict.reason = GAR_DROP_POLICY_DENY;
		return verdict;
	}
	/* 2. the most precedent allow */
	key.deny = 0;
	gar_policy_search(&key, remote, proto, &best);
	if (best.rank != GAR_RANK_NONE) {
		verdict.allowed = 1;
		verdict.match_type = gar_match_type(best.rank);
		if (best.value.flags & GAR_POLICY_REDIRECT) {
			verdict.redirect = 1;
			verdict.proxy_port = best.value.proxy_port;
		}
		return verdict;
	}
	/* 3. nothing matched */
	verdict.match_type = GAR_MATCH_NONE;
	if (enforced)
		verdict.reason = GAR_DROP_POLICY_DENIED;
	else
		verdict.allowed = 1;
	return verdict;
}

#endif
