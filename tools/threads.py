"""OpenMP waiting policy for the command-line tools; import before torch.

torch and numba each load their own OpenMP runtime (torch's bundled libgomp and the
system's, for decode.skinny's kernel), so a forward alternates between two thread pools,
a few hundred parallel regions per forward with Python in between. How long an idle thread
spins before it sleeps decides both the quiet and the loaded case:

- libgomp's default (300,000 spins) lets the idle pool steal the cores the other needs; with
  the machine loaded a 0-node forward at a 1024-token context took 3.87 s against 0.31 s
  passive (load average ~14, 2026-12-02, before the loop followed the free cores).
- Passive (no spin) pays a futex wake-up at every region: on a quiet machine our loop with
  drafts off ran at 1.02x `model.generate` against 1.46x with a short spin.
- 3,000 spins kept most of the quiet speed on the 2-core EPYC VM, but on the 2-core Xeon VM
  they do not outlast the gap between two regions: a kernel call after 100 us of torch work
  paid 31 us to wake its pool (2 us at 30,000), and a 0-node forward at 1024 tokens took
  50.8 ms against 38.8 ms.
- SPINCOUNT (30,000, tens of microseconds) spans those gaps. Beside a CPU hog the loop runs
  on the one free core (decode.cores), where no pool spins: the held-out bench ran the fused
  engine at 57.7 tok/s there against 56.5 tok/s with 3,000 spins, and at 95.9 against 80.4
  quiet (Xeon VM, README, issue 10). A process that does not follow the free cores, such as
  ``model.generate`` beside the hog, loses more to the longer spin (4.8 against 11.8 tok/s).
"""

import os

SPINCOUNT = "30000"  # tens of microseconds of spinning before an idle OpenMP thread sleeps


def short_openmp_spin() -> None:
    """Let idle OpenMP threads spin briefly, then sleep, unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is set. Takes effect only if called before torch (and numba's parallel
    kernels) are loaded."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
