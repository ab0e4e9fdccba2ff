"""Replay recorded greedy traces through the drafters, without the model (seconds, not hours).

usage: python tools/replay.py [TRACES.jsonl] [--budgets 8,16,32,64] [--datastore DIR]
                              [--drafters prompt_lookup,suffix,recycling,corpus]

Prints mean accepted tokens per verification step (accepted drafts + 1) per category and
overall, for each drafter alone and for all of them fused, at each fixed budget. Greedy
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
    categories = sorted({t.category for t in traces}) + ["overall"]
    print(f"{len(traces)} traces; mean accepted tokens per step")
    print(f"{'drafters':<42}{'budget':>7}" + "".join(f"{c[:12]:>13}" for c in categories))
    for chosen in [[n] for n in names] + ([names] if len(names) > 1 else []):
        for budget in (int(b) for b in args.budgets.split(",")):
            result = replay_all(traces, factory(chosen, datastore), budget=budget)
            print(f"{'+'.join(chosen):<42}{budget:>7}" + "".join(f"{result[c]:>13.2f}" for c in categories))


if __name__ == "__main__":
    main()
