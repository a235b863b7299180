"""garrison's `_receive_frame` is h2's, minus the eager `repr(frame)` for a disabled trace
log: this holds the copy to the h2 that is installed, statement for statement, so an h2
upgrade that changes the method fails here instead of drifting silently."""

from __future__ import annotations

import ast
import inspect
import textwrap

import h2.connection

from garrison.parsers.http2 import _BoundedH2Connection


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


def _body(fn: object, drop_trace: bool) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))  # type: ignore[arg-type]
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    body = [
        stmt
        for stmt in func.body
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
    ]
    if drop_trace:
        first = body[1]
        assert "trace" in ast.unparse(first), "h2 no longer starts with the trace log"
        body = [body[0], *body[2:]]
    func.body = body
    func.returns = None
    func.args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
    return ast.dump(_Unqualify().visit(tree))


def test_receive_frame_is_h2s_without_the_trace_repr() -> None:
    ours = _body(_BoundedH2Connection._receive_frame, drop_trace=False)
    theirs = _body(h2.connection.H2Connection._receive_frame, drop_trace=True)
    assert ours == theirs
