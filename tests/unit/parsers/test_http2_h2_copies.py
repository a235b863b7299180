"""garrison's copies of two h2 methods, held to the h2 that is installed, statement for
statement, so that an h2 upgrade that changes either fails here instead of drifting silently:

- `_BoundedH2Connection._receive_frame`: h2's, minus the eager `repr(frame)` for a disabled
  trace log;
- `_Stream.send_headers`: after its guard (both outbound passes off), h2's, minus
  `utf8_encode_headers` and the validation flags that only those passes read.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import h2.connection
import h2.stream

from garrison.parsers.http2 import _BoundedH2Connection, _Stream


class _Unqualify(ast.NodeTransformer):
    """`h2.exceptions.StreamClosedError` → `StreamClosedError` (h2 imports the names)."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        base = node.value
        if (
            isinstance(base, ast.Attribute)
            and isinstance(base.value, ast.Name)
            and base.value.id == "h2"
        ):
            return ast.Name(id=node.attr, ctx=node.ctx)
        return self.generic_visit(node)


class _WithoutFlags(ast.NodeTransformer):
    """h2's `send_headers` as the fast path has it: no UTF-8 pass, no validation flags."""

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        target = ast.unparse(node.targets[0])
        value = ast.unparse(node.value)
        if target == "bytes_headers" and value == "utf8_encode_headers(headers)":
            node.value = ast.Name(id="headers", ctx=ast.Load())
            return node
        if target == "hdr_validation_flags":
            return None
        if target == "events" and value == "self.state_machine.process_input(input_)":
            return ast.Expr(value=node.value)
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "hdr_validation_flags":
            return ast.Constant(value=None)
        return node


def _function(fn: object) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))  # type: ignore[arg-type]
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    func.body = [
        stmt
        for stmt in func.body
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
    ]
    return func


def _dump(func: ast.FunctionDef) -> str:
    func.returns = None
    func.args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
    body = [_Unqualify().visit(stmt) for stmt in func.body]
    return "\n".join(ast.dump(stmt) for stmt in body)


def test_receive_frame_is_h2s_without_the_trace_repr() -> None:
    ours = _function(_BoundedH2Connection._receive_frame)
    theirs = _function(h2.connection.H2Connection._receive_frame)
    first = theirs.body[1]
    assert "trace" in ast.unparse(first), "h2 no longer starts with the trace log"
    theirs.body = [theirs.body[0], *theirs.body[2:]]
    assert _dump(ours) == _dump(theirs)


def test_send_headers_fast_path_is_h2s_without_the_unused_passes() -> None:
    ours = _function(_Stream.send_headers)
    guard = ours.body[0]
    assert isinstance(guard, ast.If)
    assert ast.unparse(guard.test) == (
        "self.config.normalize_outbound_headers or self.config.validate_outbound_headers"
    )
    ours.body = ours.body[1:]
    theirs = _function(h2.stream.H2Stream.send_headers)
    before = ast.unparse(theirs)
    assert "utf8_encode_headers(headers)" in before
    assert "self._build_hdr_validation_flags(events)" in before
    theirs.body = [_WithoutFlags().visit(stmt) for stmt in theirs.body]
    theirs.body = [stmt for stmt in theirs.body if stmt is not None]
    assert _dump(ours) == _dump(theirs)
