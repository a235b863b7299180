/* SPDX-License-Identifier: Apache-2.0
 * ipcache: IPv4 prefix -> security identity (longest prefix wins). An address it does not
 * hold is the world (identity 2). Local endpoints carry the ifindex of their host veth, so
 * the source side can apply the destination's ingress policy as well. */
#ifndef GARRISON_LIB_IPCACHE_H
#define GARRISON_LIB_IPCACHE_H

#include "../abi.h"
#include "config.h"

#ifndef GAR_IPCACHE_MAX
#define GAR_IPCACHE_MAX 131072
#endif

BPF_TABLE_PINNED("lpm_trie", struct gar_ipcache_key, struct gar_ipcache_value, gar_ipcache,
		 GAR_IPCACHE_MAX, GAR_PIN(gar_ipcache), BPF_F_NO_PREALLOC);

static __always_inline struct gar_ipcache_value *gar_ipcache_lookup(__be32 addr)
{
	struct gar_ipcache_key key = { .prefixlen = 32, .addr = addr };

	return gar_ipcache.lookup(&key);
}

static __always_inline __u32 gar_identity_of(const struct gar_ipcache_value *info)
{
	if (!info || info->identity == GAR_IDENTITY_ANY)
		return GAR_IDENTITY_WORLD;
	return info->identity;
}

#endif
