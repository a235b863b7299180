"""Valid JSON that is no flow record (a line of another tool's log, a config) on the review
page: not a row, not a record of the map, and named among the skipped lines, as
`garrison observe` names it (tests/unit/cli/test_observe.py)."""

from __future__ import annotations

import json
from pathlib import Path

from garrison.cli.main import main
from garrison.ui.app import Listen, ReviewApp, file_source
from tests.unit.ui.test_server import DEMO, get_json

OTHER = ['{"level": "info", "msg": "agent started"}', '{"time": "x"}',
         '{"verdict": 5, "time": 7}']  # the last one said "without 'time' and 'verdict'"


def test_json_that_is_no_record_is_skipped_as_observe_skips_it(tmp_path: Path,
                                                               capsys: object) -> None:
    log = tmp_path / "access.log"
    good = DEMO.read_text().splitlines()[:3]
    log.write_text("\n".join([good[0], OTHER[0], good[1], OTHER[1], OTHER[2], good[2]]) + "\n")
    review = ReviewApp(file_source([str(log)]), Listen("127.0.0.1", 0))
    review.start()
    try:
        assert review.wait_loaded(10)
        info = get_json(review, "/api/info")
        assert (info["records"], info["skipped"]) == (3, 3)
        assert info["skipped_samples"] == [
            f"{log}:2: not a flow record (a JSON object without 'time' and 'verdict')",
            f"{log}:4: not a flow record (a JSON object without 'verdict')",
            f"{log}:5: not a flow record (a JSON object with 'time' and 'verdict' not text)",
        ]
        rows = get_json(review, "/api/flows?limit=50")["flows"]
        assert [row["record"] for row in rows] == [json.loads(line) for line in good[::-1]]
        assert "UNKNOWN" not in {row["type"] for row in rows}
        the_map = get_json(review, "/api/map")
        assert (the_map["records"], the_map["skipped"]) == (3, 3)
        assert sorted(node["name"] for node in the_map["nodes"]) == [
            "deathstar", "tiefighter", "xwing"]  # no node of nobody for the other JSON
    finally:
        review.stop()
    # what observe says of the same log
    assert main(["observe", "--input-file", str(log), "-o", "json"]) == 1


def test_hubble_get_flows_responses_are_their_flows(tmp_path: Path, capsys: object) -> None:
    """`{"flow": ..., "node_name", "time"}` lines (Hubble's -o json, its exporter, `observe -o
    jsonpb`) are the page's records, as they are observe's."""
    wrapped = tmp_path / "hubble.json"
    wrapped.write_text("".join(
        json.dumps({"flow": json.loads(line), "node_name": "vm", "time": json.loads(line)["time"]})
        + "\n" for line in DEMO.read_text().splitlines() if line.strip()))
    plain = tmp_path / "access.log"
    plain.write_bytes(DEMO.read_bytes())
    answers = []
    for log in (plain, wrapped):
        review = ReviewApp(file_source([str(log)]), Listen("127.0.0.1", 0))
        review.start()
        try:
            assert review.wait_loaded(10)
            info = get_json(review, "/api/info")
            the_map = get_json(review, "/api/map")
            rows = get_json(review, "/api/flows?limit=500")["flows"]
            answers.append(((info["records"], info["skipped"]), the_map["nodes"],
                            the_map["edges"], [row["record"] for row in rows]))
        finally:
            review.stop()
    assert answers[0][0] == (81, 0)
    assert answers[1] == answers[0]


def test_rows_show_control_characters_as_observe_does(tmp_path: Path, capsys: object) -> None:
    """A row's columns are observe's table cells: a client's ESC, CR, LF or U+202E (which
    made the browser show the rest of the path reversed) read as escapes."""
    from tests.unit.cli.test_observe_review import HOSTILE_RECORD

    log = tmp_path / "access.log"
    log.write_text(json.dumps(HOSTILE_RECORD) + "\n")
    review = ReviewApp(file_source([str(log)]), Listen("127.0.0.1", 0))
    review.start()
    try:
        assert review.wait_loaded(10)
        (row,) = get_json(review, "/api/flows?limit=5")["flows"]
    finally:
        review.stop()
    assert (row["source"], row["destination"], row["summary"]) == (
        "default/tie\\x1b[1mfighter\\nfake (ID:257)", "default/deathstar (ID:256)",
        "HTTP/1.1 PUT http://d/\\x1b[2K\\rFORWARDED\\x9b31m\\u202eup")
    assert row["record"] == HOSTILE_RECORD  # the detail pane: the record itself, as JSON
