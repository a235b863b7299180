"""`garrison policy trace`: explain whether a source may reach a destination, offline."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import replace

from garrison.identity.model import MIN_ENDPOINT_ID as FIRST_LOCAL_IDENTITY
from garrison.identity.namespaces import NamespaceError, check_label
from garrison.parsers.pathnorm import UnsafeTargetError, normalize_target
from garrison.policies.errors import PolicyValidationError
from garrison.policies.l7rules import kafka_api_key
from garrison.policies.labels import DEFAULT_NAMESPACE, LabelError, Labels, endpoint_labels
from garrison.policies.loader import load_paths
from garrison.policies.model import Protocol, parse_named_port
from garrison.policies.resolve import ResolverConfig
from garrison.policies.trace import (
    GRPCRequestSpec,
    HTTPRequestSpec,
    KafkaRequestSpec,
    L7RequestSpec,
    TraceEndpoint,
    TraceResult,
    TraceStep,
    describe_request,
    trace,
)

EXIT_BAD_USAGE = 2


class UsageError(Exception):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trace",
        help="explain whether a request would be allowed",
        description=(
            "Evaluate the source's egress and the destination's ingress policy as the "
            "datapath and the proxy would, and explain the decision. Exit 0 when the "
            "evaluation ran (allowed or denied), 2 on bad usage or an invalid policy."
        ),
    )
    p.add_argument("-f", "--file", dest="files", action="append", required=True,
                   metavar="PATH", help="policy file or directory (repeatable)")
    p.add_argument("--src-labels", metavar="k=v,...",
                   help="labels of the source endpoint, e.g. org=empire,class=tiefighter")
    p.add_argument("--src-ip", metavar="ADDR",
                   help="instead of --src-labels: an address outside the endpoints (the "
                   "CIDR identity of the longest prefix the policies name, else world)")
    p.add_argument("--src-namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                   help="namespace of the source")
    p.add_argument("--src-namespace-labels", default="", metavar="k=v,...",
                   help="labels of the source's namespace (namespaceSelector matches them)")
    p.add_argument("--dst-labels", metavar="k=v,...",
                   help="labels of the destination endpoint")
    p.add_argument("--dst-ip", metavar="ADDR",
                   help="instead of --dst-labels: an address outside the endpoints, e.g. "
                   "the server a toCIDR rule is about")
    p.add_argument("--dst-namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                   help="namespace of the destination")
    p.add_argument("--dst-namespace-labels", default="", metavar="k=v,...",
                   help="labels of the destination's namespace")
    p.add_argument("--dst-port-name", action="append", default=[], metavar="NAME=PORT/PROTO",
                   help="a port name the destination declares, e.g. http=8080/TCP "
                   "(repeatable; named ports in policies resolve against them)")
    p.add_argument("--dport", required=True, type=int, metavar="N",
                   help="destination port of the connection")
    p.add_argument("--protocol", default="TCP", type=str.upper,
                   choices=["TCP", "UDP", "SCTP"], help="L4 protocol of the connection")
    p.add_argument("--http-method", metavar="M",
                   help="an HTTP request to trace through the L7 rules: its method")
    p.add_argument("--http-path", metavar="P", help="the HTTP request's path")
    p.add_argument("--http-host", metavar="H", help="the HTTP request's Host")
    p.add_argument("--http-header", action="append", default=[], metavar="'Name: value'",
                   help="a header of the HTTP request (repeatable)")
    p.add_argument("--grpc-service", metavar="S",
                   help="a gRPC call to trace: its service, e.g. helloworld.Greeter")
    p.add_argument("--grpc-method", metavar="M", help="the gRPC call's method, e.g. SayHello")
    p.add_argument("--kafka-api-key", metavar="NAME|NUMBER",
                   help="a Kafka request to trace: its API key, e.g. produce or 0")
    p.add_argument("--kafka-api-version", type=int, metavar="N",
                   help="the Kafka request's API version")
    p.add_argument("--kafka-client-id", metavar="ID", help="the Kafka request's client id")
    p.add_argument("--kafka-topic", action="append", default=[], metavar="T",
                   help="a topic the Kafka request names (repeatable)")
    p.add_argument("--enforcement", default="default", choices=["default", "always", "never"],
                   help="policy enforcement mode (default: %(default)s)")
    p.add_argument("--allow-localhost", default="always", choices=["always", "policy"],
                   help="as the agent's flag: does the local host (reserved:host) reach "
                   "endpoints whatever policy says (default: %(default)s)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help="text: the explanation; json: one object (verdict, allowed_by, ...)")
    p.set_defaults(func=run)


def _namespace_labels(text: str, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag}: {item!r}: expected KEY=VALUE, e.g. {flag} team=blue")
        try:
            check_label(key.strip(), value.strip())
        except NamespaceError as exc:
            raise UsageError(f"{flag}: {exc}") from exc
        out[key.strip()] = value.strip()
    return out


def _endpoint(
    labels_text: str, namespace: str, flag: str, namespace_labels: dict[str, str] | None = None
) -> TraceEndpoint:
    try:
        labels = Labels.parse(labels_text)
    except LabelError as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    if not labels.items:
        raise UsageError(f"{flag}: give at least one label, e.g. {flag} app=web")
    if all(lab.source == "reserved" for lab in labels.items):
        return TraceEndpoint(labels, None)
    return TraceEndpoint(endpoint_labels(labels, namespace, namespace_labels), namespace)


def _address(text: str | None, labels: str | None, side: str) -> TraceEndpoint | None:
    """`--src-ip`/`--dst-ip`: a peer outside the endpoints; None when labels name it."""
    if text is None:
        if labels is None:
            raise UsageError(f"give --{side}-labels (an endpoint) or --{side}-ip (an address "
                             "outside the endpoints)")
        return None
    if labels is not None:
        raise UsageError(f"--{side}-labels and --{side}-ip name the same peer: give one")
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise UsageError(f"--{side}-ip {text!r}: not an IP address, e.g. --{side}-ip "
                         "203.0.113.7") from None
    return TraceEndpoint(Labels(), None, address=address)


def _proxy_refusal(
    method: str, target: str, host: str | None, headers: list[tuple[str, str]]
) -> str | None:
    """What the proxy answers before any rule is consulted, by its own request parser: the
    trace must not allow `post` (an unknown method, 501) or a field it refuses (400)."""
    from http import HTTPStatus

    from garrison.parsers.http1 import HTTP1Error, HTTP1RequestParser

    # every Host field as given (`--http-host` is one more): two are refused as the proxy does
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None or not any(name.lower() == "host" for name, _ in headers):
        lines.append(f"Host: {host or 'service'}")
    lines += [f"{name}: {value}" for name, value in headers]
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    except UnicodeEncodeError:
        return "400 Bad Request: the request line or a field is not UTF-8"
    parser = HTTP1RequestParser()
    try:
        parser.receive_data(head)
        while parser.next_event() is not None:
            pass
    except HTTP1Error as exc:
        return f"{exc.status} {HTTPStatus(exc.status).phrase}: {exc}"
    return None


def _request(args: argparse.Namespace) -> L7RequestSpec | None:
    http = any([args.http_method, args.http_path, args.http_host, args.http_header])
    grpc = any([args.grpc_service, args.grpc_method])
    kafka = any([args.kafka_api_key, args.kafka_api_version is not None,
                 args.kafka_client_id, args.kafka_topic])
    if sum([http, grpc, kafka]) > 1:
        raise UsageError("give the flags of one L7 protocol only (--http-*, --grpc-* or --kafka-*)")
    if http:
        headers = []
        for h in args.http_header:
            name, sep, value = h.partition(":")
            if not sep or not name.strip():
                raise UsageError(f"--http-header {h!r}: expected 'Name: value'")
            headers.append((name.strip(), value.strip()))
        method = args.http_method or "GET"
        raw = args.http_path or "/"
        rejected = _proxy_refusal(method, raw, args.http_host, headers)
        # a Host given as a header is the request's host, as the proxy reads it
        host = args.http_host
        if host is None:
            host = next((value for name, value in headers if name.lower() == "host"), None)
        try:
            path = normalize_target(raw.encode("utf-8")).path
        except UnsafeTargetError as exc:
            path = raw
            rejected = rejected or f"400 Bad Request: {exc.message}"
        return HTTPRequestSpec(method, path, host, tuple(headers), rejected)
    if grpc:
        if not (args.grpc_service and args.grpc_method):
            raise UsageError("--grpc-service and --grpc-method go together")
        return GRPCRequestSpec(args.grpc_service, args.grpc_method)
    if kafka:
        if not args.kafka_api_key:
            raise UsageError("--kafka-api-key is required with the other --kafka-* flags")
        key = kafka_api_key(args.kafka_api_key)
        if key is None:
            raise UsageError(
                f"--kafka-api-key {args.kafka_api_key!r}: unknown API key "
                "(use a name such as produce, fetch, metadata, or a number)"
            )
        return KafkaRequestSpec(key, args.kafka_api_version, args.kafka_client_id,
                                tuple(args.kafka_topic))
    return None


def run(args: argparse.Namespace) -> int:
    try:
        if not 0 < args.dport < 65536:
            raise UsageError(f"--dport {args.dport}: must be 1-65535")
        source = _address(args.src_ip, args.src_labels, "src") or _endpoint(
            args.src_labels, args.src_namespace, "--src-labels",
            _namespace_labels(args.src_namespace_labels, "--src-namespace-labels"),
        )
        destination = _address(args.dst_ip, args.dst_labels, "dst") or _endpoint(
            args.dst_labels, args.dst_namespace, "--dst-labels",
            _namespace_labels(args.dst_namespace_labels, "--dst-namespace-labels"),
        )
        ports = []
        for text in args.dst_port_name:
            try:
                ports.append(parse_named_port(text))
            except ValueError as exc:
                raise UsageError(f"--dst-port-name {exc}") from exc
        destination = replace(destination, ports=tuple(ports))
        request = _request(args)
    except UsageError as exc:
        print(f"garrison policy trace: {exc}", file=sys.stderr)
        return EXIT_BAD_USAGE
    try:
        loaded = load_paths(args.files)
    except PolicyValidationError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"garrison policy trace: {len(exc.issues)} policy error(s); nothing traced",
              file=sys.stderr)
        return EXIT_BAD_USAGE
    from garrison.policies.model import EnforcementMode

    result = trace(
        loaded.policies, source, destination, args.dport, Protocol(args.protocol), request,
        ResolverConfig(
            enforcement=EnforcementMode(args.enforcement),
            allow_localhost=args.allow_localhost == "always",
        ),
    )
    if args.output == "json":
        data = result.to_dict()
        # Endpoint identities are numbered by the trace, not by the agent (reserved ones are
        # the same everywhere): say so next to each number.
        for side in ("source", "destination"):
            part = data.get(side)
            if isinstance(part, dict) and isinstance(part.get("identity"), int):
                local = part["identity"] >= FIRST_LOCAL_IDENTITY
                part["identity_scope"] = "trace" if local else "reserved"
        print(json.dumps(data, indent=2))
    else:
        print(render(result))
    return 0


def render(result: TraceResult) -> str:
    lines = []
    src, dst = result.source, result.destination
    lines.append(
        f"Tracing {src.describe()} (identity {result.source_identity}) -> "
        f"{dst.describe()} (identity {result.destination_identity}) "
        f"{result.protocol.value}/{result.port}"
        + (f", {describe_request(result.request)}" if result.request else "")
    )
    if dst.ports:
        lines.append("  destination port names: " + ", ".join(str(p) for p in dst.ports))
    for step in result.steps:
        lines.extend(_render_step(step))
    for note in result.notes:
        lines.append(f"  note: {note}")
    local = sorted({i for i in (result.source_identity, result.destination_identity)
                    if i >= FIRST_LOCAL_IDENTITY})
    if local:
        numbers = " and ".join(str(i) for i in local)
        what = "identities" if len(local) > 1 else "identity"
        lines.append(f"  note: {what} {numbers} numbered for this trace only; the agent "
                     "numbers the same labels its own way (garrison identity list)")
    verdict = "ALLOWED" if result.allowed else "DENIED"
    where = f" at {result.denied_at.replace('_', '/')}" if result.denied_at else ""
    if result.allowed and result.l7_state == "not evaluated":
        where = " at L3/L4 (L7 not evaluated)"
    if result.audited_at:
        at = result.audited_at.replace("_", "/")
        where = f", recorded AUDIT (audited policies would deny it at {at})"
    lines.append(f"Final verdict: {verdict}{where}")
    return "\n".join(lines)


def _render_step(step: TraceStep) -> list[str]:
    side = "egress of source" if step.direction.value == "egress" else "ingress of destination"
    head = f"  {side} {step.endpoint}:"
    if step.lookup is None:
        return [f"{head} {step.note}"]
    out = []
    if step.enforced:
        by = ", ".join(r.policy for r in step.enforced_by) or "enforcement mode 'always'"
        out.append(f"{head} default-deny (enforced by {by})")
    elif step.lookup.passed or (step.lookup.entry and step.lookup.entry.action):
        out.append(f"{head} not enforced by the NetworkPolicy tier (none of its rules selects "
                   f"it with an {step.direction.value} section)")
    else:
        out.append(f"{head} not enforced (no rule selects it with an {step.direction.value} "
                   "section)")
    res = step.lookup
    for ref in res.passed:
        out.append(f"    Pass by {ref}: on to the next tier")
    tier = res.decided_by
    if res.entry is not None and res.entry.action is not None:
        verdict = "allowed" if res.allowed else "DENIED"
        rules = "; ".join(str(r) for r in res.refs)
        reason = "" if res.allowed else ", drop reason POLICY_DENY"
        out.append(f"    L3/L4 {verdict} in the {tier} tier by {res.entry.action.value} rule "
                   f"{rules} ({res.match_type.value} match: {res.key}{reason})")
    elif res.allowed:
        if res.refs:
            rules = "; ".join(str(r) for r in res.refs)
            out.append(f"    L3/L4 allowed by {rules} ({res.match_type.value} match: {res.key})")
        elif res.key is not None:  # an entry no policy rule wrote
            out.append("    L3/L4 allowed by allow-localhost: the local host reaches its "
                       "endpoints (--allow-localhost policy turns it off)")
        else:
            out.append("    L3/L4 allowed (no rule applies in an unenforced direction)")
        if res.redirect is not None:
            out.append(f"    redirected to the {res.redirect.value} proxy")
        if step.proxy_unreachable:
            out.append("    DROPPED: a connection from the host cannot reach the proxy at the "
                       "destination's ingress (drop reason "
                       "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL)")
    elif res.drop_reason is not None and res.drop_reason.value == "POLICY_DENY":
        rules = "; ".join(str(r) for r in res.refs)
        out.append(f"    L3/L4 DENIED by deny rule {rules} (drop reason POLICY_DENY)")
    else:
        out.append("    L3/L4 DENIED: no rule allows it in an enforced direction "
                   "(drop reason POLICY_DENIED)")
    if step.l7 is not None:
        if step.l7.allowed:
            who = str(step.l7.rule) if step.l7.rule else "allow-all L7 rules"
            out.append(f"    L7 allowed by {who}")
        else:
            out.append(f"    L7 DENIED: {step.l7.reason or 'no L7 rule matches'}")
    elif step.l7_protocol is not None:
        out.append("    L7 not evaluated")
    return out
