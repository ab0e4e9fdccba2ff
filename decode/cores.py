"""How many threads a CPU verification loop should use: the cores other processes leave free.

A verification forward on a CPU is a few hundred short parallel regions (torch's ops and
``decode.skinny``'s kernel), and a region ends when its slowest thread does. A thread that
shares its core with another busy process gets a fraction of that core, and every region
waits for it: beside one CPU hog on two cores, the held-out bench ran the fused engine at
30.0 tok/s on two threads and at 39.2 tok/s on one (README, issue 10). So the loop runs on as
many threads as other processes leave cores free, measured every ``WINDOW`` seconds from
``/proc/stat``: the CPU time spent on this process's cores (steal time included: a busy VM
neighbour counts) less this process's own, per second. Where ``/proc/stat`` cannot be read
(not Linux) every core counts as free.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger(__name__)

WINDOW = 0.5  # seconds between readings
SHORTEST = 0.1  # no reading over less: /proc/stat counts in ticks of 10 ms
MARGIN = 0.5  # others must keep more than half a core busy to take it (bursts of kernel work stay below)


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent on ``cpus`` since boot by everything (user, nice, system, irq,
    softirq, steal), or None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in rest.split()[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class FreeCores:
    """Cores of this process's affinity that other processes leave free (at least 1),
    re-read every ``window`` seconds.

    ``count()`` may be called as often as wanted (once per step): between readings it
    returns the last answer without a system call. ``others`` is the last reading of how
    many cores the rest of the machine kept busy.
    """

    def __init__(self, window: float = WINDOW):
        self.window = window
        try:
            self.cpus = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            self.cpus = set(range(os.cpu_count() or 1))
        self.others = 0.0
        self._free = len(self.cpus)
        self._last = self._reading()

    def _reading(self) -> tuple[float, float, float] | None:
        busy = _busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, _own_seconds())

    def count(self) -> int:
        if self._last is None or time.monotonic() - self._last[0] < max(self.window, SHORTEST):
            return self._free
        now = self._reading()
        if now is None:
            return self._free
        wall, busy, own = (a - b for a, b in zip(now, self._last))
        self._last = now
        self.others = max(0.0, (busy - own) / wall)
        free = max(1, math.floor(len(self.cpus) - self.others + MARGIN))
        if free != self._free:
            log.info("other processes keep %.1f of %d cores busy: %d free", self.others, len(self.cpus), free)
            self._free = free
        return free


_shared: FreeCores | None = None


def free_cores() -> FreeCores:
    """This process's ``FreeCores``, shared by every call so what it read outlives a call."""
    global _shared
    if _shared is None:
        _shared = FreeCores()
    return _shared
