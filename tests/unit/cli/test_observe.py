"""`garrison observe` and `garrison accesslog` on files: what an operator sees, line by line,
on a log the real agent wrote (tests/data/flows/starwars-demo.log), and `--follow` in a real
process across appends and rotation."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from garrison.cli.main import main
from tests.conftest import REPO

DEMO = REPO / "tests" / "data" / "flows" / "starwars-demo.log"
POLICIES = ("starwars/sw_l3_l4_l7_policy.yaml", "grpc/doors-policy.yaml",
            "kafka/kafka_policy.yaml")
DEMO_LINES = [line for line in DEMO.read_text().splitlines() if line]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def observe(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    rc, out, err = run(capsys, "observe", "--input-file", str(DEMO), *argv)
    assert (rc, err) == (0, "")
    return out.splitlines()


def test_compact_golden_lines(capsys: pytest.CaptureFixture[str]) -> None:
    # the response's source is the server (Hubble's convention): --to-pod sees the request only
    assert len(observe(capsys, "--to-pod", "deathstar", "--http-method", "PUT")) == 1
    assert observe(capsys, "--pod", "deathstar", "--http-method", "PUT", "--color",
                   "never") == [
        "Dec  5 11:59:42.390: default/tiefighter:35746 (ID:257) -> default/deathstar-2:80 "
        "(ID:256) http-request DROPPED (HTTP/1.1 PUT http://198.18.0.3/v1/exhaust-port)",
        "Dec  5 11:59:42.390: default/tiefighter:35746 (ID:257) <- default/deathstar-2:80 "
        "(ID:256) http-response DROPPED (HTTP/1.1 403 0ms (PUT http://198.18.0.3/v1/exhaust-port))",
    ]


def test_kernel_drops_and_policy_names(capsys: pytest.CaptureFixture[str]) -> None:
    lines = observe(capsys, "--from-pod", "xwing", "-t", "drop", "--first", "1")
    assert lines == ["Dec  5 11:59:39.893: default/xwing:49068 (ID:258) <> default/deathstar-1:80 "
                     "(ID:256) Policy denied DROPPED (TCP Flags: SYN)"]
    lines = observe(capsys, "--grpc-method", "SetAccessCode", "--print-policy-names",
                    "--first", "1")
    assert lines[0].endswith("(gRPC doors.DoorManager/SetAccessCode) [ingress denied by "
                             "CiliumNetworkPolicy default/door-manager ingress[0]]")


def test_colour_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    lines = observe(capsys, "--verdict", "DROPPED", "--first", "1", "--color", "always")
    assert "\x1b[31mDENIED\x1b[0m" in lines[0]
    assert "\x1b[" not in observe(capsys, "--first", "1")[0]  # not a terminal


def test_json_is_the_log_line_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    lines = observe(capsys, "-o", "json", "--kafka-topic", "deathstar-plans")
    expected = [line for line in DEMO_LINES if '"deathstar-plans"' in line]
    assert lines == expected and len(expected) == 2


def test_field_mask(capsys: pytest.CaptureFixture[str]) -> None:
    lines = observe(capsys, "-o", "json", "--http-status", "403", "--field-mask",
                    "time,verdict,source.pod_name,l7.http.code,l7.kafka")
    assert [json.loads(line) for line in lines] == [{
        "time": "2026-12-05T11:59:42.390661376Z", "verdict": "DROPPED",
        "source": {"pod_name": "deathstar-2"}, "l7": {"http": {"code": 403}},
    }]
    rc, _, err = run(capsys, "observe", "--input-file", str(DEMO), "--field-mask", "colour")
    assert rc == 2 and "--field-mask applies to -o json and -o jsonpb and -o dict" in err
    rc, _, err = run(capsys, "observe", "--input-file", str(DEMO), "-o", "json",
                     "--field-mask", "colour")
    assert rc == 2 and "'colour' is no field of a flow record" in err


def test_dict_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    lines = observe(capsys, "-o", "dict", "--http-status", "403")
    assert lines == [
        "  TIMESTAMP: Dec  5 11:59:42.390",
        "     SOURCE: default/tiefighter:35746 (ID:257)",
        "DESTINATION: default/deathstar-2:80 (ID:256)",
        "       TYPE: http-response",
        "    VERDICT: DROPPED",
        "    SUMMARY: HTTP/1.1 403 0ms (PUT http://198.18.0.3/v1/exhaust-port)",
        "------------",
    ]
    table = observe(capsys, "-o", "table", "--type", "l7", "--verdict", "DROPPED")
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT",
                                "SUMMARY"]
    assert len(table) == 7
    starts = {line.index("DROPPED") for line in table[1:]}
    assert len(starts) == 1  # aligned


def test_first_last_since_until(capsys: pytest.CaptureFixture[str]) -> None:
    everything = observe(capsys, "-o", "json")
    assert everything == DEMO_LINES
    assert observe(capsys, "-o", "json", "--last", "2") == DEMO_LINES[-2:]
    assert observe(capsys, "-o", "json", "--first", "2") == DEMO_LINES[:2]
    window = observe(capsys, "-o", "json", "--since", "2026-12-05T11:59:45Z", "--until",
                     "2026-12-05 11:59:46")
    assert window and all('"2026-12-05T11:59:45.' in line for line in window)
    rc, _, err = run(capsys, "observe", "--input-file", str(DEMO), "--first", "1", "--last", "1")
    assert rc == 2 and "--first and --last exclude each other" in err


def test_not_and_or(capsys: pytest.CaptureFixture[str]) -> None:
    kafka_not_forwarded = observe(capsys, "-o", "json", "--protocol", "kafka", "--not",
                                  "--verdict", "FORWARDED")
    assert len(kafka_not_forwarded) == 2
    either = observe(capsys, "-o", "json", "--grpc-method", "GetName", "--grpc-method",
                     "SetAccessCode")
    assert len(either) == 4
    rc, _, err = run(capsys, "observe", "--input-file", str(DEMO), "--verdict", "DROPPED",
                     "--not")
    assert rc == 2 and "--not must be followed by a filter flag" in err


def test_bad_filter_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "observe", "--input-file", str(DEMO), "--verdict", "MAYBE")
    assert (rc, out) == (2, "")
    assert "--verdict 'MAYBE': expected one of FORWARDED, DROPPED, AUDIT, ERROR" in err


def test_rotated_gzip_backups_and_bad_lines(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "access.log"
    half = len(DEMO_LINES) // 2
    with gzip.open(tmp_path / "access.log.2.gz", "wt") as f:
        f.write("\n".join(DEMO_LINES[:10]) + "\n")
    (tmp_path / "access.log.1").write_text("\n".join(DEMO_LINES[10:half]) + "\n{torn\n")
    log.write_text("\n".join(DEMO_LINES[half:]) + "\n[1]\n")
    rc, out, err = run(capsys, "observe", "--input-file", str(log), "-o", "json")
    assert out.splitlines() == DEMO_LINES
    assert rc == 1  # bad lines are reported, never printed as flows
    assert f"{tmp_path}/access.log.1:{half - 10 + 1}: not a flow record (not JSON" in err
    assert f"{log}:{len(DEMO_LINES) - half + 1}: not a flow record (not a JSON object)" in err
    rc, out, _ = run(capsys, "observe", "--input-file", str(log), "--no-backups", "-o", "json")
    assert out.splitlines() == DEMO_LINES[half:]


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Stdin:
        buffer = io.BytesIO(DEMO.read_bytes())

    monkeypatch.setattr(sys, "stdin", Stdin())
    rc, out, _ = run(capsys, "observe", "--input-file", "-", "--http-status", "403", "-o",
                     "json")
    assert rc == 0 and len(out.splitlines()) == 1


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run(capsys, "observe", "--input-file", str(tmp_path / "x.log"))
    assert rc == 1 and "x.log: cannot open: No such file or directory" in err


def test_export_csv_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "accesslog", "export", "--input-file", str(DEMO), "-o", "csv",
                     "--http-status", "403")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 1
    row = rows[0]
    assert (row["verdict"], row["type"], row["http_code"], row["source_pod"]) == (
        "DROPPED", "http-response", "403", "deathstar-2")
    assert row["destination_labels"] == (
        "k8s:class=tiefighter;k8s:io.kubernetes.pod.namespace=default;k8s:org=empire")
    assert row["policies"] == "ingress denied by CiliumNetworkPolicy default/rule1 ingress[0]"
    target = tmp_path / "out.csv"
    rc, out, _ = run(capsys, "accesslog", "export", "--input-file", str(DEMO), "-o", "csv",
                     "--field-mask", "time,l7.kafka.topics", "--kafka-topic", "deathstar-plans",
                     "--out", str(target))
    assert (rc, out) == (0, "")
    assert target.read_text().splitlines() == [
        "time,l7.kafka.topics",
        "2026-12-05T11:59:48.051732736Z,deathstar-plans",
        "2026-12-05T11:59:48.051732736Z,deathstar-plans",
    ]
    rc, out, _ = run(capsys, "accesslog", "export", "--input-file", str(DEMO), "--type", "drop")
    assert out.splitlines() == [line for line in DEMO_LINES if '"type":1,' in line]


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "accesslog", "summary", "--input-file", str(DEMO), "-o", "json",
                     *(f"--policy={REPO / 'examples' / p}" for p in POLICIES))
    data = json.loads(out)
    assert rc == 0
    assert data["records_read"] == 81
    assert data["verdicts"]["records"]["dropped"] == 14
    whats = {g["what"] for g in data["top_denied"]["groups"]}
    assert {"PUT /v1/exhaust-port", "doors.DoorManager/SetAccessCode"} <= whats
    assert data["rules"]["policies_given"] is True
    never = {r["text"] for r in data["rules"]["never_matched"]}
    assert "CiliumNetworkPolicy default/door-manager ingress[1]" in never
    bad = run(capsys, "accesslog", "summary", "--input-file", str(DEMO), "--policy",
              str(REPO / "examples"))
    assert bad[0] == 2 and "--policy: " in bad[2] and "duplicate policy" in bad[2]
    rc, out, _ = run(capsys, "accesslog", "summary", "--input-file", str(DEMO),
                     "--color", "never")
    assert rc == 0 and "PUT /v1/exhaust-port" in out and "--policy" in out


@pytest.mark.skipif(shutil.which("garrison", path=str(Path(sys.executable).parent)) is None,
                    reason="needs the garrison script in the virtualenv: make setup")
def test_follow_picks_up_appends_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(DEMO_LINES[0] + "\n")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "garrison"), "observe", "--input-file", str(log),
         "--follow", "-o", "json", "--last", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().rstrip("\n") == DEMO_LINES[0]  # --last 1 of what is there
        with log.open("a") as f:
            f.write(DEMO_LINES[1] + "\n" + DEMO_LINES[2][:50])
        assert proc.stdout.readline().rstrip("\n") == DEMO_LINES[1]
        with log.open("a") as f:  # the partial line completes, then the writer rotates
            f.write(DEMO_LINES[2][50:] + "\n")
        os.rename(log, tmp_path / "access.log.1")
        time.sleep(0.3)
        log.write_text(DEMO_LINES[3] + "\n")
        assert proc.stdout.readline().rstrip("\n") == DEMO_LINES[2]
        assert proc.stdout.readline().rstrip("\n") == DEMO_LINES[3]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_json_that_is_no_flow_record_is_an_error_per_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Some other JSON (a config file, a log of another tool) is not shown as an UNKNOWN
    record with exit 0: each line is named with its reason, and the exit is 1."""
    path = tmp_path / "other.log"
    good = DEMO.read_text().splitlines()[0]
    path.write_text('{"level": "info", "msg": "hello"}\n' + good + '\n{"time": "x"}\n')
    rc, out, err = run(capsys, "observe", "--input-file", str(path))
    assert rc == 1
    assert "UNKNOWN" not in out and len(out.splitlines()) == 1  # the one real record
    assert err.splitlines() == [
        f"garrison: {path}:1: not a flow record (a JSON object without 'time' and "
        "'verdict'); skipped",
        f"garrison: {path}:3: not a flow record (a JSON object without 'verdict'); skipped",
    ]
