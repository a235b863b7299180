"""The examples at the end of each command's `--help`, by command path.

Every line that starts with `garrison` must parse (tests/unit/cli/test_help.py parses them);
a `#` comment after a command says what it does.
"""

from __future__ import annotations

EXAMPLES: dict[str, tuple[str, ...]] = {
    "": (
        "garrison policy validate examples/starwars/sw_l3_l4_l7_policy.yaml   # offline",
        "garrison agent --policy-dir /etc/garrison/policies &   # the node agent, as root",
        "garrison observe --last 20 --verdict DROPPED   # what was dropped, and why",
    ),
    "policy": (
        "garrison policy validate examples/starwars/sw_l3_l4_l7_policy.yaml",
        "garrison policy import examples/starwars/sw_l3_l4_l7_policy.yaml",
        "garrison policy get",
    ),
    "policy validate": (
        "garrison policy validate examples/grpc/ examples/kafka/   # directories, recursively",
        "garrison policy validate -o json policies/*.yaml",
    ),
    "policy trace": (
        "garrison policy trace -f examples/starwars/sw_l3_l4_l7_policy.yaml \\\n"
        "    --src-labels org=empire,class=tiefighter --dst-labels org=empire,class=deathstar \\\n"
        "    --dport 80 --http-method PUT --http-path /v1/exhaust-port",
    ),
    "policy import": ("garrison policy import examples/starwars/sw_l3_l4_l7_policy.yaml",),
    "policy delete": ("garrison policy delete rule1", "garrison policy delete --all"),
    "policy get": ("garrison policy get -o json",),
    "proxy": (
        "garrison proxy --listen 127.0.0.1:8080 --upstream 127.0.0.1:8000 --dport 80 \\\n"
        "    -f examples/starwars/sw_l3_l4_l7_policy.yaml \\\n"
        "    --dst-labels org=empire,class=deathstar \\\n"
        "    --peer 127.0.0.2/32=org=empire,class=tiefighter --access-log /tmp/access.log -v",
    ),
    "endpoint": (
        "garrison endpoint add deathstar --labels org=empire,class=deathstar",
        "garrison endpoint list",
    ),
    "endpoint add": (
        "garrison endpoint add deathstar --labels org=empire,class=deathstar",
        "garrison endpoint add web --netns /run/netns/web --labels app=web   # adopt a namespace",
        "garrison endpoint add api --labels app=api --port http=8080/TCP   # a named port",
    ),
    "endpoint list": ("garrison endpoint list -o json",),
    "endpoint get": ("garrison endpoint get deathstar",),
    "endpoint delete": ("garrison endpoint delete deathstar",),
    "endpoint labels": (
        "garrison endpoint labels deathstar --labels org=empire,class=deathstar,v=2",
    ),
    "endpoint config": (
        "garrison endpoint config deathstar audit=true",
        "garrison endpoint config deathstar deny-response=tcp-reset   # refuse, not drop",
    ),
    "endpoint exec": ("garrison endpoint exec tiefighter -- curl -s http://198.18.0.2/",),
    "namespace": ("garrison namespace label prod team=blue", "garrison namespace list"),
    "namespace label": (
        "garrison namespace label prod team=blue tier=back",
        "garrison namespace label prod tier-   # remove a label",
    ),
    "namespace get": ("garrison namespace get prod -o json",),
    "namespace list": ("garrison namespace list",),
    "identity": ("garrison identity list",),
    "identity list": ("garrison identity list -o json",),
    "identity get": ("garrison identity get 256",),
    "bpf": ("garrison bpf policy get deathstar", "garrison bpf ct list"),
    "bpf policy": ("garrison bpf policy get deathstar",),
    "bpf policy get": ("garrison bpf policy get deathstar -o json",),
    "bpf ipcache": ("garrison bpf ipcache list",),
    "bpf ipcache list": ("garrison bpf ipcache list -o json",),
    "bpf ct": ("garrison bpf ct list",),
    "bpf ct list": ("garrison bpf ct list -o json",),
    "status": ("garrison status", "garrison status -o json"),
    "observe": (
        "garrison observe --last 20 --verdict DROPPED",
        "garrison observe --input-file /var/log/garrison/access.log --to-pod deathstar "
        "--http-method PUT",
        "garrison observe --follow -o json",
        "garrison observe --cluster --last 20 --print-node-name   # every node's, in time order",
    ),
    "accesslog": (
        "garrison accesslog summary --input-file /var/log/garrison/access.log",
        "garrison accesslog export --input-file access.log -o csv --out denied.csv "
        "--verdict DROPPED",
    ),
    "accesslog summary": (
        "garrison accesslog summary --input-file /var/log/garrison/access.log "
        "--policy examples/starwars/sw_l3_l4_l7_policy.yaml",
        "garrison accesslog summary --cluster --since 1h",
    ),
    "accesslog export": (
        "garrison accesslog export --input-file access.log -o csv --since 1h --out denied.csv "
        "--verdict DROPPED",
    ),
    "agent": (
        "garrison agent --state-dir /var/lib/garrison --policy-dir /etc/garrison/policies \\\n"
        "    --access-log /var/log/garrison/access.log --metrics 127.0.0.1:9962",
        "garrison agent --cleanup   # after it stopped: remove what it left in the kernel",
    ),
    "ui": (
        "garrison ui --input-file /var/log/garrison/access.log "
        "--policy examples/starwars/sw_l3_l4_l7_policy.yaml",
        "garrison ui   # the running agent's flows, on http://127.0.0.1:12000/",
    ),
    "cni": ("garrison cni install", "garrison cni uninstall"),
    "cni install": ("garrison cni install --network garrison --subnet 198.18.64.0/18",),
    "cni uninstall": ("garrison cni uninstall --network garrison",),
    "completion": (
        "source <(garrison completion bash)       # this shell",
        "garrison completion bash > /etc/bash_completion.d/garrison",
        "garrison completion zsh > \"${fpath[1]}/_garrison\"   # zsh: a file in $fpath",
    ),
}


def epilog(path: str) -> str | None:
    """The examples block of a command (None: none written for it)."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    body = "\n".join("  " + line.replace("\n", "\n  ") for line in lines)
    return f"example{'s' if len(lines) > 1 else ''}:\n{body}"
