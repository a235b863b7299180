"""`garrison status` lines and problems for the cluster part of the agent's status (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def cluster_problems(status: Mapping[str, Any]) -> list[str]:
    """What is wrong with the node's cluster membership, each line naming the fix."""
    cluster = status.get("cluster")
    if not cluster:
        return []
    out = []
    where = ",".join(cluster.get("endpoints", [])) or "?"
    if not cluster.get("connected"):
        reason = cluster.get("error") or next(
            (w["error"] for w in cluster.get("watches", {}).values() if w.get("error")), ""
        )
        out.append(
            f"etcd at {where} is not connected{': ' + reason if reason else ''}; enforcement"
            " stays as it is, new identities and policy imports wait until it answers"
        )
    for node, info in sorted(cluster.get("nodes", {}).items()):
        if not info.get("healthy", True):
            age = info.get("heartbeat_age_s")
            out.append(
                f"node {node}: no heartbeat for {age} s; its lease ends its endpoints"
                if age is not None
                else f"node {node}: no heartbeat; its lease ends its endpoints"
            )
    for node, error in sorted(cluster.get("route_errors", {}).items()):
        out.append(f"route to node {node}: {error}")
    if cluster.get("underlay_error"):
        out.append(str(cluster["underlay_error"]))
    if cluster.get("flow_api_error"):
        out.append(str(cluster["flow_api_error"]))
    refused = cluster.get("refused", {})
    for key, why in sorted(refused.items()):
        out.append(
            f"etcd record refused, this node ignores it: {why}; rewrite or delete it"
            f" (etcdctl del {cluster.get('root', 'garrison/')}{key})"
        )
    more = int(cluster.get("refused_count", len(refused))) - len(refused)
    if more > 0:
        out.append(f"{more} more etcd records refused (the agent's log names each)")
    for namespace in cluster.get("namespaces_not_applied", []):
        out.append(
            f"namespace {namespace}: its new labels are stored here but some of its endpoints"
            " keep their old identity until etcd answers (retried on each heartbeat)"
        )
    return out


def cluster_lines(status: Mapping[str, Any]) -> list[str]:
    """Nothing for an agent alone (the embedded store), else the kvstore and every node."""
    cluster = status.get("cluster")
    if not cluster:
        return []
    lease = cluster.get("lease") or "none"
    lines = [
        f"Kvstore:         etcd {','.join(cluster.get('endpoints', []))}, "
        + ("connected" if cluster.get("connected") else "NOT CONNECTED")
        + f", revision {cluster.get('revision', 0)}, lease {lease}"
        f" (TTL {cluster.get('lease_ttl_s', '?')} s)",
        f"Cluster:         node {cluster.get('node')}, "
        f"{cluster.get('remote_endpoints', 0)} remote endpoints",
    ]
    if cluster.get("tls"):
        lines.insert(1, f"Kvstore TLS:     {cluster['tls']}")
    if cluster.get("user"):
        lines.insert(1, f"Kvstore user:    {cluster['user']}")
    if "flow_api" in cluster:
        where = cluster["flow_api"]
        security = {
            "tls": "TLS, no client certificate asked",
            "mtls": "mTLS, client certificates from --flow-api-tls-client-ca",
        }.get(str(cluster.get("flow_api_security")), "plaintext")
        lines.append(
            f"Flow API:        {where} (read-only, {security}: `garrison observe --cluster`)"
            if where
            else "Flow API:        none (this node's flows are not in `observe --cluster`)"
        )
    routes = cluster.get("routes", {})
    for node, info in sorted(cluster.get("nodes", {}).items()):
        health = "healthy" if info.get("healthy") else "NO HEARTBEAT"
        route = f", routed via {routes[info['pod_cidr']]}" if info.get("pod_cidr") in routes else ""
        lines.append(
            f"  {node:<14} {info.get('ip', '?'):<15} {info.get('pod_cidr', '?'):<18} {health}"
            f"{route}"
        )
    return lines
