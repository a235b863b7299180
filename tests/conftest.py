"""Shared test configuration: privileged tests skip with the exact missing privilege."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def privileged_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN and CAP_BPF): run `sudo make test`"
    if shutil.which("ip") is None:
        return "needs the `ip` command: apt-get install iproute2"
    if not Path("/sys/fs/bpf").is_dir():
        return "needs bpffs mounted at /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = privileged_skip_reason()
    for item in items:
        if "privileged" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
