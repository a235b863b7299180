#!/usr/bin/env bash
# The Star Wars scenario with podman containers: a garrison agent, a CNI network chained with
# garrison-cni (ptp + host-local + portmap + garrison-cni), the deathstar, a tiefighter and an
# xwing as containers started by podman with their labels; L3/L4 and L7 policy; a container
# stopped and started; the flow records naming the containers. podman reads a containers.conf
# and network directory of the demo's own (CONTAINERS_CONF), so nothing of yours is read or
# changed. Everything it creates is removed at the end, also on error.
set -euo pipefail
cd "$(dirname "$0")/.."
G=$PWD/.venv/bin/garrison
PY=$PWD/.venv/bin/python
EX=examples/starwars
# host-local keeps its leases under /var/lib/cni/networks/NAME: a network name of the demo's own
NET=garrison-demo-$$
SUBNET=198.18.210.0/24

banner() { printf '\n\033[1m=== %s\033[0m\n' "$*"; }
say() { printf '$ %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "demo-containers needs root (podman, BPF programs): run 'sudo make demo-containers'." >&2
    exit 1
fi
if ! command -v podman >/dev/null || [[ ! -x /usr/lib/cni/ptp ]]; then
    echo "demo-containers needs podman and the reference CNI plugins:" \
        "apt-get install podman containernetworking-plugins (make setup does)" >&2
    exit 1
fi
WORK=$(mktemp -d /tmp/garrison-demo-containers.XXXXXX)
SOCK=$WORK/agent.sock
PIN=/sys/fs/bpf/garrison-demo-containers-$$
AGENT_ARGS=(--state-dir "$WORK/state" --socket "$SOCK" --bpffs-root "$PIN")
TAG=$$
DS=deathstar-$TAG TIE=tiefighter-$TAG XW=xwing-$TAG
CONTAINERS=("$DS" "$TIE" "$XW")
AGENT_PID=
cat >"$WORK/containers.conf" <<CONF
[containers]
default_ulimits = []
[network]
network_backend = "cni"
cni_plugin_dirs = ["$WORK/cni-bin", "/usr/lib/cni"]
network_config_dir = "$WORK/net.d"
CONF
export CONTAINERS_CONF=$WORK/containers.conf

cleanup() {
    set +e
    podman rm -f -t 0 --ignore "${CONTAINERS[@]}" >/dev/null 2>&1
    "$G" cni uninstall --network "$NET" --cni-conf-dir "$WORK/net.d" >/dev/null 2>&1
    rm -rf "/var/lib/cni/networks/$NET"
    if [[ -n $AGENT_PID ]]; then
        kill "$AGENT_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        "$G" agent --cleanup "${AGENT_ARGS[@]}" | sed 's/^/  /'
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

banner "Start the agent"
say "garrison agent --state-dir $WORK/state --bpffs-root $PIN --access-log $WORK/access.log &"
"$G" agent "${AGENT_ARGS[@]}" --access-log "$WORK/access.log" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
    rc=0
    "$G" status --socket "$SOCK" >/dev/null 2>&1 || rc=$?
    ((rc != 3)) && break
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent.log"; exit 1; }
    sleep 0.2
done

banner "A CNI network chained with garrison-cni"
say "garrison cni install --network $NET --subnet $SUBNET --cni-bin-dir $WORK/cni-bin --cni-conf-dir $WORK/net.d"
"$G" cni install --network "$NET" --subnet "$SUBNET" --cni-bin-dir "$WORK/cni-bin" \
    --cni-conf-dir "$WORK/net.d" --socket "$SOCK" --state-dir "$WORK/state"

banner "Containers: the deathstar, a tiefighter and an xwing (podman, the host's root as an overlay)"
run() { # name labels cmd...
    local name=$1 labels=$2; shift 2
    local args=()
    IFS=, read -ra kv <<<"$labels"
    for l in "${kv[@]}"; do args+=(--label "$l"); done
    # garrison's datapath is IPv4 only: without IPv6 the containers send nothing it drops
    args+=(--sysctl net.ipv6.conf.all.disable_ipv6=1)
    say "podman run -d --network $NET --name $name ${args[*]} --rootfs /:O $*"
    podman run -d --network "$NET" --name "$name" "${args[@]}" --rootfs /:O "$@" >/dev/null
}
run "$DS" org=empire,class=deathstar "$PY" "$PWD/$EX/deathstar.py" --listen 0.0.0.0:80
run "$TIE" org=empire,class=tiefighter sleep 600
run "$XW" org=alliance,class=xwing sleep 600
for _ in $(seq 100); do  # labels are read once podman has started each container
    n=$("$G" endpoint list --socket "$SOCK" -o json |
        "$PY" -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin)["endpoints"] if e["labels"]))')
    [[ $n -eq 3 ]] && break
    sleep 0.1
done
say "garrison endpoint list"
"$G" endpoint list --socket "$SOCK"
DS_IP=$("$G" endpoint get "$DS" --socket "$SOCK" -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])')

request() { # ship method path
    local out rc
    say "podman exec $1 curl -s -m 2 -X $2 http://$DS_IP$3"
    set +e
    out=$(podman exec "$1" curl -s -m 2 -X "$2" "http://$DS_IP$3")
    rc=$?
    set -e
    if [[ $rc -eq 28 ]]; then echo "  (no answer: the connection was dropped)"; else echo "  $out"; fi
}

banner "Stage 0: no policy — every ship lands"
request "$TIE" POST /v1/request-landing
request "$XW" POST /v1/request-landing

banner "Stage 1: L3/L4 policy — only empire ships reach the deathstar on TCP/80"
say "garrison policy import $EX/sw_l3_l4_policy.yaml"
"$G" policy import "$EX/sw_l3_l4_policy.yaml" --socket "$SOCK"
request "$TIE" POST /v1/request-landing
request "$XW" POST /v1/request-landing

banner "Stage 2: L7 policy — the tiefighter may land, not open the exhaust port"
say "garrison policy import $EX/sw_l3_l4_l7_policy.yaml"
"$G" policy import "$EX/sw_l3_l4_l7_policy.yaml" --socket "$SOCK"
request "$TIE" POST /v1/request-landing
request "$TIE" PUT /v1/exhaust-port

banner "Lifecycle: the xwing stopped (its endpoint goes) and started again (back, same labels)"
say "podman stop $XW"
podman stop -t 0 "$XW" >/dev/null
"$G" endpoint list --socket "$SOCK"
say "podman start $XW"
podman start "$XW" >/dev/null
for _ in $(seq 100); do
    "$G" endpoint get "$XW" --socket "$SOCK" -o json 2>/dev/null | grep -q '"org=alliance"' && break
    sleep 0.1
done
"$G" endpoint list --socket "$SOCK"
request "$XW" POST /v1/request-landing

banner "The flow records of the run, naming the containers"
say "garrison observe --last 12"
"$G" observe --last 12 --socket "$SOCK"
