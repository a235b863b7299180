"""The local API's requests as the handlers read them, for requests the CLI never sends
(the API is a gRPC service any root process may call)."""

from __future__ import annotations

from typing import Any

import pytest

from garrison.agent.api import APIError
from garrison.agent.handlers import policy_paths


@pytest.mark.parametrize(("paths", "why"), [
    ("/etc/garrison/policies/a.yaml", "paths: expected a list of policy files or directories"),
    ([], "paths: expected a list"),
    ([1, 2], "paths: expected a list"),
    ([""], "paths: expected a list"),
    (None, "paths: expected a list"),
    (["policies/a.yaml"], "'policies/a.yaml': not an absolute path"),
])
def test_policy_import_paths_are_a_list_of_absolute_paths(paths: Any, why: str) -> None:
    """A string was a list of one-character paths, "/" among them: the agent walked the whole
    file system for policy files, for minutes; [1, 2] was a TypeError (INTERNAL)."""
    with pytest.raises(APIError, match=why):
        policy_paths({"paths": paths})


def test_absolute_paths_pass() -> None:
    assert policy_paths({"paths": ["/a.yaml", "/b/"]}) == ["/a.yaml", "/b/"]
