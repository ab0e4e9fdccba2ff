"""Per-step overhead of the generation loop outside the model: everything but the forward and the LM head.

usage: python tools/overhead.py [--model DIR] [--max-new-tokens N] [--datastore DIR] [--prompt TEXT]

Times every base-model forward and LM-head call inside `decode.generate` and reports the
rest of each step (drafting, fusion, budget choice, mask building, acceptance, cache
compaction, bookkeeping) as a share of one forward, and drafting alone (the drafters'
propose calls, calibration and fusion) as a share of the whole step. With --datastore the
default drafters include its corpus and, if it has keys, NEST.
"""

from __future__ import annotations

import argparse
import time

from retrodraft.decode import generate, load_model
from retrodraft.decode.budget import CostModel
from retrodraft.tools.demo import BUILT_IN_PROMPT
from retrodraft.tools.generate import chat_prompt


def timed(module, log: list[float]) -> None:
    """Record the wall time of every call of ``module`` into ``log``, by hooks: replacing its
    ``forward`` would keep ``decode.skinny`` from patching it (the LM head would run BLAS)."""
    start = [0.0]
    module.register_forward_pre_hook(lambda m, args: start.__setitem__(0, time.perf_counter()))
    module.register_forward_hook(lambda m, args, out: log.append(time.perf_counter() - start[0]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--datastore", default=None, help="datastore directory for the default drafters (read-only)")
    ap.add_argument("--prompt", default=BUILT_IN_PROMPT, help="user message (default: the demo's built-in prompt)")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    datastore = None
    if args.datastore:
        from retrodraft.retrieval import Datastore

        datastore = Datastore.open(args.datastore, tokenizer=tok)
    CostModel.of(model).warm()
    ids = chat_prompt(tok, args.prompt, chat=True)
    generate(model, ids, max_new_tokens=8, datastore=datastore)
    base_log: list[float] = []
    head_log: list[float] = []
    timed(model.base_model, base_log)
    timed(model.get_output_embeddings(), head_log)
    for label, kwargs in (("no speculation", {"drafters": []}), ("all drafters", {"datastore": datastore})):
        base_log.clear()
        head_log.clear()
        t = time.perf_counter()
        out = generate(model, ids, max_new_tokens=args.max_new_tokens, **kwargs)
        total = time.perf_counter() - t
        steps = out.stats.steps
        model_time = sum(base_log[1:]) + sum(head_log)  # base_log[0] is the prompt prefill
        overhead = (total - base_log[0] - model_time) / steps
        forward = model_time / steps
        print(f"{label:15s} {steps} steps, {out.stats.mean_accepted:.2f} tokens/step: forward + head "
              f"{forward * 1000:.1f} ms/step, loop overhead {overhead * 1000:.2f} ms/step "
              f"= {overhead / forward * 100:.1f}% of a forward; drafting {out.stats.draft_seconds / steps * 1000:.2f} "
              f"ms/step = {out.stats.draft_seconds / (total - base_log[0]) * 100:.1f}% of the step time")


if __name__ == "__main__":
    main()
