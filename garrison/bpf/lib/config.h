/* SPDX-License-Identifier: Apache-2.0
 * Configuration the agent writes: per endpoint (by the ifindex of its host-side veth) and
 * datapath-wide (conntrack timeouts). Every map is pinned under GARRISON_PIN_ROOT, which the
 * loader defines, so a restarted loader finds the same maps. */
#ifndef GARRISON_LIB_CONFIG_H
#define GARRISON_LIB_CONFIG_H

#include "../abi.h"

#ifndef GARRISON_PIN_ROOT
#error "GARRISON_PIN_ROOT must be defined by the loader (a bpffs directory)"
#endif
#define GAR_PIN(name) GARRISON_PIN_ROOT "/" #name

#ifndef GAR_MAX_ENDPOINTS
#define GAR_MAX_ENDPOINTS 4096
#endif

BPF_TABLE_PINNED("hash", __u32, struct gar_endpoint, gar_endpoints, GAR_MAX_ENDPOINTS,
		 GAR_PIN(gar_endpoints));
BPF_TABLE_PINNED("array", __u32, struct gar_config, gar_config, 1, GAR_PIN(gar_config));

static __always_inline struct gar_endpoint *gar_endpoint_of(__u32 ifindex)
{
	return gar_endpoints.lookup(&ifindex);
}

static __always_inline __u64 gar_seconds(__u32 configured, __u32 fallback)
{
	return (__u64)(configured ? configured : fallback) * 1000000000ULL;
}

#endif
