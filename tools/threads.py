"""OpenMP waiting policy for the command-line tools; import before torch.

torch and numba each load their own OpenMP runtime (torch's bundled libgomp and the
system's, for decode.skinny's kernel), so a forward alternates between two thread pools.
By default an OpenMP thread spins for a while after its parallel region ends; on 2 cores
the spinning pool steals the cores the other needs, and a neighbour's load makes it far
worse: a 0-node forward of the default model at a 1024-token context took 3.87 s spinning
against 0.31 s passive with the machine loaded (load average ~14, 2026-12-02). Passive
threads sleep on a futex instead.
"""

import os


def passive_openmp() -> None:
    """Make OpenMP threads sleep instead of spin when idle, unless OMP_WAIT_POLICY is set.
    Takes effect only if called before torch (and numba's parallel kernels) are loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
