"""What an operator reviewing an access log sees when a value is out of range or malformed:
one line naming the flag and the fix, exit status 2, nothing else on the terminal."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from garrison.cli.main import main
from tests.conftest import REPO

DEMO = REPO / "tests" / "data" / "flows" / "starwars-demo.log"


@pytest.mark.parametrize("flag", ["--since", "--until"])
@pytest.mark.parametrize("value", ["99999999999999h", "9999999999d", "-9999999999d"])
def test_a_duration_too_long_is_a_usage_error(capfd: pytest.CaptureFixture[str], flag: str,
                                             value: str) -> None:
    # Go (so Hubble) refuses a duration past 2^63-1 ns (~292 years); it used to be a traceback
    rc = main(["observe", "--input-file", str(DEMO), f"{flag}={value}"])
    out, err = capfd.readouterr()
    assert (rc, out) == (2, "")
    assert err == (f"garrison: {flag} {value!r}: a duration is at most 2562047h (about 292 "
                   "years, as in Go)\n")


def test_a_long_duration_still_reads() -> None:
    assert main(["observe", "--input-file", str(DEMO), "--since", "2562047h", "--first",
                 "1", "-o", "json"]) == 0


@pytest.mark.parametrize("flag", ["--http-path", "--http-url"])
def test_a_bad_regular_expression_is_one_line(capfd: pytest.CaptureFixture[str],
                                             flag: str) -> None:
    # RE2's C++ logger wrote two lines of its own to the terminal, and the reason was bytes
    rc = main(["observe", "--input-file", str(DEMO), flag, "/v1/(exhaust"])
    out, err = capfd.readouterr()
    assert (rc, out) == (2, "")
    assert err == (f"garrison: {flag} '/v1/(exhaust': not a regular expression (RE2 syntax, "
                   "as Hubble's): missing ): /v1/(exhaust\n")


def test_follow_refuses_a_compressed_backup(tmp_path: Path) -> None:
    # it printed the gzip bytes as lines that were "not a flow record (not JSON: ...)", then
    # waited forever for a file that never grows (so: a real process, with a timeout)
    backup = tmp_path / "access.log.2.gz"
    backup.write_bytes(gzip.compress(DEMO.read_bytes()))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from garrison.cli.main import main; "
         "sys.exit(main(sys.argv[1:]))", "observe", "--input-file", str(backup), "--last", "2",
         "--follow"], capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"garrison: --follow: access log {backup} is compressed, a rotated "
                           "backup that no longer grows: read it without --follow\n")


def test_jsonpb_is_hubbles_get_flows_response(capfd: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    # `hubble observe -o jsonpb` (and Hubble's -o json) print a GetFlowsResponse per flow, so
    # scripts read `.flow`; garrison refused -o jsonpb as an invalid choice
    on_node = next(line for line in DEMO.read_text().splitlines() if '"deathstar-plans"' in line)
    first = json.loads(on_node)
    assert first["node_name"] == "vm"
    no_node = json.dumps({k: v for k, v in first.items() if k != "node_name"})
    log = tmp_path / "access.log"
    log.write_text(on_node + "\n" + no_node + "\n")
    rc = main(["observe", "--input-file", str(log), "-o", "jsonpb"])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        '{"flow":' + on_node + ',"node_name":"vm","time":"' + first["time"] + '"}',
        '{"flow":' + no_node + ',"time":"' + first["time"] + '"}',
    ]
    rc = main(["observe", "--input-file", str(log), "-o", "jsonpb", "--first", "1",
               "--field-mask", "verdict,l7.kafka.topic"])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    assert json.loads(out) == {"flow": {"verdict": "DROPPED",
                                        "l7": {"kafka": {"topic": "deathstar-plans"}}},
                               "node_name": "vm", "time": first["time"]}


HOSTILE_RECORD = {
    "time": "2026-12-05T11:59:42.390661376Z", "verdict": "DROPPED", "Type": "L7",
    "is_reply": False,
    "source": {"identity": 257, "namespace": "default", "pod_name": "tie\x1b[1mfighter\nfake"},
    "destination": {"identity": 256, "namespace": "default", "pod_name": "deathstar"},
    "l7": {"type": "REQUEST", "http": {"method": "PUT", "url": "http://d/\x1b]0;pwned\x07"}},
    "Summary": "HTTP/1.1 PUT http://d/\x1b[2K\rFORWARDED\x9b31m\u202eup",
}


@pytest.mark.parametrize(("output", "expected"), [
    ("compact", [
        "Dec  5 11:59:42.390: default/tie\\x1b[1mfighter\\nfake (ID:257) -> default/deathstar "
        "(ID:256) http-request DROPPED (HTTP/1.1 PUT http://d/\\x1b[2K\\rFORWARDED\\x9b31m"
        "\\u202eup)"]),
    ("dict", [
        "  TIMESTAMP: Dec  5 11:59:42.390",
        "     SOURCE: default/tie\\x1b[1mfighter\\nfake (ID:257)",
        "DESTINATION: default/deathstar (ID:256)",
        "       TYPE: http-request",
        "    VERDICT: DROPPED",
        "    SUMMARY: HTTP/1.1 PUT http://d/\\x1b[2K\\rFORWARDED\\x9b31m\\u202eup",
        "------------"]),
    ("table", [
        "TIMESTAMP            SOURCE                                    DESTINATION         "
        "        TYPE          VERDICT  SUMMARY",
        "Dec  5 11:59:42.390  default/tie\\x1b[1mfighter\\nfake (ID:257)  default/deathstar "
        "(ID:256)  http-request  DROPPED  HTTP/1.1 PUT http://d/\\x1b[2K\\rFORWARDED\\x9b31m"
        "\\u202eup"]),
])
def test_control_characters_from_the_log_never_reach_the_terminal(
        capfd: pytest.CaptureFixture[str], tmp_path: Path, output: str,
        expected: list[str]) -> None:
    # a path or a name in a record is the client's: raw, an escape sequence cleared the line,
    # a CR wrote FORWARDED over DROPPED and a newline forged a line of its own (Hubble escapes
    # them too)
    log = tmp_path / "access.log"
    log.write_text(json.dumps(HOSTILE_RECORD) + "\n")
    for color in ("never", "always"):
        rc = main(["observe", "--input-file", str(log), "-o", output, "--color", color])
        out, err = capfd.readouterr()
        assert (rc, err) == (0, "")
        if color == "always" and output != "table":
            assert "\x1b[31mDROPPED\x1b[0m" in out  # garrison's own colour stays
            out = out.replace("\x1b[31mDROPPED\x1b[0m", "DROPPED")
        assert out.splitlines() == expected


def test_summary_shows_control_characters_as_escapes(capfd: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(json.dumps(HOSTILE_RECORD) + "\n")
    rc = main(["accesslog", "summary", "--input-file", str(log), "--color", "never"])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    top = out.split("Top denied (1 of 1 groups)\n")[1].splitlines()
    assert top[1].split()[:4] == ["1", "default/tie\\x1b[1mfighter\\nfake", "(ID:257)",
                                  "default/deathstar"]
    assert "PUT /\\x1b]0;pwned\\x07" in top[1]


def test_a_record_with_a_time_that_is_no_text_is_named_so(capfd: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    # it said "a JSON object without 'time' and 'verdict'" of a line that has both
    log = tmp_path / "access.log"
    log.write_text('{"verdict": 5, "time": 7}\n{"time": 7}\n')
    rc = main(["observe", "--input-file", str(log)])
    out, err = capfd.readouterr()
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"garrison: {log}:1: not a flow record (a JSON object with 'time' and 'verdict' not "
        "text); skipped",
        f"garrison: {log}:2: not a flow record (a JSON object without 'verdict', with 'time' "
        "not text); skipped",
    ]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--interval", "0", "--interval 0: expected 1 or more seconds"),
    ("--interval", "-5", "--interval -5: expected 1 or more seconds"),
    ("--top", "-1", "--top -1: expected 0 or more groups"),
])
def test_summary_names_the_flag_of_a_bad_number(capfd: pytest.CaptureFixture[str], flag: str,
                                                value: str, message: str) -> None:
    # it named the code's field: "garrison: interval_s must be 1 or more, not 0"
    rc = main(["accesslog", "summary", "--input-file", str(DEMO), f"{flag}={value}"])
    out, err = capfd.readouterr()
    assert (rc, out, err) == (2, "", f"garrison: {message}\n")


def test_dict_with_a_field_mask_escapes_control_characters(capfd: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(json.dumps(HOSTILE_RECORD) + "\n")
    rc = main(["observe", "--input-file", str(log), "-o", "dict", "--field-mask",
               "Summary,source.pod_name"])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "Summary: HTTP/1.1 PUT http://d/\\x1b[2K\\rFORWARDED\\x9b31m\\u202eup",
        "source.pod_name: tie\\x1b[1mfighter\\nfake",
        "------------",
    ]


def test_hubble_get_flows_responses_read_as_their_flows(capfd: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    # what `hubble observe -o json` and Hubble's exporter write ({"flow": ...}), and
    # `observe -o jsonpb` too, was "not a flow record (a JSON object without 'verdict')"
    assert main(["observe", "--input-file", str(DEMO), "-o", "jsonpb"]) == 0
    wrapped = tmp_path / "hubble.json"
    wrapped.write_text(capfd.readouterr().out)
    for output in ("compact", "json", "jsonpb"):
        assert main(["observe", "--input-file", str(DEMO), "-o", output]) == 0
        expected = capfd.readouterr().out
        rc = main(["observe", "--input-file", str(wrapped), "-o", output])
        out, err = capfd.readouterr()
        assert (rc, err) == (0, "")
        assert out == expected
    rc = main(["observe", "--input-file", str(wrapped), "--verdict", "DROPPED", "--to-pod",
               "deathstar", "-o", "json"])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    assert out.splitlines() == [line for line in DEMO.read_text().splitlines()
                                if '"verdict":"DROPPED"' in line and
                                '"destination":{"identity":256' in line]


@pytest.mark.parametrize("stamp", ["2026-02-30T00:00:00Z", "2026-12-05T25:00:00Z",
                                   "0001-01-01T00:00:00+14:00"])
@pytest.mark.parametrize("extra", [[], ["--since", "2026-01-01"], ["-o", "table"]])
def test_a_time_that_is_no_date_is_shown_as_unknown(capfd: pytest.CaptureFixture[str],
                                                    tmp_path: Path, stamp: str,
                                                    extra: list[str]) -> None:
    # February 30th ended observe in a traceback (ValueError from datetime)
    good = DEMO.read_text().splitlines()[0]
    log = tmp_path / "access.log"
    log.write_text(json.dumps({"time": stamp, "verdict": "DROPPED"}) + "\n" + good + "\n")
    rc = main(["observe", "--input-file", str(log), *extra])
    out, err = capfd.readouterr()
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    if extra[:1] == ["--since"]:
        assert len(lines) == 1 and lines[0].startswith("Dec  5 11:59:")  # outside any bound
    elif extra:
        assert lines[1].startswith("-  ") and lines[2].startswith("Dec  5 11:59:")
    else:
        assert lines[0] == "-: - (unknown) <> - (unknown) UNKNOWN DROPPED ()"
