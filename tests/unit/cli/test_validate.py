"""`garrison policy validate`: summary on stdout and exit 0, or every error on stderr and exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from garrison.cli.main import main

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "tests" / "data" / "policies"
VALID = DATA / "valid"
INVALID = DATA / "invalid" / "three-errors.yaml"


def run(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> tuple[int, str, str]:
    rc = main(["policy", "validate", *(str(p) for p in paths)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_valid_directory(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, VALID)
    assert rc == 0
    assert out == "3 policies in 2 files are valid\n"
    assert err == (
        f"{VALID / 'backend.yml'}:33: warning: spec.egress[1].toFQDNs: not supported by "
        "garrison; this element allows nothing\n"
    )


def test_one_valid_file(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, VALID / "frontend.yaml")
    assert (rc, out, err) == (0, "1 policy in 1 file is valid\n", "")


def test_every_error_goes_to_stderr_with_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    """Errors and warnings are listed by file and line, then counted."""
    rc, out, err = run(capsys, VALID, INVALID)
    assert rc == 1
    assert out == ""
    lines = err.splitlines()
    assert lines == [
        f"{INVALID}:16: spec.egress[0].toPorts[0].ports[0].port: invalid port 'web_api': "
        "neither a number 0-65535 nor a port name (a port name has only lower-case letters, "
        "digits and '-')",
        f"{INVALID}:21: spec.egress[0].toPorts[0].rules.http[0].path: invalid regular "
        "expression: missing ): /api/(v1|v2",
        f"{INVALID}:22: spec.egress[1].toEntities[0]: unknown entity 'internet' (expected one "
        "of: all, world, cluster, host, remote-node, health, init, unmanaged, none, "
        "kube-apiserver, ingress, world-ipv4, world-ipv6)",
        f"{VALID / 'backend.yml'}:33: warning: spec.egress[1].toFQDNs: not supported by "
        "garrison; this element allows nothing",
        "3 errors in 1 file; no policy was loaded",
    ]


def test_missing_path_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    rc, out, err = run(capsys, missing)
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"{missing}:0: no such file or directory",
        "1 error in 1 file; no policy was loaded",
    ]


def test_no_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["policy", "validate"])
    assert info.value.code == 2
    assert "PATH" in capsys.readouterr().err


def test_installed_command() -> None:
    garrison = Path(sys.executable).parent / "garrison"
    if not garrison.exists():
        garrison = REPO / ".venv" / "bin" / "garrison"
    ok = subprocess.run(
        [str(garrison), "policy", "validate", str(VALID)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (ok.returncode, ok.stdout) == (0, "3 policies in 2 files are valid\n")
    assert "warning: spec.egress[1].toFQDNs" in ok.stderr
    bad = subprocess.run(
        [str(garrison), "policy", "validate", str(INVALID)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr.splitlines()[-1] == "3 errors in 1 file; no policy was loaded"
    assert len(bad.stderr.splitlines()) == 4


def test_json_output_of_valid_and_invalid_files(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc = main(["policy", "validate", "-o", "json", str(VALID)])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert rc == 0 and err == ""
    assert data["valid"] is True and data["errors"] == []
    assert len(data["policies"]) == 3 and len(data["files"]) == 2
    assert set(data["policies"][0]) == {"kind", "namespace", "name", "path", "rules"}
    assert data["warnings"][0]["path"] == str(VALID / "backend.yml")

    rc = main(["policy", "validate", "-o", "json", str(INVALID)])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert rc == 1 and err == ""
    assert data["valid"] is False and data["policies"] == []
    assert [(e["line"], e["field"]) for e in data["errors"]] == [
        (16, "spec.egress[0].toPorts[0].ports[0].port"),
        (21, "spec.egress[0].toPorts[0].rules.http[0].path"),
        (22, "spec.egress[1].toEntities[0]"),
    ]
    assert data["errors"][0]["path"] == str(INVALID)
