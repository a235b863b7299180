"""`garrison status` text: human lines (no raw JSON), problems named with their fix."""

from __future__ import annotations

from typing import Any

from garrison.cli.agentctl import status_problems, status_text


def status(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "datapath": {"loaded": True, "pin_root": "/sys/fs/bpf/garrison", "proxy_steering": True,
                     "proxy_steering_added": {"rule": True, "route": False},
                     "proxy_ports": {"http": 15001}},
        "proxy": {"http": "127.0.0.1:15001", "kafka": "127.0.0.1:15003"},
        "policy_revision": 3, "policies": 1, "endpoints": 2, "endpoints_unselected": ["xwing"],
        "identities": 9, "flows": {"total": 10, "in_ring": 4}, "map_writes": 33,
        "uptime_s": 3723.4,
    }
    data.update(overrides)
    return data


def test_healthy_agent() -> None:
    data = status()
    assert status_problems(data) == []
    assert status_text(data, []) == "\n".join([
        "Datapath:        loaded, maps pinned under /sys/fs/bpf/garrison",
        "Proxy steering:  installed (fwmark 0x200 rule, table 2004 route; this agent added "
        "the rule)",
        "Proxy:           http on 127.0.0.1:15001, kafka on 127.0.0.1:15003",
        "Policy revision: 3 (1 policy)",
        "Endpoints:       2 (1 selected by no policy, all traffic allowed: xwing)",
        "Identities:      9",
        "Flows:           10 (4 in memory)",
        "Map writes:      33",
        "Uptime:          1h 2m 3s",
    ])


def test_problems_are_listed_with_their_fix() -> None:
    data = status(policy_dir={"path": "/etc/p", "errors": ["/etc/p/a.yaml:12: x: bad"]})
    data["datapath"]["proxy_steering"] = False
    problems = status_problems(data)
    assert problems == [
        "the proxy steering ip rule or route is missing: redirected ports fail closed; "
        "restart the agent to install it",
        "policy directory: /etc/p/a.yaml:12: x: bad",
    ]
    text = status_text(data, problems)
    assert "Policy dir:      /etc/p: 1 problem, the previous policy stays in force\n" \
        "                   /etc/p/a.yaml:12: x: bad" in text
    assert text.endswith("\n\nPROBLEM: " + "\nPROBLEM: ".join(problems))
    assert "{" not in text


def test_ct_list_text() -> None:
    from garrison.cli.agentctl import ct_text

    row = {
        "protocol": "TCP", "source": "198.18.0.2", "source_port": 40000,
        "destination": "198.18.0.3", "destination_port": 80, "expires_in_s": 21590,
        "expired": False, "flags": ["SEEN_REPLY", "ESTABLISHED", "REDIRECT"],
        "tcp_flags_orig": ["SYN", "ACK"], "tcp_flags_reply": ["SYN", "ACK"],
        "packets_orig": 5, "packets_reply": 4, "src_identity": 256, "dst_identity": 257,
        "proxy_port": 15001,
    }
    assert ct_text([row]) == (
        "TCP 198.18.0.2:40000 -> 198.18.0.3:80 expires=21590s packets=5/4 "
        "tcp_flags=SYN|ACK/SYN|ACK flags=[SEEN_REPLY ESTABLISHED REDIRECT] identity=256->257 "
        "proxy_port=15001"
    )
    udp = {**row, "protocol": "UDP", "expired": True, "flags": [], "proxy_port": None}
    assert ct_text([udp]) == (
        "UDP 198.18.0.2:40000 -> 198.18.0.3:80 expired packets=5/4 flags=[] "
        "identity=256->257"
    )
    assert ct_text([]) == "(no connections tracked)"
