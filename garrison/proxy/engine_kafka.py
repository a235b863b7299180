"""Kafka connection engine (sans-io): request and response frames in, commands out.

One engine per proxied connection. Every request frame is decided on its own:

- **allowed**: the frame is forwarded unchanged and its response expected;
- **denied**: the frame is not forwarded; the client gets the answer a broker with ACLs would
  give (`garrison.proxy.deny.kafka_deny_response`: error 29 on every topic, 30/31 where the
  API has none), **in order** with the broker's answers on that connection. Kafka clients
  pipeline requests and match answers by order, so a denied request behind allowed ones still
  in flight is answered only after their responses; a Produce with acks=0 gets no answer;
- **denied and unanswerable** (an API or version kafka-python cannot encode): the connection
  is closed with an ERROR record once the answers before it are delivered (a client must never
  wait for an answer that cannot come); nothing the client sends after it is forwarded;
- **unparseable**: the connection is closed at once with an ERROR record.

Per connection the engine keeps one queue of pending answers, in request order: each slot
waits either for the broker (forwarded) or only for its turn (answered by garrison). A broker
response pops the head slot; local answers that then reach the head are written at once.

Metadata is authorized per topic, as a Kafka broker with ACLs does it:
- a request naming allowed and denied topics is forwarded for the allowed ones only (a
  denied topic never reaches the broker, which could create it) and the answer gets error 29
  entries for the others: kafka-python asks for every topic it knows in one request, and a
  whole-request denial would stop it producing to its allowed topic after one forbidden send;
- an all-topics request allowed only for some topics: the answer is filtered to those
  (`L7Verdict.allowed_topics`); so is an answer listing topics the request did not name
  (tansu answers a request for no topic with every topic).

In standalone mode (`ConnectionContext.advertise` set) every broker address in Metadata,
FindCoordinator, DescribeCluster and KIP-951 Produce/Fetch answers is rewritten to the proxy's
own address, so clients keep talking to the proxy; denied Metadata answers list the proxy as
the broker too. Every other answer is forwarded as the broker sent it.

A denied Metadata answer lists the brokers learnt from an earlier Metadata answer; before there
is one, the request is forwarded for no topic and the broker's answer carries error 29 for
each requested topic (clients retry on an answer without brokers instead of reporting).

Where the rules deny client telemetry (KIP-714, API keys 71 and 72), the broker's ApiVersions
answer is passed on without them, as a broker with no telemetry receiver answers: librdkafka
would otherwise ask on every connection and leave a denial record each time.

Repeats of a denial on one connection (same API key, version, topics) are recorded once with
a count (`_Repeats`, Hubble's `aggregate`); the first one is recorded at once, in full.

Fetch sessions (KIP-227, Fetch v7+): after a full Fetch opens a session, the client's
incremental Fetches list only the partitions that changed, often none, and the broker answers
for every partition of the session. The engine remembers, per connection, the topics of each
session the broker opened on it; an incremental Fetch is authorized for those topics plus the
ones it names (rules reloaded since the session opened apply to all of them). One for a
session not opened on this connection acts on topics garrison cannot know: only a rule
allowing any topic allows it.

Topic ids (Fetch v13+, ...) are resolved through one `TopicIdRegistry` per upstream broker,
kept in `ConnectionContext.shared` and fed by the Metadata answers every connection to that
broker sees. An id the registry has not learnt fails closed: only a rule allowing any topic
allows the request. Audit mode forwards everything (unfiltered) and logs what would have been
denied as AUDIT. Every request gets a request record (FORWARDED, DROPPED or AUDIT) and, when
the client expects an answer, a response record with the answer's error code and latency.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from garrison.flows.build import l7_kafka_request, l7_kafka_response, proxy_error
from garrison.flows.record import Aggregate, DropReasonDesc, FlowRecord, L7FlowType, Verdict
from garrison.flows.record import TrafficDirection as FlowDirection
from garrison.parsers.errors import LocalProtocolError
from garrison.parsers.kafka import (
    KafkaBrokerAddress,
    KafkaCluster,
    KafkaError,
    KafkaRequest,
    KafkaRequestParser,
    KafkaResponse,
    KafkaResponseParser,
    TopicIdRegistry,
    decode_response_body,
    parse_request_frame,
)
from garrison.parsers.kafka_apis import (
    API_VERSIONS,
    FETCH,
    GET_TELEMETRY_SUBSCRIPTIONS,
    METADATA,
    PRODUCE,
    PUSH_TELEMETRY,
    kafka_api,
)
from garrison.parsers.kafka_rewrite import (
    carries_broker_addresses,
    encode_response,
    rewrite_broker_addresses,
    rewrite_metadata_response,
)
from garrison.policies.l7rules import L7Protocol, L7RuleSet
from garrison.policies.match_kafka import KafkaMatcher, describe_api
from garrison.policies.refs import RuleRef
from garrison.proxy.commands import (
    Close,
    Command,
    ConnectionContext,
    Forward,
    Inject,
    Log,
    Side,
    client_endpoint,
    flow_endpoint,
)
from garrison.proxy.config import ProxyConfig
from garrison.proxy.deny import (
    CLUSTER_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED,
    KafkaDenyUnencodableError,
    kafka_deny_encodable,
    kafka_deny_response,
)

# Key of the broker's topic-id registry in `ConnectionContext.shared`.
TOPIC_IDS_KEY = "kafka.topic_ids"

_NS = 1_000_000_000


def shared_topic_ids(shared: dict[str, object]) -> TopicIdRegistry:
    """The topic-id registry of one upstream broker, created on first use."""
    registry = shared.get(TOPIC_IDS_KEY)
    if not isinstance(registry, TopicIdRegistry):
        registry = TopicIdRegistry()
        shared[TOPIC_IDS_KEY] = registry
    return registry


@dataclass(slots=True)
class _Slot:
    """One answer the client waits for, in request order.

    `local`: denied; garrison answers when every slot before it is answered. Otherwise the
    request was forwarded and the slot waits for the broker. `unanswerable`: denied and no
    answer exists; the connection closes when this slot reaches the head.
    """

    request: KafkaRequest
    verdict: Verdict
    refs: tuple[RuleRef, ...]
    started: float
    topics: tuple[str, ...]
    local: bool = False
    allowed_topics: frozenset[str] | None = None  # the topics a Metadata answer may list
    unanswerable: str = ""
    # Metadata naming allowed and denied topics: the denied ones, and their entries (error
    # 29, from the deny encoder) to add to the broker's answer for the allowed ones.
    denied_topics: tuple[str, ...] = ()
    denied_entries: tuple[Any, ...] = ()
    # all-topics Metadata under topic-bound L7 deny rules: topics its answer must not list
    hidden_topics: frozenset[str] = frozenset()
    # the L7 deny rules that denied `denied_topics` (garrison extension)
    denied_by: tuple[RuleRef, ...] = ()

    def __init__(
        self,
        request: KafkaRequest,
        verdict: Verdict,
        refs: tuple[RuleRef, ...],
        started: float,
        topics: tuple[str, ...],
        local: bool = False,
        allowed_topics: frozenset[str] | None = None,
        unanswerable: str = "",
        denied_topics: tuple[str, ...] = (),
        denied_entries: tuple[Any, ...] = (),
        hidden_topics: frozenset[str] = frozenset(),
        denied_by: tuple[RuleRef, ...] = (),
    ) -> None:
        # Written out, not generated: see "Initialisers" in garrison/native.py.
        self.request = request
        self.verdict = verdict
        self.refs = refs
        self.started = started
        self.topics = topics
        self.local = local
        self.allowed_topics = allowed_topics
        self.unanswerable = unanswerable
        self.denied_topics = denied_topics
        self.denied_entries = denied_entries
        self.hidden_topics = hidden_topics
        self.denied_by = denied_by


@dataclass(slots=True)
class _FetchSession:
    """The topics of one fetch session the broker opened on this connection; `unknown`: a
    topic of it was named by an id the registry had not learnt."""

    topics: dict[str, None]
    unknown: bool


# Fetch sessions remembered per connection (a client keeps one per broker connection).
_MAX_FETCH_SESSIONS = 16
# Fetch v7+ carries a session id and epoch; epoch 0 opens a session, -1 fetches without one,
# above 0 is an incremental fetch of an open session.
_FETCH_SESSIONS_FROM = 7


@dataclass(slots=True)
class _Group:
    """Repeats of one denial: the first repeat's record (built when flushed) and how many."""

    first: float
    count: int
    build: Callable[..., FlowRecord]
    args: tuple[Any, ...]


class _Repeats:
    """Identical denials on one connection, recorded once with a count (Hubble's aggregate).

    The first denial of a kind is recorded in full, at once. Its repeats (same API key,
    version, topics; only the correlation id and time differ) are counted; the group is
    recorded as the first repeat's record with `aggregate` = how many it stands for, when
    `window` seconds have passed since that repeat (checked on every event of the
    connection) and when the connection ends. A client that re-sends a denied Metadata
    without backoff (aiokafka with an assigned, denied topic: ~900 per second) then costs
    two records per window instead of two per request, and none is lost.
    """

    _MAX_KINDS = 256  # kinds of denial remembered per connection; beyond: record each one

    __slots__ = ("_direction", "_groups", "_seen", "_window")

    def __init__(self, window: float, direction: FlowDirection) -> None:
        self._window = window
        self._direction = direction
        self._seen: set[Hashable] = set()
        self._groups: dict[Hashable, _Group] = {}

    def log(
        self, out: _Out, key: Hashable, now: float, build: Callable[..., FlowRecord], *args: Any
    ) -> None:
        if self._window <= 0 or (key not in self._seen and len(self._seen) >= self._MAX_KINDS):
            out.log_later(build, *args)
            return
        if key not in self._seen:
            self._seen.add(key)
            out.log_later(build, *args)
            return
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = _Group(now, 1, build, args)
        else:
            group.count += 1

    def flush_due(self, out: _Out, now: float) -> None:
        if self._groups:
            for key, group in list(self._groups.items()):
                # `now` is the wall clock (the records' time): stepped back, a window would
                # wait for the clock to catch up, so the group is recorded at once instead.
                if now - group.first >= self._window or now < group.first:
                    del self._groups[key]
                    self._emit(out, group)

    def flush(self, out: _Out) -> None:
        for group in self._groups.values():
            self._emit(out, group)
        self._groups.clear()

    def _emit(self, out: _Out, group: _Group) -> None:
        out.log_later(
            _aggregated, group.build, group.args, Aggregate.of(self._direction, group.count)
        )


def _aggregated(
    build: Callable[..., FlowRecord], args: tuple[Any, ...], aggregate: Aggregate
) -> FlowRecord:
    return dataclasses.replace(build(*args), aggregate=aggregate)


class _Out:
    """Commands of one call. Consecutive bytes for the same side become one write, and the
    records come after the writes: the server executes commands in order, and the bytes
    should reach the peers before the records are counted and stored."""

    __slots__ = ("_close", "_commands", "_data", "_kind", "_logs", "_side")

    def __init__(self) -> None:
        self._commands: list[Command] = []
        self._logs: list[Command] = []
        self._close: Close | None = None
        self._data: list[bytes] = []
        self._kind: type[Forward] | type[Inject] | None = None
        self._side = Side.CLIENT

    def write(self, kind: type[Forward] | type[Inject], side: Side, data: bytes) -> None:
        if self._data and (kind is not self._kind or side is not self._side):
            self._flush()
        self._kind, self._side = kind, side
        self._data.append(data)

    def log(self, record: FlowRecord) -> None:
        self._logs.append(Log(record))

    def log_later(self, build: Callable[..., FlowRecord], *args: Any) -> None:
        """A record built after the bytes are written (`Log.later`): `args` must not change."""
        self._logs.append(Log.later(build, *args))

    def close(self, reason: str, error: bool) -> None:
        self._close = Close(Side.BOTH, reason, error)  # the last command: nothing follows

    def _flush(self) -> None:
        if self._data and self._kind is not None:
            data = self._data[0] if len(self._data) == 1 else b"".join(self._data)
            self._commands.append(self._kind(self._side, data))
        self._data = []

    def commands(self) -> list[Command]:
        self._flush()
        commands = self._commands
        if self._logs:
            commands += self._logs
        if self._close is not None:
            commands.append(self._close)
        return commands


class KafkaEngine:
    """One proxied Kafka connection (see the module docstring)."""

    def __init__(self, context: ConnectionContext, config: ProxyConfig) -> None:
        self._context = context
        self._limits = config.kafka
        self._audit = context.audit
        self._advertise = advertise = context.advertise
        # Standalone mode: every broker address in an answer becomes the proxy's own.
        self._address_for: Callable[[int, str, int], tuple[str, int]] | None = (
            None if advertise is None else (lambda _n, _h, _p: advertise)
        )
        # The records' own enum: builders take it as it is (a string would be parsed each time).
        self._direction = FlowDirection(context.direction.value)
        self._node = context.node_name or config.node_name
        self._client = client_endpoint(context)
        self._server = flow_endpoint(context.destination)
        self._matcher = KafkaMatcher(context.ruleset)
        self._topic_ids = shared_topic_ids(context.shared)
        self._requests = KafkaRequestParser(self._limits, self._topic_ids)
        # Every answer is decoded: the response record carries its error code, the registry
        # learns topic ids from Metadata, and standalone mode rewrites broker addresses.
        self._responses = KafkaResponseParser(self._limits, self._topic_ids)
        self._pending: deque[_Slot] = deque()
        self._closed = False
        self._stop_reading = False  # an unanswerable deny is queued: forward nothing more
        self._client_eof = False
        self._deny_cluster: tuple[KafkaCluster | None, KafkaCluster | None] = (None, None)
        self._repeats = _Repeats(self._limits.repeat_window, self._direction)
        self._fetch_sessions: dict[int, _FetchSession] = {}

    # ---- what the server asks ----------------------------------------------------------------

    @property
    def waiting(self) -> str:
        """For the server's timers: "upstream" while the broker owes an answer, "head" while
        a request frame is incomplete, else "idle"."""
        if self._pending:  # garrison's own answers never wait at the head of the queue
            return "upstream"
        if self._requests.buffered:
            return "head"
        return "idle"

    def update_ruleset(self, ruleset: L7RuleSet) -> None:
        """Policy reload: requests from now on are matched against `ruleset`."""
        self._matcher = KafkaMatcher(ruleset)

    # `EngineCore`: the broker connection is this client's own, opened at once.
    pooled_upstream = False
    upstream_protocol = "kafka"
    upstream_reusable = False
    pipeline_full = False

    def compact(self) -> None:
        pass

    def upstream_unavailable(self, reason: str, now: float) -> list[Command]:
        return self.abort(f"upstream unavailable: {reason}", now)

    def timeout(self, waiting: str, now: float) -> list[Command]:
        return self.abort(f"timeout ({waiting})", now)

    def stop(self, reason: str, now: float) -> list[Command]:
        """The connection ends without a FIN, or the proxy stops: the aggregated denials
        still counting are recorded now (nothing else is owed; nothing can be written)."""
        if self._closed:
            return []
        self._closed = True
        self._pending.clear()
        out = _Out()
        self._repeats.flush(out)
        return out.commands()

    # ---- the ConnectionEngine interface ------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> list[Command]:
        if self._closed or self._stop_reading or not data:
            return []
        out = _Out()
        self._repeats.flush_due(out, now)
        self._requests.receive_data(data)
        while not self._closed and not self._stop_reading:
            try:
                request = self._requests.next_event()
            except KafkaError as exc:
                self._fail(out, now, f"client sent a bad Kafka frame: {exc}")
                break
            if request is None:
                break
            self._on_request(request, now, out)
        return out.commands()

    def upstream_data(self, data: bytes, now: float) -> list[Command]:
        if self._closed or not data:
            return []
        out = _Out()
        self._repeats.flush_due(out, now)
        self._responses.receive_data(data)
        self._read_responses(out, now)
        return out.commands()

    def client_eof(self, now: float) -> list[Command]:
        if self._closed:
            return []
        out = _Out()
        self._client_eof = True
        if not self._stop_reading:
            self._requests.receive_data(b"")
            try:
                self._requests.next_event()
            except KafkaError as exc:
                self._fail(out, now, f"client closed inside a frame: {exc}")
                return out.commands()
        if not self._pending:
            self._finish(out, "client closed the connection")
        return out.commands()

    def upstream_eof(self, now: float) -> list[Command]:
        if self._closed:
            return []
        out = _Out()
        self._responses.receive_data(b"")
        self._read_responses(out, now)
        if self._closed:
            return out.commands()
        if self._pending:
            waiting = sum(1 for slot in self._pending if not slot.local)
            self._fail(
                out,
                now,
                f"broker closed the connection with {waiting} request(s) unanswered",
                DropReasonDesc.UPSTREAM_ERROR,
            )
        else:
            self._finish(out, "broker closed the connection")
        return out.commands()

    def abort(self, reason: str, now: float) -> list[Command]:
        if self._closed:
            return []
        out = _Out()
        self._fail(out, now, reason, DropReasonDesc.PROXY_ERROR)
        return out.commands()

    # ---- requests ----------------------------------------------------------------------------

    def _on_request(self, request: KafkaRequest, now: float, out: _Out) -> None:
        topics = named = request.topics
        if request.unresolved_topic_ids:
            topics += tuple(str(topic_id) for topic_id in request.unresolved_topic_ids)
        unknown = not request.topics_complete
        session = self._incremental_fetch_session(request) if request.api_key == FETCH else None
        if session is not None:  # the session's topics are fetched too
            extra = tuple(t for t in session.topics if t not in named)
            named += extra
            topics += extra
            unknown = unknown or session.unknown
        verdict = self._matcher.match(
            request.api_key,
            request.api_version,
            request.client_id,
            named,
            request.all_topics,
            unknown_topics=unknown,
        )
        refs = (verdict.rule,) if verdict.rule is not None else ()
        if verdict.denied_by is not None:  # an L7 deny rule (garrison extension)
            refs = (verdict.denied_by,)
        if session is not None and (verdict.allowed or verdict.audited or self._audit):
            # forwarded: the topics it names join the session
            session.topics.update(dict.fromkeys(request.topics))
            session.unknown = session.unknown or not request.topics_complete
        if verdict.audited:  # allowed, but an audited policy would deny it: recorded AUDIT
            self._forward(request, False, verdict.audit_denied_by, verdict.allowed_topics,
                          topics, now, out)
        elif verdict.allowed or self._audit:
            self._forward(request, verdict.allowed, refs, verdict.allowed_topics, topics, now, out,
                          verdict.hidden_topics)
        elif request.api_key == METADATA and (split := self._split_metadata(request)):
            self._forward_allowed_part(request, *split, now, out)
        else:
            self._deny(request, topics, now, out, refs)

    def _incremental_fetch_session(self, request: KafkaRequest) -> _FetchSession | None:
        """The fetch session an incremental Fetch reads (None for a full Fetch). A session
        not opened on this connection (or forgotten) has unknown topics."""
        decoded = request.decoded
        if (
            decoded is None
            or request.api_version < _FETCH_SESSIONS_FROM
            or decoded.session_epoch <= 0
        ):
            return None
        session = self._fetch_sessions.get(decoded.session_id)
        return session if session is not None else _FetchSession({}, True)

    def _learn_fetch_session(self, request: KafkaRequest, response: KafkaResponse) -> None:
        """A full Fetch closes the session it names and may open one (its answer's session
        id): remember that session's topics. An incremental one answered with an error has
        ended its session."""
        decoded, answer = request.decoded, response.decoded
        if decoded is None or answer is None or request.api_version < _FETCH_SESSIONS_FROM:
            return
        sessions = self._fetch_sessions
        if decoded.session_epoch > 0:
            if answer.error_code:
                sessions.pop(decoded.session_id, None)
            return
        if decoded.session_id:
            sessions.pop(decoded.session_id, None)
        if decoded.session_epoch == 0 and answer.session_id and not answer.error_code:
            if len(sessions) >= _MAX_FETCH_SESSIONS:
                del sessions[next(iter(sessions))]  # forgotten: its fetches count as unknown
            sessions[answer.session_id] = _FetchSession(
                dict.fromkeys(request.topics), not request.topics_complete
            )

    def _forward(
        self,
        request: KafkaRequest,
        allowed: bool,
        refs: tuple[RuleRef, ...],
        allowed_topics: frozenset[str] | None,
        topics: tuple[str, ...],
        now: float,
        out: _Out,
        hidden_topics: frozenset[str] = frozenset(),
    ) -> None:
        try:
            self._responses.expect(request)
        except KafkaError as exc:
            self._fail(out, now, f"client pipelines without reading: {exc}")
            return
        flow = Verdict.FORWARDED if allowed else Verdict.AUDIT
        out.log_later(self._request_record, request, flow, refs, topics, now)
        out.write(Forward, Side.UPSTREAM, request.raw)
        if request.expects_response:
            self._pending.append(
                _Slot(
                    request,
                    flow,
                    refs,
                    now,
                    topics,
                    allowed_topics=self._answer_topics(request, allowed, allowed_topics),
                    hidden_topics=hidden_topics if allowed and not self._audit else frozenset(),
                )
            )

    def _answer_topics(
        self, request: KafkaRequest, allowed: bool, allowed_topics: frozenset[str] | None
    ) -> frozenset[str] | None:
        """The topics a Metadata answer may list; None = leave the answer as it is.

        All-topics requests: the topics the rules allow (None when they allow any). Requests
        naming topics: those topics, as Kafka answers them; some brokers (tansu) list every
        topic in the answer to a request for none, which would show the client topics its
        rules do not name. Audit mode hides nothing.
        """
        if request.api_key != METADATA or not allowed or self._audit:
            return None
        if request.all_topics:
            return allowed_topics
        if not request.topics_complete:
            return None  # topic ids not learnt yet: allowed only by a rule allowing any topic
        every = self._matcher.match(
            METADATA, request.api_version, request.client_id, (), all_topics=True
        )
        if every.allowed and every.allowed_topics is None and not every.hidden_topics:
            return None  # the rules allow any topic: nothing to hide
        return frozenset(request.topics)

    def _split_metadata(
        self, request: KafkaRequest
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[RuleRef, ...], tuple[RuleRef, ...]] | None:
        """(allowed topics, denied topics, refs, the L7 deny rules that denied topics) of a
        denied Metadata request naming some topics the rules allow; None when it names none
        (or names topics by id only).

        A Kafka broker with ACLs authorizes Metadata per topic: the allowed topics are
        described, the others carry error 29. Clients rely on it: kafka-python asks for every
        topic it knows in one request, and if that answer failed every topic because of one it
        may not use, a single send to a forbidden topic would stop it sending to its own.
        """
        decoded = request.decoded
        if request.all_topics or not request.topics_complete or decoded is None:
            return None
        if not all(entry.name for entry in decoded.topics or ()):
            return None
        allowed: list[str] = []
        denied: list[str] = []
        refs: tuple[RuleRef, ...] = ()
        denied_by: dict[RuleRef, None] = {}
        for topic in request.topics:
            verdict = self._matcher.match(
                METADATA, request.api_version, request.client_id, (topic,)
            )
            if verdict.allowed:
                allowed.append(topic)
                if not refs and verdict.rule is not None:
                    refs = (verdict.rule,)
            else:
                denied.append(topic)
                if verdict.denied_by is not None:  # an L7 deny rule (garrison extension)
                    denied_by[verdict.denied_by] = None
        if not denied:
            return None
        if not allowed:
            # Every topic denied. Answered here, with the brokers learnt from an earlier
            # Metadata answer; before there is one, the request is forwarded for no topic
            # (where the rules allow that) and the answer keeps its brokers, controller and
            # cluster id: a Metadata answer without brokers makes clients retry, not report.
            if self._topic_ids.cluster is not None:
                return None
            bare = self._matcher.match(METADATA, request.api_version, request.client_id, ())
            if not bare.allowed:
                return None
            refs = (bare.rule,) if bare.rule is not None else ()
        return tuple(allowed), tuple(denied), refs, tuple(denied_by)

    def _forward_allowed_part(
        self,
        request: KafkaRequest,
        allowed: tuple[str, ...],
        denied: tuple[str, ...],
        refs: tuple[RuleRef, ...],
        denied_by: tuple[RuleRef, ...],
        now: float,
        out: _Out,
    ) -> None:
        """Forward the Metadata request for its allowed topics only (a denied topic must not
        reach the broker: it could create it) and remember the error entries of the others."""
        narrowed = self._narrowed(request, allowed)
        refused = self._narrowed(request, denied)
        answer = kafka_deny_response(refused)
        entries = decode_response_body(refused, answer).topics if answer is not None else []
        try:
            self._responses.expect(narrowed)
        except KafkaError as exc:
            self._fail(out, now, f"client pipelines without reading: {exc}")
            return
        if allowed:
            out.log_later(self._request_record, request, Verdict.FORWARDED, refs, allowed, now)
        key = (L7FlowType.REQUEST, METADATA, request.api_version, denied)
        self._repeats.log(
            out, key, now, self._request_record, request, Verdict.DROPPED, denied_by, denied, now
        )
        out.write(Forward, Side.UPSTREAM, narrowed.raw)
        self._pending.append(
            _Slot(
                narrowed,
                Verdict.FORWARDED,
                refs,
                now,
                allowed,
                allowed_topics=frozenset(allowed),
                denied_topics=denied,
                denied_entries=tuple(entries),
                denied_by=denied_by,
            )
        )

    def _narrowed(self, request: KafkaRequest, topics: tuple[str, ...]) -> KafkaRequest:
        """The same Metadata request (version, correlation id, client id) for `topics` only,
        encoded by kafka-python and read back by the parser."""
        keep = frozenset(topics)
        message = copy.copy(request.decoded)
        message.topics = [entry for entry in request.decoded.topics if entry.name in keep]
        message.with_header(correlation_id=request.correlation_id, client_id=request.client_id)
        frame = bytes(message.encode(header=True, framed=True))
        return parse_request_frame(frame, self._topic_ids)

    def _deny(
        self,
        request: KafkaRequest,
        topics: tuple[str, ...],
        now: float,
        out: _Out,
        refs: tuple[RuleRef, ...] = (),
    ) -> None:
        """`refs`: the L7 deny rule that denied it, if one did (named in `*_denied_by`)."""
        key = (L7FlowType.REQUEST, request.api_key, request.api_version, topics)
        self._repeats.log(
            out, key, now, self._request_record, request, Verdict.DROPPED, refs, topics, now
        )
        if not request.expects_response:
            return  # Produce with acks=0: the client expects nothing
        slot = _Slot(request, Verdict.DROPPED, refs, now, topics, local=True)
        if not kafka_deny_encodable(request):
            slot.unanswerable = (
                f"denied {describe_api(request.api_key)} v{request.api_version} has no "
                "possible answer: closing the connection"
            )
            self._stop_reading = True
        if len(self._pending) >= self._limits.max_in_flight:
            self._fail(out, now, f"more than {self._limits.max_in_flight} answers pending")
            return
        self._pending.append(slot)
        self._release(out, now)

    def _cluster_for_denials(self) -> KafkaCluster | None:
        """The brokers a denied Metadata answer lists: the proxy itself in standalone mode."""
        cluster = self._topic_ids.cluster
        if cluster is None or self._advertise is None:
            return cluster
        learnt, moved = self._deny_cluster
        if learnt is not cluster:
            host, port = self._advertise
            moved = KafkaCluster(
                tuple(KafkaBrokerAddress(b.node_id, host, port, b.rack) for b in cluster.brokers),
                cluster.cluster_id,
                cluster.controller_id,
            )
            self._deny_cluster = (cluster, moved)
        return moved

    # ---- responses ---------------------------------------------------------------------------

    def _read_responses(self, out: _Out, now: float) -> None:
        while not self._closed:
            try:
                response = self._responses.next_event()
            except KafkaError as exc:
                self._fail(out, now, f"broker sent a bad Kafka frame: {exc}")
                return
            if response is None:
                break
            if response.unsolicited:
                continue  # tansu answers acks=0 Produce requests; the client expects nothing
            if not self._pending or self._pending[0].request is not response.request:
                self._fail(
                    out,
                    now,
                    f"response {response.correlation_id} does not answer the head request",
                    DropReasonDesc.PROXY_ERROR,
                )
                return
            slot = self._pending.popleft()
            if slot.request.api_key == FETCH:
                self._learn_fetch_session(slot.request, response)
            try:
                raw = self._rewritten(response, slot)
            except (LocalProtocolError, ValueError, TypeError, AttributeError) as unwritable:
                # Never forward what should have been filtered: close instead.
                self._fail(
                    out,
                    now,
                    f"cannot rewrite the broker's answer: {unwritable}",
                    DropReasonDesc.PROXY_ERROR,
                )
                return
            out.write(Forward, Side.CLIENT, raw)
            if slot.topics or not slot.denied_topics:
                out.log_later(self._forwarded_response_record, slot, response, now)
            if slot.denied_topics:
                topics = slot.denied_topics
                denied = _Slot(slot.request, Verdict.DROPPED, slot.denied_by, slot.started, topics)
                key = (L7FlowType.RESPONSE, METADATA, slot.request.api_version, topics)
                self._repeats.log(
                    out, key, now, self._response_record, denied, TOPIC_AUTHORIZATION_FAILED, now
                )
            self._release(out, now)
        if self._client_eof and not self._pending and not self._closed:
            self._finish(out, "client closed the connection")

    def _rewritten(self, response: KafkaResponse, slot: _Slot) -> bytes:
        api_key = response.request.api_key
        address_for = self._address_for
        if api_key != METADATA:  # Produce and Fetch answers, most of the traffic
            if api_key == API_VERSIONS:
                return self._api_versions_answer(response)
            if address_for is not None and carries_broker_addresses(response):
                return rewrite_broker_addresses(response, address_for)
            return response.raw
        keep = slot.allowed_topics
        if slot.hidden_topics:
            # what topic-bound L7 deny rules hide from an all-topics answer
            listed = response.decoded.topics if response.decoded is not None else None
            names = {t.name for t in listed or () if t.name}
            keep = frozenset((keep if keep is not None else names) - slot.hidden_topics)
        if keep is not None:
            decoded = response.decoded
            if decoded is None:
                raise LocalProtocolError("a Metadata answer to filter was not decoded")
            if slot.denied_entries:
                merged = copy.copy(decoded)
                merged.topics = [t for t in decoded.topics or () if t.name in keep]
                merged.topics += slot.denied_entries
                whole = KafkaResponse(response.request, response.correlation_id, b"", merged)
                return rewrite_metadata_response(whole, address_for=address_for)
            if any(topic.name not in keep for topic in decoded.topics or ()):
                return rewrite_metadata_response(
                    response, allowed_topics=keep, address_for=address_for
                )
        if address_for is not None and carries_broker_addresses(response):
            return rewrite_broker_addresses(response, address_for)
        return response.raw

    def _api_versions_answer(self, response: KafkaResponse) -> bytes:
        """The broker's ApiVersions answer, with the versions garrison can read, and without
        the client telemetry APIs (KIP-714) when the rules deny them to this client.

        A client uses the newest version both it and the broker support. A version of a known
        API newer than kafka-python can decode is a parse error (the connection closes), so
        the answer advertises at most what garrison reads: the client then uses that one,
        as with an older broker. An API whose oldest version is already too new is left out.

        librdkafka asks for telemetry subscriptions on every connection to a broker that
        advertises them; denied, each would be a DROPPED record an operator has to read past.
        A Kafka broker with no telemetry receiver configured does not advertise them, and
        clients then send none: garrison answers as such a broker would. Audit mode, and rules
        that allow the APIs, leave them in the answer.
        """
        decoded, request = response.decoded, response.request
        if decoded is None or decoded.error_code != 0:
            return response.raw
        hidden: set[int] = set()
        if not self._audit:
            hidden = {
                key
                for key in (GET_TELEMETRY_SUBSCRIPTIONS, PUSH_TELEMETRY)
                if not self._matcher.match(key, 0, request.client_id, ()).allowed
            }
        entries = decoded.api_keys or ()
        too_new = [entry for entry in entries if entry.max_version > _readable(entry.api_key)]
        if not too_new and not any(entry.api_key in hidden for entry in entries):
            return response.raw
        message = copy.copy(decoded)
        message.api_keys = []
        for entry in entries:
            readable = _readable(entry.api_key)
            if entry.api_key in hidden or entry.min_version > readable:
                continue
            if entry.max_version > readable:
                entry = copy.copy(entry)
                entry.max_version = readable
            message.api_keys.append(entry)
        return encode_response(API_VERSIONS, decoded.API_VERSION, response.correlation_id, message)

    def _release(self, out: _Out, now: float) -> None:
        """Write garrison's own answers that have reached the head of the queue.

        Answers are built here, not when the request arrived: a denied Metadata answer lists
        the brokers, which a Metadata answer still in flight may be the first to tell."""
        pending = self._pending
        while pending and pending[0].local:
            slot = pending[0]
            if slot.unanswerable:
                self._fail(out, now, slot.unanswerable, DropReasonDesc.POLICY_DENIED)
                return
            try:
                answer = kafka_deny_response(slot.request, self._cluster_for_denials())
            except KafkaDenyUnencodableError as exc:  # kafka_deny_encodable said otherwise
                self._fail(out, now, f"cannot answer a denied request: {exc}")
                return
            pending.popleft()
            if answer is None:
                continue
            out.write(Inject, Side.CLIENT, answer)
            request = slot.request
            key = (L7FlowType.RESPONSE, request.api_key, request.api_version, slot.topics)
            self._repeats.log(out, key, now, self._answer_record, slot, answer, now)

    # ---- endings -----------------------------------------------------------------------------

    def _finish(self, out: _Out, reason: str) -> None:
        self._closed = True
        self._pending.clear()
        self._repeats.flush(out)
        out.close(reason, error=False)

    def _fail(
        self,
        out: _Out,
        now: float,
        error: str,
        reason: DropReasonDesc = DropReasonDesc.PARSE_ERROR,
    ) -> None:
        self._closed = True
        self._pending.clear()
        self._repeats.flush(out)
        out.log(
            proxy_error(
                time_ns=int(now * _NS),
                direction=self._direction,
                client=self._client,
                server=self._server,
                protocol=L7Protocol.KAFKA,
                error=error,
                reason=reason,
                node_name=self._node,
            )
        )
        out.close(error, error=True)

    # ---- records -----------------------------------------------------------------------------

    def _request_record(
        self,
        request: KafkaRequest,
        verdict: Verdict,
        refs: tuple[RuleRef, ...],
        topics: tuple[str, ...],
        now: float,
    ) -> FlowRecord:
        return l7_kafka_request(
            time_ns=int(now * _NS),
            verdict=verdict,
            direction=self._direction,
            client=self._client,
            server=self._server,
            api_key=request.api_key,
            api_version=request.api_version,
            correlation_id=request.correlation_id,
            topics=topics,
            allowed_by=refs if verdict is Verdict.FORWARDED else (),
            denied_by=refs if verdict is not Verdict.FORWARDED else (),
            drop_reason=DropReasonDesc.POLICY_DENIED if verdict is not Verdict.FORWARDED else None,
            node_name=self._node,
        )

    def _forwarded_response_record(
        self, slot: _Slot, response: KafkaResponse, now: float
    ) -> FlowRecord:
        return self._response_record(slot, _error_code(response), now)

    def _answer_record(self, slot: _Slot, answer: bytes, now: float) -> FlowRecord:
        """The record of garrison's own answer, with the error code it carries."""
        return self._response_record(slot, _answer_error_code(slot.request, answer), now)

    def _response_record(self, slot: _Slot, error_code: int, now: float) -> FlowRecord:
        request = slot.request
        verdict = slot.verdict
        time_ns = int(now * _NS)
        return l7_kafka_response(
            time_ns=time_ns,
            verdict=verdict,
            direction=self._direction,
            client=self._client,
            server=self._server,
            api_key=request.api_key,
            api_version=request.api_version,
            correlation_id=request.correlation_id,
            error_code=error_code,
            latency_ns=max(0, time_ns - int(slot.started * _NS)),
            topics=slot.topics,
            allowed_by=slot.refs if verdict is Verdict.FORWARDED else (),
            denied_by=slot.refs if verdict is not Verdict.FORWARDED else (),
            drop_reason=DropReasonDesc.POLICY_DENIED if verdict is not Verdict.FORWARDED else None,
            node_name=self._node,
        )


def _readable(api_key: int) -> int:
    """The newest version of an API garrison decodes; an API kafka-python has no class for is
    decided on its header whatever its version (any version is readable)."""
    api = kafka_api(api_key)
    return api.max_version if api is not None else _ANY_VERSION


_ANY_VERSION = 32767


def _error_code(response: KafkaResponse) -> int:
    """The answer's error code for its record: the top-level one, else the first non-zero
    one of its partitions. Produce and Fetch answers, most of the traffic, are read directly
    (the generic walk visits every field of the schema, present in this version or not)."""
    decoded = response.decoded
    if decoded is None:
        return 0
    api_key = response.request.api_key
    if api_key == PRODUCE:
        for topic in decoded.responses:
            for partition in topic.partition_responses:
                if partition.error_code:
                    return int(partition.error_code)
        return 0
    if api_key == FETCH:
        if decoded.error_code:
            return int(decoded.error_code)
        for topic in decoded.responses:
            for partition in topic.partitions:
                if partition.error_code:
                    return int(partition.error_code)
        return 0
    return response.error_code or 0


def _answer_error_code(request: KafkaRequest, answer: bytes) -> int:
    """The error code garrison's own answer carries (read back, not assumed)."""
    if request.api_key in (GET_TELEMETRY_SUBSCRIPTIONS, PUSH_TELEMETRY):
        return CLUSTER_AUTHORIZATION_FAILED
    decoded: Any = decode_response_body(request, answer)
    if decoded is None:
        return 0
    return KafkaResponse(request, request.correlation_id, answer, decoded).error_code or 0
