"""Who talked to whom, and under which rules: the service map of the review page.

A `ServiceMapBuilder` reads flow dicts (access-log lines, decoded; Hubble's field names) one at
a time and keeps counters only, so a log of any length fits in memory bounded by the variety of
endpoints, requests and rules, not by its length. Builders of parts of a log `merge()` into the
builder of the whole (the review server splits a large log across cores). `result()` gives the
JSON object the page draws. Nothing here reads files or sockets.

Definitions (the same as `garrison accesslog summary`, see `garrison.flows.summary`):

**Node**: the endpoints of one namespace and identity (the replicas of a workload share their
labels, so their identity): its short labels, the endpoint (pod) names seen, a display name
(the pod name, or the common prefix of the replicas' names, or the labels, or the address).

**Edge**: from the node that opened the connection to the node it reached. A request and a
datapath record name the client as `source`; a reply (`is_reply` true) names it as
`destination`, so replies are counted on the edge of their request.

**Decision**: an L7 request (not a reply), or an L3/L4 drop (event type 1) or policy verdict
(event type 5). When the log holds a drop record, policy-verdict denials are not counted (their
drop record is: the datapath writes both for one denied attempt). A denied SYN that repeats
one seen at most 64 s before (same addresses, ports and event type: the client retransmitting)
is the same attempt, counted in `retried_syns` only (`summary.RetriedSyns`; a log read in
parts misses a retransmission split from its SYN at a part boundary). Traces (event type 4)
and replies decide nothing. An edge counts its decisions by verdict.

**L7 detail** of an edge: one entry per HTTP method and path pattern (`summary.path_pattern`:
`/v1/ships/{n}`), gRPC `service/method`, Kafka API key and topic (one entry per topic), with
the requests by verdict and the answers: HTTP status codes, gRPC status codes, Kafka error codes,
each with a count. L3/L4 decisions count per protocol and port (`TCP/80`).

**Rules** of an edge: every policy rule section (`{kind, namespace, name, rule}`) named by an
edge's decisions in `*_allowed_by` (allowed) or `*_denied_by` (denied, or audited when the
verdict is AUDIT), with the counts and the first and last time. The rule totals over all edges
are the policy review's numbers; given the rule sections in force, the ones never named are
listed as never matched. In audit mode, the L7 entries and ports with AUDIT decisions are what
enforcing would deny.

**Grouping**: past `max_nodes` nodes, `result()` draws one node per namespace (the edges merged
by namespace pair, their filter `--from-namespace A --to-namespace B`) so a map of 10,000
endpoints stays readable; the page says so. Past `max_nodes` namespaces, the ones with the
fewest decisions are one node, `(other namespaces)`.

JSON (`result()`)::

    {"records": int, "skipped": int, "retried_syns": int,
     "first_time": str|null, "last_time": str|null,
     "grouped": bool,
     "nodes": [{"id": str, "namespace": str, "identity": int|null, "name": str,
                "labels": [str], "pods": [str], "pod_count": int}],
     "edges": [{"id": str, "source": str, "target": str, "state": str, "counts": COUNTS,
                "last_time": str|null, "ports": [{"port": str, **COUNTS}],
                "l7": [{"protocol": "http"|"grpc"|"kafka", "what": str, **COUNTS,
                        "answers": [{"code": str, "text": str, "count": int}]}],
                "rules": [RULE], "filter": str}],
     "rules": [RULE], "never_matched": [{"kind", "namespace", "name", "rule", "text"}]|null,
     "audited": [{"source": str, "target": str, "protocol": str, "what": str, "count": int,
                  "rules": [str]}]}

COUNTS is {"forwarded", "dropped", "audit", "error", "other": int}; RULE is {"kind",
"namespace", "name", "rule", "text", "allowed", "denied", "audited", "first_time",
"last_time"}. `state` is `forwarded`, `dropped`, `audit`, `error` or `mixed` (some forwarded,
some dropped or in error), the colour of the edge. `filter` is the `garrison observe` filter
that selects the edge's requests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from garrison.flows.build import GRPC_STATUS_NAMES
from garrison.flows.codec import format_time, parse_time
from garrison.flows.summary import (
    DEFAULT_SUMMARY,
    RetriedSyns,
    RuleKey,
    aggregated_flows,
    count_rules,
    path_pattern,
    short_labels,
)
from garrison.identity.model import RESERVED

# Verdict slots; a policy-verdict denial is kept apart until `result()` knows whether drop
# records stand for it.
_FWD, _DROP, _AUDIT, _ERROR, _OTHER, _VDENIED = range(6)
_SLOT = {"FORWARDED": _FWD, "DROPPED": _DROP, "AUDIT": _AUDIT, "ERROR": _ERROR}
# Rule slots: allowed, denied (L7), audited, L3/L4 denied by drop, by policy verdict, first, last
# the slots of `summary.count_rules`, which counts rules for both
_R_ALLOWED, _R_DENIED, _R_AUDITED, _R_DROP, _R_VERDICT, _R_FIRST, _R_LAST = range(7)
_L4_NAMES = ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6")
_MAX_PODS = 50  # endpoint names kept per node (the count goes on)
_MEMO = 4096
DEFAULT_MAX_NODES = 150

NodeKey = tuple[str, int]  # namespace, identity
_RuleTuple = tuple[Any, ...]  # as read; `_merged_rules` makes RuleKeys


class _Node:
    __slots__ = ("identity", "ips", "labels", "namespace", "pod_count", "pods")

    def __init__(self, namespace: str, identity: int) -> None:
        self.namespace, self.identity = namespace, identity
        self.labels: tuple[str, ...] = ()
        self.pods: set[str] = set()
        self.pod_count = 0
        self.ips: set[str] = set()

    def merge(self, other: _Node) -> None:
        if not self.labels:
            self.labels = other.labels
        for pod in other.pods:
            self.add_pod(pod)
        self.pod_count = max(self.pod_count, len(self.pods))
        if len(self.ips) < _MAX_PODS:
            self.ips |= set(list(other.ips)[: _MAX_PODS - len(self.ips)])

    def add_pod(self, pod: str) -> None:
        if pod not in self.pods:
            if len(self.pods) < _MAX_PODS:
                self.pods.add(pod)
            self.pod_count += 1


class _Edge:
    __slots__ = ("counts", "l7", "last", "ports", "rules")

    def __init__(self) -> None:
        self.counts = [0] * 6
        self.ports: dict[str, list[int]] = {}
        # (protocol, what) -> [6 verdict slots, answers {code: count}]
        self.l7: dict[tuple[str, str], list[Any]] = {}
        self.rules: dict[_RuleTuple, list[Any]] = {}
        self.last: str | None = None

    def merge(self, other: _Edge) -> None:
        _add(self.counts, other.counts)
        for port, counts in other.ports.items():
            _add(self.ports.setdefault(port, [0] * 6), counts)
        for key, entry in other.l7.items():
            into = self.l7.get(key)
            if into is None:
                self.l7[key] = [list(entry[0]), dict(entry[1])]
                continue
            _add(into[0], entry[0])
            for code, n in entry[1].items():
                into[1][code] = into[1].get(code, 0) + n
        for rkey, stats in other.rules.items():
            rinto = self.rules.get(rkey)
            if rinto is None:
                self.rules[rkey] = list(stats)
            else:
                _merge_rule(rinto, stats)
        self.last = _later(self.last, other.last)


def _add(into: list[int], counts: list[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


def _later(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def _earlier(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def _merge_rule(into: list[Any], stats: list[Any]) -> None:
    for i in (_R_ALLOWED, _R_DENIED, _R_AUDITED, _R_DROP, _R_VERDICT):
        into[i] += stats[i]
    into[_R_FIRST] = _earlier(into[_R_FIRST], stats[_R_FIRST])
    into[_R_LAST] = _later(into[_R_LAST], stats[_R_LAST])


def _is_obj(value: Any) -> TypeGuard[Mapping[str, Any]]:
    return type(value) is dict or (value is not None and isinstance(value, Mapping))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def _ns(text: str) -> int | None:
    """Nanoseconds of a time `record_time` gave; None for one that only looks like one."""
    try:
        return parse_time(text)
    except ValueError:
        return None


def record_time(value: Any) -> str | None:
    """A record's `time` as the map keeps it: garrison's fixed-width UTC text as it is (it
    sorts as text), another form normalised to it, None for no time."""
    if type(value) is str and len(value) == 30 and value[29] == "Z" and value[19] == ".":
        return value
    if not isinstance(value, str):
        return None
    try:
        return format_time(parse_time(value))
    except ValueError:
        return None


class ServiceMapBuilder:
    """Add flow dicts with `add()`; `merge()` another builder's counts; `result()`."""

    def __init__(self, syn_retry_window_s: float = DEFAULT_SUMMARY.syn_retry_window_s) -> None:
        self.records = 0
        self.skipped = 0
        self.first: str | None = None
        self.last: str | None = None
        self.saw_drop = False
        self.retried_syns = 0
        self._syns = RetriedSyns(syn_retry_window_s)
        self._nodes: dict[NodeKey, _Node] = {}
        self._edges: dict[tuple[NodeKey, NodeKey], _Edge] = {}
        self._patterns: dict[str, str] = {}
        self._seen: dict[tuple[Any, Any, Any], NodeKey] = {}
        self._l7memo: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        self._seconds: dict[str, int] = {}

    # -- reading ------------------------------------------------------------------------------

    def add(self, flow: Any) -> None:
        """One record (anything but a JSON object is counted as skipped)."""
        if type(flow) is not dict and not isinstance(flow, Mapping):
            self.skipped += 1
            return
        t = flow.get("time")
        if type(t) is not str or len(t) != 30 or t[29] != "Z" or t[19] != ".":
            t = record_time(t)
        self._add(flow, 1, t, t, None)

    def retried_syn(self, flow: Mapping[str, Any]) -> bool:
        """Whether a record is a client's retransmission of a denied SYN (the same addresses,
        ports and event type as one seen at most the window before: `summary.RetriedSyns`),
        which counts as that same attempt. Remembers the SYNs it is asked about: a reader
        that counts with `add_alike` asks for every record, in log order, and passes the
        answer on; `add` asks itself."""
        get = flow.get
        if get("is_reply") is True or get("verdict") != "DROPPED":
            return False
        kind = get("Type")
        if kind is None:
            kind = "L7" if "l7" in flow else "L3_L4"
        event_type = get("event_type")
        event = _int(event_type.get("type")) if _is_obj(event_type) else 0
        if kind != "L3_L4" or event not in (1, 5):
            return False
        t = record_time(get("time"))
        ns = self._ns(t) if t is not None else None
        return ns is not None and self._syns.is_retry(flow, event, ns)

    def add_alike(self, flow: Mapping[str, Any], count: int, first: str | None,
                  last: str | None, retried: bool = False) -> None:
        """`count` records equal to `flow` in every field `add` reads but their `time`, which
        ranges from `first` to `last` (as `record_time` gives them; None: none had one), and
        all retransmitted SYNs or none (`retried`, as `retried_syn` answered for each)."""
        self._add(flow, count, first, last, retried)

    def _add(self, flow: Mapping[str, Any], alike: int, t: str | None,
             t_last: str | None, retried: bool | None) -> None:
        # `t` is the (earliest) time; `t_last` the latest of `alike` records
        self.records += alike
        get = flow.get
        if t is not None and (self.first is None or t < self.first):
            self.first = t
        if t_last is not None and (self.last is None or t_last > self.last):
            self.last = t_last
        reply = get("is_reply") is True
        # endpoints seen before are one dict lookup (the common case: few pods, many records)
        seen = self._seen
        ep: Any = get("source")
        try:
            src = seen[(ep.get("namespace"), ep.get("identity"), ep.get("pod_name"))]
        except (KeyError, TypeError, AttributeError):
            src = self._node(ep)
        ep = get("destination")
        try:
            dst = seen[(ep.get("namespace"), ep.get("identity"), ep.get("pod_name"))]
        except (KeyError, TypeError, AttributeError):
            dst = self._node(ep)
        client, server = (dst, src) if reply else (src, dst)
        edges = self._edges
        kind = get("Type")
        if kind is None:
            kind = "L7" if "l7" in flow else "L3_L4"
        # a record with Hubble's `aggregate` stands for that many identical flows
        n = alike if get("aggregate") is None else alike * aggregated_flows(get("aggregate"))
        verdict = get("verdict")
        slot = _SLOT.get(verdict, _OTHER) if type(verdict) is str else _OTHER
        event = 0
        if kind == "L7":
            l7 = get("l7")
            if type(l7) is not dict and not isinstance(l7, Mapping):
                return
            edge = edges.get((client, server)) or self._edge(client, server)
            for key in self._l7_keys(l7):
                entry = edge.l7.get(key)
                if entry is None:
                    entry = edge.l7[key] = [[0] * 6, {}]
                if reply:
                    code = _answer(key[0], l7)
                    if code is not None:
                        entry[1][code] = entry[1].get(code, 0) + n
                else:
                    entry[0][slot] += n
            if reply:
                return
        elif kind == "L3_L4":
            if reply:
                return
            event_type = get("event_type")
            event = _int(event_type.get("type")) if _is_obj(event_type) else 0
            if event == 1:
                self.saw_drop = True
            elif event == 5:
                if slot == _DROP:
                    slot = _VDENIED
            else:
                return
            if slot in (_DROP, _VDENIED) and t_last is not None:
                if retried is None:  # `add`: ask now (`retried_syn`'s conditions hold here)
                    ns = self._ns(t_last)
                    retried = ns is not None and self._syns.is_retry(flow, event, ns)
                if retried:
                    self.retried_syns += alike  # a retransmitted SYN: the same attempt again
                    return
            edge = edges.get((client, server)) or self._edge(client, server)
            port = _l4_port(flow)
            counts = edge.ports.get(port)
            if counts is None:
                counts = edge.ports[port] = [0] * 6
            counts[slot] += n
        else:
            return
        edge.counts[slot] += n
        if t_last is not None and (edge.last is None or t_last > edge.last):
            edge.last = t_last
        rules = edge.rules
        refs = get("ingress_allowed_by")
        if refs:
            count_rules(rules, refs, _R_ALLOWED, t, n)
            if t_last != t:
                count_rules(rules, refs, _R_ALLOWED, t_last, 0)
        refs = get("egress_allowed_by")
        if refs:
            count_rules(rules, refs, _R_ALLOWED, t, n)
            if t_last != t:
                count_rules(rules, refs, _R_ALLOWED, t_last, 0)
        denied, egress_denied = get("ingress_denied_by"), get("egress_denied_by")
        if denied or egress_denied:
            if slot == _AUDIT:
                what = _R_AUDITED
            elif event == 1:
                what = _R_DROP
            elif event == 5:
                what = _R_VERDICT
            else:
                what = _R_DENIED
            for refs in (denied, egress_denied):
                if refs:
                    count_rules(rules, refs, what, t, n)
                    if t_last != t:
                        count_rules(rules, refs, what, t_last, 0)

    def _ns(self, text: str) -> int | None:
        """Nanoseconds of a time `record_time` gave, each second parsed once."""
        second = self._seconds.get(text[:19])
        if second is None:
            ns = _ns(text)
            if ns is None:
                return None
            if len(self._seconds) >= _MEMO:
                self._seconds.clear()
            self._seconds[text[:19]] = second = ns // 1_000_000_000
        fraction = text[20:29]
        return second * 1_000_000_000 + int(fraction) if fraction.isdigit() else _ns(text)

    def _node(self, value: Any) -> NodeKey:
        ep = value if _is_obj(value) else {}
        get = ep.get
        raw: tuple[Any, Any, Any] | None = (get("namespace"), get("identity"), get("pod_name"))
        try:
            known = self._seen.get(raw)  # type: ignore[arg-type]
        except TypeError:  # a part that is no JSON scalar
            raw, known = None, None
        if known is not None:
            return known
        key = (_text(ep.get("namespace")), _int(ep.get("identity")))
        if raw is not None:
            if len(self._seen) >= _MEMO:
                self._seen.clear()
            if isinstance(raw[2], str) and raw[2]:  # a node known by address learns them
                self._seen[raw] = key
        node = self._nodes.get(key)
        if node is None:
            node = self._nodes[key] = _Node(*key)
            labels = ep.get("labels")
            if isinstance(labels, list):
                node.labels = short_labels(x for x in labels if isinstance(x, str))
        pod = ep.get("pod_name")
        if pod and isinstance(pod, str):
            if pod not in node.pods:
                node.add_pod(pod)
        elif not node.pods and len(node.ips) < _MAX_PODS:
            ip = ep.get("ip")
            if isinstance(ip, str) and ip:
                node.ips.add(ip)
        return key

    def _edge(self, client: NodeKey, server: NodeKey) -> _Edge:
        edge = self._edges.get((client, server))
        if edge is None:
            edge = self._edges[(client, server)] = _Edge()
        return edge

    def _l7_keys(self, l7: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The L7 entries a record counts in, remembered by the values they are made of."""
        grpc, http = l7.get("grpc"), l7.get("http")
        memo: tuple[Any, ...]
        if grpc is not None:
            if type(grpc) is not dict:
                return self._make_l7_keys(l7)
            memo = ("grpc", grpc.get("service"), grpc.get("method"))
        elif type(http) is dict:
            memo = ("http", http.get("method"), http.get("url"))
        else:
            kafka = l7.get("kafka")
            if type(kafka) is not dict:
                return self._make_l7_keys(l7)
            topics = kafka.get("topics")
            memo = ("kafka", kafka.get("api_key"), kafka.get("topic"),
                    tuple(topics) if type(topics) is list else topics)
        try:
            keys = self._l7memo.get(memo)
        except TypeError:  # a part that is no JSON scalar
            return self._make_l7_keys(l7)
        if keys is None:
            if len(self._l7memo) >= _MEMO:
                self._l7memo.clear()
            keys = self._l7memo[memo] = self._make_l7_keys(l7)
        return keys

    def _make_l7_keys(self, l7: Mapping[str, Any]) -> list[tuple[str, str]]:
        grpc = l7.get("grpc")
        if _is_obj(grpc):
            return [("grpc", f"{_text(grpc.get('service'))}/{_text(grpc.get('method'))}")]
        http = l7.get("http")
        if _is_obj(http):
            url = _text(http.get("url"))
            pattern = self._patterns.get(url)
            if pattern is None:
                if len(self._patterns) >= _MEMO:
                    self._patterns.clear()
                pattern = self._patterns[url] = path_pattern(url) if url else ""
            return [("http", f"{_text(http.get('method'))} {pattern}".strip())]
        kafka = l7.get("kafka")
        if kafka is not None and _is_obj(kafka):
            api_key = kafka.get("api_key")
            api = _text(api_key) or (str(api_key) if _int(api_key) else "")
            topics = kafka.get("topics")
            if isinstance(topics, list):
                names = list(dict.fromkeys(t for t in topics if isinstance(t, str) and t))
            else:
                topic = _text(kafka.get("topic"))
                names = [topic] if topic else []
            if not names:
                return [("kafka", api)]
            return [("kafka", f"{api} topic {name}") for name in names]
        return [("l7", "")]

    def merge(self, other: ServiceMapBuilder) -> None:
        """Add another builder's counts (of another part of the log) to this one."""
        self.records += other.records
        self.skipped += other.skipped
        self.first = _earlier(self.first, other.first)
        self.last = _later(self.last, other.last)
        self.saw_drop = self.saw_drop or other.saw_drop
        self.retried_syns += other.retried_syns
        for key, node in other._nodes.items():
            mine = self._nodes.get(key)
            if mine is None:
                self._nodes[key] = node
            else:
                mine.merge(node)
        for ekey, edge in other._edges.items():
            into = self._edges.get(ekey)
            if into is None:
                self._edges[ekey] = edge
            else:
                into.merge(edge)

    def __getstate__(self) -> dict[str, Any]:
        """Plain containers only: builders cross process boundaries."""
        return {
            "counters": (self.records, self.skipped, self.first, self.last, self.saw_drop,
                         self.retried_syns),
            "nodes": [(k, n.labels, sorted(n.pods), n.pod_count, sorted(n.ips))
                      for k, n in self._nodes.items()],
            "edges": [(k, e.counts, e.ports, e.l7, e.rules, e.last)
                      for k, e in self._edges.items()],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        (self.records, self.skipped, self.first, self.last, self.saw_drop,
         self.retried_syns) = state["counters"]
        for key, labels, pods, pod_count, ips in state["nodes"]:
            node = self._nodes[(key[0], key[1])] = _Node(key[0], key[1])
            node.labels, node.pods, node.pod_count, node.ips = (
                tuple(labels), set(pods), pod_count, set(ips))
        for key, counts, ports, l7, rules, last in state["edges"]:
            edge = self._edges[key] = _Edge()
            edge.counts, edge.ports, edge.l7, edge.rules, edge.last = (
                counts, ports, l7, rules, last)

    # -- the result ---------------------------------------------------------------------------

    def result(
        self,
        known_rules: Iterable[RuleKey] | None = None,
        max_nodes: int = DEFAULT_MAX_NODES,
    ) -> dict[str, Any]:
        with_verdict_denials = not self.saw_drop
        nodes, edges = self._nodes, self._edges
        grouped = len(nodes) > max_nodes
        if grouped:
            nodes, edges = _by_namespace(nodes, edges, max_nodes)
        node_ids = {key: _node_id(key) for key in nodes}
        out_nodes = [_node_json(node_ids[key], node) for key, node in nodes.items()]
        out_nodes.sort(key=lambda n: (n["namespace"], n["name"], n["id"]))
        out_edges = []
        totals: dict[RuleKey, list[Any]] = {}
        audited = []
        for (client, server), edge in edges.items():
            rules = _merged_rules(edge.rules)
            for key, stats in rules.items():
                into = totals.get(key)
                if into is None:
                    totals[key] = list(stats)
                else:
                    _merge_rule(into, stats)
            counts = _counts(edge.counts, with_verdict_denials)
            if not sum(counts.values()) and not edge.l7:
                continue  # only traces or replies of nothing: no traffic decided here
            rule_list = [_rule_json(k, s) for k, s in sorted(rules.items(),
                                                             key=lambda kv: kv[0]._sort_key())]
            l7 = []
            for (protocol, what), (slots, answers) in sorted(edge.l7.items()):
                entry = {"protocol": protocol, "what": what,
                         **_counts(slots, with_verdict_denials),
                         "answers": [{"code": code, "text": _answer_text(protocol, code),
                                      "count": n}
                                     for code, n in sorted(answers.items(), key=_code_order)]}
                l7.append(entry)
                audit = slots[_AUDIT]
                if audit:
                    audited.append(_audit_json(node_ids, client, server, protocol, what,
                                               audit, rule_list))
            ports = []
            for port, slots in sorted(edge.ports.items()):
                ports.append({"port": port, **_counts(slots, with_verdict_denials)})
                if slots[_AUDIT]:
                    audited.append(_audit_json(node_ids, client, server, "l4", port,
                                               slots[_AUDIT], rule_list))
            edge_filter = (_group_filter(client, server) if grouped
                           else _edge_filter(client, server))
            out_edges.append({
                "id": f"{node_ids[client]}>{node_ids[server]}",
                "source": node_ids[client],
                "target": node_ids[server],
                "state": _state(counts),
                "counts": counts,
                "last_time": edge.last,
                "ports": ports,
                "l7": l7,
                "rules": rule_list,
                "filter": edge_filter,
            })
        out_edges.sort(key=lambda e: (e["source"], e["target"]))
        never = None
        if known_rules is not None:
            never = [{**k.to_dict(), "text": k.text}
                     for k in sorted(set(known_rules) - set(totals), key=RuleKey._sort_key)]
        audited.sort(key=lambda a: (-a["count"], a["source"], a["target"], a["what"]))
        return {
            "records": self.records,
            "skipped": self.skipped,
            "retried_syns": self.retried_syns,
            "first_time": self.first,
            "last_time": self.last,
            "grouped": grouped,
            "nodes": out_nodes,
            "edges": out_edges,
            "rules": [_rule_json(k, s)
                      for k, s in sorted(totals.items(), key=lambda kv: kv[0]._sort_key())],
            "never_matched": never,
            "audited": audited,
        }


def _merged_rules(rules: Mapping[_RuleTuple, list[Any]]) -> dict[RuleKey, list[Any]]:
    """By `RuleKey`: a missing namespace and an empty one are one rule."""
    merged: dict[RuleKey, list[Any]] = {}
    for raw, stats in rules.items():
        key = RuleKey(*(_text(v) for v in raw))
        into = merged.get(key)
        if into is None:
            merged[key] = list(stats)
        else:
            _merge_rule(into, stats)
    return merged


def _rule_json(key: RuleKey, stats: list[Any]) -> dict[str, Any]:
    return {
        **key.to_dict(),
        "text": key.text,
        "allowed": stats[_R_ALLOWED],
        # an L3/L4 denial is named by its drop and its policy-verdict record: count it once
        "denied": stats[_R_DENIED] + max(stats[_R_DROP], stats[_R_VERDICT]),
        "audited": stats[_R_AUDITED],
        "first_time": stats[_R_FIRST],
        "last_time": stats[_R_LAST],
    }


def _counts(slots: list[int], with_verdict_denials: bool) -> dict[str, int]:
    return {
        "forwarded": slots[_FWD],
        "dropped": slots[_DROP] + (slots[_VDENIED] if with_verdict_denials else 0),
        "audit": slots[_AUDIT],
        "error": slots[_ERROR],
        "other": slots[_OTHER],
    }


def _state(counts: Mapping[str, int]) -> str:
    bad = counts["dropped"] + counts["error"]
    if counts["forwarded"] and bad:
        return "mixed"
    if counts["dropped"]:
        return "dropped"
    if counts["error"]:
        return "error"
    if counts["audit"]:
        return "audit"
    return "forwarded"


def _answer(protocol: str, l7: Mapping[str, Any]) -> str | None:
    if protocol == "grpc":
        grpc = l7.get("grpc")
        status = grpc.get("status") if isinstance(grpc, Mapping) else None
        return None if status is None or isinstance(status, bool) else str(_int(status))
    if protocol == "http":
        http = l7.get("http")
        code = _int(http.get("code")) if isinstance(http, Mapping) else 0
        return str(code) if code else None
    if protocol == "kafka":
        kafka = l7.get("kafka")
        if isinstance(kafka, Mapping) and "error_code" in kafka:
            return str(_int(kafka.get("error_code")))
    return None


def _answer_text(protocol: str, code: str) -> str:
    """`403`, `7 PERMISSION_DENIED`, `error 29`."""
    if protocol == "grpc":
        return f"{code} {GRPC_STATUS_NAMES.get(int(code), 'UNKNOWN_STATUS')}"
    if protocol == "kafka":
        return f"error {code}" if code != "0" else "ok (0)"
    return code


def _code_order(item: tuple[str, int]) -> tuple[int, str]:
    code = item[0]
    return (int(code) if code.isdigit() else 1 << 30, code)


def _l4_port(flow: Mapping[str, Any]) -> str:
    l4 = flow.get("l4")
    if isinstance(l4, Mapping):
        for name in _L4_NAMES:
            inner = l4.get(name)
            if isinstance(inner, Mapping):
                port = _int(inner.get("type" if "type" in inner else "destination_port"))
                return f"{name}/{port}" if port else name
    return "other"


def _node_id(key: NodeKey) -> str:
    namespace, identity = key
    return f"{namespace}/{identity}" if namespace else str(identity)


def _node_json(node_id: str, node: _Node) -> dict[str, Any]:
    pods = sorted(node.pods)
    return {
        "id": node_id,
        "namespace": node.namespace,
        "identity": None if node.identity < 0 else node.identity,
        "name": _display_name(node, pods, _RESERVED_NAMES),
        "labels": list(node.labels),
        "pods": pods,
        "pod_count": node.pod_count,
        "ips": sorted(node.ips)[:10],
    }


_RESERVED_NAMES = {identity.id: name for name, identity in RESERVED.items()}  # 2: "world"


def _display_name(node: _Node, pods: list[str], reserved: Mapping[int, str]) -> str:
    if node.identity < 0:  # a namespace group
        return node.namespace or "(no namespace)"
    if len(pods) == 1:
        return pods[0]
    if pods:
        prefix = os.path.commonprefix(pods).rstrip("-_.0123456789")  # noqa: RUF071 - names
        if len(prefix) >= 2:
            return prefix
        return pods[0]
    if node.identity in reserved:
        return reserved[node.identity]
    if node.labels:
        return ",".join(node.labels)
    if node.ips:
        return sorted(node.ips)[0]
    return f"identity {node.identity}"


def _edge_filter(client: NodeKey, server: NodeKey) -> str:
    """The `observe` filter of this edge's requests and datapath records."""
    parts = []
    for side, (namespace, identity) in (("from", client), ("to", server)):
        if namespace:
            parts.append(f"--{side}-namespace {namespace}")
        parts.append(f"--{side}-identity {identity}")
    return " ".join(parts)


def _audit_json(node_ids: Mapping[NodeKey, str], client: NodeKey, server: NodeKey,
                protocol: str, what: str, count: int,
                rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "source": node_ids[client],
        "target": node_ids[server],
        "protocol": protocol,
        "what": what,
        "count": count,
        "rules": [r["text"] for r in rules if r["audited"]],
    }


OTHER_NAMESPACES = "(other namespaces)"  # no namespace is named with parentheses


def _by_namespace(
    nodes: Mapping[NodeKey, _Node], edges: Mapping[tuple[NodeKey, NodeKey], _Edge],
    max_nodes: int,
) -> tuple[dict[NodeKey, _Node], dict[tuple[NodeKey, NodeKey], _Edge]]:
    """One node per namespace (identity -1), edges merged by namespace pair; past `max_nodes`
    namespaces, the ones with the fewest decisions are one node, OTHER_NAMESPACES."""
    namespaces = {namespace for namespace, _ in nodes}
    keep = namespaces
    if len(namespaces) > max_nodes:
        traffic = dict.fromkeys(namespaces, 0)
        for (client, server), edge in edges.items():
            total = sum(edge.counts)
            traffic[client[0]] += total
            traffic[server[0]] += total
        ranked = sorted(namespaces, key=lambda ns: (-traffic[ns], ns))
        keep = set(ranked[: max(1, max_nodes - 1)])

    def group_of(namespace: str) -> NodeKey:
        return (namespace if namespace in keep else OTHER_NAMESPACES, -1)

    grouped: dict[NodeKey, _Node] = {}
    for (namespace, _), node in nodes.items():
        key = group_of(namespace)
        group = grouped.get(key)
        if group is None:
            group = grouped[key] = _Node(key[0], -1)
        group.pod_count += max(node.pod_count, 1)
    merged: dict[tuple[NodeKey, NodeKey], _Edge] = {}
    for (client, server), edge in edges.items():
        pair = (group_of(client[0]), group_of(server[0]))
        into = merged.get(pair)
        if into is None:
            into = merged[pair] = _Edge()
        into.merge(edge)
    return grouped, merged


def _group_filter(client: NodeKey, server: NodeKey) -> str:
    """The `observe` filter of an edge between two namespace groups ("" when a side has no
    single namespace)."""
    if OTHER_NAMESPACES in (client[0], server[0]) or not client[0] or not server[0]:
        return ""
    return f"--from-namespace {client[0]} --to-namespace {server[0]}"


__all__ = ["DEFAULT_MAX_NODES", "ServiceMapBuilder", "record_time"]
