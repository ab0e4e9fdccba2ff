"""Replay recorded greedy traces through the drafters, without the model (seconds, not hours).

usage: python tools/replay.py [TRACES.jsonl] [--budgets 8,16,32,64,auto] [--datastore DIR]
                              [--drafters prompt_lookup,suffix,recycling,corpus]

Prints mean accepted tokens per verification step (accepted drafts + 1) per category and
overall, for each drafter alone and for all of them fused, at each budget. "auto" chooses
each step's size with this machine's cached cost curve of the default model (measured on
first use), with online calibration as in generate(), and also prints the speedup that
curve predicts (tokens / summed cost, loop overhead aside) and the calibration per source. Greedy
acceptance is the longest tree path matching the recorded output, which is what a real run
accepts (tests/test_replay.py checks the two agree exactly). Past outputs and the
recycling matrix start empty and learn across the traces in file order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode.replay import load_traces, replay_all  # noqa: E402
from retrieval.calibration import Calibrator  # noqa: E402
from retrieval.drafters import PromptLookupDrafter  # noqa: E402
from retrieval.online import OnlineState  # noqa: E402

DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "traces" / "smollm2_specbench_dev.jsonl"
VOCAB = 49152


def factory(names: list[str], datastore):
    """A function making fresh per-trace drafters, sharing learned state across traces."""
    online = OnlineState(VOCAB)

    def make():
        pool = [PromptLookupDrafter(), *online.drafters()]
        if datastore is not None:
            pool += [d for d in datastore.drafters(VOCAB) if d.name == "corpus"]
        return [d for d in pool if d.name in names]

    return make


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="?", type=Path, default=DEFAULT_TRACES, help="JSONL traces (qid, cat, prompt, output, top8)")
    ap.add_argument("--budgets", default="8,16,32,64", help="comma-separated tree sizes (default 8,16,32,64)")
    ap.add_argument("--datastore", default=None, help="a datastore for the corpus drafter")
    ap.add_argument("--drafters", default="prompt_lookup,suffix,recycling,corpus", help="which drafters to replay")
    args = ap.parse_args(argv)
    if not args.traces.is_file():
        sys.exit(f"no traces at {args.traces}: pass a JSONL file of recorded traces")
    traces = load_traces(args.traces)
    datastore = None
    if args.datastore:
        from retrieval import Datastore

        datastore = Datastore.open(args.datastore)
    names = [n for n in args.drafters.split(",") if n != "corpus" or datastore is not None]
    budgets = args.budgets.split(",")
    table = None
    if "auto" in budgets:
        from decode import load_model
        from decode.budget import CostModel

        table = CostModel.of(load_model()[0]).table(1024)
    categories = sorted({t.category for t in traces}) + ["overall"]
    print(f"{len(traces)} traces; mean accepted tokens per step (predicted speedup for auto)")
    print(f"{'drafters':<42}{'budget':>7}" + "".join(f"{c[:12]:>13}" for c in categories))
    for chosen in [[n] for n in names] + ([names] if len(names) > 1 else []):
        for b in budgets:
            calibrator = Calibrator() if b == "auto" else None
            result = replay_all(traces, factory(chosen, datastore), budget=None if b == "auto" else int(b),
                                cost_table=table, calibrator=calibrator)
            cells = [f"{a:.2f} ({s:.2f}x)" if b == "auto" else f"{a:.2f}" for a, s in (result[c] for c in categories)]
            print(f"{'+'.join(chosen):<42}{b:>7}" + "".join(f"{c:>13}" for c in cells))
            for name, raw, seen_rate, n in calibrator.report() if calibrator else ():
                print(f"    calibration {name}: mean raw score {raw:.3f}, observed acceptance {seen_rate:.3f} ({n} nodes)")


if __name__ == "__main__":
    main()
