"""Why garrison's p99 grows at saturation: the access log's place, measured from the kernel.

Run (root: the probes are eBPF): .venv/bin/python bench/proxy_saturation.py
                                 [--duration S] [--connections N] [--disk DIR]

Issue 17 asks what the p99 is at saturation and why. `bench/proxy_http.py` runs wrk with 32
connections against one garrison worker and sees a p99 of tens of milliseconds when the access
log is on the root filesystem, a few with the log on a tmpfs or off. This bench runs the same
load (the same nginx, garrison and policy as `bench/proxy_http.py`) three times — the log on
`--disk` (default: a directory under /var/tmp, on the root filesystem), on /dev/shm (tmpfs),
and no log — and for each run attaches two probes to the proxy's event-loop thread:

- the `write(2)`s into the access log: how long each takes (log2 histogram, maximum). If the
  loop blocked on the filesystem, it would show here;
- the scheduler: how long the loop thread waits between becoming runnable (woken, or
  preempted while running) and running again, and which tasks ran on the CPU just before it
  got it back after a wait over 0.5 ms; and how long it is off the CPU, split into sleeping
  (S: waiting for events) and blocked (D: uninterruptible, inside a system call such as a
  filesystem's). Before 2026-12-07's fix every access-log rotation on ext4 showed here as
  a D block of tens of milliseconds (in `rename`: the replaced backup's blocks freed and
  trimmed, the renamed file written out first).

It also reads, from /proc, the CPU time the kernel's own threads (kworker, jbd2, kswapd...)
used during each run: the page cache writeback of a file written at tens of MB/s is work
someone's CPU does. Prints wrk's req/s, p50, p99 and the proxy's CPU per request beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy_http import children, garrison, nginx, wrk

PATH = "/v1/request-landing"
KERNEL_THREADS = ("kworker", "jbd2", "kswapd", "writeback", "flush")

PROBES = r"""
BPF_HASH(write_start, u32, u64);
BPF_HISTOGRAM(write_us);
BPF_ARRAY(write_max, u64, 1);
BPF_ARRAY(queued, u64, 1);
BPF_HISTOGRAM(wait_us);
BPF_ARRAY(wait_max, u64, 1);
BPF_ARRAY(slept, u64, 1);
BPF_HISTOGRAM(sleep_us);
BPF_HISTOGRAM(dsleep_us);
BPF_ARRAY(dstate, u64, 1);
struct comm_t { char comm[16]; };
BPF_HASH(before_us, struct comm_t, u64);

TRACEPOINT_PROBE(syscalls, sys_enter_write) {
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != TID || args->fd != LOGFD) return 0;
    u32 tid = id; u64 now = bpf_ktime_get_ns();
    write_start.update(&tid, &now);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_write) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 *start = write_start.lookup(&tid);
    if (!start) return 0;
    u64 us = (bpf_ktime_get_ns() - *start) / 1000;
    write_start.delete(&tid);
    write_us.increment(bpf_log2l(us));
    int zero = 0; u64 *max = write_max.lookup(&zero);
    if (max && us > *max) *max = us;
    return 0;
}
TRACEPOINT_PROBE(sched, sched_wakeup) {
    if (args->pid != TID) return 0;
    int zero = 0; u64 now = bpf_ktime_get_ns();
    queued.update(&zero, &now);
    u64 *since = slept.lookup(&zero);
    u64 *state = dstate.lookup(&zero);
    if (since && *since && state && now > *since) {
        u64 us = (now - *since) / 1000;
        if (*state & 2) dsleep_us.increment(bpf_log2l(us));
        else sleep_us.increment(bpf_log2l(us));
    }
    u64 none = 0; slept.update(&zero, &none);
    return 0;
}
TRACEPOINT_PROBE(sched, sched_switch) {
    int zero = 0; u64 now = bpf_ktime_get_ns();
    if (args->prev_pid == TID && args->prev_state == 0) queued.update(&zero, &now);
    if (args->prev_pid == TID && args->prev_state != 0) {
        u64 state = args->prev_state;
        slept.update(&zero, &now); dstate.update(&zero, &state);
    }
    if (args->next_pid != TID) return 0;
    u64 *since = queued.lookup(&zero);
    if (!since || *since == 0 || now < *since) return 0;
    u64 us = (now - *since) / 1000, none = 0;
    queued.update(&zero, &none);
    wait_us.increment(bpf_log2l(us));
    u64 *max = wait_max.lookup(&zero);
    if (max && us > *max) *max = us;
    if (us > 500) {
        struct comm_t key = {};
        __builtin_memcpy(&key.comm, args->prev_comm, sizeof(key.comm));
        before_us.increment(key, us);
    }
    return 0;
}
"""


@dataclass(frozen=True)
class Run:
    where: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None
    write_max_us: int
    write_hist: dict[int, int]
    wait_max_us: int
    wait_hist: dict[int, int]
    sleep_hist: dict[int, int]
    dsleep_hist: dict[int, int]
    before: list[tuple[str, int]]
    kernel_ms: list[tuple[str, float]]


def thread_cpu() -> dict[str, tuple[str, int]]:
    """CPU ticks of every kernel thread whose name starts with one of KERNEL_THREADS, by PID
    (a kworker's name carries the workqueue it serves at the moment, so it changes)."""
    out: dict[str, tuple[str, int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            if name.startswith(KERNEL_THREADS):
                fields = stat[stat.rindex(")") + 2:].split()
                out[pid] = (name.split("-")[0], int(fields[11]) + int(fields[12]))
    return out


def _hist(table: object) -> dict[int, int]:
    """A log2 histogram's non-empty slots (bcc's histograms are arrays of 64)."""
    return {int(k.value): int(v.value)
            for k, v in table.items() if v.value}  # type: ignore[attr-defined]


@contextlib.contextmanager
def probes(tid: int, log_fd: int) -> Iterator[dict[str, object]]:
    from bcc import BPF  # root only; imported here so --help works anywhere

    bpf = BPF(text=PROBES.replace("TID", str(tid)).replace("LOGFD", str(log_fd)))
    result: dict[str, object] = {}
    try:
        yield result
    finally:
        result["write_hist"] = _hist(bpf["write_us"])
        result["write_max"] = int(bpf["write_max"][0].value)
        result["wait_hist"] = _hist(bpf["wait_us"])
        result["wait_max"] = int(bpf["wait_max"][0].value)
        result["sleep_hist"] = _hist(bpf["sleep_us"])
        result["dsleep_hist"] = _hist(bpf["dsleep_us"])
        before = [(k.comm.decode(errors="replace"), int(v.value))
                  for k, v in bpf["before_us"].items()]
        result["before"] = sorted(before, key=lambda item: -item[1])[:6]
        bpf.cleanup()


def one_run(where: str, workdir: Path, access_log: bool, duration: float,
            connections: int) -> Run:
    with nginx(workdir) as (backend, _), \
            garrison(workdir, backend, access_log) as (port, proc):
        pid = (children(proc.pid) or [proc.pid])[0]
        log_fd = -1
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("access.log"):
                    log_fd = int(fd)
        url = f"http://127.0.0.1:{port}{PATH}"
        wrk(url, "POST", 2, connections, workdir, None)  # warm-up
        with probes(pid, log_fd) as seen:
            kernel_before = thread_cpu()
            result = wrk(url, "POST", duration, connections, workdir, pid)
            kernel_after = thread_cpu()
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    kernel: dict[str, float] = {}
    for thread, (name, ticks) in kernel_after.items():
        if thread not in kernel_before:
            continue  # started during the run: its whole life is not the run's
        spent = (ticks - kernel_before[thread][1]) * tick_ms
        if spent > 0:
            kernel[name] = kernel.get(name, 0.0) + spent
    return Run(
        where, result.rps, result.p50_ms, result.p99_ms, result.cpu_us,
        seen["write_max"], seen["write_hist"],  # type: ignore[arg-type]
        seen["wait_max"], seen["wait_hist"],  # type: ignore[arg-type]
        seen["sleep_hist"], seen["dsleep_hist"], seen["before"],  # type: ignore[arg-type]
        sorted(kernel.items(), key=lambda item: -item[1])[:5],
    )


def _share_over(hist: dict[int, int], bucket: int) -> float:
    total = sum(hist.values())
    return sum(v for k, v in hist.items() if k >= bucket) / total if total else 0.0


def report(run: Run) -> None:
    cpu = f"{run.cpu_us:.1f}" if run.cpu_us is not None else "-"
    print(f"{run.where:<28} {run.rps:>9.0f} {run.p50_ms:>8.2f} {run.p99_ms:>8.2f} {cpu:>10}")
    if run.write_hist:
        print(f"    access-log write(2): {sum(run.write_hist.values())} calls, max "
              f"{run.write_max_us} us, {100 * _share_over(run.write_hist, 10):.2f} % "
              f">= 512 us")
    print(f"    loop thread runnable -> running: max {run.wait_max_us / 1000:.1f} ms, "
          f"{100 * _share_over(run.wait_hist, 10):.2f} % of waits >= 512 us")
    for what, hist in (("sleeping (S)", run.sleep_hist), ("blocked (D)", run.dsleep_hist)):
        if hist:
            top = max(hist)
            print(f"    loop thread {what}: {sum(hist.values())} times, the longest "
                  f"{2 ** (top - 1) / 1000:.1f}-{2 ** top / 1000:.1f} ms, "
                  f"{sum(v for k, v in hist.items() if k >= 10)} over 0.5 ms")
    if run.before:
        print("    ran before it after waits > 0.5 ms (ms): "
              + ", ".join(f"{name} {us / 1000:.1f}" for name, us in run.before))
    print("    kernel threads' CPU during the run (ms): "
          + (", ".join(f"{name} {ms:.0f}" for name, ms in run.kernel_ms) or "none"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--disk", default="/var/tmp",
                        help="a directory on the filesystem to test (default /var/tmp)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("proxy_saturation.py: the probes are eBPF programs: run it as root",
              file=sys.stderr)
        return 2
    runs: list[Run] = []
    cases = [(f"log on {args.disk}", args.disk, True), ("log on /dev/shm", "/dev/shm", True),
             ("no access log", None, False)]
    for where, base, log in cases:
        with tempfile.TemporaryDirectory(prefix="garrison-sat-", dir=base) as tmp:
            runs.append(one_run(where, Path(tmp), log, args.duration, args.connections))
    print(f"wrk -t1 -c{args.connections} -d{round(args.duration)}s, allowed POST, one worker")
    print(f"{'case':<28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}")
    for run in runs:
        report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
