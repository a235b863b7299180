#!/usr/bin/env bash
# `make uninstall`: remove what garrison put on this machine, and nothing else.
#   1. what a stopped agent leaves in the kernel on purpose: `garrison agent --cleanup`
#      (its endpoints, pinned maps, and of the proxy steering rule/route only what it added);
#      refused while the agent runs — stopping it is yours to do (it starts nothing either);
#   2. the CNI plugin files `garrison cni install` wrote: `garrison cni uninstall`;
#   3. the systemd unit and the command's link that `make install` wrote, each only if it is
#      still exactly what garrison wrote.
# Kept, and named at the end: the state directory (identities, imported policies), the
# policy directory, the logs and the virtualenv (`make clean`).
#   GARRISON_STATE_DIR, GARRISON_SOCKET, GARRISON_BPFFS_ROOT   the agent's (default: its defaults)
#   GARRISON_BIN_DIR, GARRISON_UNIT_DIR                        as for make install
#   GARRISON_CNI_NETWORK, GARRISON_CNI_CONF_DIR, GARRISON_CNI_BIN_DIR   as for garrison cni install
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
state_dir=${GARRISON_STATE_DIR:-/var/lib/garrison}
socket=${GARRISON_SOCKET:-/run/garrison/agent.sock}
bpffs_root=${GARRISON_BPFFS_ROOT:-/sys/fs/bpf/garrison}
bin_dir=${GARRISON_BIN_DIR:-/usr/local/bin}
unit_dir=${GARRISON_UNIT_DIR:-/etc/systemd/system}
cni_conf_dir=${GARRISON_CNI_CONF_DIR:-/etc/cni/net.d}
cni_bin_dir=${GARRISON_CNI_BIN_DIR:-/usr/lib/cni}
cni_network=${GARRISON_CNI_NETWORK:-garrison}
garrison=$repo/.venv/bin/garrison
unit=$unit_dir/garrison-agent.service
link=$bin_dir/garrison

say() { printf 'uninstall: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "needs root: it removes BPF pins, network namespaces and ip rules; run: sudo make uninstall" >&2
    exit 1
fi
if [[ ! -x $garrison ]]; then
    say "$garrison is missing: nothing of garrison's can be cleaned up from this checkout" >&2
    exit 1
fi
status=0

# 1. the agent's kernel state (only with an agent's state or pins here)
# (a cleaned-up or never-started agent has neither pins nor a steering record)
if [[ -e $state_dir/steering.json || -e $bpffs_root ]]; then
    if ! "$garrison" agent --cleanup --state-dir "$state_dir" --socket "$socket" \
            --bpffs-root "$bpffs_root"; then
        say "the agent's clean-up failed (above); stop the agent first (systemctl stop garrison-agent, or SIGTERM), then run make uninstall again" >&2
        exit 1
    fi
else
    say "no agent state in $state_dir and no pins at $bpffs_root: nothing to clean up in the kernel"
fi

# 2. the CNI plugin, when this version has the command and something was installed
if "$garrison" cni uninstall --help >/dev/null 2>&1; then
    out=$("$garrison" cni uninstall --network "$cni_network" --cni-conf-dir "$cni_conf_dir" \
        --cni-bin-dir "$cni_bin_dir" 2>&1)
    rc=$?
    if [[ $rc -eq 0 ]]; then
        [[ -z $out ]] || printf '%s\n' "$out"
    elif [[ $out == *"nothing recorded"* ]]; then
        say "no CNI plugin files of garrison's"
    else
        printf '%s\n' "$out" >&2
        status=1
    fi
fi

# 3. the unit and the link of make install
wanted=$(sed "s#/opt/garrison#$repo#g" packaging/garrison-agent.service)
if [[ -f $unit ]] && [[ $(cat "$unit") == "$wanted" ]]; then
    rm -f "$unit"
    say "removed $unit"
    if [[ -d /run/systemd/system && $unit_dir == /etc/systemd/system ]]; then
        systemctl daemon-reload
    fi
elif [[ -e $unit ]]; then
    say "kept $unit: not the unit make install wrote from this checkout (edited, or someone else's)" >&2
    status=1
fi
if [[ -L $link && $(readlink "$link") == "$repo/.venv/bin/garrison" ]]; then
    rm -f "$link"
    say "removed $link"
elif [[ -e $link || -L $link ]]; then
    say "kept $link: not garrison's link to this checkout"
fi

say "kept: $state_dir (identities, imported policies; rm -r it to forget them), your policy directory and logs, and $repo/.venv (make clean)"
exit "$status"
