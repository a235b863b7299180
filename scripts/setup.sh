#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine of this kind: Debian packages, the kernel
# header links bcc needs, and the project's virtualenv in .venv (seeing Debian's bcc).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc libc6-dev python3-bpfcc linux-headers-amd64 iproute2 curl nftables iperf3 wrk nginx haproxy nghttp2-client jq
              chromium
              podman containernetworking-plugins etcd-server etcd-client
              libnghttp2-dev wget)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.garrison-installed

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]}; run 'make setup' as root or: apt-get install ${missing[*]}"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    # Keep Debian from starting the daemons it installs (nginx, haproxy): the benchmarks run
    # their own instances on loopback ports, and nothing should listen on the host's port 80.
    rcd=/usr/sbin/policy-rc.d
    made_rcd=0
    if [[ ! -e $rcd ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$rcd" && chmod +x "$rcd" && made_rcd=1
    fi
    status=0
    apt-get update -qq || status=$?
    if ((status == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || status=$?
    fi
    ((made_rcd)) && rm -f "$rcd"
    if ((status != 0)); then
        log "apt-get failed (exit $status) installing: ${missing[*]}"
        exit "$status"
    fi
fi

# Containers for the CNI tests and demo (podman 4.3 from Debian): the CNI network backend, no
# default open-files limit (crun may not raise it here), and in a hybrid cgroup layout whose
# cgroup2 mount still offers hugetlb, that controller mounted as v1 (else crun refuses hybrid
# mode). Only the keys named are written; everything else in containers.conf is kept.
if [[ $(id -u) -eq 0 ]] && command -v podman >/dev/null; then
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
    [[ -z $changed ]] || log "set in $conf under [containers]: $changed"
    if [[ -r /sys/fs/cgroup/unified/cgroup.controllers ]] \
        && grep -qw hugetlb /sys/fs/cgroup/unified/cgroup.controllers \
        && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
        mkdir -p /sys/fs/cgroup/hugetlb
        mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
        log "mounted the v1 hugetlb cgroup controller on /sys/fs/cgroup/hugetlb (crun refuses hybrid mode without it)"
    fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build; this kernel ships no headers, so point
# the links at Debian's headers — only when they are missing, never over a real tree.
kver=$(uname -r)
moddir=/lib/modules/$kver
hdr_amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
if [[ -n $hdr_amd64 && -n $hdr_common && $(id -u) -eq 0 ]]; then
    mkdir -p "$moddir"
    [[ -e $moddir/build ]] || { ln -s "$hdr_amd64" "$moddir/build"; log "linked $moddir/build -> $hdr_amd64"; }
    [[ -e $moddir/source ]] || { ln -s "$hdr_common" "$moddir/source"; log "linked $moddir/source -> $hdr_common"; }
fi

if [[ ! -x $VENV/bin/python ]]; then
    log "creating virtualenv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# Debian's bcc module is pure Python over libbcc.so; the PyPI package named 'bcc' is unrelated.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -d /usr/lib/python3/dist-packages/bcc ]]; then
    # Expose only the bcc package (not all of Debian's dist-packages) through a one-entry dir.
    mkdir -p "$VENV/debian-bcc"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
    echo "$(cd "$VENV/debian-bcc" && pwd)" > "$site/garrison-debian-bcc.pth"
fi

if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]]; then
    log "installing garrison and its test dependencies into $VENV (output: $VENV/pip-install.log)"
    # pip and the build backend's banners go to the log; shown only when the install fails
    if ! { "$VENV/bin/pip" install -q --upgrade pip &&
           "$VENV/bin/pip" install -q -e '.[test]'; } >"$VENV/pip-install.log" 2>&1; then
        tail -n 40 "$VENV/pip-install.log" >&2
        log "pip install failed; the whole output is in $VENV/pip-install.log"
        exit 1
    fi
    touch "$STAMP"
fi
# The proxy's per-request path runs compiled (mypyc); recompiled only when a source changed.
"$VENV/bin/python" scripts/compile.py
log "ready; the garrison command is $VENV/bin/garrison: export PATH=\"$PWD/$VENV/bin:\$PATH\""
