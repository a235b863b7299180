"""Several nodes: node registry, ipcache and policy sync through etcd's watches and leases,
routes to other nodes' pod CIDRs. docs/cluster.md describes the whole."""
