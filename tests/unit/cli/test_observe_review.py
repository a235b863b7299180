"""What an operator reviewing an access log sees when a value is out of range or malformed:
one line naming the flag and the fix, exit status 2, nothing else on the terminal."""

from __future__ import annotations

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
