"""Measure this machine's cost of verifying draft trees now, so no generate call pays for it.

usage: python tools/measure_cost.py [--model DIR]

The automatic budget needs c(n), the time of a forward over the root plus n draft nodes
relative to one over the root alone, at three context lengths. The first generate() on a
new machine measures it (about 30 s per context length on 2 cores) and caches it under
$RETRODRAFT_CACHE/cost (default ~/.cache/retrodraft/cost); this command does it ahead and
prints the curves. Already cached curves are only read.
"""

from __future__ import annotations

import argparse
import logging

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


if __name__ == "__main__":
    main()
