"""Access-log lines into a service map, reading only what the map reads.

`ServiceMapBuilder.add` takes a whole decoded record, but the map reads a few of its fields:
the endpoints, the verdict, the L7 request's method and path (not its headers), the ports, the
rules. A line here is decoded (msgspec) into `MapFields`, frozen structs of exactly those
fields; everything else in the line is skipped without being built. Records whose fields are
equal but for their `time` — most of a log: the same clients making the same requests under
the same rules — are counted once per distinct value, with how many and the first and last
time (`ServiceMapBuilder.add_alike`); the builder then does its work once per distinct record
in a window of `window` of them, not once per line.

A line is decoded whole with orjson, as `add` would get it, so that the map is the one `add`
makes line by line, when it is not plain ASCII (orjson's UTF-8 checks are the reference),
when a field the map reads has another type than garrison writes (`"identity": "5"`, a time
that is not garrison's fixed-width UTC), or when it is no JSON object at all. Whether a
denied TCP SYN is a client's retransmission depends on its own time and port: such a record
is read once more for its addresses and ports (`SynFields`) and `retried_syn` asked, for
every record in log order as lines are read. The distinct records and the lines decoded
whole are given to the builder in the order they first appeared, so the first labels, pods
and addresses seen of a node are the same.

One difference from decoding with orjson remains, in fields the map does not read: a number
too large for a float (`1e400`) there is valid JSON to msgspec, so such a line is counted as a
record where orjson calls it "not JSON".

`MapFields` must name every field `ServiceMapBuilder.add` reads but the endpoints' labels
(`FirstLabels`: a node's labels are those of the first record naming it, which is always the
first of its distinct record, so they are read from that one only). tests/unit/ui/
test_mapscan.py feeds `add` a record that notes each field read and compares the maps of both
ways.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType
from msgspec.structs import replace

from garrison.flows.flowdict import flow_of, not_a_record
from garrison.flows.servicemap import ServiceMapBuilder, record_time

# orjson makes a float of an integer past 64 bits, which the map reads as no number (msgspec
# bounds are int64: an integer in [2**63, 2**64) takes the builder's own way)
Int = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]

DEFAULT_WINDOW = 4096  # distinct records held before they are given to the builder


class Endpoint(Struct, frozen=True, gc=False):
    """An endpoint, but its labels: a node's are those of the first record naming it."""

    namespace: str | None = None
    identity: Int | None = None
    pod_name: str | None = None
    ip: str | None = None


class RuleRef(Struct, frozen=True, gc=False):
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    rule: str | None = None


class Http(Struct, frozen=True, gc=False):
    method: str | None = None
    url: str | None = None
    code: Int | None = None


class Grpc(Struct, frozen=True, gc=False):
    service: str | None = None
    method: str | None = None
    status: Int | None = None


class Kafka(Struct, frozen=True, gc=False):
    api_key: str | Int | None = None
    topic: str | None = None
    topics: tuple[str, ...] | None = None
    error_code: Int | UnsetType | None = UNSET  # a reply's; present or not matters


class L7(Struct, frozen=True, gc=False):
    http: Http | None = None
    grpc: Grpc | None = None
    kafka: Kafka | None = None


class TcpFlags(Struct, frozen=True, gc=False):
    SYN: bool | None = None
    ACK: bool | None = None


class Port(Struct, frozen=True, gc=False):
    """An `l4` protocol's part: the port reached (ICMP: the `type`), and TCP's flags."""

    destination_port: Int | None = None
    type: Int | UnsetType | None = UNSET  # ICMP's; present or not matters
    flags: TcpFlags | None = None


class L4(Struct, frozen=True, gc=False):
    TCP: Port | None = None
    UDP: Port | None = None
    SCTP: Port | None = None
    ICMPv4: Port | None = None
    ICMPv6: Port | None = None


class EventType(Struct, frozen=True, gc=False):
    type: Int | None = None


class Aggregate(Struct, frozen=True, gc=False):
    ingress_flow_count: Int | None = None
    egress_flow_count: Int | None = None
    unknown_direction_flow_count: Int | None = None


class MapFields(Struct, frozen=True, gc=False):
    """The fields of a flow record (Hubble's names) that the service map reads."""

    time: str | None = None
    verdict: str | None = None
    Type: str | None = None
    is_reply: bool | None = None
    source: Endpoint | None = None
    destination: Endpoint | None = None
    l4: L4 | None = None
    l7: L7 | UnsetType | None = UNSET  # without `Type`, its presence makes an L7 record
    event_type: EventType | None = None
    aggregate: Aggregate | None = None
    ingress_allowed_by: tuple[RuleRef, ...] | None = None
    egress_allowed_by: tuple[RuleRef, ...] | None = None
    ingress_denied_by: tuple[RuleRef, ...] | None = None
    egress_denied_by: tuple[RuleRef, ...] | None = None


class _Flags(TypedDict, total=False):
    SYN: bool | None
    ACK: bool | None


class _SynPorts(TypedDict, total=False):
    source_port: Int | None
    destination_port: Int | None
    flags: _Flags | None


class _SynL4(TypedDict, total=False):
    TCP: _SynPorts | None


class _Address(TypedDict, total=False):
    ip: str | None


class _Event(TypedDict, total=False):
    type: Int | None


class _IPHeader(TypedDict, total=False):
    source: str | None
    destination: str | None


class SynFields(TypedDict, total=False):
    """What `ServiceMapBuilder.retried_syn` reads of a denied SYN (a dict, as it takes)."""

    time: str | None
    verdict: str | None
    Type: str | None
    is_reply: bool | None
    l7: Any
    event_type: _Event | None
    l4: _SynL4 | None
    source: _Address | None
    destination: _Address | None
    IP: _IPHeader | None


class _Labels(TypedDict, total=False):
    labels: Any


class FirstLabels(TypedDict, total=False):
    """The endpoints' labels, read from the first record of each distinct record: the map
    reads them only from the record that first names a node, which is always the first of
    its distinct record (those are given to the builder in the order they first appear)."""

    source: _Labels | None
    destination: _Labels | None


def _maybe_retried(fields: MapFields) -> bool:
    """A record `retried_syn` may call a retransmission: a denied TCP SYN."""
    if fields.verdict != "DROPPED" or fields.l4 is None:
        return False
    tcp = fields.l4.TCP
    return tcp is not None and tcp.flags is not None and tcp.flags.SYN is True


class MapScan:
    """Feeds a `ServiceMapBuilder` access-log lines: `add_lines()`, then `flush()`."""

    def __init__(self, builder: ServiceMapBuilder, window: int = DEFAULT_WINDOW) -> None:
        self.builder = builder
        self._window = window
        self._decode = msgspec.json.Decoder(MapFields).decode
        self._decode_syn = msgspec.json.Decoder(SynFields).decode
        self._decode_labels = msgspec.json.Decoder(FirstLabels).decode
        # in order of first appearance: a distinct record (time None; in a 1-tuple when it
        # is a retransmitted SYN) -> [count, first time, last time]; or a number -> (a line
        # decoded whole, whether it is a retransmitted SYN)
        self._pending: dict[Any, Any] = {}
        self._whole = 0

    def add_lines(self, lines: list[bytes]) -> list[tuple[int, str]]:
        """Count non-blank lines; returns the lines that are no flow record, as (index in
        `lines`, why), for the caller to report and to count in `builder.skipped`."""
        bad: list[tuple[int, str]] = []
        decode, decode_syn, pending = self._decode, self._decode_syn, self._pending
        retried_syn = self.builder.retried_syn
        for index, line in enumerate(lines):
            key: Any = None
            if line.isascii():
                # nothing is counted or remembered until the line has been read
                try:
                    fields = decode(line)
                    t = fields.time
                    if t is None or fields.verdict is None:
                        pass  # no flow record: the whole line says why, below
                    elif len(t) == 30 and t[29] == "Z" and t[19] == ".":
                        key = replace(fields, time=None)
                    # else a time to normalise: the builder's own way
                    syn = entry = labels = None
                    if key is None:
                        pass
                    elif fields.verdict == "DROPPED" and _maybe_retried(fields):
                        syn = decode_syn(line)
                        if key not in pending or (key,) not in pending:
                            labels = self._decode_labels(line)  # maybe the first of its kind
                    else:
                        entry = pending.get(key)
                        if entry is None:
                            labels = self._decode_labels(line)  # the first of its kind
                except (msgspec.DecodeError, RecursionError):  # not as garrison writes it
                    key = None
            if key is not None:
                if syn is not None:
                    # asked now, in log order; counted with the others when flushed
                    if retried_syn(syn):
                        key = (key,)
                    entry = pending.get(key)
                if entry is None:
                    self._hold(key, [1, t, t, labels])
                else:
                    entry[0] += 1
                    if t is not None:
                        if entry[1] is None or t < entry[1]:
                            entry[1] = t
                        if entry[2] is None or t > entry[2]:
                            entry[2] = t
                continue
            try:
                flow = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                bad.append((index, f"not JSON: {exc}"))
                continue
            if type(flow) is not dict:
                bad.append((index, "not a JSON object"))
                continue
            flow = flow_of(flow)
            why = not_a_record(flow)
            if why is not None:
                bad.append((index, why))
                continue
            self._whole += 1
            self._hold(self._whole, (flow, retried_syn(flow)))
        return bad

    def _hold(self, key: Any, value: Any) -> None:
        if len(self._pending) >= self._window:
            self.flush()
        self._pending[key] = value

    def flush(self) -> None:
        """Give the builder what is held (call it at the end, before reading the builder)."""
        add_alike, encode = self.builder.add_alike, msgspec.json.encode
        for key, value in self._pending.items():
            if type(value) is list:
                retried = type(key) is tuple
                # a dict as orjson makes it of a line holding these fields only, with the
                # labels of the first such line
                flow = orjson.loads(encode(key[0] if retried else key))
                for side, labels in value[3].items():
                    endpoint = flow.get(side)
                    if type(endpoint) is dict and type(labels) is dict and "labels" in labels:
                        endpoint["labels"] = labels["labels"]
                add_alike(flow, value[0], value[1], value[2], retried)
            else:
                flow, retried = value
                t = record_time(flow.get("time"))
                add_alike(flow, 1, t, t, retried)
        self._pending.clear()


__all__ = ["DEFAULT_WINDOW", "FirstLabels", "MapFields", "MapScan", "SynFields"]
