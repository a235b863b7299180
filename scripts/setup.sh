#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine of this kind: Debian packages, the kernel
# header links bcc needs, and the project's virtualenv in .venv (seeing Debian's bcc).
# One line per phase: `setup: [3/7] kernel headers for bcc ... ok`; the tools' own output goes
# to logs under .venv, shown when a phase fails.
#   GARRISON_SETUP=runtime (make setup-runtime, make demo): what garrison and its demo need —
#   no test and lint tools, no container runtime set-up, no mypyc build (garrison then runs
#   from source). The default, full, is everything `make test` needs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${GARRISON_SETUP:-full}
case $MODE in full|runtime) ;; *) echo "setup: GARRISON_SETUP=$MODE: use full or runtime" >&2; exit 2;; esac

RUNTIME_APT_PACKAGES=(gcc libc6-dev python3-bpfcc linux-headers-amd64 iproute2 curl libnghttp2-dev)
APT_PACKAGES=(gcc libc6-dev python3-bpfcc linux-headers-amd64 iproute2 curl nftables iperf3 wrk nginx haproxy nghttp2-client jq
              chromium
              podman containernetworking-plugins etcd-server etcd-client
              libnghttp2-dev wget zsh kcat nodejs)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.garrison-installed          # the full install (test extras)
RUNTIME_STAMP=$VENV/.garrison-installed-runtime

log() { printf 'setup: %s\n' "$*" >&2; }
PHASES=7
phase_no=0
phase() { phase_no=$((phase_no + 1)); printf 'setup: [%d/%d] %s ... ' "$phase_no" "$PHASES" "$1" >&2; }
result() { printf '%s\n' "${1:-ok}" >&2; }   # ends the phase's line
fail() { printf 'failed\n' >&2; log "$*"; exit 1; }

if [[ $MODE == runtime ]]; then
    APT_PACKAGES=("${RUNTIME_APT_PACKAGES[@]}")
fi

phase "Debian packages (${#APT_PACKAGES[@]})"
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        fail "missing Debian packages: ${missing[*]}; run 'make setup' as root or: apt-get install ${missing[*]}"
    fi
    printf 'installing %s ... ' "${missing[*]}" >&2
    # Keep Debian from starting the daemons it installs (nginx, haproxy): the benchmarks run
    # their own instances on loopback ports, and nothing should listen on the host's port 80.
    rcd=/usr/sbin/policy-rc.d
    made_rcd=0
    if [[ ! -e $rcd ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$rcd" && chmod +x "$rcd" && made_rcd=1
    fi
    status=0
    mkdir -p "$VENV"
    apt-get update -qq >"$VENV/apt.log" 2>&1 || status=$?
    if ((status == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$VENV/apt.log" 2>&1 || status=$?
    fi
    ((made_rcd)) && rm -f "$rcd"
    if ((status != 0)); then
        printf 'failed\n' >&2
        tail -n 20 "$VENV/apt.log" >&2
        log "apt-get failed (exit $status) installing: ${missing[*]}; the whole output is in $VENV/apt.log"
        exit "$status"
    fi
    result "installed"
else
    result "ok (all installed)"
fi

# Containers for the CNI tests and demo (podman 4.3 from Debian): the CNI network backend, no
# default open-files limit (crun may not raise it here), and in a hybrid cgroup layout whose
# cgroup2 mount still offers hugetlb, that controller mounted as v1 (else crun refuses hybrid
# mode). Only the keys named are written; everything else in containers.conf is kept.
phase "container runtime (podman, for the CNI tests and make demo-containers)"
notes=()
if [[ $MODE == runtime ]]; then
    notes+=("skipped (make setup does it)")
elif [[ $(id -u) -ne 0 ]] || ! command -v podman >/dev/null; then
    notes+=("skipped (needs root and podman)")
else
    conf=/etc/containers/containers.conf
    changed=$(python3 - "$conf" <<'PY'
import re, sys
from pathlib import Path
path = Path(sys.argv[1])
want = {"network_backend": '"cni"', "default_ulimits": "[]"}
text = path.read_text() if path.exists() else ""
lines = text.splitlines()
start = next((i for i, l in enumerate(lines) if l.strip() == "[containers]"), None)
if start is None:
    lines += ([""] if lines else []) + ["[containers]"]
    start = len(lines) - 1
end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
done = []
for key, value in want.items():
    line = f"{key} = {value}"
    hit = next((i for i in range(start + 1, end) if re.match(rf"\s*{key}\s*=", lines[i])), None)
    if hit is None:
        lines.insert(start + 1, line)
        end += 1
        done.append(line)
    elif lines[hit].strip() != line:
        lines[hit] = line
        done.append(line)
if done:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
print("; ".join(done))
PY
)
    [[ -z $changed ]] || notes+=("set in $conf under [containers]: $changed")
    if [[ -r /sys/fs/cgroup/unified/cgroup.controllers ]] \
        && grep -qw hugetlb /sys/fs/cgroup/unified/cgroup.controllers \
        && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
        mkdir -p /sys/fs/cgroup/hugetlb
        mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
        notes+=("mounted the v1 hugetlb cgroup controller on /sys/fs/cgroup/hugetlb (crun refuses hybrid mode without it)")
    fi
fi
if ((${#notes[@]})); then result "$(IFS=';'; echo "${notes[*]}")"; else result "ok"; fi

# bcc compiles against /lib/modules/$(uname -r)/build; this kernel ships no headers, so point
# the links at Debian's headers — only when they are missing, never over a real tree.
phase "kernel headers for bcc"
notes=()
kver=$(uname -r)
moddir=/lib/modules/$kver
hdr_amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
if [[ -n $hdr_amd64 && -n $hdr_common && $(id -u) -eq 0 ]]; then
    mkdir -p "$moddir"
    [[ -e $moddir/build ]] || { ln -s "$hdr_amd64" "$moddir/build"; notes+=("linked $moddir/build -> $hdr_amd64"); }
    [[ -e $moddir/source ]] || { ln -s "$hdr_common" "$moddir/source"; notes+=("linked $moddir/source -> $hdr_common"); }
fi
if ((${#notes[@]})); then
    result "$(IFS=';'; echo "${notes[*]}")"
elif [[ -e $moddir/build ]]; then
    result "ok"
else
    result "missing: $moddir/build (install linux-headers-amd64 as root)"
fi

phase "Python packages in $VENV"
made_venv=0
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON"
    made_venv=1
fi

# Debian's bcc module is pure Python over libbcc.so; the PyPI package named 'bcc' is unrelated.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -d /usr/lib/python3/dist-packages/bcc ]]; then
    # Expose only the bcc package (not all of Debian's dist-packages) through a one-entry dir.
    mkdir -p "$VENV/debian-bcc"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
    echo "$(cd "$VENV/debian-bcc" && pwd -P)" > "$site/garrison-debian-bcc.pth"
fi

if [[ $MODE == full ]]; then
    want_stamp=$STAMP; extras='.[test]'; what="garrison and its test tools"
else
    want_stamp=$RUNTIME_STAMP; extras='.[demo]'; what="garrison and what its demo runs"
fi
# a full install serves the runtime too
if [[ -f $STAMP && ! pyproject.toml -nt $STAMP ]] \
    || [[ $MODE == runtime && -f $RUNTIME_STAMP && ! pyproject.toml -nt $RUNTIME_STAMP ]]; then
    result "ok (up to date)"
else
    printf 'installing %s (log: %s) ... ' "$what" "$VENV/pip-install.log" >&2
    # pip and the build backend's banners go to the log; shown only when the install fails
    if ! { "$VENV/bin/pip" install -q --upgrade pip &&
           "$VENV/bin/pip" install -q -e "$extras"; } >"$VENV/pip-install.log" 2>&1; then
        printf 'failed\n' >&2
        tail -n 40 "$VENV/pip-install.log" >&2
        log "pip install failed; the whole output is in $VENV/pip-install.log"
        exit 1
    fi
    touch "$want_stamp"
    result "installed$( ((made_venv)) && echo " (new virtualenv)")"
fi

# The proxy's per-request path runs compiled (mypyc); recompiled only when a source changed.
phase "compiled proxy path (mypyc)"
if [[ $MODE == runtime ]]; then
    result "skipped (make setup compiles it; garrison runs from source meanwhile)"
elif "$VENV/bin/python" scripts/compile.py >"$VENV/compile.log" 2>&1; then
    result "$(tail -n 1 "$VENV/compile.log" | sed 's/^compile: //')"
else
    printf 'failed\n' >&2
    tail -n 40 "$VENV/compile.log" >&2
    log "mypyc failed; the whole output is in $VENV/compile.log"
    exit 1
fi
# The HTTP/2 codec of the proxy (both modes: the proxy needs it): nghttp2 through a cffi
# extension, rebuilt only when its declarations changed.
phase "HTTP/2 codec (nghttp2 binding)"
if "$VENV/bin/python" -m garrison.parsers.nghttp2_build >"$VENV/nghttp2-build.log" 2>&1; then
    result "$(tail -n 1 "$VENV/nghttp2-build.log" | sed 's/^nghttp2 binding: //')"
else
    printf 'failed\n' >&2
    tail -n 40 "$VENV/nghttp2-build.log" >&2
    log "the nghttp2 binding did not build; the whole output is in $VENV/nghttp2-build.log"
    exit 1
fi
# Node clients of the real-client tests (grpc-js), pinned by tests/e2e/node/package-lock.json;
# reinstalled only when the lock file is newer than what was installed.
phase "Node test clients (npm ci in tests/e2e/node)"
node_dir=tests/e2e/node
if [[ $MODE == runtime ]]; then
    result "skipped (make setup installs them)"
elif ! command -v npm >/dev/null; then
    fail "needs npm (it comes with Node.js: apt-get install nodejs)"
elif [[ -f $node_dir/node_modules/.package-lock.json && ! $node_dir/package-lock.json -nt $node_dir/node_modules/.package-lock.json ]]; then
    result "ok (up to date)"
elif npm ci --prefix "$node_dir" --no-audit --no-fund >"$VENV/npm-ci.log" 2>&1; then
    result "installed"
else
    printf 'failed\n' >&2
    tail -n 40 "$VENV/npm-ci.log" >&2
    log "npm ci failed; the whole output is in $VENV/npm-ci.log"
    exit 1
fi
log "ready; the garrison command is $VENV/bin/garrison: export PATH=\"$PWD/$VENV/bin:\$PATH\" (or: sudo make install)"
