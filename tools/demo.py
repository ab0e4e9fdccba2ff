"""The main job: generate with retrieval drafting and print the speedup over model.generate.

usage: python tools/demo.py [--model DIR] [--max-new-tokens N] [--datastore DIR [--scope NAME]] [--prompt TEXT]

Runs plain greedy `model.generate` and `decode.generate` on the same prompt (built in by
default: a request to restate a text, where copying pays), checks the outputs are identical,
and prints both speeds. Measures the hardware cost curve first if it is not cached yet.
"""

from __future__ import annotations

import argparse
import logging
import time

from retrodraft.tools.threads import short_openmp_spin

short_openmp_spin()  # before torch: see tools/threads.py

from retrodraft.decode import generate, load_model
from retrodraft.decode.budget import CostModel
from retrodraft.tools.generate import chat_prompt

BUILT_IN_PROMPT = """Here is a function from Python's standard library:

def commonprefix(m):
    "Given a list of pathnames, returns the longest common leading component"
    if not m: return ''
    s1 = min(m)
    s2 = max(m)
    for i, c in enumerate(s1):
        if c != s2[i]:
            return s1[:i]
    return s1

Rewrite this function with type hints and a longer docstring, keeping the same logic."""


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # cost curve news
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local HF model directory (default SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    ap.add_argument("--datastore", default=None, help="a datastore built by tools/build_index.py")
    ap.add_argument("--scope", default="default", help="with --datastore: whose learned state (past outputs, recycling, "
                    "calibration) to draft from, over the shared corpus (default: default)")
    ap.add_argument("--prompt", default=BUILT_IN_PROMPT, help="the user message (default: a built-in one)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be 1 or more, got {args.max_new_tokens}")

    model, tok = load_model(args.model)
    datastore = None
    if args.datastore:
        from retrodraft.retrieval import Datastore

        datastore = Datastore.open(args.datastore, tokenizer=tok, scope=args.scope)
    ids = chat_prompt(tok, args.prompt, chat=True)
    print("checking the cost curve of this model on this machine (measured once, then cached) ...")
    CostModel.of(model).warm(ids.shape[1] + args.max_new_tokens)
    generate(model, ids, max_new_tokens=8, datastore=datastore)  # compile the kernels

    t = time.perf_counter()
    ref = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    t_vanilla = time.perf_counter() - t
    t = time.perf_counter()
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, datastore=datastore)
    t_ours = time.perf_counter() - t

    n = out.sequences.shape[1] - ids.shape[1]
    print(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"\nmodel.generate: {(ref.shape[1] - ids.shape[1]) / t_vanilla:.1f} tok/s; "
          f"retrodraft: {n / t_ours:.1f} tok/s; speedup {t_vanilla / t_ours:.2f}x; "
          f"identical output: {bool((ref == out.sequences).all()) if ref.shape == out.sequences.shape else False}")
    print(out.stats.summary())


if __name__ == "__main__":
    main()
