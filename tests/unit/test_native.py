"""The mypyc build: the suite runs what users run, and a stale build never runs."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import garrison
from garrison import native

PURE = os.environ.get(native.PURE_ENV, "") not in ("", "0")
EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = (
    "import garrison, garrison.parsers.http1 as a, garrison.proxy.engine_http1 as b; "
    "print(garrison.COMPILED_IN_USE, a.__file__, b.__file__)"
)


@pytest.mark.skipif(PURE, reason="this run asked for the source (GARRISON_PURE=1)")
def test_the_suite_runs_the_compiled_modules() -> None:
    state = native.check()
    assert state.fresh, f"the mypyc build is not in use ({state.problem}): {native.REBUILD_HINT}"
    assert garrison.COMPILED_IN_USE
    for name in native.COMPILED:
        assert str(importlib.import_module(name).__file__).endswith(EXTENSION), name


@pytest.fixture
def built_copy(tmp_path: Path) -> Path:
    """A copy of the package with its build, to edit without touching the checkout."""
    if not native.check().fresh:
        pytest.fail(f"no fresh mypyc build to copy: {native.REBUILD_HINT}")
    shutil.copytree(native.PACKAGE_DIR, tmp_path / "garrison",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def probe(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    environment.update(env, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=environment,
                          capture_output=True, text=True, check=True, timeout=60)


def test_a_fresh_build_is_used(built_copy: Path) -> None:
    done = probe(built_copy)
    used, first, second = done.stdout.split()
    assert used == "True"
    assert first == str(built_copy / "garrison/parsers" / f"http1{EXTENSION}")
    assert second == str(built_copy / "garrison/proxy" / f"engine_http1{EXTENSION}")
    assert "RuntimeWarning" not in done.stderr


def test_an_edited_source_sends_every_compiled_module_back_to_source(built_copy: Path) -> None:
    edited = built_copy / "garrison/parsers/http1.py"
    edited.write_text(edited.read_text() + "\nEDITED = True\n")
    done = probe(built_copy)
    used, first, second = done.stdout.split()
    assert used == "False"
    # the unedited engine falls back too: compiled modules call each other directly
    assert (first, second) == (str(edited), str(built_copy / "garrison/proxy/engine_http1.py"))
    assert "changed since they were compiled: garrison/parsers/http1.py" in done.stderr
    assert native.REBUILD_HINT in done.stderr


def test_a_missing_compiled_module_sends_every_one_back_to_source(built_copy: Path) -> None:
    (built_copy / "garrison/flows" / f"codec{EXTENSION}").unlink()
    done = probe(built_copy)
    assert done.stdout.split()[0] == "False"
    assert done.stdout.split()[1].endswith("http1.py")
    assert "compiled files are missing for garrison.flows.codec" in done.stderr


def test_a_missing_build_record_sends_every_one_back_to_source(built_copy: Path) -> None:
    (built_copy / "garrison/native-build.json").unlink()
    done = probe(built_copy)
    assert done.stdout.split()[0] == "False"
    assert "native-build.json is missing or unreadable" in done.stderr


def test_a_module_compiled_by_an_older_build_runs_from_source(built_copy: Path) -> None:
    # A module dropped from COMPILED keeps its extension file until the next compile; Python
    # would import that in preference to the (maybe newer) source.
    old = built_copy / "garrison/parsers" / f"grpc{EXTENSION}"
    shutil.copy(built_copy / "garrison/parsers" / f"http1{EXTENSION}", old)
    environment = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    environment["PYTHONPATH"] = str(built_copy)
    done = subprocess.run(
        [sys.executable, "-c", "import garrison, garrison.parsers.grpc as g; "
         "print(garrison.COMPILED_IN_USE, g.__file__)"],
        cwd=built_copy, env=environment, capture_output=True, text=True, check=True, timeout=60,
    )
    assert done.stdout.split() == ["False", str(built_copy / "garrison/parsers/grpc.py")]
    assert "old compiled files remain for garrison.parsers.grpc" in done.stderr


def test_garrison_pure_asks_for_the_source_without_a_warning(built_copy: Path) -> None:
    done = probe(built_copy, **{native.PURE_ENV: "1"})
    used, first, _ = done.stdout.split()
    assert (used, first) == ("False", str(built_copy / "garrison/parsers/http1.py"))
    assert done.stderr == ""


# ---- written-out dataclass initialisers ("Initialisers" in garrison/native.py) ------------


def _written_initialisers() -> list[tuple[str, ast.ClassDef, ast.FunctionDef]]:
    """Every dataclass of a compiled module that defines its own `__init__`."""
    found = []
    for name in native.COMPILED:
        path = native.ROOT / (name.replace(".", "/") + ".py")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef) or not any(
                _decorator_name(d) == "dataclass" for d in node.decorator_list
            ):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    found.append((name, node, item))
    return found


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.id if isinstance(target, ast.Name) else ""


def _dataclass_options(cls: ast.ClassDef) -> dict[str, object]:
    for node in cls.decorator_list:
        if isinstance(node, ast.Call) and _decorator_name(node) == "dataclass":
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    return {}


def _fields(cls: ast.ClassDef) -> list[tuple[str, str, str | None, bool]]:
    """(name, annotation, default source or None, init) of each field, in order."""
    fields = []
    for item in cls.body:
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        annotation = ast.unparse(item.annotation)
        if annotation.startswith("ClassVar"):
            continue
        default: str | None = None
        init = True
        value = item.value
        if isinstance(value, ast.Call) and _decorator_name(value) == "field":
            for keyword in value.keywords:
                if keyword.arg == "default":
                    default = ast.unparse(keyword.value)
                elif keyword.arg == "init":
                    init = bool(ast.literal_eval(keyword.value))
                elif keyword.arg == "default_factory":
                    pytest.fail(f"{cls.name}.{item.target.id}: a default_factory field")
        elif value is not None:
            default = ast.unparse(value)
        fields.append((item.target.id, annotation, default, init))
    return fields


WRITTEN = _written_initialisers()


def test_the_per_request_dataclasses_write_their_initialisers() -> None:
    names = {cls.name for _, cls, _ in WRITTEN}
    assert {"FlowRecord", "Layer7", "HTTP", "Kafka", "Endpoint", "RequestReceived",
            "ResponseReceived", "KafkaRequest", "KafkaResponse", "Forward"} <= names


@pytest.mark.parametrize(("module", "cls", "init"), WRITTEN,
                         ids=[f"{m}.{c.name}" for m, c, _ in WRITTEN])
def test_a_written_initialiser_matches_its_fields(
    module: str, cls: ast.ClassDef, init: ast.FunctionDef
) -> None:
    fields = _fields(cls)
    options = _dataclass_options(cls)
    wanted = [(name, annotation, default) for name, annotation, default, use in fields if use]
    arguments = init.args.kwonlyargs if options.get("kw_only") else init.args.args[1:]
    defaults = init.args.kw_defaults if options.get("kw_only") else (
        [None] * (len(arguments) - len(init.args.defaults)) + list(init.args.defaults))
    if options.get("kw_only"):
        assert len(init.args.args) == 1, f"{cls.name}: kw_only, so only self is positional"
    else:
        assert not init.args.kwonlyargs, f"{cls.name}: its fields are positional"
    got = [
        (arg.arg, ast.unparse(arg.annotation) if arg.annotation else "",
         ast.unparse(default) if default is not None else None)
        for arg, default in zip(arguments, defaults, strict=True)
    ]
    assert got == wanted, f"{module}.{cls.name}.__init__ does not take its fields as declared"
    frozen = bool(options.get("frozen"))
    sets = []
    for statement in init.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
            call = statement.value
            assert frozen and ast.unparse(call.func) == "object.__setattr__", ast.unparse(call)
            target, name, value = call.args
            assert ast.unparse(target) == "self"
            assert isinstance(name, ast.Constant)
            sets.append((name.value, ast.unparse(value)))
        elif isinstance(statement, ast.Assign):
            assert not frozen, f"{cls.name} is frozen: set fields with object.__setattr__"
            (target,) = statement.targets
            assert isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self"
            sets.append((target.attr, ast.unparse(statement.value)))
        else:
            pytest.fail(f"{cls.name}.__init__ does more than set fields: {ast.unparse(statement)}")
    expected = [(name, name if use else str(default)) for name, _, default, use in fields]
    assert sets == expected, f"{module}.{cls.name}.__init__ must set each field, in order, once"


@pytest.mark.skipif(PURE, reason="this run asked for the source (GARRISON_PURE=1)")
def test_written_initialisers_run_compiled() -> None:
    for module, cls, _ in WRITTEN:
        init = vars(getattr(importlib.import_module(module), cls.name))["__init__"]
        assert not isinstance(init, types.FunctionType), f"{module}.{cls.name}: interpreted"


def test_an_except_name_is_bound_to_one_type_per_function_in_compiled_modules() -> None:
    """mypyc gives a local one type, from its first binding: `except LengthError as exc` then
    `except Exception as exc` in one function made the compiled Kafka parser raise TypeError
    instead of its decode error (found by the fuzz test once kafka_lengths was compiled)."""
    package = Path(garrison.__file__).parent
    mixed = []
    for module in native.COMPILED:
        path = package.parent / (module.replace(".", "/") + ".py")
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            types_by_name: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name:
                    kind = ast.unparse(node.type) if node.type else "BaseException"
                    types_by_name.setdefault(node.name, set()).add(kind)
            mixed += [f"{path.name}:{fn.lineno} {fn.name}: {name} as {sorted(kinds)}"
                      for name, kinds in types_by_name.items() if len(kinds) > 1]
    assert mixed == []
