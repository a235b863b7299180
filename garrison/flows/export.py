"""Flows for other tools: a field mask over the JSON object, and flat CSV rows.

A field mask (`--field-mask time,verdict,source.pod_name,l7.http`) keeps only the named paths
of each flow, nested as in the original (protobuf's FieldMask, as `hubble observe
--field-mask` does); a path that a flow does not have is left out of that flow. The first
part of a path must be a key of the flow record; what is below it is not checked, since a
record of another kind may have it.

CSV has one row per flow and a header. By default the columns are `CSV_COLUMNS`, which flatten
what a review needs (labels joined with `;`, the deciding policies as `kind ns/name rule`);
with a field mask, the columns are the mask's paths, a nested value written as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from garrison.flows.query import FlowDict, flow_protocol, flow_side
from garrison.flows.render import flow_type_text, policy_names


class FieldMaskError(ValueError):
    """A field mask that names no field of a flow record."""


RECORD_FIELDS = (
    "time", "verdict", "IP", "l4", "source", "destination", "Type", "node_name", "l7",
    "event_type", "traffic_direction", "policy_match_type", "trace_observation_point",
    "drop_reason_desc", "is_reply", "Summary", "error", "egress_allowed_by",
    "ingress_allowed_by", "egress_denied_by", "ingress_denied_by",
)


@dataclass(frozen=True, slots=True)
class FieldMask:
    paths: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> FieldMask:
        parts = text.split(",") if isinstance(text, str) else [
            p for item in text for p in item.split(",")
        ]
        paths = []
        for part in parts:
            part = part.strip()
            if not part:
                continue
            path = tuple(part.split("."))
            if any(not p for p in path):
                raise FieldMaskError(f"field mask: empty part in {part!r}")
            if path[0] not in RECORD_FIELDS:
                raise FieldMaskError(
                    f"field mask: {path[0]!r} is no field of a flow record "
                    f"(fields: {', '.join(RECORD_FIELDS)})"
                )
            paths.append(path)
        if not paths:
            raise FieldMaskError("field mask: no field named")
        return cls(tuple(paths))

    @property
    def names(self) -> list[str]:
        return [".".join(p) for p in self.paths]

    def apply(self, d: FlowDict) -> dict[str, Any]:
        """The flow with only the masked paths, in the mask's order."""
        out: dict[str, Any] = {}
        for path in self.paths:
            found, value = lookup(d, path)
            if not found:
                continue
            node = out
            for key in path[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = node[key] = {}
                node = child
            node[path[-1]] = value
        return out


def lookup(d: Any, path: Sequence[str]) -> tuple[bool, Any]:
    node = d
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ";".join(str(v) for v in value)
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def _at(*path: str) -> Callable[[FlowDict], str]:
    return lambda d: _cell(lookup(d, path)[1])


def _side(which: str, attr: str) -> Callable[[FlowDict], str]:
    return lambda d: _cell(getattr(flow_side(d, which), attr) or None)


def _labels(which: str) -> Callable[[FlowDict], str]:
    return lambda d: ";".join(flow_side(d, which).labels)


def _topics(d: FlowDict) -> str:
    found, topics = lookup(d, ("l7", "kafka", "topics"))
    if found:
        return _cell(topics)
    return _cell(lookup(d, ("l7", "kafka", "topic"))[1])


CSV_COLUMNS: tuple[tuple[str, Callable[[FlowDict], str]], ...] = (
    ("time", _at("time")),
    ("verdict", _at("verdict")),
    ("type", flow_type_text),
    ("traffic_direction", _at("traffic_direction")),
    ("is_reply", _at("is_reply")),
    ("source_namespace", _side("source", "namespace")),
    ("source_pod", _side("source", "pod_name")),
    ("source_identity", _side("source", "identity")),
    ("source_labels", _labels("source")),
    ("source_ip", _side("source", "ip")),
    ("source_port", _side("source", "port")),
    ("destination_namespace", _side("destination", "namespace")),
    ("destination_pod", _side("destination", "pod_name")),
    ("destination_identity", _side("destination", "identity")),
    ("destination_labels", _labels("destination")),
    ("destination_ip", _side("destination", "ip")),
    ("destination_port", _side("destination", "port")),
    ("protocol", flow_protocol),
    ("http_method", _at("l7", "http", "method")),
    ("http_url", _at("l7", "http", "url")),
    ("http_code", _at("l7", "http", "code")),
    ("grpc_service", _at("l7", "grpc", "service")),
    ("grpc_method", _at("l7", "grpc", "method")),
    ("grpc_status", _at("l7", "grpc", "status")),
    ("kafka_api_key", _at("l7", "kafka", "api_key")),
    ("kafka_topics", _topics),
    ("kafka_error_code", _at("l7", "kafka", "error_code")),
    ("latency_ns", _at("l7", "latency_ns")),
    ("drop_reason_desc", _at("drop_reason_desc")),
    ("policies", lambda d: ";".join(policy_names(d))),
    ("error", _at("error")),
    ("summary", _at("Summary")),
)


def csv_header(mask: FieldMask | None = None) -> list[str]:
    return mask.names if mask is not None else [name for name, _ in CSV_COLUMNS]


def csv_row(d: FlowDict, mask: FieldMask | None = None) -> list[str]:
    if mask is not None:
        return [_cell(lookup(d, path)[1]) for path in mask.paths]
    return [get(d) for _, get in CSV_COLUMNS]
