/* SPDX-License-Identifier: Apache-2.0
 * What the datapath reports: per-CPU packet/byte counters and a ring buffer of events
 * (drops with their reason, policy verdicts of new connections). Both are pinned, so a
 * restarted loader keeps reading the same buffer and nothing written meanwhile is lost. */
#ifndef GARRISON_LIB_EVENTS_H
#define GARRISON_LIB_EVENTS_H

#include "../abi.h"
#include "config.h"
#include "packet.h"

#ifndef GAR_EVENTS_PAGES
#define GAR_EVENTS_PAGES 256
#endif

BPF_TABLE_PINNED("percpu_array", __u32, struct gar_counter, gar_counters, GAR_COUNTERS_MAX,
		 GAR_PIN(gar_counters));

/* BPF_RINGBUF_OUTPUT with a pin path (bcc has no pinned form of that macro). */
struct gar_events_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" GAR_PIN(gar_events))))
struct gar_events_table_t gar_events = { .max_entries = GAR_EVENTS_PAGES * PAGE_SIZE };

static __always_inline void gar_count(__u8 obs, __u8 code, __u32 length)
{
	__u32 index = GAR_COUNTER_INDEX(obs, code);
	struct gar_counter *c = gar_counters.lookup(&index);

	if (c) {
		c->packets++;
		c->bytes += length;
	}
}

static __always_inline void gar_emit(__u8 type, __u8 obs, const struct gar_packet *pkt,
				     __u32 ifindex, __u32 src_identity, __u32 dst_identity,
				     __u8 direction, __u8 reason, __u8 match_type, __u8 flags,
				     __u16 proxy_port)
{
	struct gar_event *ev = gar_events.ringbuf_reserve(sizeof(struct gar_event));

	if (!ev) {
		gar_count(obs, GAR_COUNT_EVENTS_LOST, 0);
		return;
	}
	ev->time_ns = bpf_ktime_get_ns();
	ev->type = type;
	ev->reason = reason;
	ev->direction = direction;
	ev->match_type = match_type;
	ev->flags = flags;
	ev->protocol = pkt->tuple.protocol;
	ev->tcp_flags = pkt->tcp_flags;
	ev->obs_point = obs;
	ev->ifindex = ifindex;
	ev->src_identity = src_identity;
	ev->dst_identity = dst_identity;
	ev->saddr = pkt->tuple.saddr;
	ev->daddr = pkt->tuple.daddr;
	ev->sport = pkt->sport;
	ev->dport = pkt->dport;
	ev->proxy_port = proxy_port;
	ev->pad = 0;
	ev->length = pkt->length;
	gar_events.ringbuf_submit(ev, 0);
}

#endif
