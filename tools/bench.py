"""Spec-Bench speed benchmark: methods side by side, interleaved per question, greedy, batch 1.

usage: python tools/bench.py [--questions FILE] [--categories a,b] [--limit N] [--max-new-tokens N]
                             [--warmup N] [--model DIR] [--datastore DIR] [--out RESULTS.json]

Methods: vanilla `model.generate`, transformers' prompt lookup (prompt_lookup_num_tokens=10),
retrodraft (`decode.generate`, automatic budget) and, with --datastore, retrodraft_datastore
(the same with the datastore attached, opened read-only: what it learns stays in memory). For every method and category it
prints tokens/s, speedup (mean per-question tok/s of the method / that of vanilla), mean
accepted tokens per verification step (new tokens / target forwards, the same count for every
method) and whether every output is identical to vanilla's. The 8 MT-bench categories form
one group, mt_bench, whose second turn includes the model's own first answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from decode import generate, load_model  # noqa: E402
from decode.budget import CostModel  # noqa: E402
from tools.generate import chat_ids  # noqa: E402

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def load_questions(path: Path, categories: set[str] | None, limit: int | None) -> list[dict]:
    """Questions grouped (mt_bench for MT-bench's 8), at most ``limit`` per group, file order."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        q["group"] = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        if categories and q["group"] not in categories:
            continue
        if limit is None or taken[q["group"]] < limit:
            taken[q["group"]] += 1
            out.append(q)
    return out


class ForwardCounter:
    """Counts forward calls of a model (verification steps of transformers' own loops)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def run_method(name: str, model, ids: torch.Tensor, max_new_tokens: int, counter: ForwardCounter, datastore,
               budget: int | None = None):
    """(new token ids, seconds, verification steps) for one method on one prompt."""
    start_calls = counter.calls
    t = time.perf_counter()
    if name.startswith("retrodraft"):
        out = generate(model, ids, max_new_tokens=max_new_tokens, budget=budget,
                       datastore=datastore if name == "retrodraft_datastore" else None)
        seconds = time.perf_counter() - t
        return out.sequences[0, ids.shape[1]:].tolist(), seconds, out.stats.steps
    extra = {"prompt_lookup_num_tokens": 10} if name == "prompt_lookup" else {}
    seq = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    seconds = time.perf_counter() - t
    return seq[0, ids.shape[1]:].tolist(), seconds, counter.calls - start_calls


def summarize(records: list[dict], methods: list[str]) -> dict:
    """Per method, per group and overall: speedup, tokens_per_s, mean_accepted, identical."""
    result: dict[str, dict] = {}
    groups = sorted({r["group"] for r in records}) + ["overall"]
    for m in methods:
        result[m] = {}
        for g in groups:
            rs = [r for r in records if g == "overall" or r["group"] == g]
            tps = [r[m]["tokens"] / r[m]["seconds"] for r in rs]
            vanilla = [r["vanilla"]["tokens"] / r["vanilla"]["seconds"] for r in rs]
            result[m][g] = {
                "speedup": (sum(tps) / len(tps)) / (sum(vanilla) / len(vanilla)),
                "tokens_per_s": sum(tps) / len(tps),
                "mean_accepted": sum(r[m]["tokens"] for r in rs) / sum(r[m]["steps"] for r in rs),
                "identical": all(r[m]["identical"] for r in rs),
            }
    return result


def print_table(result: dict) -> None:
    methods = list(result)
    groups = list(result[methods[0]])
    print(f"\n{'method':<22}{'group':<16}{'tok/s':>8}{'speedup':>9}{'accepted':>10}{'identical':>11}")
    for m in methods:
        for g in groups:
            r = result[m][g]
            print(f"{m:<22}{g:<16}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x{r['mean_accepted']:>10.2f}"
                  f"{str(r['identical']):>11}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="Spec-Bench question.jsonl")
    ap.add_argument("--categories", default=None, help="comma-separated groups (e.g. summarization,rag,mt_bench)")
    ap.add_argument("--limit", type=int, default=10, help="questions per group (default 10)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="same for every method (default 128)")
    ap.add_argument("--warmup", type=int, default=1, help="questions run first and not counted (default 1)")
    ap.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")
    ap.add_argument("--datastore", default=None, help="datastore directory for retrodraft")
    ap.add_argument("--budget", type=int, default=None,
                    help="fixed draft tree size for retrodraft (default: automatic, from the cost curve)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    if not args.questions.is_file():
        print(f"no questions at {args.questions}: pass --questions FILE (Spec-Bench format); nothing to do")
        return
    categories = set(args.categories.split(",")) if args.categories else None
    questions = load_questions(args.questions, categories, args.limit)
    model, tok = load_model(args.model)
    datastore = None
    if args.datastore:
        from retrieval import Datastore

        datastore = Datastore.open(args.datastore, tokenizer=tok)
    counter = ForwardCounter(model)
    methods = ["vanilla", "prompt_lookup", "retrodraft"] + (["retrodraft_datastore"] if datastore else [])
    print(f"{len(questions)} questions, {torch.get_num_threads()} threads, max_new_tokens={args.max_new_tokens}")

    CostModel.of(model).warm()  # measured once per machine and cached: keep it out of the timings
    for q in questions[: args.warmup]:  # compiles kernels, uncounted
        for m in methods:
            run_method(m, model, chat_ids(tok, [{"role": "user", "content": q["turns"][0]}]), 16, counter, datastore)
    records = []
    for i, q in enumerate(tqdm(questions, desc="questions")):
        order = methods[i % len(methods):] + methods[: i % len(methods)]  # no method always runs first
        messages: list[dict] = []
        for turn in q["turns"][: 2 if q["group"] == "mt_bench" else 1]:
            messages.append({"role": "user", "content": turn})
            ids = chat_ids(tok, messages)
            rec = {"qid": q["question_id"], "group": q["group"]}
            outputs = {}
            for m in order:
                outputs[m], seconds, steps = run_method(m, model, ids, args.max_new_tokens, counter, datastore,
                                                        args.budget)
                rec[m] = {"tokens": len(outputs[m]), "seconds": seconds, "steps": steps}
            for m in methods:
                rec[m]["identical"] = outputs[m] == outputs["vanilla"]
            records.append(rec)
            messages.append({"role": "assistant", "content": tok.decode(outputs["vanilla"], skip_special_tokens=True)})
    result = summarize(records, methods)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps({"results": result, "records": records}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
