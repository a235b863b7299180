"""load_paths: files and directories, problems with the files themselves, issues across files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from garrison.policies.errors import PolicyValidationError
from garrison.policies.loader import load_paths

DATA = Path(__file__).resolve().parents[2] / "data" / "policies"


def cnp(name: str, extra: str = "") -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata:\n  name: {name}\nspec:\n  endpointSelector: {{}}\n{extra}"
    )


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def rendered(paths: list[str | Path]) -> list[str]:
    with pytest.raises(PolicyValidationError) as info:
        load_paths(paths)
    return [str(i) for i in info.value.issues]


def test_directory_is_searched_recursively_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "b.yaml", cnp("b"))
    write(tmp_path / "a" / "z.yml", cnp("az"))
    write(
        tmp_path / "a" / "y.json",
        '{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",'
        ' "metadata": {"name": "ay"}, "spec": {"endpointSelector": {}}}',
    )
    write(tmp_path / "notes.txt", "not a policy")
    write(tmp_path / "README.md", "# not a policy")
    write(tmp_path / ".hidden.yaml", "not: [valid")
    write(tmp_path / ".git" / "x.yaml", "not: [valid")
    result = load_paths([tmp_path])
    assert [os.path.relpath(f, tmp_path) for f in result.files] == [
        "a/y.json",
        "a/z.yml",
        "b.yaml",
    ]
    assert [p.name for p in result.policies] == ["ay", "az", "b"]


def test_kubernetes_configmap_mount_is_read_once(tmp_path: Path) -> None:
    """A mounted ConfigMap keeps its files in `..data/` and links them from the top."""
    write(tmp_path / "..2024_01_01" / "p.yaml", cnp("p"))
    (tmp_path / "..data").symlink_to("..2024_01_01")
    (tmp_path / "p.yaml").symlink_to("..data/p.yaml")
    result = load_paths([tmp_path])
    assert [p.name for p in result.policies] == ["p"]


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", cnp("p"))
    result = load_paths([path, tmp_path, str(path)])
    assert result.files == (str(path),)
    assert len(result.policies) == 1


def test_a_named_file_of_any_suffix_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.txt", cnp("p"))
    assert [p.name for p in load_paths([str(path)]).policies] == ["p"]


def test_empty_directory_is_a_warning(tmp_path: Path) -> None:
    result = load_paths([tmp_path])
    assert result.policies == () and result.files == ()
    assert [str(w) for w in result.warnings] == [
        f"{tmp_path}:0: warning: no *.yaml, *.yml or *.json files in this directory"
    ]


def test_missing_path_is_an_issue(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert rendered([missing]) == [f"{missing}:0: no such file or directory"]


def test_unreadable_file_is_an_issue(tmp_path: Path) -> None:
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "deleted.yaml")
    assert rendered([tmp_path]) == [
        f"{tmp_path / 'gone.yaml'}:0: cannot read: No such file or directory"
    ]


def test_invalid_utf8_is_an_issue_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", cnp("p").encode() + b"# caf\xe9\n")
    assert rendered([path]) == [f"{path}:7: not valid UTF-8 text"]


def test_every_issue_of_every_file(tmp_path: Path) -> None:
    broken = write(tmp_path / "a.yaml", "apiVersion: cilium.io/v2\nkind: [\n")
    bad = write(tmp_path / "b.yaml", cnp("b", "  ingress: [{fromEntities: [mars]}]\n"))
    missing = tmp_path / "c.yaml"
    assert rendered([tmp_path, missing]) == [
        f"{missing}:0: no such file or directory",
        f"{broken}:3: YAML syntax error: expected the node content, but found '<stream end>' "
        "(while parsing a flow node)",
        f"{bad}:7: spec.ingress[0].fromEntities[0]: unknown entity 'mars' (expected one of: "
        "all, world, cluster, host, remote-node, health, init, unmanaged, none, "
        "kube-apiserver, ingress, world-ipv4, world-ipv6)",
    ]


def test_syntax_error_after_a_good_document_keeps_the_good_documents_issues(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "p.yaml",
        cnp("p", "  egress: [{toPorts: [{ports: [{port: -1}]}]}]\n") + "---\nkind: {\n",
    )
    assert rendered([path]) == [
        f"{path}:7: spec.egress[0].toPorts[0].ports[0].port: port -1 out of range 0-65535",
        f"{path}:10: YAML syntax error: expected the node content, but found '<stream end>' "
        "(while parsing a flow node)",
    ]


def test_duplicate_policy_across_files(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", cnp("same"))
    second = write(tmp_path / "sub" / "b.yaml", "# moved\n" + cnp("same"))
    assert rendered([tmp_path]) == [
        f"{second}:5: metadata.name: duplicate policy CiliumNetworkPolicy default/same "
        f"(also defined at {first}:4)"
    ]


def test_three_errors_in_the_invalid_fixture() -> None:
    path = DATA / "invalid" / "three-errors.yaml"
    assert [line.split(": ", 2)[1] for line in rendered([path])] == [
        "spec.egress[0].toPorts[0].ports[0].port",
        "spec.egress[0].toPorts[0].rules.http[0].path",
        "spec.egress[1].toEntities[0]",
    ]


def test_warnings_are_kept_when_errors_are_raised(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.yaml",
        cnp("p", "  egress:\n  - toFQDNs: [{matchName: x.io}]\n  - toEntities: [moon]\n"),
    )
    with pytest.raises(PolicyValidationError) as info:
        load_paths([path])
    assert [(i.line, i.field) for i in info.value.issues] == [(9, "spec.egress[1].toEntities[0]")]
    assert [(w.line, w.field) for w in info.value.warnings] == [(8, "spec.egress[0].toFQDNs")]


def test_a_fifo_among_policy_files_is_an_issue_and_never_blocks(tmp_path: Path) -> None:
    """A FIFO named *.yaml used to block the reader until someone wrote to it (in the agent:
    its policy-directory watcher, holding the agent's lock)."""
    write(tmp_path / "a.yaml", cnp("a"))
    os.mkfifo(tmp_path / "b.yaml")
    raised: list[PolicyValidationError] = []

    def load() -> None:
        with pytest.raises(PolicyValidationError) as err:
            load_paths([tmp_path])
        raised.append(err.value)

    reader = threading.Thread(target=load, daemon=True)  # a blocked read never returns
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "load_paths blocked on the FIFO"
    assert [str(i) for i in raised[0].issues] == [
        f"{tmp_path / 'b.yaml'}:0: not a regular file (a FIFO, socket or device): policy files "
        "must be regular files"
    ]
