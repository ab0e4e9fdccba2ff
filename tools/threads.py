"""OpenMP waiting policy for the command-line tools; import before torch.

torch and numba each load their own OpenMP runtime (torch's bundled libgomp and the
system's, for decode.skinny's kernel), so a forward alternates between two thread pools,
a few hundred parallel regions per forward with Python in between. How long an idle thread
spins before it sleeps decides both the quiet and the loaded case:

- libgomp's default (300,000 spins) lets the idle pool steal the cores the other needs; with
  the machine loaded a 0-node forward at a 1024-token context took 3.87 s against 0.31 s
  passive (load average ~14, 2026-12-02).
- Passive (no spin) pays a futex wake-up at every region: on a quiet machine our loop with
  drafts off ran at 1.02x `model.generate` against 1.46x with a short spin.
- A short spin (SPINCOUNT) keeps nearly all of the quiet speed and, with a CPU hog beside
  it, about as much as passive (README, issue 10).
"""

import os

SPINCOUNT = "3000"  # ~tens of microseconds of spinning before an idle OpenMP thread sleeps


def short_openmp_spin() -> None:
    """Let idle OpenMP threads spin briefly, then sleep, unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is set. Takes effect only if called before torch (and numba's parallel
    kernels) are loaded."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
