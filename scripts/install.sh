#!/usr/bin/env bash
# `make install`: the garrison command on the PATH and the agent's systemd unit. Replaces
# nothing it did not write: an existing command or unit of another origin is kept and named.
# `make uninstall` (scripts/uninstall.sh) removes exactly these two again.
#   GARRISON_BIN_DIR   where the command's link goes  (default /usr/local/bin)
#   GARRISON_UNIT_DIR  where the unit goes            (default /etc/systemd/system)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin_dir=${GARRISON_BIN_DIR:-/usr/local/bin}
unit_dir=${GARRISON_UNIT_DIR:-/etc/systemd/system}
target=$repo/.venv/bin/garrison
link=$bin_dir/garrison
unit=$unit_dir/garrison-agent.service

say() { printf 'install: %s\n' "$*"; }

if [[ ! -x $target ]]; then
    say "$target is missing: run 'make setup' first" >&2
    exit 1
fi
status=0

# the command: a link into this checkout's virtualenv
if [[ -L $link && $(readlink "$link") == "$target" ]]; then
    say "$link -> $target (already)"
elif [[ -e $link || -L $link ]]; then
    say "kept $link: it is not garrison's link to $target; the command stays $target" >&2
    status=1
else
    mkdir -p "$bin_dir"
    ln -s "$target" "$link"
    say "linked $link -> $target"
fi

# the unit: packaging/garrison-agent.service with this checkout's path for /opt/garrison
wanted=$(sed "s#/opt/garrison#$repo#g" packaging/garrison-agent.service)
if [[ -f $unit ]] && [[ $(cat "$unit") == "$wanted" ]]; then
    say "$unit (already)"
elif [[ -e $unit ]]; then
    say "kept $unit: it differs from packaging/garrison-agent.service (not written by garrison, or edited)" >&2
    status=1
else
    mkdir -p "$unit_dir"
    printf '%s\n' "$wanted" > "$unit"
    say "wrote $unit"
    if [[ -d /run/systemd/system && $unit_dir == /etc/systemd/system ]]; then
        systemctl daemon-reload
    fi
    say "start it with: systemctl enable --now garrison-agent"
fi
exit "$status"
