"""Spec-Bench: speed side by side (run), greedy traces of the target (record), and
acceptance replayed from traces without the model (replay).

usage: python tools/bench.py [run] [--questions FILE] [--categories a,b] [--limit N]
                             [--max-new-tokens N] [--warmup N] [--model DIR] [--datastore DIR]
                             [--budget N] [--hog N] [--out RESULTS.json] [--chart RESULTS.png]
       python tools/bench.py compare RESULTS.json [--resamples N] [--confidence 0.9] [--seed N]
       python tools/bench.py record --out TRACES.jsonl [--questions FILE] [--categories a,b]
                             [--limit N] [--max-new-tokens N] [--model DIR]
       python tools/bench.py replay [TRACES.jsonl] [--budgets 8,16,32,64,auto] [--datastore DIR]
                             [--drafters prompt_lookup,suffix,ngram,recycling,corpus,nest] [--hidden]
                             [--memory BYTES]

run: methods interleaved per question, greedy, batch 1, the same max_new_tokens for all:
vanilla `model.generate`, transformers' prompt lookup (prompt_lookup_num_tokens=10),
`no_drafts` (`decode.generate` with speculation off: what its loop and kernels alone give), each
drafter alone (`drafter:NAME`, automatic budget, its own online state and calibration) and
`retrodraft`, the fused engine as `decode.generate` runs it by default (with --datastore,
over that datastore, opened read-only: what it learns stays in memory). With a datastore
that has NEST keys, `drafter:nest` runs NEST alone and `retrodraft:no_nest` the fused
engine without NEST (its own fresh online state), beside `retrodraft`, which includes it.
--methods keeps only the named methods (vanilla always runs: speedups are over it). Per method and
category it prints tokens/s, speedup (mean per-question tok/s of the method / that of
vanilla), mean accepted tokens per verification step (new tokens / target forwards, counted
the same way for every method), whether every output equals vanilla's and the median error
of the cost model's predicted step time against the measured one (our methods with the
automatic budget); then the fused engine's calibration error (predicted against observed
acceptance) and the cost curves measured and learned. --hog N runs it all beside N
processes spinning a CPU each (a noisy neighbour), started before the first call. The JSON
(--out) holds the results, per-question records with per-step prediction errors, the
calibration and the cost model (curves, machine level, drafting time d). The 8 MT-bench
categories form one group, mt_bench, whose second turn includes the model's own first answer.

compare: reads a run's JSON and prints, per group, the fused engine's speedup against its
best single drafter's (ratio, and its bootstrap interval over questions: each resample
draws questions with replacement and takes the best single drafter of that resample) and
speculation's own share, fused / no_drafts.

record: runs the target once per question (turn) and writes its greedy output and its top-8
ids at every output position, one JSON line each (qid, cat, prompt, output, top8).

replay: drives each drafter alone and all of them fused over recorded traces: the accepted
length of a step is the longest tree path matching the recorded continuation, which is what
a real greedy run accepts. Prints mean accepted tokens per category at each budget; "auto"
chooses each step's size with the default model's cost model on this machine (the cached
curve, learned as generate() ran, plus the replay's own drafting time per step, as
generate() weighs them), with calibration as in generate(), and also prints the speedup it
predicts (tokens / summed c(n) + d, in 0-node forwards) and the calibration error.
NEST needs the target's hidden states, which traces do not hold: --hidden loads the model
and recomputes them with one prefill per trace (the datastore must have keys); the fused rows
are then printed with and without NEST.
"""

from __future__ import annotations

import argparse
import logging
import contextlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from retrodraft.tools.threads import short_openmp_spin

short_openmp_spin()  # before torch: see tools/threads.py

import numpy as np
import torch
import transformers
from tqdm import tqdm

from retrodraft.decode import GenerationStats, generate, load_model, online_state
from retrodraft.decode.budget import CostModel
from retrodraft.decode.keys import nest_drafters, sequence_hidden
from retrodraft.decode.replay import load_traces, replay_all
from retrodraft.retrieval.calibration import Calibrator
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter
from retrodraft.retrieval.online import OnlineState
from retrodraft.tools.generate import chat_ids

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_QUESTIONS = SHARED / "spec_bench" / "question.jsonl"
DEFAULT_TRACES = SHARED / "traces" / "smollm2_specbench_dev.jsonl"
DRAFTERS = ("prompt_lookup", "suffix", "ngram", "recycling", "corpus", "nest")
TRACE_TOPK = DEFAULT.topk  # the traces' top-k is what the recycling drafter learns from


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


def asked(question: dict) -> list[str]:
    """The user turns of ``question`` a run asks: two for mt_bench, else the first."""
    return question["turns"][: 2 if question["group"] == "mt_bench" else 1]


def turns(question: dict, tokenizer, answer: Callable[[torch.Tensor], list[int]]) -> Iterator[torch.Tensor]:
    """The chat-templated prompt ids of each turn of ``question`` (two for mt_bench, else
    one); after each, ``answer(ids)`` gives the target's greedy output, which the next turn
    includes."""
    messages: list[dict] = []
    for turn in asked(question):
        messages.append({"role": "user", "content": turn})
        ids = chat_ids(tokenizer, messages)
        yield ids
        messages.append({"role": "assistant", "content": tokenizer.decode(answer(ids), skip_special_tokens=True)})


def longest_context(questions: list[dict], tokenizer, max_new_tokens: int) -> int:
    """More tokens than any turn of ``questions`` can reach as its context (prompt and
    output), for warming only the cost curves a run uses: each user turn templated on its own
    (so each counts the template once more than needed), and each answer at twice
    ``max_new_tokens`` plus 16 (an answer's text is tokenized again in the next turn's prompt)."""
    longest = 1
    for q in questions:
        user = asked(q)
        prompts = sum(chat_ids(tokenizer, [{"role": "user", "content": t}]).shape[1] for t in user)
        longest = max(longest, prompts + len(user) * (2 * max_new_tokens + 16))
    return longest


class ForwardCounter:
    """Counts forward calls of a model (verification steps of transformers' own loops)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def drafter_pool(online: OnlineState, datastore, vocab: int, model=None) -> list[Drafter]:
    """One of each drafter: prompt lookup, ``online``'s past outputs and recycling, and the
    datastore's corpus when there is one, and NEST when it has keys and ``model`` is given."""
    corpus = [d for d in datastore.drafters(vocab) if d.name == "corpus"] if datastore is not None else []
    nest = nest_drafters(model, datastore) if datastore is not None and model is not None else []
    return [PromptLookupDrafter(), *online.drafters(), *corpus, *nest]


# (ids, max_new_tokens) -> (new ids, steps, our loop's GenerationStats or None)
Method = Callable[[torch.Tensor, int], tuple[list[int], int, GenerationStats | None]]


def methods(model, datastore, budget: int | None) -> dict[str, Method]:
    """Every method of a run by name: vanilla, prompt_lookup, no_drafts, drafter:NAME per drafter, retrodraft."""
    counter = ForwardCounter(model)
    vocab = model.config.vocab_size

    def hf(extra: dict) -> Method:
        def run(ids, max_new_tokens):
            start = counter.calls
            seq = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False, **extra)
            return seq[0, ids.shape[1]:].tolist(), counter.calls - start, None
        return run

    def ours(make_drafters: Callable[[], list[Drafter]] | None, calibrator: Calibrator | None) -> Method:
        def run(ids, max_new_tokens):
            drafters = make_drafters() if make_drafters else None
            out = generate(model, ids, max_new_tokens=max_new_tokens, budget=budget, drafters=drafters,
                           calibrator=calibrator, datastore=datastore if drafters is None else None)
            return out.sequences[0, ids.shape[1]:].tolist(), out.stats.steps, out.stats
        return run

    def alone(name: str) -> Method:
        solo = OnlineState(vocab)  # this method's own past outputs, recycling matrix and calibration

        return ours(lambda: [d for d in drafter_pool(solo, datastore, vocab, model) if d.name == name],
                    solo.calibrator)

    keys = datastore is not None and datastore.nest_index() is not None
    table = {"vanilla": hf({}), "prompt_lookup": hf({"prompt_lookup_num_tokens": 10}),
             "no_drafts": ours(lambda: [], None)}
    for name in DRAFTERS:
        if (name != "corpus" or datastore is not None) and (name != "nest" or keys):
            table[f"drafter:{name}"] = alone(name)
    table["retrodraft"] = ours(None, None)
    if keys:
        solo = OnlineState(vocab)
        table["retrodraft:no_nest"] = ours(
            lambda: [d for d in drafter_pool(solo, datastore, vocab) if d.name != "nest"], solo.calibrator)
    return table


def time_methods(questions: list[dict], tokenizer, table: dict[str, Method], max_new_tokens: int,
                 warmup: int = 1) -> list[dict]:
    """Run every method on every turn of ``questions``, interleaved in rotating order, after
    ``warmup`` uncounted questions (16 tokens each). One record per turn: qid, group and per
    method tokens, seconds, steps, identical (to vanilla's output), step_errors (see
    ``step_errors``) and, for our loop, step_seconds and host_seconds (see GenerationStats)."""
    names = list(table)
    for q in questions[:warmup]:  # compiles kernels (and on CUDA captures graphs), uncounted
        for method in table.values():
            method(chat_ids(tokenizer, [{"role": "user", "content": q["turns"][0]}]), 16)
    records = []
    for i, q in enumerate(tqdm(questions, desc="questions")):
        order = names[i % len(names):] + names[: i % len(names)]  # no method always runs first
        outputs: dict[str, list[int]] = {}
        for ids in turns(q, tokenizer, lambda ids: outputs["vanilla"]):
            rec = {"qid": q["question_id"], "group": q["group"]}
            for m in order:
                t = time.perf_counter()
                outputs[m], steps, stats = table[m](ids, max_new_tokens)
                rec[m] = {"tokens": len(outputs[m]), "seconds": time.perf_counter() - t, "steps": steps}
                rec[m]["step_errors"] = step_errors(stats)
                if stats is not None:
                    rec[m].update(step_seconds=stats.step_seconds, host_seconds=stats.host_seconds)
            for m in names:
                rec[m]["identical"] = outputs[m] == outputs["vanilla"]
            records.append(rec)
    return records


def step_errors(stats: GenerationStats | None) -> list[float]:
    """|predicted - measured| / measured step time per step ([] if not predicted)."""
    if stats is None or not stats.measured_step_seconds:
        return []
    p, m = np.array(stats.predicted_step_seconds), np.array(stats.measured_step_seconds)
    return (np.abs(p - m) / m).round(4).tolist()


def tokens_per_s(records: list[dict], method: str) -> float:
    """Mean over ``records`` of ``method``'s tokens per second."""
    return sum(r[method]["tokens"] / r[method]["seconds"] for r in records) / len(records)


def speedup(records: list[dict], method: str) -> float:
    """Mean tokens/s of ``method`` over ``records`` / that of vanilla."""
    return tokens_per_s(records, method) / tokens_per_s(records, "vanilla")


def summarize(records: list[dict], names: list[str]) -> dict:
    """Per method, per group and overall: speedup, tokens_per_s, mean_accepted, identical and
    prediction_error (median over steps of |predicted - measured| / measured step time; None
    for methods the cost model does not drive)."""
    result: dict[str, dict] = {}
    for m in names:
        result[m] = {}
        for g, rs in by_group(records).items():
            result[m][g] = {
                "speedup": speedup(rs, m),
                "tokens_per_s": tokens_per_s(rs, m),
                "mean_accepted": sum(r[m]["tokens"] for r in rs) / sum(r[m]["steps"] for r in rs),
                "identical": all(r[m]["identical"] for r in rs),
                "prediction_error": prediction_error([e for r in rs for e in r[m]["step_errors"]]),
            }
    return result


def by_group(records: list[dict]) -> dict[str, list[dict]]:
    """The records of each group, and all of them as "overall"."""
    groups = {g: [r for r in records if r["group"] == g] for g in sorted({r["group"] for r in records})}
    return {**groups, "overall": list(records)}


def compare(args) -> None:
    """The fused engine against its best single drafter, per group of a ``run``'s results, with
    a bootstrap interval over questions, and speculation's own share (fused / no_drafts)."""
    try:
        data = json.loads(args.results.read_text())
        records, result = data["records"], data["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{args.results} is not a results file of `bench.py run --out` ({e})")
    singles = [m for m in result if m.startswith("drafter:")]
    if "retrodraft" not in result or not singles:
        sys.exit(f"{args.results} has no retrodraft or no drafter:NAME method to compare "
                 f"(it has {', '.join(result)}): run without --methods, or name them")
    rng = np.random.default_rng(args.seed)
    print(f"fused (retrodraft) against the best single drafter, {args.resamples} resamples of the questions, "
          f"{args.confidence:.0%} interval")
    print(f"{'group':<16}{'fused':>8}{'best single':>28}{'ratio':>8}{'interval':>16}{'fused / no_drafts':>19}")
    tail = (100 - 100 * args.confidence) / 2
    for g, rs in by_group(records).items():
        questions = defaultdict(list)  # an MT-bench question's turns (one qid) are drawn together
        for r in rs:
            questions[r["qid"]].append(r)
        drawn = list(questions.values())
        best = max(singles, key=lambda m: result[m][g]["speedup"])
        ratios = []
        for _ in range(args.resamples):
            sample = [r for i in rng.integers(0, len(drawn), len(drawn)) for r in drawn[i]]
            ratios.append(speedup(sample, "retrodraft") / max(speedup(sample, m) for m in singles))
        lo, hi = np.percentile(ratios, [tail, 100 - tail])
        fused = result["retrodraft"][g]["speedup"]
        share = f"{fused / result['no_drafts'][g]['speedup']:.2f}" if "no_drafts" in result else "-"
        print(f"{g:<16}{fused:>7.2f}x{best:>20} {result[best][g]['speedup']:>5.2f}x{fused / result[best][g]['speedup']:>8.2f}"
              f"{f'{lo:.2f}-{hi:.2f}':>16}{share:>19}")


def prediction_error(errors: list[float]) -> float | None:
    return float(np.median(errors)) if errors else None


def print_table(result: dict) -> None:
    print(f"\n{'method':<24}{'group':<16}{'tok/s':>8}{'speedup':>9}{'accepted':>10}{'identical':>11}"
          f"{'step time error':>17}")
    for m, groups in result.items():
        for g, r in groups.items():
            err = r["prediction_error"]
            print(f"{m:<24}{g:<16}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x{r['mean_accepted']:>10.2f}"
                  f"{str(r['identical']):>11}{'-' if err is None else f'{100 * err:.1f}%':>17}")


def print_calibration(calibrator: Calibrator) -> dict:
    """Print and return the calibration error of ``calibrator`` (see Calibrator.calibration_error)."""
    ece, rows = calibrator.calibration_error()
    print(f"\ncalibration of the fused engine: expected calibration error {ece:.3f}")
    print(f"{'predicted':>10}{'observed':>10}{'nodes':>9}")
    for predicted, observed, n in rows:
        print(f"{predicted:>10.3f}{observed:>10.3f}{n:>9}")
    return {"expected_calibration_error": ece,
            "bins": [{"predicted": p, "observed": o, "nodes": n} for p, o, n in rows]}


def chart(result: dict, path: Path) -> None:
    """A PNG of speedup and mean accepted tokens per method (bars) and group (x axis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no chart: matplotlib is missing (pip install -e '.[bench]'); {path} not written")
        return
    names = list(result)
    groups = list(result[names[0]])
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8), sharex=True)
    for ax, key, label in ((axes[0], "speedup", "speedup over model.generate"),
                           (axes[1], "mean_accepted", "mean accepted tokens per step")):
        for i, m in enumerate(names):
            ax.bar(x + (i - (len(names) - 1) / 2) * width, [result[m][g][key] for g in groups], width, label=m)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel(label)
    axes[0].legend(ncol=min(4, len(names)), fontsize=8)
    axes[1].set_xticks(x, groups)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def open_datastore(path: str | None, tokenizer=None, scope: str = "default"):
    if not path:
        return None
    from retrodraft.retrieval import Datastore

    return Datastore.open(path, tokenizer=tokenizer, scope=scope)


@contextlib.contextmanager
def cpu_hogs(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning a CPU each (a noisy neighbour) for the duration of the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    if hogs:
        print(f"started {n} CPU hog process(es): {', '.join(str(h.pid) for h in hogs)}")
    try:
        yield hogs
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def run(args) -> None:
    questions = load_questions(args.questions, args.categories, args.limit)
    model, tok = load_model(args.model)
    datastore = open_datastore(args.datastore, tok, args.scope)
    with cpu_hogs(args.hog):
        timed_run(args, questions, model, tok, datastore)


def timed_run(args, questions: list[dict], model, tok, datastore) -> None:
    table = methods(model, datastore, args.budget)
    if args.methods:
        unknown = args.methods - set(table)
        if unknown:
            sys.exit(f"unknown --methods {', '.join(sorted(unknown))}: choose from {', '.join(table)}")
        table = {m: f for m, f in table.items() if m == "vanilla" or m in args.methods}
    names = list(table)
    print(f"{len(questions)} questions, {torch.get_num_threads()} threads, max_new_tokens={args.max_new_tokens}, "
          f"{args.hog} CPU hogs; methods: {', '.join(names)}")

    costs = CostModel.of(model)
    # measured once per machine and cached (or read back and checked): out of the timings
    costs.warm(longest_context(questions, tok, args.max_new_tokens))
    records = time_methods(questions, tok, table, args.max_new_tokens, args.warmup)
    result = summarize(records, names)
    print_table(result)
    calibration = print_calibration(online_state(model, datastore).calibrator)
    cost_model = costs.report()
    print("\ncost curves at the end (c at " + ", ".join(f"n = {n}" for n in (1, 16, 64)) + "): " + "; ".join(
        f"{b} tokens measured {v['measured'][1]:.2f} / {v['measured'][8]:.2f} / {v['measured'][-1]:.2f}, learned "
        f"{v['learned'][1]:.2f} / {v['learned'][8]:.2f} / {v['learned'][-1]:.2f}"
        for b, v in cost_model["buckets"].items()))
    costs.save(force=True)
    if args.out:
        # the settings go with the figures, so a results file says how it was run
        settings = {"config": DEFAULT.as_dict(), "budget": args.budget, "max_new_tokens": args.max_new_tokens,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__}
        args.out.write_text(json.dumps({"settings": {**settings, "hogs": args.hog}, "results": result,
                                        "calibration": calibration, "cost_model": cost_model, "records": records},
                                       indent=1))
        print(f"wrote {args.out}")
    chart_path = args.chart or (args.out.with_suffix(".png") if args.out else None)
    if chart_path:
        chart(result, chart_path)
    if datastore is not None:
        datastore.close()  # LMDB allows one open environment per path per process


def record(args) -> None:
    questions = load_questions(args.questions, args.categories, args.limit)
    model, tok = load_model(args.model)
    written = 0
    with open(args.out, "w") as f:
        for q in tqdm(questions, desc="questions"):
            traces: list[dict] = []

            def answer(ids: torch.Tensor) -> list[int]:
                out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
                output = out.sequences[0, ids.shape[1]:].tolist()
                top = torch.cat(out.logits).topk(TRACE_TOPK, dim=-1).indices[: len(output)]
                qid = q["question_id"] if not traces else f"{q['question_id']}-{len(traces) + 1}"
                traces.append({"qid": qid, "cat": q["group"], "prompt": ids[0].tolist(), "output": output,
                               "top8": top.tolist()})
                return output

            for _ in turns(q, tok, answer):  # answer() records each turn
                pass
            for t in traces:
                f.write(json.dumps(t) + "\n")
            written += len(traces)
    print(f"wrote {written} traces to {args.out}")


def replay(args) -> None:
    if not args.traces.is_file():
        sys.exit(f"no traces at {args.traces}: pass a JSONL file of recorded traces (tools/bench.py record)")
    traces = load_traces(args.traces)
    datastore = open_datastore(args.datastore, scope=args.scope)
    vocab = int(max(max(t.prompt.max(), t.output.max(), t.topk.max()) for t in traces)) + 1
    if args.hidden and (datastore is None or datastore.nest_index() is None):
        if datastore is not None:
            datastore.close()
        sys.exit("--hidden is for NEST: pass --datastore DIR of a datastore built with --keys")
    names = [n for n in args.drafters.split(",")
             if (n != "corpus" or datastore is not None) and (n != "nest" or args.hidden)]
    budgets = args.budgets.split(",")
    costs, model, hidden = None, None, None
    if "auto" in budgets or args.hidden:
        model = load_model()[0]
        vocab = model.config.vocab_size
    if "auto" in budgets:
        costs = CostModel.of(model)
    if args.hidden:
        cache: dict[str, np.ndarray] = {}
        for t in tqdm(traces, desc="hidden states (one prefill per trace)"):
            cache[t.qid] = sequence_hidden(model, np.concatenate([t.prompt, t.output]))
        hidden = lambda t: cache[t.qid]  # noqa: E731
    categories = sorted({t.category for t in traces}) + ["overall"]
    print(f"{len(traces)} traces; mean accepted tokens per step (predicted speedup for auto)")
    print(f"{'drafters':<42}{'budget':>7}" + "".join(f"{c[:12]:>13}" for c in categories))
    rows = [[n] for n in names] + ([names] if len(names) > 1 else [])
    if "nest" in names and len(names) > 2:
        rows.append([n for n in names if n != "nest"])  # the fused engine without NEST, beside it
    for chosen in rows:
        for b in budgets:
            online = OnlineState(vocab, args.memory)  # learned across the traces in file order, fresh per row

            calibrator = online.calibrator if b == "auto" else None
            nest_model = model if "nest" in chosen else None
            result = replay_all(traces, lambda: [d for d in drafter_pool(online, datastore, vocab, nest_model)
                                                 if d.name in chosen],
                                budget=None if b == "auto" else int(b), calibrator=calibrator,
                                costs=costs if b == "auto" else None, hidden=hidden)
            cells = [f"{a:.2f} ({s:.2f}x)" if b == "auto" else f"{a:.2f}" for a, s in (result[c] for c in categories)]
            print(f"{'+'.join(chosen):<42}{b:>7}" + "".join(f"{c:>13}" for c in cells))
            if calibrator is not None:
                ece, _ = calibrator.calibration_error()
                print(f"    expected calibration error {ece:.3f}; per source: " + ", ".join(
                    f"{name} predicted raw {raw:.3f} observed {seen:.3f} ({n} nodes)"
                    for name, raw, seen, n in calibrator.report()))
    if datastore is not None:
        datastore.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # cost curve news
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "record", "replay", "compare", "-h", "--help"):
        argv = ["run", *argv]  # `run` is the default command
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    commands = ap.add_subparsers(dest="command", required=True)

    def questions_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
        p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="Spec-Bench question.jsonl")
        p.add_argument("--categories", type=lambda s: set(s.split(",")), default=None,
                       help="comma-separated groups (e.g. summarization,rag,mt_bench; default all)")
        p.add_argument("--limit", type=int, default=10, help="questions per group (default 10)")
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"the same for every method (default {max_new_tokens})")
        p.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")

    p = commands.add_parser("run", help="time every method side by side (the default command)")
    questions_options(p, 128)
    p.add_argument("--warmup", type=int, default=1, help="questions run first and not counted (default 1)")
    p.add_argument("--datastore", default=None, help="datastore directory for the corpus drafter and retrodraft")
    p.add_argument("--scope", default="default", help="with --datastore: the scope whose learned state retrodraft "
                   "starts from (opened read-only: nothing is written)")
    p.add_argument("--budget", type=int, default=None,
                   help="fixed draft tree size for our methods (default: automatic, from the cost curve)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (and the chart beside it)")
    p.add_argument("--chart", type=Path, default=None, help="write the chart (PNG) here (default: --out with .png)")
    p.add_argument("--methods", type=lambda s: set(s.split(",")), default=None,
                   help="comma-separated methods to run (e.g. retrodraft,retrodraft:no_nest,drafter:nest; "
                        "default all; vanilla always runs)")
    p.add_argument("--hog", type=int, default=0, metavar="N",
                   help="start N CPU-hog processes (a noisy neighbour) before the first call, stop them at the end")
    p.set_defaults(func=run)

    p = commands.add_parser("record", help="record greedy traces of the target, with its top-8 at every position")
    questions_options(p, 256)
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.set_defaults(func=record)

    p = commands.add_parser("replay", help="mean accepted tokens of the drafters on recorded traces, no model")
    p.add_argument("traces", nargs="?", type=Path, default=DEFAULT_TRACES,
                   help="JSONL traces with qid, cat, prompt, output, top8 (default: ../shared's)")
    p.add_argument("--budgets", default="8,16,32,64", help="comma-separated tree sizes and/or auto (default 8,16,32,64)")
    p.add_argument("--datastore", default=None, help="a datastore for the corpus drafter")
    p.add_argument("--scope", default="default", help="with --datastore: its scope (replay learns in memory only)")
    p.add_argument("--drafters", default=",".join(DRAFTERS), help="which drafters to replay, comma-separated")
    p.add_argument("--hidden", action="store_true",
                   help="recompute the target's hidden states (one prefill per trace) so NEST replays too; "
                        "needs a --datastore with keys")
    p.add_argument("--memory", type=int, default=None,
                   help="bytes for past outputs (suffix window 2/3, n-gram table 1/3; default: LearnedMemory())")
    p.set_defaults(func=replay)

    p = commands.add_parser("compare", help="the fused engine against its best single drafter in a run's results, "
                            "with bootstrap intervals over questions")
    p.add_argument("results", type=Path, help="JSON written by `bench.py run --out`")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.9, help="interval's coverage (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    p.set_defaults(func=compare)

    args = ap.parse_args(argv)
    if getattr(args, "resamples", 1) < 1 or not 0 < getattr(args, "confidence", 0.5) < 1:
        ap.error("--resamples must be >= 1 and --confidence between 0 and 1")
    if getattr(args, "hog", 0) < 0:
        ap.error(f"--hog must be 0 or more, got {args.hog}")
    if getattr(args, "max_new_tokens", 1) < 1:
        ap.error(f"--max-new-tokens must be 1 or more, got {args.max_new_tokens}")
    if getattr(args, "questions", None) is not None and not args.questions.is_file():
        sys.exit(f"no questions at {args.questions}: pass --questions FILE (Spec-Bench format)")
    args.func(args)


if __name__ == "__main__":
    main()
