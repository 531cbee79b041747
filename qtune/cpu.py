"""CPU threads: as many as the machine really gives this process, following what other processes use.

torch sizes its OpenMP pool by the cores it sees, ignoring a container's CPU quota and whatever else
runs on the machine. On cores that other processes share, every parallel region waits for its slowest
thread, and a thread that lost its core for a scheduler slice stalls all the others: beside one busy
process GPTQ and AWQ ran far slower than a fair share of the cores predicts. Letting idle threads sleep
(OMP_WAIT_POLICY=PASSIVE) fixes the shared case but costs much more when the machine is idle
(scripts/bench_threads.py; the numbers are in docs/benchmarks.md, "Cores shared with other processes").

So qtune keeps OpenMP's defaults and changes the thread count instead: ``configure_threads`` (at
start-up, before torch) sizes the pools by the CPUs this process may use, and ``fit_threads`` (called
between units of work: decoder blocks, training steps, evaluation batches) sets torch's thread count to
the CPUs that other processes left idle since the previous call. A thread count the user sets
(OMP_NUM_THREADS) is always kept.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

THREAD_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
MIN_INTERVAL = 1.0  # seconds of history a decision needs; shorter intervals are noise


class _State:
    adaptive = False
    last: tuple[float, float, float] | None = None  # (time, busy CPU seconds on our CPUs, our CPU seconds)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max, or v1 cfs_quota_us), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup's quota."""
    count = len(_affinity())
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def configure_threads() -> int:
    """Size the thread pools by ``available_cpus()`` unless the environment already does; returns the
    count. Call before torch or numba is imported: OpenMP reads these variables once."""
    _State.adaptive = "OMP_NUM_THREADS" not in os.environ
    threads = int(os.environ.get("OMP_NUM_THREADS") or available_cpus())
    for name in THREAD_COUNT_VARIABLES:
        os.environ.setdefault(name, str(threads))
    _State.last = _sample()
    return threads


def _sample() -> tuple[float, float, float] | None:
    """(now, CPU seconds spent on our CPUs by everyone, CPU seconds spent by this process); None off Linux."""
    try:
        cpus, hertz = _affinity(), os.sysconf("SC_CLK_TCK")
        busy = 0
        with open("/proc/stat") as handle:
            for line in handle:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(f) for f in fields[:8]]
                    busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        own = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        return time.monotonic(), busy / hertz, (int(own[11]) + int(own[12])) / hertz  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def fit_threads() -> int | None:
    """Set torch's thread count to the CPUs other processes left free since the last call (at least one,
    at most ``available_cpus()``). Does nothing when the user chose a thread count, or less than
    MIN_INTERVAL seconds have passed. Returns the count it set, else None."""
    if not _State.adaptive:
        return None
    now = _sample()
    if now is None or _State.last is None or now[0] - _State.last[0] < MIN_INTERVAL:
        _State.last = _State.last or now
        return None
    elapsed = now[0] - _State.last[0]
    others = max(0.0, (now[1] - _State.last[1]) - (now[2] - _State.last[2])) / elapsed
    _State.last = now
    threads = max(1, min(available_cpus(), int(len(_affinity()) - others + 0.5)))
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
