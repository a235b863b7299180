"""`garrison observe`, `accesslog summary` and `accesslog export` take `hubble observe`'s
filter flags with Hubble's meaning, on the log the real agent wrote in the Star Wars demo:
the same flags select the same records in all three commands, Hubble's own forms are read,
and what Hubble refuses is a one-line error with exit code 2."""

from __future__ import annotations

import json

import pytest

from garrison.cli.main import main
from tests.conftest import REPO

DEMO = REPO / "tests" / "data" / "flows" / "starwars-demo.log"
DEMO_LINES = [line for line in DEMO.read_text().splitlines() if line]
COMMANDS = (("observe", "-o", "json"), ("accesslog", "export"), ("accesslog", "summary",
                                                                 "-o", "json"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def observed(capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict[str, object]]:
    rc, out, err = run(capsys, "observe", "--input-file", str(DEMO), "-o", "json", *flags)
    assert (rc, err) == (0, "")
    return [json.loads(line) for line in out.splitlines()]


def counts(capsys: pytest.CaptureFixture[str], *flags: str) -> list[int]:
    """How many records each of the three commands selects with `flags`."""
    found = []
    for command in COMMANDS:
        rc, out, err = run(capsys, *command, "--input-file", str(DEMO), *flags)
        assert (rc, err) == (0, ""), command
        if command[1] == "summary":
            found.append(json.loads(out)["records_read"])
        else:
            found.append(len(out.splitlines()))
    return found


def pods(flows: list[dict[str, object]], side: str) -> set[str]:
    return {str(f[side].get("pod_name", "")) for f in flows}  # type: ignore[attr-defined]


def _port(d: dict[str, object], key: str) -> object:
    return d["l4"]["TCP"].get(key)  # type: ignore[index,attr-defined]


def test_the_three_commands_select_the_same_records(capsys: pytest.CaptureFixture[str]) -> None:
    flows = [json.loads(line) for line in DEMO_LINES]
    # Hubble: (from default and from port 80) or (to default and to port 80)
    expected = sum(1 for d in flows if _port(d, "destination_port") == 80
                   or _port(d, "source_port") == 80)
    assert counts(capsys, "--namespace", "default", "--port", "80") == [expected] * 3 == [16] * 3
    assert counts(capsys, "--not", "-t", "drop", "--not", "--from-pod", "xwing") == [77] * 3
    assert counts(capsys, "--protocol", "http", "--verdict", "DROPPED") == [4] * 3


def test_direction_less_port_stays_with_its_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    # the outpost talks to kafka:9092 from ephemeral ports: `--pod outpost --port 9092` is
    # "outpost's own port 9092, or to outpost on port 9092" -- neither happens
    assert observed(capsys, "--pod", "outpost", "--port", "9092") == []
    requests = observed(capsys, "--from-pod", "outpost", "--to-port", "9092")
    assert len(requests) == 18 and pods(requests, "destination") == {"kafka"}
    # the same for labels: an xwing never listens on port 80
    assert observed(capsys, "--label", "class=xwing", "--port", "80") == []
    assert len(observed(capsys, "--from-label", "class=xwing", "--to-port", "80")) == 8


def test_several_not_flags_hide_what_matches_all_of_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shown = observed(capsys, "--not", "-t", "drop", "--not", "--from-pod", "xwing")
    assert len(shown) == len(DEMO_LINES) - 4  # the xwing's four SYN drops
    # the xwing's other records and other drops stay
    assert any(f["source"].get("pod_name") == "xwing" for f in shown)  # type: ignore[attr-defined]


def test_pod_names_and_namespaces(capsys: pytest.CaptureFixture[str]) -> None:
    every_pod = observed(capsys, "-A", "--pod", "deathstar")
    assert every_pod == observed(capsys, "--pod", "default/deathstar")
    assert every_pod == observed(capsys, "--pod", "deathstar")  # default/deathstar
    assert observed(capsys, "--pod", "kube-system/deathstar") == []
    assert len(observed(capsys, "--to-pod", "default/")) == len(
        observed(capsys, "-n", "default", "--not", "--from-namespace", "default")
    ) + len(observed(capsys, "--to-namespace", "default", "--from-namespace", "default"))


def test_hubble_forms_are_read(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(observed(capsys, "-t", "129")) == len(observed(capsys, "-t", "l7"))
    assert len(observed(capsys, "-t", "drop:133")) == 4
    assert observed(capsys, "--verdict", "REDIRECTED") == []
    assert observed(capsys, "--to-port", "0") == []
    assert len(observed(capsys, "-l", "class notin ()", "-t", "drop")) == 4
    since = observed(capsys, "--since", "2026-12-05T11:59Z")
    assert since == observed(capsys, "--since", "Sat, 05 Dec 2026 11:59:00 +0000")
    assert len(since) == len(DEMO_LINES)
    # Hubble's flags for what garrison records too
    assert len(observed(capsys, "-4")) == len(DEMO_LINES) and observed(capsys, "-6") == []
    assert len(observed(capsys, "--node-name", "vm")) == len(DEMO_LINES)
    syns = observed(capsys, "--tcp-flags", "syn")
    assert syns and all(f["l4"]["TCP"]["flags"]["SYN"] for f in syns)  # type: ignore[index]
    assert len(observed(capsys, "--http-header", "User-Agent:curl/7.88.1")) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("-t", "trace:typo"), "--type 'trace:typo': sub type 'typo' is no number nor an "
                               "observation point"),
        (("--http-status", "404+"), "--http-status '404+': expected a status code (403) or "
                                    "one or two leading digits and + (4+, 40+)"),
        (("--pod", "kube-system/coredns", "--namespace", "default"),
         "pod 'kube-system/coredns' is not in --namespace default: the filters contradict"),
        (("--ip", "198.18.0.5", "--pod", "xwing"),
         "filters --ip and --pod cannot be combined (as in Hubble): keep one of them"),
        (("--from-pod", "xwing", "-n", "default"),
         "filters --from-pod and --namespace cannot be combined"),
        (("--http-method", "PUT", "-t", "drop"), "--http-method needs --type l7 among the "
                                                 "types given"),
        (("--not", "--not", "--verdict", "DROPPED"), "--not --not: negate a filter flag once"),
        (("--not", "--since", "5m"), "--not cannot negate --since"),
    ],
)
def test_what_hubble_refuses_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], message: str
) -> None:
    for command in COMMANDS:
        rc, out, err = run(capsys, *command, "--input-file", str(DEMO), *flags)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("garrison: ")
        assert message in err


def test_first_and_follow_are_refused_together(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "observe", "--input-file", str(DEMO), "--first", "3", "--follow")
    assert (rc, out) == (2, "")
    assert err == ("garrison: --first and --follow cannot be combined (as in Hubble): --first "
                   "stops after N records; write --last N --follow\n")


def test_print_raw_filters_shows_hubbles_filters(capsys: pytest.CaptureFixture[str]) -> None:
    # as `hubble observe --print-raw-filters`: the flags' filters, nothing read
    rc, out, err = run(capsys, "observe", "--namespace", "cilium", "--port", "443", "--not",
                       "--verdict", "DROPPED", "--not", "--pod", "kube-system/",
                       "--print-raw-filters")
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "allowlist:",
        """    - '{"source_pod":["cilium/"],"source_port":["443"]}'""",
        """    - '{"destination_pod":["cilium/"],"destination_port":["443"]}'""",
        "denylist:",
        """    - '{"source_pod":["kube-system/"],"verdict":["DROPPED"]}'""",
        """    - '{"destination_pod":["kube-system/"],"verdict":["DROPPED"]}'""",
    ]
    rc, out, _ = run(capsys, "observe", "--from-pod", "xwing", "--to-port", "80",
                     "--print-raw-filters")
    assert out == """allowlist:\n    - '{"source_pod":["xwing"],"destination_port":["80"]}'\n"""
    rc, out, _ = run(capsys, "observe", "--print-raw-filters")
    assert (rc, out) == (0, "")


def test_the_print_raw_filters_example_in_the_docs_runs_as_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shlex

    doc = (REPO / "docs" / "observe.md").read_text()
    block = doc.split("$ garrison observe --namespace cilium", 1)[1].split("```", 1)[0]
    command, *expected = ("observe --namespace cilium" + block).splitlines()
    rc, out, err = run(capsys, *shlex.split(command))
    assert (rc, err) == (0, "")
    assert out.splitlines() == expected
