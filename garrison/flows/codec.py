"""JSON for flow records: the access-log line, and reading it back.

`record_to_dict()` is the definition of the JSON object (keys in Hubble's order, absent
values omitted). `record_to_json()` writes the same object as one line without building the
dict: it runs for every request the proxy logs, and endpoints, whose labels are most of a
line, are encoded once per endpoint and reused. A property test holds the two equal.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from garrison.flows.record import (
    GRPC,
    HTTP,
    MATCH_TYPE_BY_NUMBER,
    MATCH_TYPE_NUMBER,
    TCP_FLAG_BITS,
    Aggregate,
    DropReasonDesc,
    Endpoint,
    EventType,
    FlowDecodeError,
    FlowRecord,
    FlowType,
    HTTPHeader,
    Kafka,
    L4Protocol,
    L7FlowType,
    Layer4,
    Layer7,
    Policy,
    TCPFlags,
    TraceObservationPoint,
    TrafficDirection,
    Verdict,
)

_POLICY_LISTS = ("egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by")

# ---------------------------------------------------------------------------------------------
# Time


# The last second formatted and its text: records come in bursts within the same second, and
# formatting it is most of a record's time (a memo of a pure function, not observable state).
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def format_time(time_ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: `2024-11-21T12:00:00.123456789Z`."""
    global _last_second
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    last = _last_second
    if last[0] == seconds:
        text = last[1]
    else:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{str(nanos).zfill(9)}Z"


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})\Z"
)


def parse_time(text: str) -> int:
    """RFC 3339 (any fraction up to nanoseconds, `Z` or an offset) to nanoseconds."""
    m = _RFC3339.match(text)
    if m is None:
        raise FlowDecodeError(f"not an RFC 3339 time: {text!r}")
    date, clock, fraction, zone = m.groups()
    offset = "+00:00" if zone in ("Z", "z") else zone
    try:  # February 30th, hour 25, or outside years 1-9999 in UTC
        when = datetime.fromisoformat(f"{date}T{clock}{offset}").astimezone(UTC)
        seconds = int(when.timestamp())
    except (ValueError, OverflowError) as exc:
        raise FlowDecodeError(f"not a time: {text!r} ({exc})") from exc
    nanos = int((fraction or "").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


# ---------------------------------------------------------------------------------------------
# JSON encoding


def _endpoint_to_dict(ep: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": ep.identity}
    if ep.namespace:
        out["namespace"] = ep.namespace
    if ep.labels:
        out["labels"] = list(ep.labels)
    if ep.pod_name:
        out["pod_name"] = ep.pod_name
    if ep.ip:
        out["ip"] = ep.ip
    if ep.port:
        out["port"] = ep.port
    return out


def _l4_to_dict(l4: Layer4, src: Endpoint, dst: Endpoint) -> dict[str, Any]:
    if l4.protocol is L4Protocol.ICMPV4:
        return {l4.protocol.value: {"type": dst.port}}
    inner: dict[str, Any] = {"source_port": src.port, "destination_port": dst.port}
    if l4.flags is not None:
        inner["flags"] = {name: True for name in l4.flags.names()}
    return {l4.protocol.value: inner}


def _http_to_dict(http: HTTP) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if http.code:
        out["code"] = http.code
    if http.method:
        out["method"] = http.method
    if http.url:
        out["url"] = http.url
    if http.raw_target:
        out["raw_target"] = http.raw_target
    if http.protocol:
        out["protocol"] = http.protocol
    if http.headers:
        out["headers"] = [{"key": h.key, "value": h.value} for h in http.headers]
    return out


def _kafka_to_dict(kafka: Kafka) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kafka.error_code is not None:
        out["error_code"] = kafka.error_code
    if kafka.api_version is not None:
        out["api_version"] = kafka.api_version
    if kafka.api_key:
        out["api_key"] = kafka.api_key
    if kafka.correlation_id is not None:
        out["correlation_id"] = kafka.correlation_id
    if kafka.topic:
        out["topic"] = kafka.topic
    if kafka.topics:
        out["topics"] = list(kafka.topics)
    return out


def _grpc_to_dict(grpc: GRPC) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if grpc.service:
        out["service"] = grpc.service
    if grpc.method:
        out["method"] = grpc.method
    if grpc.status is not None:
        out["status"] = grpc.status
    return out


def _l7_to_dict(l7: Layer7) -> dict[str, Any]:
    out: dict[str, Any] = {"type": l7.type.value}
    if l7.latency_ns is not None:
        out["latency_ns"] = l7.latency_ns
    if l7.http is not None:
        out["http"] = _http_to_dict(l7.http)
    if l7.kafka is not None:
        out["kafka"] = _kafka_to_dict(l7.kafka)
    if l7.grpc is not None:
        out["grpc"] = _grpc_to_dict(l7.grpc)
    return out


def _policy_to_dict(policy: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {"name": policy.name}
    if policy.namespace:
        out["namespace"] = policy.namespace
    if policy.kind:
        out["kind"] = policy.kind
    if policy.rule:
        out["rule"] = policy.rule
    return out


def _event_sub_type(record: FlowRecord) -> int:
    if record.event_type is EventType.DROP and record.drop_reason_desc is not None:
        return record.drop_reason_desc.code
    if record.event_type is EventType.TRACE and record.trace_observation_point is not None:
        return record.trace_observation_point.code
    return 0


def _ip_version(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def record_to_dict(r: FlowRecord) -> dict[str, Any]:
    # Key order follows Hubble's Flow message.
    out: dict[str, Any] = {"time": format_time(r.time), "verdict": r.verdict.value}
    if r.source.ip or r.destination.ip:
        out["IP"] = {
            "source": r.source.ip,
            "destination": r.destination.ip,
            "ipVersion": _ip_version(r.source.ip or r.destination.ip),
        }
    if r.l4 is not None:
        out["l4"] = _l4_to_dict(r.l4, r.source, r.destination)
    out["source"] = _endpoint_to_dict(r.source)
    out["destination"] = _endpoint_to_dict(r.destination)
    out["Type"] = r.type.value
    if r.node_name:
        out["node_name"] = r.node_name
    if r.l7 is not None:
        out["l7"] = _l7_to_dict(r.l7)
    event: dict[str, Any] = {"type": int(r.event_type)}
    sub_type = _event_sub_type(r)
    if sub_type:
        event["sub_type"] = sub_type
    out["event_type"] = event
    out["traffic_direction"] = r.traffic_direction.value
    if r.policy_match_type is not None:
        out["policy_match_type"] = MATCH_TYPE_NUMBER[r.policy_match_type]
    if r.trace_observation_point is not None:
        out["trace_observation_point"] = r.trace_observation_point.value
    if r.drop_reason_desc is not None:
        out["drop_reason_desc"] = r.drop_reason_desc.value
    if r.is_reply is not None:
        out["is_reply"] = r.is_reply
    if r.summary:
        out["Summary"] = r.summary
    if r.error:
        out["error"] = r.error
    if r.deny_response:
        out["deny_response"] = r.deny_response
    for key in _POLICY_LISTS:
        policies: tuple[Policy, ...] = getattr(r, key)
        if policies:
            out[key] = [_policy_to_dict(p) for p in policies]
    if r.aggregate is not None:
        out["aggregate"] = r.aggregate.to_dict()
    return out


# ---------------------------------------------------------------------------------------------
# The line, written directly

_q = encode_basestring_ascii  # a JSON string literal, non-ASCII escaped (C implementation)


# JSON fragments of frozen values the record builders hand out again and again (the same
# endpoints, HTTP parts, redacted header tuples and policy tuples, request after request), by
# identity: an entry holds its value, so the id cannot be reused while the entry is there.
# Memos of pure functions, bounded, forgotten all at once when full; one per kind of fragment.
_MEMO_SIZE = 512
_Fragments = dict[int, tuple[Any, str]]
_HEADERS: _Fragments = {}
_POLICIES: _Fragments = {}
_HTTPS: _Fragments = {}
# The IP, l4 and endpoint parts are per connection (the client's port): a few dozen busy
# connections' worth, so that a proxy holding thousands of idle ones does not keep theirs alive.
_CONNECTIONS_SIZE = 64
_CONNECTIONS: dict[tuple[int, int, int], tuple[Endpoint, Endpoint, Layer4, str]] = {}


def _known(memo: _Fragments, value: Any, encode: Callable[[Any], str]) -> str:
    entry = memo.get(id(value))
    if entry is not None and entry[0] is value:
        return entry[1]
    text = encode(value)
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[id(value)] = (value, text)
    return text


def _policies_json(policies: tuple[Policy, ...]) -> str:
    return ",".join(_policy_json(p) for p in policies)


def _addresses_json(src: Endpoint, dst: Endpoint, l4: Layer4 | None) -> str:
    """`,"IP":…,"l4":…` (each part only when the record has it)."""
    out = []
    if src.ip or dst.ip:
        version = _ip_version(src.ip or dst.ip)
        out.append(
            f',"IP":{{"source":{_q(src.ip)},"destination":{_q(dst.ip)},"ipVersion":"{version}"}}'
        )
    if l4 is not None and l4.protocol is L4Protocol.ICMPV4:
        out.append(f',"l4":{{"{l4.protocol}":{{"type":{dst.port}}}}}')
    elif l4 is not None:
        out.append(
            f',"l4":{{"{l4.protocol}":{{"source_port":{src.port},'
            f'"destination_port":{dst.port}'
        )
        if l4.flags is not None:
            flags = ",".join(f'"{name}":true' for name in l4.flags.names())
            out.append(f',"flags":{{{flags}}}')
        out.append("}}")
    return "".join(out)


def _endpoint_json(ep: Endpoint) -> str:
    text = ep._json
    if not text:
        text = json.dumps(_endpoint_to_dict(ep), separators=(",", ":"), ensure_ascii=True)
        object.__setattr__(ep, "_json", text)  # a cache of the frozen value, not a change
    return text


def _http_json(http: HTTP) -> str:
    out = []
    if http.code:
        out.append(f'"code":{http.code}')
    if http.method:
        out.append(f'"method":{_q(http.method)}')
    if http.url:
        out.append(f'"url":{_q(http.url)}')
    if http.raw_target:
        out.append(f'"raw_target":{_q(http.raw_target)}')
    if http.protocol:
        out.append(f'"protocol":{_q(http.protocol)}')
    if http.headers:
        out.append(_known(_HEADERS, http.headers, _headers_json))
    return "{" + ",".join(out) + "}"


def _headers_json(headers: tuple[HTTPHeader, ...]) -> str:
    items = ",".join(f'{{"key":{_q(h.key)},"value":{_q(h.value)}}}' for h in headers)
    return f'"headers":[{items}]'


def _kafka_json(kafka: Kafka) -> str:
    out = []
    if kafka.error_code is not None:
        out.append(f'"error_code":{kafka.error_code}')
    if kafka.api_version is not None:
        out.append(f'"api_version":{kafka.api_version}')
    if kafka.api_key:
        out.append(f'"api_key":{_q(kafka.api_key)}')
    if kafka.correlation_id is not None:
        out.append(f'"correlation_id":{kafka.correlation_id}')
    if kafka.topic:
        out.append(f'"topic":{_q(kafka.topic)}')
    if kafka.topics:
        out.append(f'"topics":[{",".join(_q(t) for t in kafka.topics)}]')
    return "{" + ",".join(out) + "}"


def _grpc_json(grpc: GRPC) -> str:
    out = []
    if grpc.service:
        out.append(f'"service":{_q(grpc.service)}')
    if grpc.method:
        out.append(f'"method":{_q(grpc.method)}')
    if grpc.status is not None:
        out.append(f'"status":{grpc.status}')
    return "{" + ",".join(out) + "}"


def _l7_json(l7: Layer7) -> str:
    latency = f',"latency_ns":{l7.latency_ns}' if l7.latency_ns is not None else ""
    http = f',"http":{_known(_HTTPS, l7.http, _http_json)}' if l7.http is not None else ""
    kafka = f',"kafka":{_kafka_json(l7.kafka)}' if l7.kafka is not None else ""
    grpc = f',"grpc":{_grpc_json(l7.grpc)}' if l7.grpc is not None else ""
    return f'{{"type":"{l7.type}"{latency}{http}{kafka}{grpc}}}'


def _policy_json(policy: Policy) -> str:
    out = [f'"name":{_q(policy.name)}']
    if policy.namespace:
        out.append(f'"namespace":{_q(policy.namespace)}')
    if policy.kind:
        out.append(f'"kind":{_q(policy.kind)}')
    if policy.rule:
        out.append(f'"rule":{_q(policy.rule)}')
    return "{" + ",".join(out) + "}"


def _connection_json(src: Endpoint, dst: Endpoint, l4: Layer4 | None) -> str:
    """`,"IP":…,"l4":…,"source":…,"destination":…`: the part of a line a connection's
    records share, made once per (source, destination, l4) of a busy connection."""
    key = (id(src), id(dst), id(l4))
    entry = _CONNECTIONS.get(key)
    if entry is not None and entry[0] is src and entry[1] is dst and entry[2] is l4:
        return entry[3]
    text = (
        f'{_addresses_json(src, dst, l4)},"source":{_endpoint_json(src)}'
        f',"destination":{_endpoint_json(dst)}'
    )
    if l4 is not None:  # a record without l4 is a datapath one-off: not worth keeping
        if len(_CONNECTIONS) >= _CONNECTIONS_SIZE:
            _CONNECTIONS.clear()
        _CONNECTIONS[key] = (src, dst, l4, text)
    return text


def record_to_json(r: FlowRecord) -> str:
    """`record_to_dict(r)` as one line of ASCII JSON, keys in the same order.

    One string built from its parts, the optional ones "" when absent (an L7 record has most
    of them absent). The enums are StrEnums and format as their value (`.value` is a
    Python-level descriptor in Python 3.11, measurable at one call per field per record)."""
    node = f',"node_name":{_q(r.node_name)}' if r.node_name else ""
    l7 = f',"l7":{_l7_json(r.l7)}' if r.l7 is not None else ""
    sub_type = _event_sub_type(r)
    sub = f',"sub_type":{sub_type}' if sub_type else ""
    optional = ""  # the rare keys between traffic_direction and Summary
    if r.policy_match_type is not None:
        optional = f',"policy_match_type":{MATCH_TYPE_NUMBER[r.policy_match_type]}'
    if r.trace_observation_point is not None:
        optional += f',"trace_observation_point":"{r.trace_observation_point}"'
    if r.drop_reason_desc is not None:
        optional += f',"drop_reason_desc":"{r.drop_reason_desc}"'
    if r.is_reply is not None:
        optional += ',"is_reply":true' if r.is_reply else ',"is_reply":false'
    summary = f',"Summary":{_q(r.summary)}' if r.summary else ""
    tail = ""  # error, deny_response, the policy lists, aggregate
    if r.error:
        tail = f',"error":{_q(r.error)}'
    if r.deny_response:
        tail += f',"deny_response":{_q(r.deny_response)}'
    if r.egress_allowed_by:
        tail += _policy_list_json("egress_allowed_by", r.egress_allowed_by)
    if r.ingress_allowed_by:
        tail += _policy_list_json("ingress_allowed_by", r.ingress_allowed_by)
    if r.egress_denied_by:
        tail += _policy_list_json("egress_denied_by", r.egress_denied_by)
    if r.ingress_denied_by:
        tail += _policy_list_json("ingress_denied_by", r.ingress_denied_by)
    if r.aggregate is not None:
        counts = ",".join(f'"{k}":{v}' for k, v in r.aggregate.to_dict().items())
        tail += f',"aggregate":{{{counts}}}'
    return (
        f'{{"time":"{format_time(r.time)}","verdict":"{r.verdict}"'
        f"{_connection_json(r.source, r.destination, r.l4)}"
        f',"Type":"{r.type}"{node}{l7}'
        f',"event_type":{{"type":{int(r.event_type)}{sub}}}'
        f',"traffic_direction":"{r.traffic_direction}"{optional}{summary}{tail}}}'
    )


def _policy_list_json(key: str, policies: tuple[Policy, ...]) -> str:
    return f',"{key}":[{_known(_POLICIES, policies, _policies_json)}]'


def record_from_dict(data: Mapping[str, Any]) -> FlowRecord:
    try:
        return _record_from_dict(data)
    except FlowDecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FlowDecodeError(f"not a flow record: {exc}") from exc


def record_from_json(line: str | bytes) -> FlowRecord:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise FlowDecodeError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FlowDecodeError("a flow record is a JSON object")
    return record_from_dict(data)


# ---------------------------------------------------------------------------------------------
# JSON decoding


def _obj(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FlowDecodeError(f"{key}: expected an object")
    return value


def _int(value: Any, what: str) -> int:
    # protobuf's JSON mapping quotes 64-bit integers: accept "123" as well as 123.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FlowDecodeError(f"{what}: expected an integer")
    return int(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FlowDecodeError(f"{what}: expected a string")
    return value


def _endpoint_from_dict(
    data: Mapping[str, Any] | None, fallback_ip: str, fallback_port: int
) -> Endpoint:
    if data is None:
        return Endpoint(ip=fallback_ip, port=fallback_port)
    labels = data.get("labels") or []
    if not isinstance(labels, list):
        raise FlowDecodeError("labels: expected a list")
    return Endpoint(
        identity=_int(data.get("identity", 0), "identity"),
        labels=tuple(_str(label, "label") for label in labels),
        namespace=_str(data.get("namespace", ""), "namespace"),
        pod_name=_str(data.get("pod_name", ""), "pod_name"),
        ip=_str(data.get("ip", fallback_ip), "ip"),
        port=_int(data.get("port", fallback_port), "port"),
    )


def _l4_from_dict(data: Mapping[str, Any] | None) -> tuple[Layer4 | None, int, int]:
    if data is None:
        return None, 0, 0
    for proto in L4Protocol:
        inner = _obj(data, proto.value)
        if inner is None:
            continue
        if proto is L4Protocol.ICMPV4:
            return Layer4(protocol=proto), 0, _int(inner.get("type", 0), "type")
        flags_data = _obj(inner, "flags")
        flags = None
        if flags_data is not None:
            known = {name for name, _ in TCP_FLAG_BITS}
            flags = TCPFlags(
                **{k.lower(): bool(v) for k, v in flags_data.items() if k.lower() in known}
            )
        src = _int(inner.get("source_port", 0), "source_port")
        dst = _int(inner.get("destination_port", 0), "destination_port")
        return Layer4(protocol=proto, flags=flags), src, dst
    return None, 0, 0  # ICMPv6 and others: not modelled


def _l7_from_dict(data: Mapping[str, Any] | None) -> Layer7 | None:
    if data is None:
        return None
    http_data = _obj(data, "http")
    http = None
    if http_data is not None:
        headers = http_data.get("headers") or []
        if not isinstance(headers, list):
            raise FlowDecodeError("headers: expected a list")
        http = HTTP(
            method=_str(http_data.get("method", ""), "method"),
            url=_str(http_data.get("url", ""), "url"),
            protocol=_str(http_data.get("protocol", ""), "protocol"),
            code=_int(http_data.get("code", 0), "code"),
            headers=tuple(
                HTTPHeader(_str(h["key"], "header key"), _str(h.get("value", ""), "header value"))
                for h in headers
            ),
            raw_target=_str(http_data.get("raw_target", ""), "raw_target"),
        )
    kafka_data = _obj(data, "kafka")
    kafka = None
    if kafka_data is not None:
        topics = kafka_data.get("topics") or []
        if not isinstance(topics, list):
            raise FlowDecodeError("topics: expected a list")
        error_code = kafka_data.get("error_code")
        version = kafka_data.get("api_version")
        correlation = kafka_data.get("correlation_id")
        kafka = Kafka(
            api_key=_str(kafka_data.get("api_key", ""), "api_key"),
            api_version=None if version is None else _int(version, "api_version"),
            correlation_id=None if correlation is None else _int(correlation, "correlation_id"),
            topic=_str(kafka_data.get("topic", ""), "topic"),
            topics=tuple(_str(t, "topic") for t in topics),
            error_code=None if error_code is None else _int(error_code, "error_code"),
        )
    grpc_data = _obj(data, "grpc")
    grpc = None
    if grpc_data is not None:
        status = grpc_data.get("status")
        grpc = GRPC(
            service=_str(grpc_data.get("service", ""), "service"),
            method=_str(grpc_data.get("method", ""), "method"),
            status=None if status is None else _int(status, "status"),
        )
    latency = data.get("latency_ns")
    return Layer7(
        type=L7FlowType(data.get("type", "REQUEST")),
        latency_ns=None if latency is None else _int(latency, "latency_ns"),
        http=http,
        kafka=kafka,
        grpc=grpc,
    )


def _policies_from(data: Mapping[str, Any], key: str) -> tuple[Policy, ...]:
    items = data.get(key) or []
    if not isinstance(items, list):
        raise FlowDecodeError(f"{key}: expected a list")
    return tuple(
        Policy(
            name=_str(p.get("name", ""), "policy name"),
            namespace=_str(p.get("namespace", ""), "policy namespace"),
            kind=_str(p.get("kind", ""), "policy kind"),
            rule=_str(p.get("rule", ""), "policy rule"),
        )
        for p in items
    )


def _record_from_dict(data: Mapping[str, Any]) -> FlowRecord:
    ip = _obj(data, "IP") or {}
    l4, src_port, dst_port = _l4_from_dict(_obj(data, "l4"))
    event = _obj(data, "event_type") or {}
    l7 = _l7_from_dict(_obj(data, "l7"))
    flow_type = FlowType(data.get("Type", "L7" if l7 is not None else "L3_L4"))
    default_event = EventType.ACCESS_LOG if flow_type is FlowType.L7 else EventType.TRACE
    match = data.get("policy_match_type")
    obs = data.get("trace_observation_point")
    reason = data.get("drop_reason_desc")
    is_reply = data.get("is_reply")
    if is_reply is not None and not isinstance(is_reply, bool):
        raise FlowDecodeError("is_reply: expected a boolean")
    return FlowRecord(
        time=parse_time(_str(data["time"], "time")),
        verdict=Verdict(data["verdict"]),
        type=flow_type,
        event_type=EventType(_int(event.get("type", default_event), "event_type")),
        traffic_direction=TrafficDirection(
            data.get("traffic_direction", TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN.value)
        ),
        source=_endpoint_from_dict(
            _obj(data, "source"), _str(ip.get("source", ""), "IP.source"), src_port
        ),
        destination=_endpoint_from_dict(
            _obj(data, "destination"), _str(ip.get("destination", ""), "IP.destination"), dst_port
        ),
        is_reply=is_reply,
        l4=l4,
        l7=l7,
        drop_reason_desc=None if reason is None else DropReasonDesc(reason),
        policy_match_type=None if match is None else MATCH_TYPE_BY_NUMBER[_int(match, "match")],
        trace_observation_point=None if obs is None else TraceObservationPoint(obs),
        ingress_allowed_by=_policies_from(data, "ingress_allowed_by"),
        egress_allowed_by=_policies_from(data, "egress_allowed_by"),
        ingress_denied_by=_policies_from(data, "ingress_denied_by"),
        egress_denied_by=_policies_from(data, "egress_denied_by"),
        summary=_str(data.get("Summary", ""), "Summary"),
        node_name=_str(data.get("node_name", ""), "node_name"),
        error=_str(data.get("error", ""), "error"),
        deny_response=_str(data.get("deny_response", ""), "deny_response"),
        aggregate=_aggregate_from(_obj(data, "aggregate")),
    )


def _aggregate_from(data: Mapping[str, Any] | None) -> Aggregate | None:
    if data is None:
        return None
    return Aggregate(
        ingress_flow_count=_int(data.get("ingress_flow_count", 0), "aggregate"),
        egress_flow_count=_int(data.get("egress_flow_count", 0), "aggregate"),
        unknown_direction_flow_count=_int(data.get("unknown_direction_flow_count", 0), "aggregate"),
    )
