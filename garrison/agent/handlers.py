"""The local API's methods: JSON in, JSON out, each a thin call into the Agent."""

from __future__ import annotations

from typing import Any

import grpc

from garrison.agent.api import APIError, Handler
from garrison.agent.daemon import Agent
from garrison.agent.endpoints import EndpointError, EndpointRecord
from garrison.agent.policystore import PolicyStoreError
from garrison.agent.runtime import RuntimeEndpoints
from garrison.bpf.abi import DENY_RESPONSES
from garrison.flows.query import FilterError, FlowQuery
from garrison.flows.summary import rule_keys
from garrison.identity.namespaces import NamespaceError, check_namespace
from garrison.kvstore.base import KVStoreError
from garrison.policies.errors import PolicyValidationError
from garrison.policies.mapstate import PROTOCOL_NAMES, TIER_NAMES, MapState
from garrison.statefile import StateWriteError


def endpoint_view(agent: Agent, ep: EndpointRecord) -> dict[str, Any]:
    state = agent.map_state(ep.identity) if ep.identity else None
    return {
        "id": ep.id,
        "name": ep.name,
        "namespace": ep.namespace,
        "identity": ep.identity,
        "labels": list(ep.labels),
        "namespace_labels": list(ep.namespace_labels),
        "ports": list(ep.ports),
        "ipv4": ep.ipv4,
        "host_veth": ep.host_veth,
        "netns": ep.netns_path or f"/run/netns/{ep.name}",
        "adopted": ep.adopted,
        "container_id": ep.container_id,
        "ingress_enforcement": bool(state and state.ingress_enforced),
        "egress_enforcement": bool(state and state.egress_enforced),
        "audit": bool(state and state.audit) or ep.audit,
        # policies in audit mode selecting it: what they would deny is recorded AUDIT
        "audit_policies": agent.audit_policies(ep.identity),
        "deny_response": ep.deny_response,
    }


def map_state_view(state: MapState) -> list[dict[str, Any]]:
    rows = []
    for key, entry in sorted(state.entries.items()):
        ruleset = state.l7.get(key)
        rows.append(
            {
                "direction": key.direction.value,
                "identity": key.identity,
                "protocol": PROTOCOL_NAMES.get(key.protocol, "ANY" if not key.protocol else
                                               str(key.protocol)),
                "port": key.port,
                "end_port": key.end_port,
                # a ClusterNetworkPolicy tier entry: its action (accept / deny / pass)
                "verdict": entry.action.value.lower() if entry.action else "deny" if entry.deny
                else (f"redirect:{entry.redirect.value}" if entry.redirect else "allow"),
                "tier": TIER_NAMES[key.tier],
                "l7_rules": len(ruleset.rules) if ruleset else 0,
                "l7_allow_all": bool(ruleset and ruleset.allow_all),
                "derived_from": [str(r) for r in entry.derived_from],
            }
        )
    return rows


def policy_paths(req: dict[str, Any]) -> list[str]:
    """`PolicyImport`'s `paths`: absolute paths (the CLI resolves them). A string was taken
    as a list of one-character paths, "/" among them: the agent walked the whole file system
    for policy files; a relative path is resolved against the agent's directory, not the
    caller's."""
    paths = req.get("paths")
    if (not isinstance(paths, list) or not paths
            or not all(isinstance(p, str) and p for p in paths)):
        raise APIError(f"paths: expected a list of policy files or directories, got {paths!r:.80}")
    for path in paths:
        if not path.startswith("/"):
            raise APIError(f"{path!r}: not an absolute path (the agent's working directory is "
                           "not the caller's); give the whole path")
    return paths


def make_handlers(agent: Agent) -> dict[str, Handler]:
    def guard(fn: Handler) -> Handler:
        def call(req: dict[str, Any]) -> dict[str, Any]:
            try:
                return fn(req)
            except (EndpointError, PolicyStoreError, NamespaceError) as exc:
                raise APIError(str(exc)) from exc
            except PolicyValidationError as exc:
                raise APIError(
                    "\n".join(str(i) for i in exc.issues)
                    + f"\n{len(exc.issues)} error(s); nothing imported, the previous policy "
                    "stays in force"
                ) from exc
            except KeyError as exc:
                raise APIError(str(exc), grpc.StatusCode.NOT_FOUND) from exc
            except KVStoreError as exc:  # etcd away (cluster mode): nothing was changed
                raise APIError(str(exc), grpc.StatusCode.UNAVAILABLE) from exc
            except StateWriteError as exc:  # a full or read-only state dir: refused whole
                raise APIError(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from exc

        return call

    def status(_: dict[str, Any]) -> dict[str, Any]:
        return agent.status()

    runtime = RuntimeEndpoints(agent)
    runtime.resume()  # containers whose labels were not read before a restart

    def cni_add(req: dict[str, Any]) -> dict[str, Any]:
        return endpoint_view(agent, runtime.add(req))

    def cni_del(req: dict[str, Any]) -> dict[str, Any]:
        return runtime.delete(req)

    def cni_check(req: dict[str, Any]) -> dict[str, Any]:
        return runtime.check(req)

    def cni_gc(req: dict[str, Any]) -> dict[str, Any]:
        return runtime.gc(req)

    def cni_status(_: dict[str, Any]) -> dict[str, Any]:
        return {"ready": bool(agent.datapath.status().get("loaded"))}

    def endpoint_add(req: dict[str, Any]) -> dict[str, Any]:
        ep = agent.add_endpoint(
            req["name"], req.get("labels", []), req.get("namespace") or "default", req.get("ip"),
            netns=req.get("netns") or None, interface=req.get("interface") or "eth0",
            ports=[str(p) for p in req.get("ports") or []],
        )
        return endpoint_view(agent, ep)

    # Under the agent's lock: a relabel (namespace label, the cluster's watch) replaces an
    # endpoint's identity, and a view read half before and half after names an identity that
    # is gone.
    def endpoint_list(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            return {"endpoints": [endpoint_view(agent, ep) for ep in agent.endpoints]}

    def endpoint_get(req: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            ep = agent.endpoints.get(str(req["name"]))
            view = endpoint_view(agent, ep)
            view["policy"] = map_state_view(agent.map_state(ep.identity))
            return view

    def endpoint_delete(req: dict[str, Any]) -> dict[str, Any]:
        ep = agent.delete_endpoint(str(req["name"]))
        return {"deleted": ep.name}

    def endpoint_config(req: dict[str, Any]) -> dict[str, Any]:
        settings = dict(req.get("settings") or {})
        unknown = sorted(set(settings) - {"audit", "deny-response"})
        if unknown:
            raise APIError(f"unknown endpoint setting {unknown[0]!r}: the ones there are: "
                           "audit, deny-response")
        ep = agent.endpoints.get(str(req["name"]))
        audit: bool | None = None
        deny_response: str | None = None
        if "audit" in settings:
            value = str(settings["audit"]).lower()
            if value not in ("true", "false"):
                raise APIError(f"audit={settings['audit']}: expected audit=true or audit=false")
            audit = value == "true"
        if "deny-response" in settings:
            deny_response = str(settings["deny-response"]).lower()
            if deny_response not in DENY_RESPONSES:
                raise APIError(
                    f"deny-response={settings['deny-response']}: expected one of "
                    + ", ".join(f"deny-response={v}" for v in DENY_RESPONSES)
                )
        if audit is not None or deny_response is not None:
            ep = agent.configure_endpoint(ep.name, audit, deny_response)
        return endpoint_view(agent, ep)

    def endpoint_labels(req: dict[str, Any]) -> dict[str, Any]:
        ep = agent.relabel_endpoint(str(req["name"]), req.get("labels", []))
        return endpoint_view(agent, ep)

    def namespace_view(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "labels": [f"{k}={v}" for k, v in sorted(labels.items())],
            "endpoints": sorted(ep.name for ep in agent.endpoints if ep.namespace == name),
        }

    def namespace_label(req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        labels, moved = agent.label_namespace(name, [str(c) for c in req.get("labels", [])])
        view = namespace_view(name, labels)
        view["relabelled"] = [{"name": ep.name, "identity": ep.identity} for ep in moved]
        return view

    def namespace_get(req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        check_namespace(name)
        with agent.lock:
            return namespace_view(name, agent.namespaces.labels(name))

    def namespace_list(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            known = agent.namespaces.all()
            for ep in agent.endpoints:
                if ep.namespace not in known:
                    known[ep.namespace] = agent.namespaces.labels(ep.namespace)
            return {"namespaces": [namespace_view(n, known[n]) for n in sorted(known)]}

    def policy_import(req: dict[str, Any]) -> dict[str, Any]:
        change = agent.import_policies(policy_paths(req))
        return {
            "revision": change.revision,
            "imported": [f"{p.kind.value} {p.namespace or ''}/{p.name}" for p in change.added],
        }

    def policy_delete(req: dict[str, Any]) -> dict[str, Any]:
        n = agent.delete_policies(req.get("name"), req.get("namespace"), bool(req.get("all")))
        return {"deleted": n, "revision": agent.revision}

    def policy_get(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            return {
                "revision": agent.revision,
                **(
                    {"cluster_revision": agent.cluster.node.policy_revision()}
                    if agent.cluster is not None
                    else {}
                ),
                "policies": [
                    {
                        "kind": p.kind.value,
                        "namespace": p.namespace,
                        "name": p.name,
                        "rules": len(p.rules),
                        # every rule section, so a review can list those never matched
                        "rule_refs": [key.to_dict() for key in rule_keys([p])],
                        "source": p.source.path if p.source else None,
                    }
                    for p in agent.repository
                ],
            }

    def identity_list(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            ids = agent.allocator.all()
        return {
            "identities": [
                {"id": i, "labels": [str(lab) for lab in labels]}
                for i, labels in sorted(ids.items())
            ]
        }

    def identity_get(req: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            ident = agent.allocator.lookup_id(int(req["id"]))
        if ident is None:
            raise APIError(f"no identity {req['id']}", grpc.StatusCode.NOT_FOUND)
        return {"id": ident.id, "labels": [str(lab) for lab in ident.labels]}

    def bpf_policy_get(req: dict[str, Any]) -> dict[str, Any]:
        ep = agent.endpoints.get(str(req["endpoint"]))
        with agent.lock:
            entries = agent.datapath.dump_policy(ep.identity)
        return {"endpoint": ep.name, "identity": ep.identity, "entries": list(entries)}

    def bpf_ipcache_list(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            return {"entries": list(agent.datapath.dump_ipcache())}

    def bpf_ct_list(_: dict[str, Any]) -> dict[str, Any]:
        with agent.lock:
            return {"entries": list(agent.datapath.dump_ct())}

    def _query(req: dict[str, Any]) -> Any:
        try:
            return FlowQuery.from_dict(req.get("query") or {}).compile()
        except FilterError as exc:
            raise APIError(str(exc)) from exc

    def flows(req: dict[str, Any]) -> dict[str, Any]:
        """The newest `limit` matching records, oldest first, and the cursor after them
        (for `FlowsSince`): `garrison observe --last N [--follow]`; with `first`, the oldest
        ones instead."""
        query = _query(req)
        if req.get("first") is not None:  # --first N: the oldest in the ring
            cursor = agent.flows.total
            records = agent.flows.query(query, limit=int(req["first"]))
            return {"flows": [r.to_json() for r in records], "cursor": cursor}
        batch = agent.flows.tail(int(req.get("limit", 100)), query)
        return {"flows": [r.to_json() for r in batch.records], "cursor": batch.cursor}

    def flows_since(req: dict[str, Any]) -> dict[str, Any]:
        """The matching records added since `cursor`: `garrison observe --follow` polls it.
        `missed` counts records the ring evicted before the follower read them."""
        batch = agent.flows.since(int(req.get("cursor", 0)), _query(req))
        return {
            "flows": [r.to_json() for r in batch.records],
            "cursor": batch.cursor,
            "missed": batch.missed,
        }

    handlers: dict[str, Handler] = {
        "Status": status,
        "EndpointAdd": endpoint_add,
        "EndpointList": endpoint_list,
        "EndpointGet": endpoint_get,
        "EndpointDelete": endpoint_delete,
        "EndpointLabels": endpoint_labels,
        "EndpointConfig": endpoint_config,
        "NamespaceLabel": namespace_label,
        "NamespaceGet": namespace_get,
        "NamespaceList": namespace_list,
        "CniAdd": cni_add,
        "CniDel": cni_del,
        "CniCheck": cni_check,
        "CniGc": cni_gc,
        "CniStatus": cni_status,
        "PolicyImport": policy_import,
        "PolicyDelete": policy_delete,
        "PolicyGet": policy_get,
        "IdentityList": identity_list,
        "IdentityGet": identity_get,
        "BpfPolicyGet": bpf_policy_get,
        "BpfIpcacheList": bpf_ipcache_list,
        "BpfCtList": bpf_ct_list,
        "Flows": flows,
        "FlowsSince": flows_since,
    }
    return {name: guard(fn) for name, fn in handlers.items()}
