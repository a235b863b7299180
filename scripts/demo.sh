#!/usr/bin/env bash
# The Star Wars scenario, offline part: validate the policies of each stage and trace every
# request of the scenario through them (no root, no agent needed).
set -euo pipefail
cd "$(dirname "$0")/.."
G=.venv/bin/garrison
EX=examples/starwars
DEATHSTAR=org=empire,class=deathstar
TIEFIGHTER=org=empire,class=tiefighter
XWING=org=alliance,class=xwing

banner() { printf '\n=== %s\n' "$*"; }
run() { printf '$ %s\n' "garrison ${*:2}"; "$@"; }

banner "Validate the policies of stage 1 and stage 2"
run $G policy validate $EX/sw_l3_l4_policy.yaml
run $G policy validate $EX/sw_l3_l4_l7_policy.yaml

banner "Stage 1 (L3/L4): only org=empire may reach the deathstar on TCP/80"
for ship in "tiefighter $TIEFIGHTER" "xwing $XWING"; do
    set -- $ship
    run $G policy trace -f $EX/sw_l3_l4_policy.yaml --src-labels "$2" --dst-labels $DEATHSTAR \
        --dport 80 --http-method POST --http-path /v1/request-landing
    echo
done

banner "Stage 2 (L7): the tiefighter may only POST /v1/request-landing"
run $G policy trace -f $EX/sw_l3_l4_l7_policy.yaml --src-labels $TIEFIGHTER \
    --dst-labels $DEATHSTAR --dport 80 --http-method POST --http-path /v1/request-landing
echo
run $G policy trace -f $EX/sw_l3_l4_l7_policy.yaml --src-labels $TIEFIGHTER \
    --dst-labels $DEATHSTAR --dport 80 --http-method PUT --http-path /v1/exhaust-port
echo
run $G policy trace -f $EX/sw_l3_l4_l7_policy.yaml --src-labels $XWING \
    --dst-labels $DEATHSTAR --dport 80 --http-method POST --http-path /v1/request-landing
echo
banner "The same decision as JSON, for scripts"
run $G policy trace -f $EX/sw_l3_l4_l7_policy.yaml --src-labels $TIEFIGHTER \
    --dst-labels $DEATHSTAR --dport 80 --http-method PUT --http-path /v1/exhaust-port -o json
