"""Measure this machine's cost of verifying draft trees now, so no generate call pays for it.

usage: python tools/measure_cost.py [--model DIR]

The automatic budget needs c(n), the time of a forward over the root plus n draft nodes
relative to one over the root alone, at three context lengths. The first generate() on a
new machine measures it (20-60 s per context length on 2 cores: on a CPU each size is timed
with the few-rows kernel and with BLAS, and steps take the faster) and caches it under
$RETRODRAFT_CACHE/cost (default ~/.cache/retrodraft/cost); this command does it ahead and
prints the curves and the sizes that run on BLAS. Already cached curves are only read.
"""

from __future__ import annotations

import argparse
import logging

from retrodraft.tools.threads import short_openmp_spin

short_openmp_spin()  # before torch, as generate and bench run: see tools/threads.py

from retrodraft.decode import load_model
from retrodraft.decode.budget import BUCKETS, CostModel


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, _ = load_model(args.model)
    costs = CostModel.of(model)
    costs.warm()
    for b in BUCKETS:
        curve = costs.curve(b)
        print(f"context {b:>5}: " + ", ".join(f"c({n}) = {c:.2f}" for n, c in zip(curve.sizes, curve.costs)))
        blas = [n for n, k in zip(curve.sizes, curve.kernel) if not k]
        if blas:
            print(f"               BLAS, not the few-rows kernel, at n = {', '.join(map(str, blas))}")


if __name__ == "__main__":
    main()
