"""Line-tracking reads of composed YAML, for validators that report `file:line` problems.

`yaml.compose_all` keeps every node's position; this module reads those nodes as typed values
and records each problem as a `PolicyIssue` instead of stopping at the first one. A reader
returns None when the value is unusable (the problem is already recorded), so a validator can
go on and find the next problem.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from garrison.policies.errors import PolicyIssue

TAG_STR = "tag:yaml.org,2002:str"
TAG_INT = "tag:yaml.org,2002:int"
TAG_FLOAT = "tag:yaml.org,2002:float"
TAG_BOOL = "tag:yaml.org,2002:bool"
TAG_NULL = "tag:yaml.org,2002:null"
TAG_MERGE = "tag:yaml.org,2002:merge"

# Aliases let a small document expand into a huge tree ("billion laughs"); policies never
# need more than this many nodes once aliases are expanded.
MAX_EXPANDED_NODES = 200_000


@dataclass(slots=True)
class Reporter:
    """Collects the issues of one file; `document` is the YAML document being read."""

    path: str
    document: int = 0
    issues: list[PolicyIssue] = field(default_factory=list)

    def error(self, line: int, field_path: str, reason: str) -> None:
        self.issues.append(PolicyIssue(self.path, line, field_path, reason, self.document))

    def warn(self, line: int, field_path: str, reason: str) -> None:
        self.issues.append(
            PolicyIssue(self.path, line, field_path, reason, self.document, warning=True)
        )

    def error_count(self) -> int:
        return sum(1 for i in self.issues if not i.warning)


def node_line(node: Node) -> int:
    return int(node.start_mark.line) + 1


@dataclass(frozen=True, slots=True)
class At:
    """A node with its field path (`spec.ingress[0]`) and the line of the key that names it.

    Problems with the value itself are reported at the value's line; problems with something
    missing inside it at `key_line`, where the reader's eye is.
    """

    node: Node
    field: str
    key_line: int
    rep: Reporter

    @classmethod
    def root(cls, node: Node, rep: Reporter) -> At:
        return cls(node, "", node_line(node), rep)

    @property
    def line(self) -> int:
        return node_line(self.node)

    def error(self, reason: str) -> None:
        self.rep.error(self.line, self.field, reason)

    def key_error(self, reason: str) -> None:
        self.rep.error(self.key_line, self.field, reason)

    def warn_key(self, reason: str) -> None:
        self.rep.warn(self.key_line, self.field, reason)

    def path_of(self, name: str) -> str:
        return f"{self.field}.{name}" if self.field else name

    def child(self, name: str, key: Node, value: Node) -> At:
        return At(value, self.path_of(name), node_line(key), self.rep)

    def item(self, index: int, value: Node) -> At:
        return At(value, f"{self.field}[{index}]", node_line(value), self.rep)

    def missing(self, name: str) -> None:
        self.rep.error(self.key_line, self.path_of(name), "missing required field")


def describe(node: Node) -> str:
    """What a node is, in the words an error message uses."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        TAG_NULL: "nothing (null)",
        TAG_INT: "an integer",
        TAG_FLOAT: "a number",
        TAG_BOOL: "a boolean",
        TAG_STR: "a string",
    }.get(str(node.tag), f"a {str(node.tag).rsplit(':', 1)[-1]}")


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == TAG_NULL


def mapping(
    at: At,
    allowed: Collection[str],
    *,
    also_known: Collection[str] = (),
    required: Collection[str] = (),
) -> dict[str, At] | None:
    """The fields of a mapping by name, in YAML order; None if `at` is not a mapping.

    `allowed` fields are listed in the unknown-field message; `also_known` ones are returned
    too but not advertised (fields the caller rejects or warns about itself). A key that
    matches a known field only when case is ignored is accepted with a warning, as Cilium's
    JSON decoder accepts it. Duplicate keys are errors.
    """
    node = at.node
    if not isinstance(node, MappingNode):
        at.error(f"expected a mapping, got {describe(node)}")
        return None
    known = {*allowed, *also_known}
    by_lower = {name.lower(): name for name in known}
    out: dict[str, At] = {}
    first_line: dict[str, int] = {}
    for key, value in node.value:
        if not isinstance(key, ScalarNode) or key.tag == TAG_NULL:
            at.rep.error(node_line(key), at.field, "mapping keys must be strings")
            continue
        written = str(key.value)
        if key.tag == TAG_MERGE:
            at.rep.error(node_line(key), at.path_of(written), "YAML merge keys are not supported")
            continue
        name = written
        if name not in known:
            canonical = by_lower.get(name.lower())
            if canonical is None:
                expected = ", ".join(sorted(allowed))
                at.rep.error(
                    node_line(key),
                    at.path_of(written),
                    f"unknown field '{written}' (expected one of: {expected})",
                )
                continue
            at.rep.warn(
                node_line(key), at.path_of(written), f"field should be written '{canonical}'"
            )
            name = canonical
        if name in out:
            at.rep.error(
                node_line(key),
                at.path_of(written),
                f"duplicate key '{written}' (first at line {first_line[name]})",
            )
            continue
        first_line[name] = node_line(key)
        out[name] = at.child(written, key, value)
    for name in required:
        if name not in out:
            at.missing(name)
    return out


def raw_entries(at: At) -> Iterator[tuple[str, At]]:
    """Key/value pairs of a mapping with free-form keys (e.g. matchLabels).

    Reports non-mappings, non-scalar keys and duplicate keys; yields the rest.
    """
    node = at.node
    if not isinstance(node, MappingNode):
        at.error(f"expected a mapping, got {describe(node)}")
        return
    first_line: dict[str, int] = {}
    for key, value in node.value:
        if not isinstance(key, ScalarNode) or key.tag == TAG_NULL:
            at.rep.error(node_line(key), at.field, "mapping keys must be strings")
            continue
        name = str(key.value)
        if key.tag == TAG_MERGE:
            at.rep.error(node_line(key), at.path_of(name), "YAML merge keys are not supported")
            continue
        if name in first_line:
            at.rep.error(
                node_line(key),
                at.path_of(name),
                f"duplicate key '{name}' (first at line {first_line[name]})",
            )
            continue
        first_line[name] = node_line(key)
        yield name, at.child(name, key, value)


def peek(at: At, name: str) -> At | None:
    """The first value under `name` in a mapping, without validating anything."""
    if isinstance(at.node, MappingNode):
        for key, value in at.node.value:
            if isinstance(key, ScalarNode) and key.value == name:
                return at.child(name, key, value)
    return None


def sequence(at: At) -> list[At] | None:
    node = at.node
    if not isinstance(node, SequenceNode):
        hint = " (write [] for an empty list)" if is_null(node) else ""
        at.error(f"expected a list, got {describe(node)}{hint}")
        return None
    return [at.item(i, item) for i, item in enumerate(node.value)]


def string(at: At) -> str | None:
    """A YAML string. Numbers and booleans are refused with a hint to quote them."""
    node = at.node
    if isinstance(node, ScalarNode) and node.tag == TAG_STR:
        return str(node.value)
    if isinstance(node, ScalarNode) and node.tag != TAG_NULL:
        at.error(f'expected a string, got {describe(node)} (write it in quotes: "{node.value}")')
    else:
        at.error(f"expected a string, got {describe(node)}")
    return None


def text(at: At) -> str | None:
    """Any non-null scalar as the text it was written as (`version: 2` -> "2")."""
    node = at.node
    if isinstance(node, ScalarNode) and node.tag != TAG_NULL:
        return str(node.value)
    at.error(f"expected a string, got {describe(node)}")
    return None


def integer(at: At) -> int | None:
    node = at.node
    if isinstance(node, ScalarNode) and node.tag == TAG_INT:
        value = SafeConstructor().construct_yaml_int(node)
        return int(value)
    at.error(f"expected an integer, got {describe(node)}")
    return None


def boolean(at: At) -> bool | None:
    node = at.node
    if isinstance(node, ScalarNode) and node.tag == TAG_BOOL:
        return bool(SafeConstructor().construct_yaml_bool(node))
    at.error(f"expected true or false, got {describe(node)}")
    return None


def scalar_kind(at: At) -> str | None:
    """The resolved tag of a scalar (TAG_STR, TAG_INT, ...); None for mappings and lists."""
    return str(at.node.tag) if isinstance(at.node, ScalarNode) else None


def expansion_problem(root: Node, limit: int = MAX_EXPANDED_NODES) -> str | None:
    """Why a document's node graph cannot be read as a tree: an alias cycle or an alias
    expansion beyond `limit` nodes. Sizes are memoized, so this costs one pass per node."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Cycle
        active.add(key)
        total = 1
        if isinstance(node, MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        elif isinstance(node, SequenceNode):
            for v in node.value:
                total += size(v)
                if total > limit:
                    break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(root)
    except _Cycle:
        return "a YAML alias refers to a node that contains it"
    if total > limit:
        return f"the document expands to more than {limit} YAML nodes (alias expansion)"
    return None


class _Cycle(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ComposedDocument:
    index: int
    node: Node


def compose_documents(text_: str, rep: Reporter) -> list[ComposedDocument]:
    """The non-empty documents of a YAML stream, each a node tree with positions.

    A syntax error is recorded with its line; the documents before it are still returned so
    their problems are reported as well.
    """
    docs: list[ComposedDocument] = []
    index = 0
    try:
        for node in yaml.compose_all(text_, Loader=yaml.SafeLoader):
            rep.document = index
            if node is not None and not is_null(node):
                problem = expansion_problem(node)
                if problem is None:
                    docs.append(ComposedDocument(index, node))
                else:
                    rep.error(node_line(node), "", problem)
            index += 1
    except yaml.MarkedYAMLError as exc:
        rep.document = index
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        reason = f"YAML syntax error: {exc.problem or exc.context}"
        if exc.problem and exc.context:
            reason += f" ({exc.context})"
        rep.error(line, "", reason)
    except yaml.reader.ReaderError as exc:
        rep.document = index
        line = text_.count("\n", 0, exc.position) + 1
        rep.error(line, "", f"YAML syntax error: unacceptable character #x{exc.character:04x}")
    except yaml.YAMLError as exc:
        rep.document = index
        rep.error(1, "", f"YAML syntax error: {exc}")
    except RecursionError:
        rep.document = index
        rep.error(1, "", "YAML nesting is too deep")
    return docs
