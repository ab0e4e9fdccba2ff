"""Generate text with retrieval drafting, then print one line of stats.

usage: python tools/generate.py "PROMPT" [--model DIR] [--max-new-tokens N]
                                [--sample --temperature T --top-k K --top-p P --seed S]
                                [--reference FILE ...] [--datastore DIR [--scope NAME]] [--budget N]
                                [--no-chat]

The prompt goes through the model's chat template (unless --no-chat). Output is identical
to the model's own greedy decoding (or follows its sampling distribution with --sample).
"""

from __future__ import annotations

import argparse
from typing import NoReturn
import sys
import time
from pathlib import Path


from retrodraft.tools.threads import short_openmp_spin

short_openmp_spin()  # before torch: see tools/threads.py

from retrodraft.decode import generate, load_model
from retrodraft.retrieval import Datastore, DatastoreError


def chat_ids(tokenizer, messages: list[dict]):
    """LongTensor [1, T]: a conversation through the chat template, ready for the reply."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def chat_prompt(tokenizer, text: str, chat: bool):
    """LongTensor [1, T] for ``text``, through the chat template if the model has one."""
    if chat and tokenizer.chat_template:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, return_tensors="pt")["input_ids"]


def die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the user message (use - to read it from standard input)")
    ap.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    ap.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ap.add_argument("--reference", action="append", default=[], metavar="FILE",
                    help="a text file whose spans may be copied (repeatable)")
    ap.add_argument("--datastore", default=None, metavar="DIR", help="a datastore built by tools/build_index.py")
    ap.add_argument("--scope", default="default", metavar="NAME", help="with --datastore: whose learned state (past outputs, recycling, calibration) "
                    "to draft from and add to, over the shared corpus (default: default)")
    ap.add_argument("--budget", type=int, default=None, help="draft tree nodes per step (default: automatic)")
    ap.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    args = ap.parse_args(argv)

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    references = []
    for f in args.reference:
        try:
            references.append(Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read reference {f}: {e}")
    try:
        model, tokenizer = load_model(args.model)
        # writable, so the datastore keeps what this call learns (past outputs, recycling)
        datastore = Datastore.open(args.datastore, readonly=False, tokenizer=tokenizer,
                                   scope=args.scope) if args.datastore else None
        ids = chat_prompt(tokenizer, prompt, chat=not args.no_chat)
        start = time.perf_counter()
        out = generate(
            model, ids, max_new_tokens=args.max_new_tokens, references=references, tokenizer=tokenizer,
            datastore=datastore, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, budget=args.budget,
        )
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, ModuleNotFoundError, DatastoreError) as e:
        die(str(e))
    print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"[{out.stats.new_tokens / seconds:.1f} tok/s] {out.stats.summary()}", file=sys.stderr)
    for s in out.spans:
        if s.length >= 4:
            print(f"  copied {s.length} tokens from {s.document} (token {s.offset}) by {s.source}", file=sys.stderr)


if __name__ == "__main__":
    main()
