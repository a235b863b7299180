/* SPDX-License-Identifier: Apache-2.0
 *
 * The garrison datapath ABI: every map key and value, mark, drop reason and event record
 * that the kernel programs and the Python side exchange, declared here once.
 *
 * garrison/bpf/abi.py mirrors this file (one place); tests/privileged/test_datapath_abi.py
 * compares sizes, field offsets and constants with what bcc compiled from this header.
 * Change both together.
 *
 * Only fixed-width UAPI types; explicit padding everywhere (padding bytes are part of hash and
 * LPM keys and must be zero). Addresses are network byte order (__be32); the policy key's port
 * is network byte order because the LPM prefix runs over its bits; every other port is host
 * byte order.
 */
#ifndef GARRISON_ABI_H
#define GARRISON_ABI_H

#include <linux/types.h>

/* ---- Marks ------------------------------------------------------------------------------
 * skb->mark bits 8..11 (mask 0x0f00) carry garrison's meaning, as in Cilium.
 *
 * GAR_MARK_TO_PROXY: set by from_container on a packet it has assigned to a proxy socket
 *   (bpf_sk_assign). The host routes it locally with
 *     ip rule add fwmark 0x200/0xf00 lookup 2004
 *     ip route add local 0.0.0.0/0 dev lo table 2004
 * GAR_MARK_PROXY_UPSTREAM: the SO_MARK of the proxy's upstream sockets. Semantics at
 *   to_container (the only hook that honours it on a packet): a new connection carrying this mark is the
 *   proxy forwarding a connection it accepted from a redirect; the L3/L4 policy of both sides
 *   was applied when the client's SYN was redirected and L7 by the proxy, so the datapath
 *   admits it without a policy lookup, creates a conntrack entry flagged
 *   GAR_CT_PROXY_UPSTREAM (its replies pass) and emits no verdict event. The mark is not
 *   honoured at from_container: packets from an endpoint have crossed a network namespace and
 *   the kernel has cleared their mark, so an endpoint cannot forge it. Its value must not
 *   match GAR_MARK_TO_PROXY under GAR_MARK_MASK (it would be routed to the local table).
 *   from_netdev reads it on a *socket*: a reply from another node to a local endpoint's
 *   address is handed to the host socket its tuple names only when that socket's SO_MARK is
 *   this value (the proxy's transparent upstream leg of an egress L7 connection,
 *   lib/proxy.h); the packet's own mark is never trusted there.
 * GAR_MARK_DENY_RESPONSE: set by to_container on the answer it made for a denied packet
 *   (lib/deny_response.h) and redirected to the ingress of the same host veth, towards the
 *   sender; from_container passes a packet carrying it without a lookup and clears it. Only
 *   the host network namespace can set it (an endpoint's packets lose their mark crossing
 *   the veth).
 */
#define GAR_MARK_MASK            0x0f00
#define GAR_MARK_TO_PROXY        0x0200
#define GAR_MARK_PROXY_UPSTREAM  0x0b00
#define GAR_MARK_DENY_RESPONSE   0x0c00
#define GAR_PROXY_ROUTE_TABLE    2004
#define GAR_PROXY_LISTEN_ADDR    0x7f000001 /* 127.0.0.1, host byte order */

/* ---- Identities ------------------------------------------------------------------------ */
#define GAR_IDENTITY_ANY    0
#define GAR_IDENTITY_HOST   1
#define GAR_IDENTITY_WORLD  2 /* an address the ipcache does not hold */

/* ---- Directions (policy direction; Hubble TrafficDirection numbers) --------------------- */
#define GAR_DIR_INGRESS 1
#define GAR_DIR_EGRESS  2

/* ---- Observation points ---------------------------------------------------------------- */
#define GAR_OBS_FROM_CONTAINER 1 /* tc ingress of the host-side veth: leaving the endpoint */
#define GAR_OBS_TO_CONTAINER   2 /* tc egress of the host-side veth: entering the endpoint */

/* ---- Policy match types (Cilium's policy-verdict numbering) ---------------------------- */
#define GAR_MATCH_NONE       0
#define GAR_MATCH_L3_ONLY    1
#define GAR_MATCH_L3_L4      2
#define GAR_MATCH_L4_ONLY    3
#define GAR_MATCH_ALL        4
#define GAR_MATCH_L3_PROTO   5
#define GAR_MATCH_PROTO_ONLY 6

/* ---- Drop reasons (Hubble's DropReason numbers) ----------------------------------------- */
#define GAR_DROP_INVALID_SOURCE_IP        132 /* source address is not the endpoint's */
#define GAR_DROP_POLICY_DENIED            133 /* enforced direction, no allow matched */
#define GAR_DROP_INVALID_PACKET           134 /* truncated headers */
#define GAR_DROP_UNSUPPORTED_L3           139 /* neither IPv4 nor ARP */
#define GAR_DROP_CT_INSERT_FAILED         155
#define GAR_DROP_FRAGMENT                 157 /* IP fragments are not supported */
#define GAR_DROP_NO_ENDPOINT_CONFIG       165 /* program attached to an unknown ifindex */
#define GAR_DROP_PROXY_NOT_LISTENING      178 /* redirect: no proxy socket (fail closed) */
#define GAR_DROP_PROXY_ASSIGN_FAILED      179 /* redirect: bpf_sk_assign refused */
#define GAR_DROP_PROXY_REDIRECT_UNSUPPORTED 180 /* redirect needed where it cannot happen */
#define GAR_DROP_POLICY_DENY              181 /* an explicit deny matched */

/* ---- Per-endpoint configuration (map gar_endpoints: ifindex of the host veth -> value) -- */
#define GAR_EP_INGRESS_ENFORCED 0x1
#define GAR_EP_EGRESS_ENFORCED  0x2
#define GAR_EP_AUDIT            0x4
/* `endpoint config NAME deny-response=...`: what a packet its L3/L4 policy denies gets back
 * (lib/deny_response.h); neither = none, a silent drop. At most one is set. */
#define GAR_EP_DENY_RESPONSE_ICMP      0x8  /* ICMP destination unreachable, code 13 */
#define GAR_EP_DENY_RESPONSE_TCP_RESET 0x10 /* TCP: RST; anything else: as ICMP */
#define GAR_EP_TIERS                   0x20 /* has ClusterNetworkPolicy (Admin/Baseline) entries */
/* Policies in audit mode (garrison.io/audit, "try before enforce"): the endpoint's identity
 * has entries in gar_policy_audit, its what-if state (every policy enforced, the audited ones
 * included). A connection gar_policy allows and the what-if state denies passes, and its
 * verdict event says AUDIT with the what-if match type. The what-if state's own enforcement
 * and tier bits are the three after it (an audited policy may switch a direction to
 * default-deny that the enforced set leaves open). */
#define GAR_EP_POLICY_AUDIT            0x40
#define GAR_EP_AUDIT_INGRESS_ENFORCED  0x80
#define GAR_EP_AUDIT_EGRESS_ENFORCED   0x100
#define GAR_EP_AUDIT_TIERS             0x200

struct gar_endpoint {
	__u32 identity;
	__be32 ipv4;
	__u32 flags; /* GAR_EP_* */
	__u32 pad;
};

/* ---- Datapath-wide configuration (map gar_config: array of one) ------------------------
 * Zero fields take the defaults below. */
#define GAR_CT_TIMEOUT_SYN_S_DEFAULT   60
#define GAR_CT_TIMEOUT_TCP_S_DEFAULT   21600
#define GAR_CT_TIMEOUT_CLOSE_S_DEFAULT 10
#define GAR_CT_TIMEOUT_OTHER_S_DEFAULT 60

struct gar_config {
	__u32 ct_timeout_syn_s;   /* TCP connection not yet established */
	__u32 ct_timeout_tcp_s;   /* TCP established */
	__u32 ct_timeout_close_s; /* TCP after RST or FIN in both directions */
	__u32 ct_timeout_other_s; /* UDP, ICMP, other protocols */
};

/* ---- ipcache (map gar_ipcache: LPM trie, IPv4 prefix -> identity) ----------------------- */
#define GAR_IPCACHE_LOCAL_ENDPOINT 0x1 /* ifindex names the host veth of a local endpoint */

struct gar_ipcache_key {
	__u32 prefixlen; /* 0..32 */
	__be32 addr;
};

struct gar_ipcache_value {
	__u32 identity;
	__u32 ifindex;
	__u32 flags; /* GAR_IPCACHE_* */
};

/* ---- Policy (maps gar_policy and gar_policy_audit: LPM tries) ---------------------------
 * gar_policy holds what is enforced; gar_policy_audit, of the same layout, the what-if state
 * of the identities some audited policy selects (GAR_EP_POLICY_AUDIT).
 * One trie for every endpoint identity. The fixed part (endpoint identity .. tier, 96 bits)
 * always matches in full; the prefix then runs over the big-endian destination port, so a
 * port range is stored as the aligned power-of-two blocks it splits into. prefixlen =
 * GAR_POLICY_FIXED_BITS + port prefix bits (0 = any port, 16 = one port). Allow and deny
 * entries live apart (field `deny`) and are looked up separately: see lib/policy.h. */
#define GAR_POLICY_FIXED_BITS 96
#define GAR_POLICY_FULL_BITS  112

struct gar_policy_key {
	__u32 prefixlen;
	__u32 endpoint_identity; /* the endpoint whose policy this is */
	__u32 remote_identity;   /* 0 = any identity */
	__u8 direction;          /* GAR_DIR_* */
	__u8 deny;               /* 1 = explicit deny entry, 0 = allow entry */
	__u8 protocol;           /* IP protocol, 0 = any */
	__u8 tier;               /* GAR_POLICY_TIER_*; in the Admin/Baseline tiers deny is 0 */
	__be16 dport;            /* block start (ICMP: type), network byte order */
	__u16 pad1;              /* beyond every prefix; zero */
};

#define GAR_POLICY_REDIRECT 0x1 /* allowed, and redirected to proxy_port */
/* ClusterNetworkPolicy tiers: a tier entry's action is one of these flags, and its
 * proxy_port field holds the rule's order in the tier (lower first) */
#define GAR_POLICY_ACCEPT 0x2
#define GAR_POLICY_DENY   0x4
#define GAR_POLICY_PASS   0x8

#define GAR_POLICY_TIER_NETWORKPOLICY 0
#define GAR_POLICY_TIER_ADMIN         1
#define GAR_POLICY_TIER_BASELINE      2

struct gar_policy_value {
	/* tier entries (GAR_POLICY_ACCEPT / DENY / PASS): proxy_port holds the rule's order */
	__u16 proxy_port;     /* host byte order; with GAR_POLICY_REDIRECT, 0 = no proxy (drop) */
	__u8 flags;           /* GAR_POLICY_* */
	__u8 port_prefixlen;  /* the entry's port prefix bits (0..16): precedence + match type */
};

/* ---- Conntrack (map gar_ct: LRU hash) ---------------------------------------------------
 * Keyed by the tuple of a connection's first packet (its original direction); a packet of
 * the other direction finds it under the reversed tuple. ICMP (lib/packet.h, gar_parse): a
 * query (echo, timestamp, ...) is (identifier, 0) and its reply (0, identifier), so they
 * share the entry while a request from the other side does not (only identifier 0 reads
 * alike both ways); any other type is (0x100 | type, 0x200 | code), one way only. */
struct gar_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 pad[3];
};

#define GAR_CT_SEEN_REPLY     0x0001 /* a packet of the reply direction passed */
#define GAR_CT_ESTABLISHED    0x0002 /* TCP: SYN-ACK seen, then an ACK of the original side */
#define GAR_CT_FIN_ORIG       0x0004
#define GAR_CT_FIN_REPLY      0x0008
#define GAR_CT_RST            0x0010
#define GAR_CT_EGRESS_DONE    0x0020 /* the source endpoint's egress policy admitted it */
#define GAR_CT_INGRESS_DONE   0x0040 /* the destination endpoint's ingress policy admitted it */
#define GAR_CT_REDIRECT       0x0080 /* original direction is steered to proxy_port */
#define GAR_CT_PROXY_UPSTREAM 0x0100 /* opened by the proxy (GAR_MARK_PROXY_UPSTREAM) */
#define GAR_CT_AUDIT          0x0200 /* admitted only because of audit mode */

struct gar_ct_entry {
	__u64 expires_ns;   /* CLOCK_MONOTONIC (bpf_ktime_get_ns); garbage after this */
	__u64 packets_orig;
	__u64 packets_reply;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 proxy_port;   /* host byte order, with GAR_CT_REDIRECT */
	__u16 flags;        /* GAR_CT_* */
	__u8 tcp_flags_orig;  /* OR of the TCP flags seen in each direction */
	__u8 tcp_flags_reply;
	__u8 pad[2];
};

/* ---- Counters (map gar_counters: per-CPU array) ----------------------------------------
 * index = GAR_COUNTER_INDEX(observation point, code); code is a drop reason or one of: */
#define GAR_COUNT_FORWARDED   0
#define GAR_COUNT_REDIRECTED  1 /* assigned to a proxy socket */
#define GAR_COUNT_AUDITED     2 /* would have been dropped; passed because of audit mode */
#define GAR_COUNT_EVENTS_LOST 3 /* ring buffer full */
#define GAR_COUNT_DENY_RESPONSE_SENT    4 /* a denied packet answered (ICMP or TCP RST) */
#define GAR_COUNT_DENY_RESPONSE_LIMITED 5 /* an answer withheld by the rate limit */
#define GAR_COUNTER_INDEX(obs, code) (((((obs) - 1) & 0x1) << 8) | ((code) & 0xff))
#define GAR_COUNTERS_MAX 512

struct gar_counter {
	__u64 packets;
	__u64 bytes;
};

/* ---- Events (ring buffer gar_events) --------------------------------------------------- */
#define GAR_EVENT_DROP           1 /* a packet was dropped (reason) */
#define GAR_EVENT_POLICY_VERDICT 2 /* a new connection was judged by one side's policy */

#define GAR_EVENT_F_ALLOWED  0x01 /* verdict: the policy allows it */
#define GAR_EVENT_F_AUDIT    0x02 /* audit mode: computed and logged, nothing dropped */
#define GAR_EVENT_F_REDIRECT 0x04 /* steered to the proxy (proxy_port) */
/* drops: the answer sent to the sender instead of silence (deny-response) */
#define GAR_EVENT_F_DENY_RESPONSE_ICMP      0x08
#define GAR_EVENT_F_DENY_RESPONSE_TCP_RESET 0x10

/* ---- Answers for denied packets (lib/deny_response.h): a token bucket per CPU ------------
 * one answer per GAR_DENY_RESPONSE_INTERVAL_NS (1000/s) per CPU, bursts of up to
 * GAR_DENY_RESPONSE_BURST; beyond it the packet is dropped silently (counted LIMITED). */
#define GAR_DENY_RESPONSE_INTERVAL_NS 1000000
#define GAR_DENY_RESPONSE_BURST       50

struct gar_event {
	__u64 time_ns;       /* bpf_ktime_get_ns */
	__u8 type;           /* GAR_EVENT_* */
	__u8 reason;         /* GAR_DROP_* (verdicts: the drop reason of a deny, else 0) */
	__u8 direction;      /* GAR_DIR_* of the policy that decided, 0 if none */
	__u8 match_type;     /* GAR_MATCH_* */
	__u8 flags;          /* GAR_EVENT_F_* */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 obs_point;      /* GAR_OBS_* */
	__u32 ifindex;       /* host veth of the endpoint whose policy decided */
	__u32 src_identity;
	__u32 dst_identity;
	__be32 saddr;
	__be32 daddr;
	__u16 sport;         /* host byte order (ICMP: identifier) */
	__u16 dport;         /* host byte order (ICMP: type) */
	__u16 proxy_port;
	__u16 pad;
	__u32 length;        /* packet length */
};

#endif /* GARRISON_ABI_H */
