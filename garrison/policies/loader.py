"""Read policy files (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
ClusterNetworkPolicy) into the validated model, reporting every problem as
`PATH:LINE: field.path: reason`.

The YAML is composed, not constructed, so every value keeps its line; the model is built from
those nodes. All problems of all files are collected and raised together as one
`PolicyValidationError`: a policy set is applied whole or not at all.

Meanings pinned here where Cilium or Kubernetes leave a choice (docs/POLICY-SEMANTICS.md):
- A section element with no peers selects nothing unless it has a non-empty `toPorts` or
  `icmps` list (then it selects any peer). `ingress: [{}]` is Cilium's default-deny idiom.
- Fields of Cilium that garrison cannot enforce make that allow element select nothing (a
  warning), and are errors in deny sections, where ignoring them would allow more.
- A YAML null where a list or mapping is expected is an error, never "absent".
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import re2
from yaml.nodes import MappingNode, SequenceNode

from garrison.policies.errors import PolicyIssue, PolicyValidationError
from garrison.policies.l7rules import (
    GRPCRule,
    HeaderMatch,
    HTTPRule,
    KafkaRole,
    KafkaRule,
    L7Rules,
    MismatchAction,
    kafka_api_key,
    valid_kafka_topic,
)
from garrison.policies.labels import (
    DEFAULT_NAMESPACE,
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCE_RESERVED,
    split_source,
)
from garrison.policies.model import (
    CNP_MAX_PRIORITY,
    CNP_MAX_RULES,
    ICMP_TYPES,
    MAX_PORTS_PER_RULE,
    CIDRPeer,
    Direction,
    EndpointPeer,
    Entity,
    EntityPeer,
    ICMPField,
    IPNetwork,
    Peer,
    Policy,
    PolicySection,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
    Source,
    Tier,
    TierAction,
    port_name_problem,
)
from garrison.policies.refs import PolicyKind, RuleRef
from garrison.policies.selector import EndpointSelector, Operator, Requirement
from garrison.policies.yamlnodes import (
    TAG_INT,
    TAG_STR,
    At,
    Reporter,
    boolean,
    compose_documents,
    describe,
    integer,
    mapping,
    peek,
    raw_entries,
    scalar_kind,
    sequence,
    string,
    text,
)

POLICY_FILE_SUFFIXES = (".yaml", ".yml", ".json")

API_VERSIONS: dict[PolicyKind, str] = {
    PolicyKind.CNP: "cilium.io/v2",
    PolicyKind.CCNP: "cilium.io/v2",
    PolicyKind.KNP: "networking.k8s.io/v1",
    PolicyKind.CLUSTER: "policy.networking.k8s.io/v1alpha2",
}

# The garrison extensions dialect: a CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
# written with this apiVersion may use L7 deny rules and header value regex (docs/policy.md,
# "garrison extensions"); with cilium.io/v2 it keeps Cilium's meaning and validation exactly.
EXTENSION_API_VERSION = "garrison.io/v1"
EXTENSION_HINT = f"a garrison extension: write apiVersion: {EXTENSION_API_VERSION} to use it"

# `metadata.annotations: {garrison.io/audit: "true"}`: the policy is audited, not enforced
AUDIT_ANNOTATION = "garrison.io/audit"

NOT_SUPPORTED = "not supported by garrison"
FAIL_CLOSED = f"{NOT_SUPPORTED}; this element allows nothing"
DENY_NOT_ENFORCEABLE = f"{NOT_SUPPORTED}; garrison cannot enforce this deny rule"

# The usual Kubernetes object metadata: accepted, and all but name/namespace/labels ignored.
METADATA_FIELDS = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "generateName",
    "selfLink",
)
CILIUM_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "specs", "description", "status")
KNP_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
LIST_TOP_FIELDS = ("apiVersion", "kind", "metadata", "items")

RULE_FIELDS = (
    "endpointSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "description",
    "enableDefaultDeny",
)
SELECTOR_FIELDS = ("matchLabels", "matchExpressions")

# Cilium section fields garrison does not enforce. `auth` is the older spelling of
# `authentication` that Cilium's published examples still use.
INGRESS_UNSUPPORTED = ("fromGroups", "fromNodes", "fromRequires", "authentication", "auth")
EGRESS_UNSUPPORTED = (
    "toFQDNs",
    "toServices",
    "toGroups",
    "toNodes",
    "toRequires",
    "authentication",
    "auth",
)
# Of those, the ones that name peers (for the one-peer-kind-per-element check).
UNSUPPORTED_PEER_KINDS = frozenset(
    {"fromGroups", "fromNodes", "toFQDNs", "toServices", "toGroups", "toNodes"}
)
REQUIRES_FIELDS = frozenset({"fromRequires", "toRequires"})
TO_PORTS_UNSUPPORTED = ("terminatingTLS", "originatingTLS", "serverNames", "listener")
L7_TYPES = ("http", "kafka", "grpc")
L7_UNSUPPORTED = ("dns", "l7proto", "l7")

HTTP_FIELDS = ("method", "path", "host", "headers", "headerMatches")
HEADER_MATCH_FIELDS = ("name", "value", "mismatch", "regex")
KAFKA_FIELDS = ("role", "apiKey", "apiVersion", "clientID", "topic")
GRPC_FIELDS = ("service", "method")

PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ANY)
KNP_PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)

K8S_NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
DNS1123_LABEL = re.compile(_DNS_LABEL)
GRPC_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a set of policy files holds: the policies in file order, the warnings (fields
    accepted but not enforced), and the files that were read."""

    policies: tuple[Policy, ...]
    warnings: tuple[PolicyIssue, ...] = ()
    files: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_text(text_: str, path: str = "<string>") -> LoadResult:
    """Load the policies of one YAML (or JSON) text; raise PolicyValidationError on any error."""
    loaded, issues = _load_file_text(text_, path)
    issues += _duplicate_issues(loaded)
    return _result(loaded, issues, (path,))


def load_paths(paths: Sequence[str | Path]) -> LoadResult:
    """Load policy files and directories (every *.yaml, *.yml, *.json below, recursively,
    sorted; names starting with a dot are skipped, as Kubernetes volume mounts keep their
    internals there). Every issue of every file is reported together."""
    files, issues = policy_files(paths)
    loaded: list[_Loaded] = []
    for path in files:
        try:
            data = _read_regular_file(path)
        except OSError as exc:
            issues.append(PolicyIssue(path, 0, "", f"cannot read: {exc.strerror or exc}"))
            continue
        if data is None:  # a FIFO would block the reader (the agent) until someone writes
            issues.append(PolicyIssue(path, 0, "", "not a regular file (a FIFO, socket or "
                                      "device): policy files must be regular files"))
            continue
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            issues.append(PolicyIssue(path, line, "", "not valid UTF-8 text"))
            continue
        file_loaded, file_issues = _load_file_text(decoded, path)
        loaded += file_loaded
        issues += file_issues
    issues += _duplicate_issues(loaded)
    return _result(loaded, issues, tuple(files))


def _read_regular_file(path: str) -> bytes | None:
    """The bytes of `path`, None when it is not a regular file (opened without blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read()


def policy_files(paths: Sequence[str | Path]) -> tuple[list[str], list[PolicyIssue]]:
    """The files `paths` name, directories expanded; a file named twice is read once.

    Missing paths are issues; a directory without policy files is a warning.
    """
    files: list[str] = []
    issues: list[PolicyIssue] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)

    for given in paths:
        path = os.fspath(given)
        if os.path.isdir(path):
            found = _walk_policy_files(path)
            if not found:
                issues.append(
                    PolicyIssue(
                        path,
                        0,
                        "",
                        "no *.yaml, *.yml or *.json files in this directory",
                        warning=True,
                    )
                )
            for file in found:
                add(file)
        elif os.path.lexists(path):
            add(path)
        else:
            issues.append(PolicyIssue(path, 0, "", "no such file or directory"))
    return files, issues


def _walk_policy_files(directory: str) -> list[str]:
    found: list[str] = []
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith(POLICY_FILE_SUFFIXES):
                found.append(os.path.join(root, name))
    return sorted(found)


def _items(f: dict[str, At], name: str) -> list[At]:
    """The elements of list field `name`; none when it is absent or not a list (reported)."""
    if name not in f:
        return []
    return sequence(f[name]) or []


# ---------------------------------------------------------------------------------------------
# Files and documents


@dataclass(frozen=True, slots=True)
class _Loaded:
    policy: Policy
    name_at: tuple[str, int, str, int]  # path, line, field, document of metadata.name


def _result(loaded: list[_Loaded], issues: list[PolicyIssue], files: tuple[str, ...]) -> LoadResult:
    if any(not i.warning for i in issues):
        raise PolicyValidationError(issues)
    return LoadResult(
        policies=tuple(item.policy for item in loaded),
        warnings=tuple(issues),
        files=files,
    )


def _load_file_text(text_: str, path: str) -> tuple[list[_Loaded], list[PolicyIssue]]:
    rep = Reporter(path)
    loaded: list[_Loaded] = []
    for doc in compose_documents(text_, rep):
        rep.document = doc.index
        loaded += _document(At.root(doc.node, rep), None)
    issues = sorted(rep.issues, key=lambda i: (i.document, i.line))
    return loaded, issues


def _duplicate_issues(loaded: list[_Loaded]) -> list[PolicyIssue]:
    first: dict[tuple[str, str | None, str], tuple[str, int]] = {}
    issues: list[PolicyIssue] = []
    for item in loaded:
        key = item.policy.key
        path, line, field_path, document = item.name_at
        if key in first:
            where = first[key]
            issues.append(
                PolicyIssue(
                    path,
                    line,
                    field_path,
                    f"duplicate policy {_policy_title(item.policy)} "
                    f"(also defined at {where[0]}:{where[1]})",
                    document,
                )
            )
        else:
            first[key] = (path, line)
    return issues


def _policy_title(policy: Policy) -> str:
    where = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
    return f"{policy.kind.value} {where}"


def _document(at: At, list_kind: PolicyKind | None) -> list[_Loaded]:
    """One document (or List item): a policy, or a List of them."""
    if not isinstance(at.node, MappingNode):
        at.error(f"a policy document must be a mapping, not {describe(at.node)}")
        return []
    kind_at = peek(at, "kind")
    version_at = peek(at, "apiVersion")
    kind_text = string(kind_at) if kind_at is not None else None
    if kind_at is None:
        if list_kind is None:
            at.missing("kind")
            return []
        kind_text = list_kind.value
    if kind_text is None:
        return []
    if kind_text == "List" or kind_text.endswith("List"):
        return _list_document(at, kind_text, kind_at)
    try:
        kind = PolicyKind(kind_text)
    except ValueError:
        assert kind_at is not None
        expected = ", ".join(sorted([*(k.value for k in PolicyKind), "List"]))
        kind_at.error(f"unknown kind '{kind_text}' (expected one of: {expected})")
        return []
    expected_version = API_VERSIONS[kind]
    extensions = False
    if version_at is None:
        if list_kind is None:
            at.missing("apiVersion")
    else:
        version = string(version_at)
        if version == EXTENSION_API_VERSION and kind in (PolicyKind.CNP, PolicyKind.CCNP):
            extensions = True
        elif version is not None and version != expected_version:
            version_at.error(
                f"apiVersion '{version}' does not match kind {kind.value} "
                f"(expected {expected_version})"
            )
    top = KNP_TOP_FIELDS if kind in (PolicyKind.KNP, PolicyKind.CLUSTER) else CILIUM_TOP_FIELDS
    fields = mapping(at, top)
    if fields is None:
        return []
    meta = _metadata(at, fields, kind)
    if kind is PolicyKind.KNP:
        policy = _network_policy(at, fields, meta)
    elif kind is PolicyKind.CLUSTER:
        policy = _cluster_network_policy(at, fields, meta)
    else:
        policy = _cilium_policy(at, fields, kind, meta, extensions)
    if policy is None or meta.name_at is None:
        return []
    name_at = meta.name_at
    return [_Loaded(policy, (at.rep.path, name_at.line, name_at.field, at.rep.document))]


def _list_document(at: At, kind_text: str, kind_at: At | None) -> list[_Loaded]:
    fields = mapping(at, LIST_TOP_FIELDS, required=("items",))
    if fields is None or "items" not in fields:
        return []
    item_kind: PolicyKind | None = None
    prefix = kind_text.removesuffix("List")
    if prefix:
        try:
            item_kind = PolicyKind(prefix)
        except ValueError:
            assert kind_at is not None
            expected = ", ".join(sorted(f"{k.value}List" for k in PolicyKind))
            kind_at.error(f"unknown kind '{kind_text}' (expected List or one of: {expected})")
            return []
    items = sequence(fields["items"])
    loaded: list[_Loaded] = []
    for item in items or ():
        loaded += _document(item, item_kind)
    return loaded


@dataclass(slots=True)
class _Meta:
    name: str = "<invalid>"
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    name_at: At | None = None
    audit: bool = False  # the garrison.io/audit annotation


def _metadata(doc: At, fields: dict[str, At], kind: PolicyKind) -> _Meta:
    meta = _Meta()
    if "metadata" not in fields:
        doc.missing("metadata")
        return meta
    m = mapping(fields["metadata"], METADATA_FIELDS, required=("name",))
    if m is None:
        return meta
    if "name" in m:
        name = string(m["name"])
        if name is not None:
            if len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
                m["name"].error(
                    f"invalid name '{name}' (lower-case letters, digits, '-' and '.', "
                    "starting and ending with a letter or digit, at most 253 characters)"
                )
            else:
                meta.name = name
                meta.name_at = m["name"]
    namespace: str | None = DEFAULT_NAMESPACE
    if "namespace" in m:
        ns = string(m["namespace"])
        if ns is not None and (len(ns) > 63 or not DNS1123_LABEL.fullmatch(ns)):
            m["namespace"].error(
                f"invalid namespace '{ns}' (lower-case letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters)"
            )
        elif ns is not None:
            namespace = ns
        if kind in (PolicyKind.CCNP, PolicyKind.CLUSTER):
            m["namespace"].warn_key(f"ignored: a {kind.value} is not namespaced")
    meta.namespace = None if kind in (PolicyKind.CCNP, PolicyKind.CLUSTER) else namespace
    if "labels" in m:
        pairs = []
        for key, value_at in raw_entries(m["labels"]):
            value = text(value_at)
            if value is not None:
                pairs.append((key, value))
        meta.labels = tuple(sorted(pairs))
    if "annotations" in m:
        for key, value_at in raw_entries(m["annotations"]):
            if key != AUDIT_ANNOTATION:
                continue
            value = text(value_at)
            if value in ("true", "false"):
                meta.audit = value == "true"
            elif value is not None:
                value_at.error(f'{AUDIT_ANNOTATION} must be "true" or "false", not {value!r}')
    return meta


# ---------------------------------------------------------------------------------------------
# CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy


@dataclass(slots=True)
class _PolicyCtx:
    kind: PolicyKind
    name: str
    namespace: str | None
    # (direction, port) -> (L7 type, line) for the one-L7-type-per-port check.
    # apiVersion garrison.io/v1: the garrison extensions are allowed
    extensions: bool = False
    l7_ports: dict[tuple[Direction, int | str], tuple[str, int]] = field(default_factory=dict)

    def ref(self, section: str, spec_index: int, rule_index: int, has_specs: bool) -> RuleRef:
        return RuleRef(
            self.kind, self.namespace, self.name, section, spec_index, rule_index, has_specs
        )


def _cilium_policy(
    doc: At, fields: dict[str, At], kind: PolicyKind, meta: _Meta, extensions: bool = False
) -> Policy | None:
    ctx = _PolicyCtx(kind, meta.name, meta.namespace, extensions)
    description = text(fields["description"]) if "description" in fields else None
    specs: list[tuple[At, int, bool]] = []
    if "spec" in fields:
        specs.append((fields["spec"], 0, False))
    if "specs" in fields:
        items = sequence(fields["specs"])
        if items is not None and not items and "spec" not in fields:
            fields["specs"].error("a policy needs at least one rule")
        specs += [(item, i, True) for i, item in enumerate(items or ())]
    if "spec" not in fields and "specs" not in fields:
        doc.missing("spec")
    rules = []
    for at, index, has_specs in specs:
        rule = _cilium_rule(ctx, at, index, has_specs, description or "")
        if rule is not None:
            rules.append(rule)
    if len(rules) != len(specs) or not rules:
        return None
    return Policy(
        kind=kind,
        name=meta.name,
        namespace=meta.namespace,
        rules=tuple(rules),
        source=Source(doc.rep.path, doc.rep.document, doc.line),
        labels=meta.labels,
        audit=meta.audit,
    )


_SECTIONS: tuple[tuple[str, Direction, bool], ...] = (
    ("ingress", Direction.INGRESS, False),
    ("ingressDeny", Direction.INGRESS, True),
    ("egress", Direction.EGRESS, False),
    ("egressDeny", Direction.EGRESS, True),
)


def _cilium_rule(
    ctx: _PolicyCtx, at: At, spec_index: int, has_specs: bool, description: str
) -> Rule | None:
    f = mapping(at, RULE_FIELDS, also_known=("nodeSelector",))
    if f is None:
        return None
    errors_before = at.rep.error_count()
    selector: EndpointSelector | None = None
    if "nodeSelector" in f:
        f["nodeSelector"].key_error(f"{NOT_SUPPORTED} (host policies)")
    elif "endpointSelector" not in f:
        at.missing("endpointSelector")
    else:
        selector = _cilium_selector(f["endpointSelector"], own_namespace=ctx.namespace)
        if selector is not None and any(
            r.key == "host" and r.source == SOURCE_RESERVED
            and r.operator in (Operator.IN, Operator.EXISTS)
            for r in selector.requirements
        ):
            # Cilium's host policy: it would load here as a rule that enforces nothing
            f["endpointSelector"].key_error(
                f"selects the host (reserved:host): {NOT_SUPPORTED} (host policies; garrison "
                "enforces policy on endpoints only)"
            )
            selector = None
    if selector is not None and ctx.namespace is not None and not any(
        r.key == "init" and r.source == SOURCE_RESERVED for r in selector.requirements
    ):
        # Cilium adds no namespace to a selector of initializing endpoints (reserved:init):
        # they have no labels yet, the namespace label included
        selector = selector.with_requirement(
            Requirement(NAMESPACE_KEY, Operator.IN, (ctx.namespace,), SOURCE_K8S)
        )
    sections: dict[str, tuple[PolicySection, ...] | None] = {}
    for name, direction, deny in _SECTIONS:
        sections[name] = None
        if name in f:
            items = sequence(f[name])
            built = [
                _cilium_section(ctx, item, name, direction, deny, spec_index, i, has_specs)
                for i, item in enumerate(items or ())
            ]
            # Cilium: "if omitted or empty, this rule does not apply at ingress" (or egress):
            # an empty list is absent and switches nothing to default deny
            sections[name] = tuple(s for s in built if s is not None) or None
    default_deny = {"ingress": True, "egress": True}
    if "enableDefaultDeny" in f:
        dd = mapping(f["enableDefaultDeny"], ("ingress", "egress"))
        for key, value_at in (dd or {}).items():
            value = boolean(value_at)
            if value is not None:
                default_deny[key] = value
    if "labels" in f:
        _rule_labels(f["labels"])
    if "description" in f:
        description = text(f["description"]) or ""
    if selector is None or at.rep.error_count() != errors_before:
        return None
    return Rule(
        endpoint_selector=selector,
        ingress=sections["ingress"],
        ingress_deny=sections["ingressDeny"],
        egress=sections["egress"],
        egress_deny=sections["egressDeny"],
        default_deny_ingress=default_deny["ingress"],
        default_deny_egress=default_deny["egress"],
        description=description,
        namespace=ctx.namespace,
    )


def _rule_labels(at: At) -> None:
    """`labels: [{key, value, source}]` on a rule: validated, not used by enforcement."""
    for item in sequence(at) or ():
        f = mapping(item, ("key", "value", "source"), required=("key",))
        for value_at in (f or {}).values():
            string(value_at)


def _cilium_section(
    ctx: _PolicyCtx,
    at: At,
    section: str,
    direction: Direction,
    deny: bool,
    spec_index: int,
    rule_index: int,
    has_specs: bool,
) -> PolicySection | None:
    ingress = direction is Direction.INGRESS
    prefix = "from" if ingress else "to"
    endpoints, entities, cidr, cidr_set = (
        f"{prefix}Endpoints",
        f"{prefix}Entities",
        f"{prefix}CIDR",
        f"{prefix}CIDRSet",
    )
    unsupported = INGRESS_UNSUPPORTED if ingress else EGRESS_UNSUPPORTED
    peer_fields = (endpoints, entities, cidr, cidr_set)
    f = mapping(at, (*peer_fields, "toPorts", "icmps"), also_known=unsupported)
    if f is None:
        return None
    fail_closed = False
    for name in unsupported:
        # fromRequires / toRequires are enforced (they narrow the endpoint peers of the
        # allow, or deny, sections of the rules selecting the endpoint)
        if name in f and name not in REQUIRES_FIELDS:
            if deny:
                f[name].key_error(DENY_NOT_ENFORCEABLE)
            else:
                f[name].warn_key(FAIL_CLOSED)
                fail_closed = True
    kinds = [n for n in f if n in peer_fields or n in UNSUPPORTED_PEER_KINDS]
    if len(kinds) > 1:
        f[kinds[1]].key_error(f"one peer kind per rule element: {', '.join(kinds)}")

    peers: list[Peer] = []
    has_peers = False
    if endpoints in f:
        has_peers = True
        for item in sequence(f[endpoints]) or ():
            sel = _cilium_selector(item)
            if sel is not None:
                peers.append(EndpointPeer(_limit_peer(ctx, sel)))
    if entities in f:
        has_peers = True
        peers += [EntityPeer(e) for e in _entities(f[entities])]
    if cidr in f:
        has_peers = True
        for item in sequence(f[cidr]) or ():
            net = _cidr(item)
            if net is not None:
                peers.append(CIDRPeer(net))
    if cidr_set in f:
        has_peers = True
        peers += _cidr_set(f[cidr_set])

    requires: list[EndpointSelector] = []
    for name in REQUIRES_FIELDS:
        if name in f:
            for item in sequence(f[name]) or ():
                sel = _cilium_selector(item)
                if sel is not None:
                    requires.append(_limit_peer(ctx, sel))

    to_ports: tuple[PortRule, ...] = ()
    if "toPorts" in f:
        to_ports, ports_fail_closed = _port_rules(ctx, f["toPorts"], direction, deny)
        fail_closed = fail_closed or ports_fail_closed
    icmps: tuple[ICMPField, ...] = ()
    if "icmps" in f:
        icmps = _icmps(f["icmps"])
        if "toPorts" in f:
            f["icmps"].key_error("icmps and toPorts cannot be combined in one rule element")

    final_peers: tuple[Peer, ...] | None
    if fail_closed:
        final_peers = ()
    elif has_peers:
        final_peers = tuple(peers)
    elif to_ports or icmps:
        final_peers = None
    else:
        final_peers = ()
    return PolicySection(
        peers=final_peers,
        to_ports=to_ports,
        icmps=icmps,
        ref=ctx.ref(section, spec_index, rule_index, has_specs),
        requires=tuple(requires),
    )


def _limit_peer(ctx: _PolicyCtx, selector: EndpointSelector) -> EndpointSelector:
    """A namespaced policy's peers are endpoints of its namespace unless the selector names
    the namespace label or a reserved identity; a clusterwide policy's are not limited."""
    if ctx.namespace is None or selector.names_reserved():
        return selector
    return selector.in_namespace(ctx.namespace)


def _entities(at: At) -> list[Entity]:
    out = []
    for item in sequence(at) or ():
        name = string(item)
        if name is None:
            continue
        try:
            out.append(Entity(name))
        except ValueError:
            valid = ", ".join(e.value for e in Entity)
            item.error(f"unknown entity '{name}' (expected one of: {valid})")
    return out


def _cidr(at: At) -> IPNetwork | None:
    value = string(at)
    if value is None:
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        at.error(f"invalid CIDR '{value}'")
        return None
    at.error(f"CIDR '{value}' has host bits set (did you mean {loose}?)")
    return None


def _cidr_set(at: At) -> list[Peer]:
    out: list[Peer] = []
    for item in sequence(at) or ():
        f = mapping(item, ("cidr", "except"), also_known=("cidrGroupRef", "cidrGroupSelector"))
        if f is None:
            continue
        group = [n for n in ("cidrGroupRef", "cidrGroupSelector") if n in f]
        for name in group:
            f[name].key_error(NOT_SUPPORTED)
        if "cidr" not in f:
            if not group:
                item.missing("cidr")
            continue
        net = _cidr(f["cidr"])
        excepts: list[IPNetwork] = []
        for ex_at in _items(f, "except"):
            ex = _cidr(ex_at)
            if ex is None or net is None:
                continue
            if ex.version != net.version or not ex.subnet_of(net):  # type: ignore[arg-type]
                ex_at.error(f"except {ex} is not inside {net}")
                continue
            excepts.append(ex)
        if net is not None:
            out.append(CIDRPeer(net, tuple(excepts)))
    return out


def _icmps(at: At) -> tuple[ICMPField, ...]:
    out: list[ICMPField] = []
    for item in sequence(at) or ():
        f = mapping(item, ("fields",), required=("fields",))
        if f is None or "fields" not in f:
            continue
        fields = sequence(f["fields"])
        if fields is not None and not fields:
            f["fields"].error("needs at least one ICMP field")
        for field_at in fields or ():
            icmp = _icmp_field(field_at)
            if icmp is not None:
                out.append(icmp)
    return tuple(out)


def _icmp_field(at: At) -> ICMPField | None:
    f = mapping(at, ("type", "family"), required=("type",))
    if f is None or "type" not in f:
        return None
    family = "IPv4"
    if "family" in f:
        written = string(f["family"])
        if written is None:
            return None
        if written not in ICMP_TYPES:
            f["family"].error(f"unknown family '{written}' (expected one of: IPv4, IPv6)")
            return None
        family = written
    type_at = f["type"]
    if scalar_kind(type_at) == TAG_INT:
        number = integer(type_at)
        if number is None:
            return None
        if not 0 <= number <= 255:
            type_at.error(f"ICMP type {number} out of range 0-255")
            return None
        return ICMPField(family=family, type=number)
    name = string(type_at)
    if name is None:
        return None
    if name.isdigit() and int(name) <= 255:
        return ICMPField(family=family, type=int(name))
    names = ICMP_TYPES[family]
    if name not in names:
        type_at.error(
            f"unknown {family} ICMP type '{name}' (a number 0-255 or one of: {', '.join(names)})"
        )
        return None
    return ICMPField(family=family, type=names[name])


# ---------------------------------------------------------------------------------------------
# toPorts and L7 rules


@dataclass(frozen=True, slots=True)
class _Port:
    value: PortProtocol
    at: At
    fields: dict[str, At]


def _port_rules(
    ctx: _PolicyCtx, at: At, direction: Direction, deny: bool
) -> tuple[tuple[PortRule, ...], bool]:
    """The `toPorts` list, and whether an unsupported field makes the element allow nothing."""
    rules: list[PortRule] = []
    fail_closed = False
    for item in sequence(at) or ():
        f = mapping(item, ("ports", "rules"), also_known=TO_PORTS_UNSUPPORTED)
        if f is None:
            continue
        errors = item.rep.error_count()
        for name in TO_PORTS_UNSUPPORTED:
            if name in f:
                if deny:
                    f[name].key_error(DENY_NOT_ENFORCEABLE)
                else:
                    f[name].warn_key(FAIL_CLOSED)
                    fail_closed = True
        ports, ports_complete = _ports(f["ports"]) if "ports" in f else ([], True)
        l7: _L7 | None = None
        if "rules" in f:
            if deny and not ctx.extensions:
                f["rules"].key_error(
                    f"L7 rules are not allowed in deny sections ({EXTENSION_HINT})"
                )
            else:
                dialect = _Dialect(ctx.extensions, deny)
                l7, l7_unsupported = _l7_rules(f["rules"], direction, dialect)
                if deny and l7_unsupported:
                    f["rules"].key_error(DENY_NOT_ENFORCEABLE)
                fail_closed = fail_closed or l7_unsupported
        # Ports that failed to parse are already reported; L7 checks the rest.
        if l7 is not None and (ports or ports_complete):
            ports = _l7_ports(ctx, item, f, ports, l7, direction)
        elif l7 is None and not ports and ports_complete and item.rep.error_count() == errors:
            # Cilium merges an entry port by port, and a non-empty toPorts is no L3-only
            # rule: the entry allows (or denies) nothing. Reading it as "every port" was wider.
            f.get("ports", item).error(
                "a toPorts entry without ports selects no port (as in Cilium): list its ports "
                "(a port without number means every port), or leave toPorts out for every port"
            )
        rules.append(PortRule(ports=tuple(p.value for p in ports), rules=l7.rules if l7 else None))
    return tuple(rules), fail_closed


def _ports(at: At) -> tuple[list[_Port], bool]:
    """The ports of a `ports` list, and whether every one of them was valid."""
    items = sequence(at)
    if items is None:
        return [], False
    if len(items) > MAX_PORTS_PER_RULE:
        at.key_error(f"at most {MAX_PORTS_PER_RULE} ports per rule (got {len(items)})")
    out = []
    for item in items:
        port = _port_protocol(item, PORT_PROTOCOLS, Protocol.ANY)
        if port is not None:
            out.append(port)
    return out, len(out) == len(items)


def _port_protocol(at: At, protocols: tuple[Protocol, ...], default: Protocol) -> _Port | None:
    f = mapping(at, ("port", "endPort", "protocol"))
    if f is None:
        return None
    port = 0
    name = ""
    if "port" in f:
        named = _port_name(f["port"])
        parsed = _port_number(f["port"]) if named is None else 0
        ok = parsed is not None and named != ""
        port = parsed or 0
        name = named or ""
    else:
        ok = True
    end_port = 0
    if "endPort" in f:
        parsed = _port_number(f["endPort"])
        if parsed is None or not ok:
            ok = False
        elif name:
            f["endPort"].key_error(f"endPort needs a numeric port, not the named port '{name}'")
            ok = False
        elif parsed and port == 0:
            f["endPort"].error("endPort needs a non-zero port")
            ok = False
        elif parsed and parsed < port:
            f["endPort"].error(f"endPort {parsed} is below port {port}")
            ok = False
        elif parsed != port:
            end_port = parsed
    protocol = default
    if "protocol" in f:
        written = string(f["protocol"])
        canonical = {p.value.upper(): p for p in protocols}
        if written is None:
            ok = False
        elif written.upper() not in canonical:
            valid = ", ".join(p.value for p in protocols)
            f["protocol"].error(f"unknown protocol '{written}' (expected one of: {valid})")
            ok = False
        else:
            protocol = canonical[written.upper()]
    if not ok:
        return None
    return _Port(PortProtocol(port, end_port, protocol, name), at, f)


def _port_name(at: At) -> str | None:
    """A named port (`port: http`): its name; "" for an invalid name (reported); None when
    the value is not a name (a number, quoted or not, or not a string at all)."""
    if scalar_kind(at) != TAG_STR:
        return None
    written = str(at.node.value).strip()
    if not written or re.fullmatch(r"-?[0-9]+", written):
        return None
    problem = port_name_problem(written)
    if problem is not None:
        at.error(f"invalid port '{written}': neither a number 0-65535 nor a port name "
                 f"({problem})")
        return ""
    return written


def _port_number(at: At) -> int | None:
    kind = scalar_kind(at)
    if kind == TAG_INT:
        number = integer(at)
    elif kind == TAG_STR:
        written = str(at.node.value).strip()
        if not re.fullmatch(r"-?[0-9]+", written):
            at.error(f"invalid port '{written}' (expected a number 0-65535)")
            return None
        number = int(written)
    else:
        integer(at)
        return None
    if number is None:
        return None
    if not 0 <= number <= 65535:
        at.error(f"port {number} out of range 0-65535")
        return None
    return number


def _l7_ports(
    ctx: _PolicyCtx,
    element: At,
    f: dict[str, At],
    ports: list[_Port],
    l7: _L7,
    direction: Direction,
) -> list[_Port]:
    """L7 rules apply to single TCP ports: check each, turn ANY into TCP, and record the port
    so another element of the policy cannot give it a different L7 type."""
    if not ports:
        f.get("ports", element).key_error("L7 rules need a specific TCP port")
        return ports
    out = []
    for p in ports:
        pp = p.value
        if pp.port == 0 and not pp.name:
            port_at = p.fields.get("port")
            if port_at is not None:
                port_at.error("L7 rules need a specific TCP port (port 0 means any port)")
            else:
                p.at.error("L7 rules need a specific TCP port")
            continue
        if pp.end_port:
            p.fields["endPort"].key_error("L7 rules on a port range are not supported")
            continue
        if pp.protocol not in (Protocol.TCP, Protocol.ANY):
            p.fields["protocol"].error(f"L7 rules need protocol TCP, not {pp.protocol.value}")
            continue
        out.append(_Port(PortProtocol(pp.port, 0, Protocol.TCP, pp.name), p.at, p.fields))
        key = (direction, pp.name or pp.port)
        if key not in ctx.l7_ports:
            ctx.l7_ports[key] = (l7.name, l7.at.key_line)
            continue
        other, line = ctx.l7_ports[key]
        if other != l7.name:
            l7.at.key_error(
                f"port {pp.name or pp.port}/TCP has {other} rules at line {line}; one L7 type "
                "per port"
            )
    return out


@dataclass(frozen=True, slots=True)
class _L7:
    """A validated `rules` mapping: its one L7 type, where that type's key is, the rules."""

    name: str
    at: At
    rules: L7Rules


def _l7_group(name: str) -> str:
    return "l7proto/l7" if name in ("l7proto", "l7") else name


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What the L7 rules being read may use: the garrison extensions, and whether they are
    deny rules (no header mismatch actions there)."""

    extensions: bool = False
    deny: bool = False


def _l7_rules(at: At, direction: Direction, dialect: _Dialect) -> tuple[_L7 | None, bool]:
    """`rules`: exactly one L7 type. Returns the rules and whether an unsupported type makes
    the element allow nothing. DNS rules on ingress are an error, as Cilium's validation
    says ("DNS rules are not allowed on ingress")."""
    f = mapping(at, L7_TYPES, also_known=L7_UNSUPPORTED)
    if f is None:
        return None, False
    groups: dict[str, At] = {}
    for name, value_at in f.items():
        groups.setdefault(_l7_group(name), value_at)
    if not groups:
        at.key_error("rules need one of: http, kafka, grpc")
        return None, False
    unsupported = [n for n in f if n in L7_UNSUPPORTED]
    if len(groups) > 1:
        list(groups.values())[1].key_error(f"one L7 type per port: {', '.join(groups)}")
    else:
        for name in unsupported:
            if name == "dns" and direction is Direction.INGRESS:
                f[name].key_error(
                    "DNS rules are not allowed on ingress (as in Cilium): they belong in an "
                    "egress section"
                )
            else:
                f[name].warn_key(FAIL_CLOSED)
    # Rules of every supported type are read, so their own problems are reported too.
    parsed = [
        _L7(name, type_at, _typed_l7_rules(name, type_at, dialect))
        for name, type_at in f.items()
        if name in L7_TYPES
    ]
    if len(groups) > 1 or unsupported:
        return None, bool(unsupported)
    return parsed[0], False


def _typed_l7_rules(name: str, at: At, dialect: _Dialect) -> L7Rules:
    items = sequence(at)
    if items is not None and not items:
        at.error(f"needs at least one rule (write [{{}}] to allow all {name})")
    if name == "http":
        http = [_http_rule(item, dialect) for item in items or ()]
        return L7Rules(http=tuple(r for r in http if r is not None))
    if name == "kafka":
        kafka = [_kafka_rule(item) for item in items or ()]
        return L7Rules(kafka=tuple(r for r in kafka if r is not None))
    grpc = [_grpc_rule(item) for item in items or ()]
    return L7Rules(grpc=tuple(r for r in grpc if r is not None))


def _regex(at: At) -> str | None:
    pattern = string(at)
    if pattern is None:
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        message = exc.args[0] if exc.args else exc
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        at.error(f"invalid regular expression: {message}")
        return None
    return pattern


def _http_rule(at: At, dialect: _Dialect) -> HTTPRule | None:
    f = mapping(at, HTTP_FIELDS)
    if f is None:
        return None
    errors_before = at.rep.error_count()
    method = _regex(f["method"]) if "method" in f else None
    path = _regex(f["path"]) if "path" in f else None
    host = _regex(f["host"]) if "host" in f else None
    headers: list[str] = []
    for item in _items(f, "headers"):
        header = string(item)
        if header is None:
            continue
        name, sep, value = header.partition(":")
        if not HTTP_TOKEN.fullmatch(name.strip()):
            item.error(f"invalid header '{header}' (expected 'Name' or 'Name: value')")
            continue
        headers.append(f"{name.strip()}: {value.strip()}" if sep else name.strip())
    matches: list[HeaderMatch] = []
    for item in _items(f, "headerMatches"):
        match = _header_match(item, dialect)
        if isinstance(match, str):
            headers.append(match)  # presence only
        elif match is not None:
            matches.append(match)
    if at.rep.error_count() != errors_before:
        return None
    return HTTPRule(
        method=method, path=path, host=host, headers=tuple(headers), header_matches=tuple(matches)
    )


def _header_match(at: At, dialect: _Dialect) -> HeaderMatch | str | None:
    """The match, or the header's name alone where only its presence is asked: Cilium's
    HeaderMatch with no value (absent or empty) and no mismatch action."""
    f = mapping(at, HEADER_MATCH_FIELDS, also_known=("secret",), required=("name",))
    if f is None:
        return None
    regex: str | None = None
    if "regex" in f:
        if not dialect.extensions:
            f["regex"].key_error(f"headerMatches regex is {EXTENSION_HINT}")
            return None
        if "value" in f:
            f["regex"].key_error("give either value or regex, not both")
            return None
        if "mismatch" in f:
            f["mismatch"].key_error("mismatch needs a value, not a regex")
            return None
        regex = _regex(f["regex"])
        name = string(f["name"]) if "name" in f else None
        if name is not None and not HTTP_TOKEN.fullmatch(name):
            f["name"].error(f"invalid header name '{name}'")
            return None
        if regex is None or name is None or "secret" in f:
            if "secret" in f:
                f["secret"].key_error(NOT_SUPPORTED)
            return None
        return HeaderMatch(name=name, value="", regex=regex)
    acts = "mismatch" in f and scalar_kind(f["mismatch"]) == TAG_STR and bool(
        f["mismatch"].node.value
    )
    if "value" not in f and acts:
        at.rep.error(
            at.key_line, at.path_of("value"),
            "missing required field (a mismatch action needs a value)",
        )
        return None
    if dialect.deny and "mismatch" in f:
        f["mismatch"].key_error("mismatch actions are not allowed in deny rules")
        return None
    if "secret" in f:
        f["secret"].key_error(NOT_SUPPORTED)
    name = string(f["name"]) if "name" in f else None
    if name is not None and not HTTP_TOKEN.fullmatch(name):
        f["name"].error(f"invalid header name '{name}'")
        name = None
    value = string(f["value"]) if "value" in f else ""
    mismatch: MismatchAction | None = None
    if "mismatch" in f:
        written = string(f["mismatch"])
        if written is None:
            return None
        if written:
            try:
                mismatch = MismatchAction(written.upper())
            except ValueError:
                valid = ", ".join(a.value for a in MismatchAction)
                f["mismatch"].error(
                    f"unknown mismatch action '{written}' (expected \"\" or one of: {valid})"
                )
                return None
    if name is None or value is None or "secret" in f:
        return None
    if mismatch in _EDITS:
        if name.lower() in _UNEDITABLE_FIELDS:
            # The proxy refuses such an edit on every request (HTTP/1.1: the message would be
            # framed otherwise than validated; HTTP/2: connection-specific, or a host field
            # contradicting :authority): a rule that can only fail is an error now.
            f["name"].error(
                f"{mismatch.value} cannot edit '{name}': it frames or routes the request, "
                "and the proxy forwards it as the client sent it"
            )
            return None
        if mismatch is not MismatchAction.DELETE and _FIELD_VALUE_CTL.search(value):
            f["value"].error(
                "a header field value cannot hold control characters (CR, LF, NUL, DEL, ...)"
            )
            return None
    if not value and mismatch is None:
        return name
    return HeaderMatch(name=name, value=value, mismatch=mismatch)


_EDITS = (MismatchAction.ADD, MismatchAction.REPLACE, MismatchAction.DELETE)
# Fields a header edit must never touch: framing (HTTP/1.1) and connection-specific (HTTP/2).
_UNEDITABLE_FIELDS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
    }
)
_FIELD_VALUE_CTL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5: HTAB is allowed


def _kafka_rule(at: At) -> KafkaRule | None:
    f = mapping(at, KAFKA_FIELDS)
    if f is None:
        return None
    # Cilium's kafka.PortRule: each field "if omitted or empty" matches every request
    f = {k: v for k, v in f.items() if not (scalar_kind(v) == TAG_STR and v.node.value == "")}
    ok = True
    role: KafkaRole | None = None
    if "role" in f:
        written = string(f["role"])
        try:
            role = KafkaRole((written or "").lower())
        except ValueError:
            if written is not None:
                f["role"].error(f"unknown Kafka role '{written}' (expected produce or consume)")
            ok = False
    api_key: int | None = None
    if "apiKey" in f:
        if "role" in f:
            f["apiKey"].key_error("role and apiKey cannot be combined in one Kafka rule")
            ok = False
        key_at = f["apiKey"]
        key = integer(key_at) if scalar_kind(key_at) == TAG_INT else string(key_at)
        api_key = kafka_api_key(key) if key is not None else None
        if key is not None and api_key is None:
            key_at.error(
                f"unknown Kafka apiKey '{key}' (a name such as produce, fetch, metadata, "
                "apiversions, or a number 0-32767)"
            )
        ok = ok and api_key is not None
    api_version: int | None = None
    if "apiVersion" in f:
        v_at = f["apiVersion"]
        if scalar_kind(v_at) == TAG_INT:
            api_version = integer(v_at)
        else:
            written = string(v_at)
            if written is not None and written.strip().isdigit():
                api_version = int(written)
            elif written is not None:
                v_at.error(f"invalid Kafka apiVersion '{written}' (expected a number >= 0)")
        if api_version is not None and not 0 <= api_version <= 32767:
            v_at.error(f"invalid Kafka apiVersion {api_version} (expected a number >= 0)")
            api_version = None
        ok = ok and api_version is not None
    client_id = string(f["clientID"]) if "clientID" in f else None
    if "clientID" in f and client_id is None:
        ok = False
    topic: str | None = None
    if "topic" in f:
        topic = string(f["topic"])
        if topic is not None and not valid_kafka_topic(topic):
            f["topic"].error(
                f"invalid Kafka topic '{topic}' (1-255 characters of a-z A-Z 0-9 . _ -)"
            )
            topic = None
        ok = ok and topic is not None
    if not ok:
        return None
    return KafkaRule(
        role=role, api_key=api_key, api_version=api_version, client_id=client_id, topic=topic
    )


def _grpc_rule(at: At) -> GRPCRule | None:
    f = mapping(at, GRPC_FIELDS, required=("service",))
    if f is None or "service" not in f:
        return None
    service = string(f["service"])
    if service is not None and not GRPC_SERVICE.fullmatch(service):
        f["service"].error(f"invalid gRPC service '{service}' (expected package.Service)")
        service = None
    method: str | None = None
    if "method" in f:
        method = string(f["method"])
        if method is not None and not GRPC_METHOD.fullmatch(method):
            f["method"].error(f"invalid gRPC method '{method}' (expected a name like GetFeature)")
            return None
        if method is None:
            return None
    if service is None:
        return None
    return GRPCRule(service=service, method=method)


# ---------------------------------------------------------------------------------------------
# Label selectors


@dataclass(frozen=True, slots=True)
class _Term:
    """One selector condition as written: matchLabels entries become `In` with one value."""

    key: str
    operator: Operator
    values: tuple[str, ...]
    at: At
    match_label: bool = False  # written in matchLabels


def _selector_terms(at: At) -> list[_Term] | None:
    f = mapping(at, SELECTOR_FIELDS)
    if f is None:
        return None
    errors_before = at.rep.error_count()
    terms: list[_Term] = []
    if "matchLabels" in f:
        for key, value_at in raw_entries(f["matchLabels"]):
            value = text(value_at)
            if _label_key_ok(key, value_at) and value is not None:
                terms.append(_Term(key, Operator.IN, (value,), value_at, match_label=True))
    if "matchExpressions" in f:
        for item in sequence(f["matchExpressions"]) or ():
            term = _expression(item)
            if term is not None:
                terms.append(term)
    return terms if at.rep.error_count() == errors_before else None


def _label_key_ok(key: str, at: At) -> bool:
    _, bare = split_source(key, SOURCE_ANY)
    if not bare or any(c.isspace() for c in key):
        at.key_error(f"invalid label key '{key}'")
        return False
    return True


def _expression(at: At) -> _Term | None:
    f = mapping(at, ("key", "operator", "values"), required=("key", "operator"))
    if f is None or "key" not in f or "operator" not in f:
        return None
    key = string(f["key"])
    if key is not None and not _label_key_ok(key, f["key"]):
        key = None
    written = string(f["operator"])
    operator: Operator | None = None
    if written is not None:
        by_lower = {op.value.lower(): op for op in Operator}
        operator = by_lower.get(written.lower())
        if operator is None:
            valid = ", ".join(op.value for op in Operator)
            f["operator"].error(f"unknown operator '{written}' (expected one of: {valid})")
    values: list[str] = []
    values_ok = True
    if "values" in f:
        items = sequence(f["values"])
        values_ok = items is not None
        for item in items or ():
            value = text(item)
            if value is None:
                values_ok = False
            else:
                values.append(value)
    if operator in (Operator.IN, Operator.NOT_IN) and values_ok and not values:
        where = f.get("values")
        reason = f"operator {operator.value} needs at least one value"
        if where is not None:
            where.error(reason)
        else:
            at.rep.error(at.key_line, at.path_of("values"), reason)
        return None
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        f["values"].key_error(f"operator {operator.value} takes no values")
        return None
    if key is None or operator is None or not values_ok:
        return None
    return _Term(key, operator, tuple(values), at)


def _cilium_selector(at: At, own_namespace: str | None = None) -> EndpointSelector | None:
    """`own_namespace`: the subject selector of a namespaced policy, which always selects in
    the policy's namespace: as Cilium does, a `matchLabels` entry
    `k8s:io.kubernetes.pod.namespace` naming another namespace is dropped with a warning
    (the caller adds the policy's own)."""
    terms = _selector_terms(at)
    if terms is None:
        return None
    reqs = []
    for term in terms:
        source, key = split_source(term.key, SOURCE_ANY)
        if (own_namespace is not None and term.match_label and source == SOURCE_K8S
                and key == NAMESPACE_KEY):
            if term.values != (own_namespace,):
                term.at.warn_key(
                    f"endpointSelector always selects in the policy's namespace "
                    f"'{own_namespace}', not '{term.values[0]}' (as in Cilium): remove this "
                    f"label, or move the policy to namespace '{term.values[0]}'"
                )
            continue
        reqs.append(Requirement(key, term.operator, tuple(sorted(set(term.values))), source))
    return EndpointSelector.of(reqs)


# ---------------------------------------------------------------------------------------------
# Kubernetes NetworkPolicy


def _network_policy(doc: At, fields: dict[str, At], meta: _Meta) -> Policy | None:
    namespace = meta.namespace or DEFAULT_NAMESPACE
    ctx = _PolicyCtx(PolicyKind.KNP, meta.name, namespace)
    if "spec" not in fields:
        doc.missing("spec")
        return None
    at = fields["spec"]
    f = mapping(at, ("podSelector", "policyTypes", "ingress", "egress"), required=("podSelector",))
    if f is None:
        return None
    errors_before = doc.rep.error_count()
    selector = _k8s_pod_selector(f["podSelector"]) if "podSelector" in f else None
    if selector is not None:
        selector = selector.with_requirement(
            Requirement(NAMESPACE_KEY, Operator.IN, (namespace,), SOURCE_K8S)
        )
    types: set[str] = set()
    written_types = sequence(f["policyTypes"]) if "policyTypes" in f else None
    for item in written_types or ():
        written = string(item)
        if written is not None and written not in ("Ingress", "Egress"):
            item.error(f"unknown policy type '{written}' (expected Ingress or Egress)")
        elif written is not None:
            types.add(written)
    if not written_types:
        # the API server's default (SetDefaults_NetworkPolicy): an absent or empty list is
        # Ingress, plus Egress when `egress` holds a rule (`egress: []` does not count)
        egress = f["egress"].node if "egress" in f else None
        has_egress = isinstance(egress, SequenceNode) and bool(egress.value)
        types = {"Ingress", "Egress"} if has_egress else {"Ingress"}
    sections: dict[str, tuple[PolicySection, ...] | None] = {"ingress": None, "egress": None}
    for name, direction, type_name in (
        ("ingress", Direction.INGRESS, "Ingress"),
        ("egress", Direction.EGRESS, "Egress"),
    ):
        items = sequence(f[name]) if name in f else []
        built = [_k8s_section(ctx, item, name, direction, i) for i, item in enumerate(items or ())]
        if type_name in types:
            sections[name] = tuple(s for s in built if s is not None)
        elif items:
            f[name].warn_key(f"ignored: policyTypes does not include {type_name}")
    if selector is None or doc.rep.error_count() != errors_before:
        return None
    rule = Rule(
        endpoint_selector=selector,
        ingress=sections["ingress"],
        egress=sections["egress"],
        namespace=namespace,
    )
    return Policy(
        kind=PolicyKind.KNP,
        name=meta.name,
        namespace=namespace,
        rules=(rule,),
        source=Source(doc.rep.path, doc.rep.document, doc.line),
        labels=meta.labels,
        audit=meta.audit,
    )


def _k8s_section(
    ctx: _PolicyCtx, at: At, section: str, direction: Direction, index: int
) -> PolicySection | None:
    peers_key = "from" if direction is Direction.INGRESS else "to"
    f = mapping(at, (peers_key, "ports"))
    if f is None:
        return None
    peers: list[Peer] = []
    for item in _items(f, peers_key):
        peers += _k8s_peer(ctx, item)
    to_ports: list[PortRule] = []
    if "ports" in f:
        ports: list[PortProtocol] = []
        for item in sequence(f["ports"]) or ():
            port = _port_protocol(item, KNP_PORT_PROTOCOLS, Protocol.TCP)
            if port is not None and "port" in port.fields and not port.value.port and (
                not port.value.name
            ):
                # the API server refuses it; "any port" here would widen the policy
                port.fields["port"].error(
                    "port 0 is not valid in a NetworkPolicy (1-65535; leave port out for "
                    "every port)"
                )
            elif port is not None:
                ports.append(port.value)
        # Kubernetes sets no limit on ports; the datapath's per-rule limit is met by splitting.
        for start in range(0, len(ports), MAX_PORTS_PER_RULE):
            to_ports.append(PortRule(ports=tuple(ports[start : start + MAX_PORTS_PER_RULE])))
    return PolicySection(
        peers=tuple(peers) if peers else None,
        to_ports=tuple(to_ports),
        ref=ctx.ref(section, 0, index, False),
    )


def _k8s_peer(ctx: _PolicyCtx, at: At) -> list[Peer]:
    f = mapping(at, ("podSelector", "namespaceSelector", "ipBlock"))
    if f is None:
        return []
    if not f:
        at.error("a peer needs podSelector, namespaceSelector or ipBlock")
        return []
    if "ipBlock" in f:
        if len(f) > 1:
            f["ipBlock"].key_error(
                "ipBlock cannot be combined with podSelector or namespaceSelector"
            )
        return _ip_block(f["ipBlock"])
    reqs: list[Requirement] = []
    ok = True
    if "podSelector" in f:
        pod = _k8s_pod_selector(f["podSelector"])
        ok = pod is not None
        reqs += pod.requirements if pod is not None else ()
    if "namespaceSelector" in f:
        ns = _k8s_namespace_requirements(f["namespaceSelector"])
        ok = ok and ns is not None
        reqs += ns or ()
    else:
        assert ctx.namespace is not None
        reqs.append(Requirement(NAMESPACE_KEY, Operator.IN, (ctx.namespace,), SOURCE_K8S))
    return [EndpointPeer(EndpointSelector.of(reqs))] if ok else []


def _k8s_pod_selector(at: At) -> EndpointSelector | None:
    """A Kubernetes label selector on pod labels: keys are plain k8s label keys."""
    terms = _selector_terms(at)
    if terms is None:
        return None
    ok = True
    for term in terms:
        if ":" in term.key:
            term.at.key_error(f"invalid label key '{term.key}' (Kubernetes keys have no source)")
            ok = False
    if not ok:
        return None
    return EndpointSelector.of(
        [Requirement(t.key, t.operator, tuple(sorted(set(t.values))), SOURCE_K8S) for t in terms]
    )


def _k8s_namespace_requirements(at: At) -> list[Requirement] | None:
    """`namespaceSelector` in Cilium's label terms: the namespace's name is the endpoint's
    namespace label, its other labels are `io.cilium.k8s.namespace.labels.<key>`. Every
    namespace selector also requires a namespace, so it never selects reserved identities."""
    pod = _k8s_pod_selector(at)
    if pod is None:
        return None
    out = [Requirement(NAMESPACE_KEY, Operator.EXISTS, (), SOURCE_K8S)]
    for req in pod.requirements:
        key = (
            NAMESPACE_KEY
            if req.key == K8S_NAMESPACE_NAME_LABEL
            else NAMESPACE_LABELS_PREFIX + req.key
        )
        out.append(Requirement(key, req.operator, req.values, SOURCE_K8S))
    return out


def _ip_block(at: At) -> list[Peer]:
    f = mapping(at, ("cidr", "except"), required=("cidr",))
    if f is None or "cidr" not in f:
        return []
    net = _cidr(f["cidr"])
    excepts: list[IPNetwork] = []
    for ex_at in _items(f, "except"):
        ex = _cidr(ex_at)
        if ex is None or net is None:
            continue
        if ex.version != net.version or not ex.subnet_of(net):  # type: ignore[arg-type]
            ex_at.error(f"except {ex} is not inside {net}")
            continue
        excepts.append(ex)
    return [CIDRPeer(net, tuple(excepts))] if net is not None else []


# ---------------------------------------------------------------------------------------------
# ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): the Admin and Baseline tiers

CNP_SPEC_FIELDS = ("tier", "priority", "subject", "ingress", "egress")
CNP_SUBJECT_FIELDS = ("namespaces", "pods")
CNP_PODS_FIELDS = ("namespaceSelector", "podSelector")
CNP_INGRESS_PEER_FIELDS = ("namespaces", "pods")
CNP_EGRESS_PEER_FIELDS = ("namespaces", "pods", "nodes", "networks", "domainNames")
CNP_PROTOCOL_FIELDS = ("tcp", "udp", "sctp", "destinationNamedPort")
CNP_PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP}
CNP_MAX_PEERS = 25
CNP_MAX_NAME = 100


def _cluster_network_policy(doc: At, fields: dict[str, At], meta: _Meta) -> Policy | None:
    """One ClusterNetworkPolicy: a single Rule with `tier`/`priority`, whose ingress/egress
    sections carry their `action` in the order written (the order decides in the policy)."""
    if "spec" not in fields:
        doc.missing("spec")
        return None
    f = mapping(fields["spec"], CNP_SPEC_FIELDS, required=("tier", "priority", "subject"))
    if f is None:
        return None
    errors_before = doc.rep.error_count()
    tier: Tier | None = None
    if "tier" in f:
        written = string(f["tier"])
        if written is not None:
            try:
                tier = Tier(written)
            except ValueError:
                f["tier"].error(f"unknown tier '{written}' (expected Admin or Baseline)")
    priority = 0
    if "priority" in f:
        number = integer(f["priority"])
        if number is not None and not 0 <= number <= CNP_MAX_PRIORITY:
            f["priority"].error(f"priority {number} out of range 0-{CNP_MAX_PRIORITY}")
        elif number is not None:
            priority = number
    subject = _cnp_subject(f["subject"]) if "subject" in f else None
    where = f"{tier.value if tier else '?'} {priority}"
    sections: dict[str, tuple[PolicySection, ...] | None] = {"ingress": None, "egress": None}
    for name, direction in (("ingress", Direction.INGRESS), ("egress", Direction.EGRESS)):
        if name not in f:
            continue
        items = sequence(f[name]) or []
        if len(items) > CNP_MAX_RULES:
            f[name].key_error(f"at most {CNP_MAX_RULES} rules (got {len(items)})")
        built = [
            _cnp_rule(meta.name, where, item, direction, index)
            for index, item in enumerate(items)
        ]
        sections[name] = tuple(s for s in built if s is not None)
    if subject is None or tier is None or doc.rep.error_count() != errors_before:
        return None
    rule = Rule(
        endpoint_selector=subject,
        ingress=sections["ingress"],
        egress=sections["egress"],
        tier=tier,
        priority=priority,
    )
    return Policy(
        kind=PolicyKind.CLUSTER,
        name=meta.name,
        namespace=None,
        rules=(rule,),
        source=Source(doc.rep.path, doc.rep.document, doc.line),
        labels=meta.labels,
        audit=meta.audit,
    )


def _cnp_one_of(at: At, allowed: tuple[str, ...], what: str) -> tuple[str, At] | None:
    """A mapping with exactly one of `allowed` set (the API's MinProperties/MaxProperties 1)."""
    f = mapping(at, allowed)
    if f is None:
        return None
    if len(f) != 1:
        names = " or ".join(allowed)
        got = f" (got {', '.join(f)})" if f else ""
        at.error(f"{what} needs exactly one of {names}{got}")
        return None
    return next(iter(f.items()))


def _cnp_subject(at: At) -> EndpointSelector | None:
    got = _cnp_one_of(at, CNP_SUBJECT_FIELDS, "subject")
    if got is None:
        return None
    name, value = got
    return _cnp_namespaces(value) if name == "namespaces" else _cnp_pods(value)


def _cnp_namespaces(at: At) -> EndpointSelector | None:
    """Every pod of the namespaces a namespace label selector picks (`{}`: all)."""
    reqs = _k8s_namespace_requirements(at)
    return EndpointSelector.of(reqs) if reqs is not None else None


def _cnp_pods(at: At) -> EndpointSelector | None:
    """`{namespaceSelector, podSelector}`: the pods podSelector picks in the namespaces
    namespaceSelector picks (absent or `{}`: all namespaces)."""
    f = mapping(at, CNP_PODS_FIELDS, required=("podSelector",))
    if f is None or "podSelector" not in f:
        return None
    pod = _k8s_pod_selector(f["podSelector"])
    if "namespaceSelector" in f:
        ns = _k8s_namespace_requirements(f["namespaceSelector"])
    else:
        ns = [Requirement(NAMESPACE_KEY, Operator.EXISTS, (), SOURCE_K8S)]
    if pod is None or ns is None:
        return None
    return EndpointSelector.of([*ns, *pod.requirements])


def _cnp_rule(
    policy: str, where: str, at: At, direction: Direction, index: int
) -> PolicySection | None:
    peers_key = "from" if direction is Direction.INGRESS else "to"
    f = mapping(at, ("name", "action", peers_key, "protocols"), required=("action", peers_key))
    if f is None:
        return None
    errors_before = at.rep.error_count()
    rule_name = ""
    if "name" in f:
        rule_name = string(f["name"]) or ""
        if len(rule_name) > CNP_MAX_NAME:
            f["name"].error(f"a rule name has at most {CNP_MAX_NAME} characters")
    action: TierAction | None = None
    if "action" in f:
        written = string(f["action"])
        if written is not None:
            try:
                action = TierAction(written)
            except ValueError:
                f["action"].error(f"unknown action '{written}' (expected Accept, Deny or Pass)")
    peers: list[Peer] = []
    has_networks = False
    if peers_key in f:
        items = sequence(f[peers_key])
        if items is not None and not 1 <= len(items) <= CNP_MAX_PEERS:
            f[peers_key].key_error(
                f"{peers_key} needs 1-{CNP_MAX_PEERS} peers (got {len(items)}); a rule "
                "applies to the peers it names"
            )
        allowed = CNP_INGRESS_PEER_FIELDS if direction is Direction.INGRESS else (
            CNP_EGRESS_PEER_FIELDS
        )
        for item in items or ():
            got = _cnp_peer(item, allowed, action)
            if got is not None:
                peers += got[1]
                has_networks = has_networks or got[0]
    ports: list[PortProtocol] = []
    if "protocols" in f:
        items = sequence(f["protocols"])
        if items is not None and not 1 <= len(items) <= CNP_MAX_PEERS:
            f["protocols"].key_error(
                f"protocols needs 1-{CNP_MAX_PEERS} entries (got {len(items)}); leave it out "
                "to match every protocol and port"
            )
        for item in items or ():
            port = _cnp_protocol(item)
            if port is None:
                continue
            if port.name and has_networks:
                item.error(
                    "destinationNamedPort cannot be used with networks or nodes peers (they "
                    "have no named ports)"
                )
                continue
            ports.append(port)
    if action is None or at.rep.error_count() != errors_before:
        return None
    return PolicySection(
        peers=tuple(peers),
        to_ports=(PortRule(ports=tuple(ports)),) if ports else (),
        ref=RuleRef(
            PolicyKind.CLUSTER, None, policy, direction.value, 0, index, False, rule_name, where
        ),
        action=action,
    )


def _cnp_peer(
    at: At, allowed: tuple[str, ...], action: TierAction | None
) -> tuple[bool, list[Peer]] | None:
    """(whether it names networks or nodes, the peers)."""
    got = _cnp_one_of(at, allowed, "a peer")
    if got is None:
        return None
    name, value = got
    if name == "namespaces":
        sel = _cnp_namespaces(value)
        return (False, [EndpointPeer(sel)]) if sel is not None else None
    if name == "pods":
        sel = _cnp_pods(value)
        return (False, [EndpointPeer(sel)]) if sel is not None else None
    if name == "domainNames":
        value.key_error(
            f"domainNames {NOT_SUPPORTED} (garrison has no DNS-based peers); name the "
            "addresses with networks instead"
        )
        return None
    if name == "nodes":
        terms = _selector_terms(value)
        if terms is None:
            return None
        if terms:
            value.key_error(
                f"a nodes selector with labels is {NOT_SUPPORTED} (garrison does not know "
                "node labels); write nodes: {} for every node"
            )
            return None
        return True, [EntityPeer(Entity.HOST), EntityPeer(Entity.REMOTE_NODE)]
    items = sequence(value)
    if items is None:
        return None
    if not 1 <= len(items) <= CNP_MAX_PEERS:
        value.key_error(f"networks needs 1-{CNP_MAX_PEERS} CIDRs (got {len(items)})")
    peers: list[Peer] = []
    for item in items:
        net = _cidr(item)
        if net is not None:
            peers.append(CIDRPeer(net))
    if action in (TierAction.DENY, TierAction.PASS):
        value.warn_key(
            "networks match addresses outside the cluster only (as Cilium's CIDR rules): "
            "endpoints inside a CIDR are matched by their identity, so name them with "
            "namespaces or pods peers to deny or pass them too"
        )
    return True, peers


def _cnp_protocol(at: At) -> PortProtocol | None:
    got = _cnp_one_of(at, CNP_PROTOCOL_FIELDS, "a protocols entry")
    if got is None:
        return None
    name, value = got
    if name == "destinationNamedPort":
        port_name = string(value)
        if port_name is None:
            return None
        problem = port_name_problem(port_name)
        if problem is not None:
            value.error(f"invalid port name '{port_name}' ({problem})")
            return None
        return PortProtocol(0, 0, Protocol.ANY, port_name)
    protocol = CNP_PROTOCOLS[name]
    f = mapping(value, ("destinationPort",))
    if f is None:
        return None
    if "destinationPort" not in f:
        return PortProtocol(0, 0, protocol)  # every port of the protocol
    got = _cnp_one_of(f["destinationPort"], ("number", "range"), "destinationPort")
    if got is None:
        return None
    kind, port_at = got
    if kind == "number":
        number = _cnp_port_number(port_at)
        return PortProtocol(number, 0, protocol) if number is not None else None
    r = mapping(port_at, ("start", "end"), required=("start", "end"))
    if r is None or "start" not in r or "end" not in r:
        return None
    start = _cnp_port_number(r["start"])
    end = _cnp_port_number(r["end"])
    if start is None or end is None:
        return None
    if start >= end:
        port_at.error(f"range start {start} must be less than end {end}")
        return None
    return PortProtocol(start, end, protocol)


def _cnp_port_number(at: At) -> int | None:
    number = integer(at)
    if number is None:
        return None
    if not 1 <= number <= 65535:
        at.error(f"port {number} out of range 1-65535")
        return None
    return number
