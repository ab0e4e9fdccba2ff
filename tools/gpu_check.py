"""The GPU measurements in one command: exactness, cost curves, Spec-Bench, host share, replay.

usage: python tools/gpu_check.py --out gpu.json [--device cuda] [--quick] [--prompts N] [--limit N]
                                 [--max-new-tokens N] [--budget N] [--dtypes float32,bfloat16]
                                 [--bench-dtype float32] [--data DIR]

Installs and downloads nothing (the 1B-class model has random weights, built from a config)
and takes under 8 minutes on one GPU with the defaults. Writes every figure as JSON to --out
and prints a summary. Phases, in order:

  kernels     which of SDPA's fused CUDA kernels accept the verifier's attention layout
              (packed query heads, its padded additive mask); the memory-efficient one must.
  exactness   per dtype (float32, bfloat16): the default model's greedy output from
              model.generate against ours and against transformers' prompt lookup, on the
              same --prompts prompts: how many outputs diverge, and where first. In float32
              ours must never diverge; in bfloat16 a forward over n rows may round
              differently from one over 1 row, so near-ties can flip, for both.
  cost        c(n) for n in decode.budget.SIZES as the cost model times it (on CUDA the
              whole verify step replayed from its CUDA graph), over a 1024-token context:
              the default model in the device's default dtype, and a Llama-shaped 1B-class
              model with random weights in bfloat16 (hidden 2048, 16 layers, 32 query / 8
              key-value heads, vocabulary 128256).
  specbench   vanilla model.generate, transformers' prompt lookup, our loop without drafts,
              our loop with prompt lookup alone and with the suffix drafter alone (the best
              single drafters on a CPU) and ours (default drafters): --limit questions per
              group, speedups, outputs identical to vanilla's, mean accepted tokens, ours
              against its best single drafter, and our host time per step
              (drafting, Python, launches: step time not spent waiting for the device) as a
              share of step time.
  replay      acceptance replayed over the recorded traces with every drafter fused, each
              step's size chosen on the 1B-class cost curve: the speedup that curve predicts.

--quick is a smoke test that runs anywhere (with --device cpu): 2 prompts, 6 tokens, float32
only (bfloat16 matrix products are slow on most CPUs), one qa question, no warm-up, a small
random Llama instead of the 1B one, 5 sizes, 2 traces, a fixed budget of 8 (no cost-curve
measurement for the default model).
A phase that fails is recorded (its traceback under "errors"), the phases that do not need
its result still run, the JSON is rewritten after every phase, and the exit status is 1.
Spec-Bench and replay read --data (default: the shared data beside the checkout); without
it they are skipped, saying so, and exactness uses a few built-in prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from retrodraft.decode import generate, load_model
from retrodraft.decode.budget import SIZES, CostCurve, CostModel, forward_seconds
from retrodraft.decode.replay import load_traces, replay_all
from retrodraft.decode.verifier import TreeVerifier, fused_kernels
from retrodraft.retrieval.config import DEFAULT
from retrodraft.retrieval.online import OnlineState
from retrodraft.tools.bench import drafter_pool, load_questions, longest_context, methods, summarize, time_methods
from retrodraft.tools.generate import chat_ids

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS = (ROOT.parent / "shared" / "data", ROOT / "shared" / "data")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECBENCH_METHODS = ("vanilla", "prompt_lookup", "no_drafts", "drafter:prompt_lookup", "drafter:suffix", "retrodraft")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
LLAMA_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)
BUILT_IN_PROMPTS = [
    "Explain what a hash table is and when to use one.",
    "Write a Python function that returns the n-th Fibonacci number, then explain it.",
    "Summarize: The committee met on Tuesday. It approved the budget and postponed the vote on the new park.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "What is 17 times 23? Show your steps.",
    "List three causes of the French Revolution.",
]


def log(message: str) -> None:
    print(message, flush=True)


def prompts_for(data: Path | None, tokenizer, n: int) -> list[torch.Tensor]:
    """``n`` chat-templated prompts: Spec-Bench first turns taken from each group in turn,
    or the built-in ones without data."""
    if data is None:
        texts = BUILT_IN_PROMPTS[:n]
    else:
        by_group: dict[str, list[str]] = {}
        for q in load_questions(data / "spec_bench" / "question.jsonl", None, -(-n // 6) + 1):
            by_group.setdefault(q["group"], []).append(q["turns"][0])
        rounds = zip(*by_group.values())
        texts = [t for r in rounds for t in r][:n]
    return [chat_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def exactness(model, prompts: list[torch.Tensor], max_new_tokens: int, budget: int | None) -> dict:
    """Greedy outputs of ours and of transformers' prompt lookup against model.generate."""
    diverged = {"ours": [], "prompt_lookup": []}
    for i, ids in enumerate(prompts):
        ids = ids.to(model.device)
        ref = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        pld = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             prompt_lookup_num_tokens=10)[0, ids.shape[1]:].tolist()
        ours = generate(model, ids, max_new_tokens=max_new_tokens, budget=budget).sequences[0, ids.shape[1]:].tolist()
        for name, out in (("ours", ours), ("prompt_lookup", pld)):
            at = first_difference(out, ref)
            if at is not None:
                diverged[name].append({"prompt": i, "first_difference": at})
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "ours_diverged": len(diverged["ours"]), "prompt_lookup_diverged": len(diverged["prompt_lookup"]),
            "divergences": diverged}


def random_llama(config: dict, device: torch.device, dtype: torch.dtype):
    """A Llama-shaped causal LM with random weights, built on ``device`` from ``config``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval()


def cost_curve(model, context: int, sizes: tuple[int, ...], reps: int) -> dict:
    """c(n) as the cost model times it (on CUDA the replayed verify step; on a CPU the forward),
    the median of ``reps`` interleaved rounds, with the seconds behind it."""
    seconds = forward_seconds(model, context, sizes, reps)[0]
    return {"context": context, "dtype": str(model.dtype).replace("torch.", ""), "sizes": list(sizes),
            "seconds": seconds, "costs": [s / seconds[0] for s in seconds]}


def specbench(model, tokenizer, data: Path, limit: int, categories: set[str] | None, max_new_tokens: int,
              budget: int | None, warmup: int) -> dict:
    """Spec-Bench side by side (tools/bench.py's loop) for SPECBENCH_METHODS."""
    questions = load_questions(data / "spec_bench" / "question.jsonl", categories, limit)
    table = {k: v for k, v in methods(model, None, budget).items() if k in SPECBENCH_METHODS}
    # one-time costs out of the timed calls: the cost curves these contexts use, and one
    # verifier with room for the longest, every size bucket's graph captured
    longest = longest_context(questions, tokenizer, max_new_tokens)
    if budget is None:
        CostModel.of(model).warm(longest)
    nodes = DEFAULT.max_nodes if budget is None else budget
    TreeVerifier.of(model, longest + nodes + 1, nodes).warm()
    records = time_methods(questions, tokenizer, table, max_new_tokens, warmup)
    result = summarize(records, list(table))
    ours = [r["retrodraft"] for r in records]
    host, step = sum(r["host_seconds"] for r in ours), sum(r["step_seconds"] for r in ours)
    return {"questions_per_group": limit, "turns": len(records), "max_new_tokens": max_new_tokens,
            "results": result,
            "not_identical": {m: sum(not r[m]["identical"] for r in records) for m in table},
            "host_share_of_step": host / step if step else None,
            "host_ms_per_step": 1000 * host / sum(r["steps"] for r in ours),
            "step_ms": 1000 * step / sum(r["steps"] for r in ours)}


def replay_prediction(traces_path: Path, curve: dict, vocab: int, traces: int | None) -> dict:
    """Predicted speedup over our own loop without drafts (tokens / summed c(n)) of all
    drafters fused, each step's size chosen on ``curve``."""
    chosen = load_traces(traces_path)[:traces]
    table = CostCurve(tuple(curve["sizes"]), tuple(curve["costs"])).table()
    online = OnlineState(vocab)
    result = replay_all(chosen, lambda: drafter_pool(online, None, vocab), budget=None, cost_table=table,
                        calibrator=online.calibrator)
    return {"traces": len(chosen), "by_category": {c: {"mean_accepted": a, "predicted_speedup": s}
                                                   for c, (a, s) in result.items()}}


def summary(report: dict) -> None:
    log(f"\n== gpu_check on {report['device_name']} ({report['device']}), torch {report['torch']}")
    if report.get("fused_kernels"):
        log(f"fused SDPA kernels accepting the verifier's layout: {report['fused_kernels']}")
    for dtype, e in report.get("exactness", {}).items():
        log(f"exactness {dtype}: ours diverged {e['ours_diverged']}/{e['prompts']}, "
            f"transformers prompt lookup diverged {e['prompt_lookup_diverged']}/{e['prompts']}")
    for name, c in report.get("cost", {}).items():
        log(f"c(n) {name} ({c['dtype']}, context {c['context']}, 1 token = {1000 * c['seconds'][0]:.2f} ms): "
            + ", ".join(f"{n}: {x:.2f}" for n, x in zip(c["sizes"], c["costs"])))
    s = report.get("specbench", {"skipped": "the phase failed"})
    if "skipped" in s:
        log(f"spec-bench skipped: {s['skipped']}")
    else:
        overall = {m: r["overall"] for m, r in s["results"].items()}
        log("spec-bench overall: " + ", ".join(f"{m} {r['speedup']:.2f}x ({r['mean_accepted']:.2f}/step)"
                                               for m, r in overall.items()))
        groups = s["results"]["retrodraft"]
        log("ours by group: " + ", ".join(f"{g} {r['speedup']:.2f}x" for g, r in groups.items() if g != "overall")
            + f"; step-time prediction error (median) {groups['overall']['prediction_error']}")
        singles = [m for m in overall if m.startswith("drafter:")]
        if singles:
            best = max(singles, key=lambda m: overall[m]["speedup"])
            log(f"ours / best single drafter ({best}): "
                f"{overall['retrodraft']['speedup'] / overall[best]['speedup']:.2f}; speculation's own share "
                f"(ours / no_drafts): {overall['retrodraft']['speedup'] / overall['no_drafts']['speedup']:.2f}")
        log(f"host time per step: {s['host_ms_per_step']:.2f} of {s['step_ms']:.2f} ms = "
            f"{100 * s['host_share_of_step']:.0f}%; outputs not identical to vanilla's: {s['not_identical']}")
    r = report.get("replay", {"skipped": "the phase failed"})
    if "skipped" in r:
        log(f"replay skipped: {r['skipped']}")
    else:
        o = r["by_category"]["overall"]
        log(f"replay on the {report['cost_1b_name']} curve: {o['mean_accepted']:.2f} tokens/step, "
            f"predicted {o['predicted_speedup']:.2f}x over our loop without drafts")
    if report.get("errors"):
        log(f"failed phases: {', '.join(report['errors'])}")
    log(f"phases (s): {report['seconds']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="write the results here as JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke test that runs on a CPU")
    ap.add_argument("--prompts", type=int, default=None, help="prompts for exactness (default 10; quick 2)")
    ap.add_argument("--limit", type=int, default=None, help="Spec-Bench questions per group (default 3; quick 1)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per output (default 128; quick 6)")
    ap.add_argument("--budget", type=int, default=None,
                    help="fixed tree size for ours (default: automatic on the measured cost curve; quick 8)")
    ap.add_argument("--dtypes", default=None, help="dtypes for exactness (default float32,bfloat16; quick float32)")
    ap.add_argument("--bench-dtype", default=None, choices=list(DTYPES),
                    help="dtype of the default model for cost and Spec-Bench (default bfloat16 on CUDA, else "
                         "float32; float32 keeps every output identical to model.generate's)")
    ap.add_argument("--data", type=Path, default=next((d for d in DATA_DIRS if d.is_dir()), None),
                    help="folder with spec_bench/question.jsonl and traces/ (default: ../shared/data)")
    args = ap.parse_args(argv)
    quick = args.quick

    def pick(given, quick_value, full_value):
        return given if given is not None else quick_value if quick else full_value

    prompts_n, limit = pick(args.prompts, 2, 10), pick(args.limit, 1, 3)
    max_new, budget = pick(args.max_new_tokens, 6, 128), pick(args.budget, 8, None)
    dtypes = (args.dtypes or ("float32" if quick else "float32,bfloat16")).split(",")
    if bad := [d for d in dtypes if d not in DTYPES]:
        sys.exit(f"unknown dtype {bad[0]!r}: choose from {', '.join(DTYPES)}")
    if min(prompts_n, limit, max_new) < 1:
        sys.exit("--prompts, --limit and --max-new-tokens must be at least 1")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        sys.exit(f"device {args.device!r} is not usable here: {e}")
    data = args.data if args.data is not None and args.data.is_dir() else None
    default_dtype = DTYPES[args.bench_dtype] if args.bench_dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    context, sizes, reps = (64, (0, 1, 2, 4, 8), 1) if quick else (1024, SIZES, 5)

    import transformers

    report: dict = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "quick": quick, "argv": sys.argv[1:] if argv is None else argv,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": {}}
    start = time.perf_counter()
    failed = report.setdefault("errors", {})  # phase name -> traceback

    def phase(name: str, run) -> None:
        """Run one phase; a failure is recorded under its name (the traceback) and the
        phases that do not need its result still run. The JSON is rewritten after each
        phase, so a run cut short keeps what it measured."""
        try:
            run()
        except Exception:  # noqa: BLE001  (one phase's failure must not lose the others' figures)
            failed[name] = traceback.format_exc()
            log(f"phase {name} failed:\n{failed[name]}")
        report["seconds"][name] = round(time.perf_counter() - start - sum(report["seconds"].values()), 1)
        log(f"[{time.perf_counter() - start:6.1f}s] {name} {'failed' if name in failed else 'done'}")
        args.out.write_text(json.dumps(report, indent=1))

    models = {}

    def load() -> None:
        for name in dtypes:
            models[name] = load_model(device=device, dtype=DTYPES[name])
        default_name = str(default_dtype).replace("torch.", "")
        if default_name not in models:
            models[default_name] = load_model(device=device, dtype=default_dtype)
        models["default"] = models[default_name]
        report["fused_kernels"] = fused_kernels(models["default"][0]) if device.type == "cuda" else None

    phase("load", load)
    if "load" in failed:
        summary(report)
        sys.exit("the default model did not load; nothing else can run")
    model, tokenizer = models["default"]
    prompts = prompts_for(data, tokenizer, prompts_n)
    report["exactness"] = {}

    def exact(name: str) -> None:
        m = models[name][0]
        if budget is None:
            CostModel.of(m).warm()
        report["exactness"][name] = exactness(m, prompts, max_new, budget)

    for name in dtypes:
        phase(f"exactness {name}", lambda: exact(name))

    report["cost_1b_name"] = "small random Llama (quick)" if quick else "1B-class random Llama"
    report["cost"] = {}

    def cost() -> None:
        report["cost"]["default model"] = cost_curve(model, context, sizes, reps)
        big = random_llama(LLAMA_SMALL if quick else LLAMA_1B, device, torch.bfloat16)
        report["cost"][report["cost_1b_name"]] = cost_curve(big, context, sizes, reps)

    phase("cost", cost)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 1B model's memory

    def bench() -> None:
        if data is None:
            report["specbench"] = {"skipped": "no data folder (pass --data DIR with spec_bench/question.jsonl)"}
            return
        categories = {"qa"} if quick else None
        report["specbench"] = specbench(model, tokenizer, data, limit, categories, max_new, budget, 0 if quick else 1)
        report["specbench"]["cost_model"] = CostModel.of(model).report()

    phase("specbench", bench)

    def replay() -> None:
        traces = data / "traces" / "smollm2_specbench_dev.jsonl" if data is not None else None
        curve_1b = report["cost"].get(report["cost_1b_name"])
        if curve_1b is None:
            report["replay"] = {"skipped": "no 1B-class cost curve (the cost phase failed)"}
        elif traces is None or not traces.is_file():
            report["replay"] = {"skipped": f"no traces at {traces}"}
        else:
            report["replay"] = replay_prediction(traces, curve_1b, model.config.vocab_size, 2 if quick else None)

    phase("replay", replay)
    summary(report)
    log(f"wrote {args.out}")
    if failed:
        sys.exit(f"phases failed: {', '.join(failed)} (tracebacks under 'errors' in {args.out})")


if __name__ == "__main__":
    main()
