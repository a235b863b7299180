"""Prometheus metrics of the agent and its datapath, named after Cilium's with `garrison_`.

Served with the proxy's (`garrison.proxy.metrics`) on `garrison agent --metrics HOST:PORT`.

Datapath:

- `garrison_drop_count_total{reason, direction}`, `garrison_drop_bytes_total{...}` counters:
  packets the datapath dropped, from its drop events: `reason` is Hubble's drop reason name
  as the flow records name it (what `observe --drop-reason-desc` takes: POLICY_DENIED,
  POLICY_DENY, PROXY_NOT_LISTENING), else Hubble's (INVALID_PACKET_DROPPED, ...); Cilium's
  label is a sentence, `direction` the policy direction that dropped it
  (INGRESS, EGRESS; UNKNOWN for drops before any policy, e.g. a redirect with no proxy).
- `garrison_policy_verdict_total{direction, match, action}` counter: the datapath's verdicts
  on new connections: direction INGRESS / EGRESS; match as `observe` and Cilium print it
  (L3-L4, L4-Only, L3-Only, L3-Proto, Proto-Only, all, none); action allowed, redirected (allowed,
  to the proxy), denied, audited (denied, let through in audit mode).
- `garrison_forward_count_total{direction}`, `garrison_forward_bytes_total{direction}`: the
  kernel's per-CPU counters (pinned: they count on across agent restarts) of packets let
  through, by the hook that saw them: EGRESS leaving an endpoint, INGRESS entering one.
- `garrison_datapath_events_lost_total{direction}`: events the ring buffer had no room for
  (kernel counter). Drops and verdicts among them are missing from the counters above.
- `garrison_deny_response_total{outcome}`: answers (ICMP unreachable or TCP RST)
  to connections denied at L3/L4 on endpoints with `endpoint config NAME deny-response=...`,
  from the kernel's counters: outcome `sent`, or `limited` (over the datapath's rate limit:
  dropped silently instead).
- `garrison_bpf_map_pressure{map_name}` gauge: entries / max entries of each hash and trie
  map (gar_ipcache, gar_policy, gar_endpoints, gar_ct); at 1.0 new entries fail.

Policy and agent:

- `garrison_policy` gauge: policies loaded; `garrison_policy_max_revision` gauge: the
  policy repository's revision; `garrison_policy_change_total{outcome}` counter: policy
  changes applied (success) and refused (failure: an import or a policy-directory change
  that did not validate; the previous policy stays).
- `garrison_endpoint_count` gauge and `garrison_endpoint_state{endpoint_state}`: ready, or
  waiting-for-identity (no labels yet: the reserved init identity, denied both ways).
- `garrison_identity_count{type}` gauge: reserved, cluster_local (from endpoint labels,
  shared through the kvstore), node_local (CIDR identities). Absent while etcd is away.

Gauges and the kernel counters are read at scrape time; drops, verdicts and policy changes
are counted as they happen (from agent start).
A scrape never takes the datapath down: a part that cannot be read is left out and logged.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from garrison.agent.events import DROP_REASONS
from garrison.bpf.abi import HUBBLE_DROP_NAMES, CounterCode, DropReason, ObservationPoint
from garrison.bpf.abi import EventType as DatapathEventType
from garrison.bpf.maps import DatapathEvent
from garrison.flows.record import MATCH_TYPE_TEXT
from garrison.identity.model import CIDR_ID_FLAG, RESERVED, RESERVED_BY_ID
from garrison.kvstore.base import KVStoreError
from garrison.policies.mapstate import MatchType

if TYPE_CHECKING:
    from garrison.agent.daemon import Agent

log = logging.getLogger("garrison.agent.metrics")

Family = CounterMetricFamily | GaugeMetricFamily

# from_container sees what the endpoint sends, to_container what it receives
DIRECTIONS = {ObservationPoint.FROM_CONTAINER: "EGRESS", ObservationPoint.TO_CONTAINER: "INGRESS"}
INIT_IDENTITY = RESERVED["init"].id
ANSWER_OUTCOMES: dict[int, str] = {CounterCode.DENY_RESPONSE_SENT: "sent",
                                   CounterCode.DENY_RESPONSE_LIMITED: "limited"}


def drop_reason_name(code: int) -> str:
    """The `reason` label of a kernel drop code."""
    try:
        reason = DropReason(code)
    except ValueError:
        return f"UNKNOWN_{code}"
    flow_name = DROP_REASONS.get(reason)  # the flow records' name, where they have one
    return str(flow_name) if flow_name else HUBBLE_DROP_NAMES.get(reason, reason.name)


def identity_type(identity: int) -> str:
    if identity in RESERVED_BY_ID:
        return "reserved"
    if identity & CIDR_ID_FLAG:
        return "node_local"
    return "cluster_local"


class AgentMetrics(Collector):
    """The agent's collector: register it in the registry the metrics server serves, and
    give `event_seen` every datapath event (`Agent.event_listeners`)."""

    def __init__(self, agent: Agent, prefix: str = "garrison") -> None:
        self._agent = agent
        self._p = prefix
        self._lock = threading.Lock()
        self._verdicts: Counter[tuple[str, str, str]] = Counter()
        self._drops: Counter[tuple[str, str]] = Counter()
        self._drop_bytes: Counter[tuple[str, str]] = Counter()

    def event_seen(self, event: DatapathEvent) -> None:
        """Count one datapath event (called on the agent's event thread)."""
        direction = event.direction.name if event.direction is not None else "UNKNOWN"
        if event.type is DatapathEventType.DROP:
            reason = drop_reason_name(event.reason_code)
            with self._lock:
                self._drops[(reason, direction)] += 1
                self._drop_bytes[(reason, direction)] += event.length
            return
        match = event.match_type.model
        if event.allowed:
            if match is MatchType.NONE and not event.audit:
                return  # an unenforced direction: no policy decided anything
            action = "redirected" if event.redirect else "allowed"
        else:
            action = "audited" if event.audit else "denied"
        with self._lock:
            self._verdicts[(direction, MATCH_TYPE_TEXT[match], action)] += 1

    # -- the Collector protocol ----------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # names only: registering must not read the agent (it may not have started yet)
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        self._datapath(families)
        self._agent_state(families)
        with self._lock:
            verdicts = dict(self._verdicts)
            drops, drop_bytes = dict(self._drops), dict(self._drop_bytes)
        for (direction, match, action), n in sorted(verdicts.items()):
            families["verdict"].add_metric([direction, match, action], n)
        for key, n in sorted(drops.items()):
            families["drop"].add_metric(list(key), n)
            families["drop_bytes"].add_metric(list(key), drop_bytes[key])
        return list(families.values())

    # -- parts -----------------------------------------------------------------------------------

    def _families(self) -> dict[str, Family]:
        p = self._p
        return {
            "drop": CounterMetricFamily(f"{p}_drop_count", "Packets dropped by the datapath",
                                        labels=["reason", "direction"]),
            "drop_bytes": CounterMetricFamily(f"{p}_drop_bytes", "Bytes dropped by the datapath",
                                              labels=["reason", "direction"]),
            "forward": CounterMetricFamily(f"{p}_forward_count",
                                           "Packets the datapath let through",
                                           labels=["direction"]),
            "forward_bytes": CounterMetricFamily(f"{p}_forward_bytes",
                                                 "Bytes the datapath let through",
                                                 labels=["direction"]),
            "lost": CounterMetricFamily(f"{p}_datapath_events_lost",
                                        "Datapath events the ring buffer had no room for",
                                        labels=["direction"]),
            "answers": CounterMetricFamily(f"{p}_deny_response",
                                           "Answers to connections denied at L3/L4 "
                                           "(endpoint config deny-response)",
                                           labels=["outcome"]),
            "pressure": GaugeMetricFamily(f"{p}_bpf_map_pressure",
                                          "Fill of a BPF map: entries / max entries",
                                          labels=["map_name"]),
            "verdict": CounterMetricFamily(f"{p}_policy_verdict",
                                           "Datapath policy verdicts on new connections",
                                           labels=["direction", "match", "action"]),
            "policy": GaugeMetricFamily(f"{p}_policy", "Policies loaded"),
            "revision": GaugeMetricFamily(f"{p}_policy_max_revision",
                                          "Revision of the policy repository"),
            "change": CounterMetricFamily(f"{p}_policy_change",
                                          "Policy changes, applied or refused",
                                          labels=["outcome"]),
            "endpoints": GaugeMetricFamily(f"{p}_endpoint_count", "Endpoints of this agent"),
            "endpoint_state": GaugeMetricFamily(f"{p}_endpoint_state", "Endpoints by state",
                                                labels=["endpoint_state"]),
            "identities": GaugeMetricFamily(f"{p}_identity_count", "Identities in use",
                                            labels=["type"]),
        }

    def _datapath(self, families: dict[str, Family]) -> None:
        kernel = self._agent.datapath
        try:
            counters = kernel.counters()
            usage = kernel.map_usage()
        except Exception as exc:  # not loaded yet, or stopping: leave the datapath part out
            log.debug("metrics: datapath not readable: %s", exc)
            return
        # counted by the hook that answered (either side's); users ask how many, not where
        answers = dict.fromkeys(ANSWER_OUTCOMES.values(), 0)
        for (obs, code), value in sorted(counters.items()):
            direction = DIRECTIONS[obs]
            if code == CounterCode.FORWARDED:
                families["forward"].add_metric([direction], value.packets)
                families["forward_bytes"].add_metric([direction], value.bytes)
            elif code == CounterCode.EVENTS_LOST:
                families["lost"].add_metric([direction], value.packets)
            elif code in ANSWER_OUTCOMES:
                answers[ANSWER_OUTCOMES[code]] += value.packets
        for outcome, packets in answers.items():
            families["answers"].add_metric([outcome], packets)
        for name, (entries, size) in sorted(usage.items()):
            families["pressure"].add_metric([name], entries / size if size else 0.0)

    def _agent_state(self, families: dict[str, Family]) -> None:
        agent = self._agent
        with agent.lock:
            revision = agent.repository.revision
            policies = len(agent.repository)
            changes = dict(agent.policy_changes)
            endpoints = [ep.identity for ep in agent.endpoints]
        families["policy"].add_metric([], policies)
        families["revision"].add_metric([], revision)
        for outcome in ("success", "failure"):
            families["change"].add_metric([outcome], changes.get(outcome, 0))
        families["endpoints"].add_metric([], len(endpoints))
        waiting = sum(1 for ident in endpoints if ident in (0, INIT_IDENTITY))
        families["endpoint_state"].add_metric(["ready"], len(endpoints) - waiting)
        families["endpoint_state"].add_metric(["waiting-for-identity"], waiting)
        try:
            identities = agent.allocator.all()
        except KVStoreError:  # etcd away: `garrison status` says so
            return
        types = Counter(identity_type(i) for i in identities)
        for kind in ("reserved", "cluster_local", "node_local"):
            families["identities"].add_metric([kind], types.get(kind, 0))

