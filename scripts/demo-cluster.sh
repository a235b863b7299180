#!/usr/bin/env bash
# The Star Wars scenario on three nodes sharing etcd: etcd in a network namespace of its own
# on an underlay bridge (198.19.0.0/24), three nodes as network namespaces on that bridge, one
# `garrison agent --kvstore etcd` in each; the deathstar in two replicas on nodes 1 and 2, the
# tiefighter and the xwing on node 3; the example policies imported on node 1 only, enforced by
# the deathstars' nodes with the ships' identities they learnt through etcd; `garrison status`
# of a node; the flow records of every node.
#
#   gd-ul  (198.19.0.10): bridge gd-br, etcd
#   gd-n1  (198.19.0.11, pods 198.18.11.0/24): agent, gd-deathstar-1
#   gd-n2  (198.19.0.12, pods 198.18.12.0/24): agent, gd-deathstar-2
#   gd-n3  (198.19.0.13, pods 198.18.13.0/24): agent, gd-tiefighter, gd-xwing
#
# None of these namespaces is linked to the host's: no packet leaves them. On the host the demo
# makes only the namespaces above (gd-*), a pinned-map directory per agent
# (/sys/fs/bpf/garrison-demo-cluster-<pid>-n<N>) and a work directory in /tmp; all of it is
# removed at the end, also on error and on Ctrl-C. It refuses to start when one of those
# namespace names exists already (never its own: they are removed each time).
set -euo pipefail
cd "$(dirname "$0")/.."
G=$PWD/.venv/bin/garrison
PY=$PWD/.venv/bin/python
EX=examples/starwars
DEATHSTAR=org=empire,class=deathstar
TIEFIGHTER=org=empire,class=tiefighter
XWING=org=alliance,class=xwing
UNDERLAY=gd-ul
ETCD_IP=198.19.0.10
ETCD_URL=http://$ETCD_IP:2379
NODES=(1 2 3)
node_ip() { echo "198.19.0.1$1"; }
pod_cidr() { echo "198.18.1$1.0/24"; }
# endpoint -> node, address
declare -A EP_NODE=([gd-deathstar-1]=1 [gd-deathstar-2]=2 [gd-tiefighter]=3 [gd-xwing]=3)
declare -A EP_IP=([gd-deathstar-1]=198.18.11.10 [gd-deathstar-2]=198.18.12.10
                  [gd-tiefighter]=198.18.13.10 [gd-xwing]=198.18.13.11)
declare -A EP_LABELS=([gd-deathstar-1]=$DEATHSTAR [gd-deathstar-2]=$DEATHSTAR
                      [gd-tiefighter]=$TIEFIGHTER [gd-xwing]=$XWING)
ENDPOINTS=(gd-deathstar-1 gd-deathstar-2 gd-tiefighter gd-xwing)
NAMESPACES=("$UNDERLAY" gd-n1 gd-n2 gd-n3 "${ENDPOINTS[@]}")

banner() { printf '\n\033[1m=== %s\033[0m\n' "$*"; }
say() { printf '$ %s\n' "$*"; }
die() { echo "demo-cluster: $*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    die "needs root (network namespaces, BPF programs): run 'sudo make demo-cluster'"
fi
command -v etcd >/dev/null || die "needs etcd: apt-get install etcd-server (make setup does)"
command -v etcdctl >/dev/null || die "needs etcdctl: apt-get install etcd-client (make setup does)"
command -v nsenter >/dev/null || die "needs nsenter: apt-get install util-linux"
command -v curl >/dev/null || die "needs curl: apt-get install curl"
[[ -x $G ]] || die "no $G: run 'make setup' first"
# The demo deletes these namespaces at the end: never one it did not make.
for ns in "${NAMESPACES[@]}"; do
    if [[ -e /run/netns/$ns ]]; then
        die "a network namespace named '$ns' exists already and is not this run's; it is" \
            "left alone: delete it (ip netns delete $ns; an earlier demo killed with SIGKILL" \
            "leaves its gd-* namespaces) or rename it, then run the demo again"
    fi
done

PIN_PREFIX=/sys/fs/bpf/garrison-demo-cluster-$$
for n in "${NODES[@]}"; do
    if [[ -e $PIN_PREFIX-n$n ]]; then
        die "$PIN_PREFIX-n$n exists already and is not this run's; it is left alone" \
            "(an agent of an earlier demo may still use it)"
    fi
done
WORK=$(mktemp -d /tmp/garrison-demo-cluster.XXXXXX)
# in the environment of every process the demo starts: one left behind can be found
export GARRISON_DEMO_CLUSTER=$WORK
MADE_NS=()      # namespaces this run made (deleted at the end)
CREATED=()      # endpoints this run asked an agent to add (their namespaces are this run's)
PIDS=()         # the deathstar apps
declare -A AGENT_PID=()
ETCD_PID=

sock() { echo "$WORK/n$1/agent.sock"; }
agent_args() { echo --state-dir "$WORK/n$1/state" --socket "$(sock "$1")" --bpffs-root "$PIN_PREFIX-n$1"; }
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

stop_pid() { # pid: SIGTERM, then SIGKILL after 10 s
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap '' INT TERM  # a second Ctrl-C does not interrupt the clean-up
    # A Ctrl-C reaches the whole process group: etcd and the agents stop at once, and the
    # command running then fails on them. bash leaves a SIGINT to a foreground command that
    # exits on its own, so the run ends by errexit, not by the INT trap. etcd (stopped by
    # this clean-up only below) says which signal it got: an interrupted run, not a failed one.
    if ((rc != 0 && rc != 130 && rc != 143)) && [[ -s $WORK/etcd.log ]]; then
        if grep -q "received interrupt signal" "$WORK/etcd.log"; then
            rc=130
        elif grep -q "received terminated signal" "$WORK/etcd.log"; then
            rc=143
        fi
    fi
    echo
    echo "demo-cluster: removing what it made (agents, endpoints, etcd, namespaces gd-*, pins)"
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    for ep in "${CREATED[@]}"; do
        "$G" endpoint delete "$ep" --socket "$(sock "${EP_NODE[$ep]}")" >/dev/null 2>&1
    done
    for n in "${!AGENT_PID[@]}"; do stop_pid "${AGENT_PID[$n]}"; done
    for n in "${!AGENT_PID[@]}"; do
        # what a stopped agent leaves on purpose (pinned maps, endpoints it could not delete)
        # shellcheck disable=SC2046
        in_ns "gd-n$n" "$G" agent --cleanup $(agent_args "$n") >"$WORK/cleanup-n$n.log" 2>&1 ||
            { echo "  node $n: garrison agent --cleanup failed:"; sed 's/^/    /' "$WORK/cleanup-n$n.log"; }
    done
    [[ -n $ETCD_PID ]] && stop_pid "$ETCD_PID"
    # endpoint namespaces are the agents' to delete; one left (an agent that failed) is this
    # run's all the same: it did not exist when the agent was asked to add it
    for ep in "${CREATED[@]}"; do
        [[ -e /run/netns/$ep ]] && ip netns delete "$ep"
    done
    for ((i = ${#MADE_NS[@]} - 1; i >= 0; i--)); do ip netns delete "${MADE_NS[i]}"; done
    for n in "${NODES[@]}"; do
        [[ -d $PIN_PREFIX-n$n ]] && rm -rf "$PIN_PREFIX-n$n"
    done
    if ((rc != 0 && rc != 130 && rc != 143)) && [[ -d $WORK ]]; then  # failed: say why
        echo "demo-cluster: failed (exit $rc); the last lines of the agents' and etcd's logs:"
        for log in "$WORK"/n*/agent.log "$WORK/etcd.log"; do
            [[ -s $log ]] || continue
            echo "--- last lines of $log"
            tail -n 15 "$log"
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

add_ns() {
    ip netns add "$1"
    MADE_NS+=("$1")
    ip -n "$1" link set lo up
}

banner "The underlay: a bridge in namespace $UNDERLAY, etcd on $ETCD_IP"
add_ns "$UNDERLAY"
ip -n "$UNDERLAY" link add gd-br type bridge
ip -n "$UNDERLAY" addr add "$ETCD_IP/24" dev gd-br
ip -n "$UNDERLAY" link set gd-br up
say "etcd --listen-client-urls $ETCD_URL ...   # Debian's etcd-server, in $UNDERLAY"
# (nsenter runs etcd itself: $! is etcd's PID)
nsenter --net="/run/netns/$UNDERLAY" etcd --name gd-etcd --data-dir "$WORK/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster gd-etcd=http://127.0.0.1:2380 >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
etcd_healthy() {
    ETCDCTL_API=3 in_ns "$UNDERLAY" etcdctl --endpoints "$ETCD_URL" --command-timeout=1s \
        endpoint health >/dev/null 2>&1
}
for _ in $(seq 200); do
    etcd_healthy && break
    kill -0 "$ETCD_PID" 2>/dev/null || die "etcd exited (its log: below)"
    sleep 0.1
done
etcd_healthy || die "etcd did not answer within 20 s (its log: below)"

banner "Three nodes on the underlay, one garrison agent each"
for n in "${NODES[@]}"; do
    add_ns "gd-n$n"
    ip -n "gd-n$n" link add "gd-u$n" type veth peer name "gd-p$n" netns "$UNDERLAY"
    ip -n "gd-n$n" addr add "$(node_ip "$n")/24" dev "gd-u$n"
    ip -n "gd-n$n" link set "gd-u$n" up
    ip -n "$UNDERLAY" link set "gd-p$n" master gd-br up
    in_ns "gd-n$n" sysctl -qw net.ipv4.ip_forward=1
    mkdir -p "$WORK/n$n"
    say "garrison agent --kvstore etcd --kvstore-endpoints $ETCD_URL --node-name gd-n$n" \
        "--pod-cidr $(pod_cidr "$n") --node-ip $(node_ip "$n") ...   # in gd-n$n"
    # (nsenter runs the agent itself: $! is the agent's PID)
    # shellcheck disable=SC2046
    nsenter --net="/run/netns/gd-n$n" "$G" agent $(agent_args "$n") --kvstore etcd --kvstore-endpoints "$ETCD_URL" \
        --node-name "gd-n$n" --pod-cidr "$(pod_cidr "$n")" --node-ip "$(node_ip "$n")" \
        </dev/null >"$WORK/n$n/agent.log" 2>&1 &
    AGENT_PID[$n]=$!
done
for n in "${NODES[@]}"; do
    for i in $(seq 300); do
        rc=0
        "$G" status --socket "$(sock "$n")" >/dev/null 2>&1 || rc=$?
        ((rc != 3)) && break  # 3: no answer yet
        kill -0 "${AGENT_PID[$n]}" 2>/dev/null || die "the agent of node $n exited (its log: below)"
        ((i < 300)) || die "the agent of node $n did not answer within a minute (its log: below)"
        sleep 0.2
    done
done

# until every node's `garrison CMD -o json` (as d) satisfies a Python expression (n: the node)
wait_nodes() { # what cmd expr
    local what=$1 cmd=$2 expr=$3 ok
    for _ in $(seq 300); do
        ok=1
        for n in "${NODES[@]}"; do
            # shellcheck disable=SC2086
            "$G" $cmd --socket "$(sock "$n")" -o json 2>/dev/null | "$PY" -c "
import json, sys
d = json.load(sys.stdin)
n = $n
sys.exit(0 if ($expr) else 1)" 2>/dev/null || { ok=0; break; }
        done
        ((ok)) && return 0
        sleep 0.2
    done
    die "timed out waiting for $what"
}

banner "Endpoints: deathstar replicas on nodes 1 and 2, the tiefighter and the xwing on node 3"
for ep in "${ENDPOINTS[@]}"; do
    n=${EP_NODE[$ep]}
    say "garrison endpoint add $ep --labels ${EP_LABELS[$ep]} --ip ${EP_IP[$ep]}   # node $n"
    if [[ -e /run/netns/$ep ]]; then
        die "a network namespace named '$ep' appeared meanwhile; it is left alone"
    fi
    CREATED+=("$ep")
    "$G" endpoint add "$ep" --labels "${EP_LABELS[$ep]}" --ip "${EP_IP[$ep]}" \
        --socket "$(sock "$n")" >/dev/null
done
for ds in gd-deathstar-1 gd-deathstar-2; do
    ip netns exec "$ds" "$PY" "$EX/deathstar.py" --listen 0.0.0.0:80 >"$WORK/$ds.log" 2>&1 &
    PIDS+=($!)
done
# each node knows the others' endpoints (ipcache) and routes their pod CIDRs
wait_nodes "every node to know the other nodes' endpoints and routes" status \
    'len(d["cluster"]["routes"]) == 2 and d["cluster"]["remote_endpoints"] == (2 if n == 3 else 3)'
app_up() { ip netns exec "$1" "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 80), 1).close()' 2>/dev/null; }
for ds in gd-deathstar-1 gd-deathstar-2; do
    for _ in $(seq 100); do
        app_up "$ds" && break
        sleep 0.1
    done
    app_up "$ds" || die "the deathstar app in $ds did not start: $(tail -n 5 "$WORK/$ds.log")"
done
say "garrison endpoint list   # on node 3: its own endpoints"
"$G" endpoint list --socket "$(sock 3)"

request() { # ship method path deathstar
    local ship=$1 method=$2 path=$3 ds=$4 out rc
    say "garrison endpoint exec $ship -- curl -s -m 2 -X $method http://${EP_IP[$ds]}$path   # $ds on node ${EP_NODE[$ds]}"
    set +e
    out=$("$G" endpoint exec "$ship" -- curl -s -m 2 -o "$WORK/body" -w '%{http_code}' \
        -X "$method" "http://${EP_IP[$ds]}$path")
    rc=$?
    set -e
    if [[ $rc -eq 28 ]]; then
        echo "  (no answer: the connection was dropped)"
    else
        echo "  $out $(head -c 200 "$WORK/body" | tr -d '\r' | head -n 1)"
    fi
}

import_policy() { # file
    say "garrison policy import $1   # on node 1"
    "$G" policy import "$1" --socket "$(sock 1)"
    wait_nodes "$1 to reach every node" "policy get" \
        "any(p[\"source\"] == \"$1\" for p in d[\"policies\"])"
}

banner "Stage 0: no policy — every ship lands, on either node's deathstar"
request gd-tiefighter POST /v1/request-landing gd-deathstar-1
request gd-xwing POST /v1/request-landing gd-deathstar-2

banner "Stage 1: L3/L4 policy, imported on node 1 — only org=empire may reach the deathstar on TCP/80"
import_policy "$PWD/$EX/sw_l3_l4_policy.yaml"
request gd-tiefighter POST /v1/request-landing gd-deathstar-1
request gd-tiefighter POST /v1/request-landing gd-deathstar-2
request gd-xwing POST /v1/request-landing gd-deathstar-1

banner "Stage 2: L7 policy, imported on node 1 — the tiefighter may only POST /v1/request-landing"
import_policy "$PWD/$EX/sw_l3_l4_l7_policy.yaml"
request gd-tiefighter POST /v1/request-landing gd-deathstar-2
request gd-tiefighter PUT /v1/exhaust-port gd-deathstar-1
request gd-tiefighter PUT /v1/exhaust-port gd-deathstar-2
request gd-xwing POST /v1/request-landing gd-deathstar-2

banner "The cluster as node 3 sees it"
say "garrison status   # on node 3"
"$G" status --socket "$(sock 3)" || true  # a PROBLEM line is shown, the demo goes on
say "garrison policy get   # on node 2: the policy imported on node 1"
"$G" policy get --socket "$(sock 2)"

if "$G" observe --help 2>/dev/null | grep -q -- '--cluster'; then
    banner "Flow records of every node, merged (garrison observe --cluster)"
    say "garrison observe --cluster --kvstore-endpoints $ETCD_URL --print-node-name --last 40   # in gd-n1"
    in_ns gd-n1 "$G" observe --cluster --kvstore-endpoints "$ETCD_URL" --print-node-name \
        --last 40 || true
else
    banner "Flow records of each node (garrison observe on each)"
    for n in "${NODES[@]}"; do
        say "garrison observe --print-node-name --last 15   # on node $n"
        "$G" observe --socket "$(sock "$n")" --print-node-name --last 15 || true
    done
fi
