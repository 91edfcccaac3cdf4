"""Grammar backends side by side on one schema and one tokenizer: xgrammar (what the ranks
use) and llguidance (when installed: ``pip install llguidance``). Per backend: building
its view of the vocabulary, compiling ``bench.throughput.STRUCTURED_SCHEMA`` (compact
JSON), and the per-token cost that lands on every decode step: filling the next-token
bitmask, then accepting the token, along a valid document's tokens.

    python -m bench.grammar_backends --tokenizer .tok_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.throughput import STRUCTURED_SCHEMA, emit_json, machine_info, run_cli

SAMPLE = {"id": 4821, "name": "Ada Lovelace", "status": "active", "score": 87.5,
          "address": {"street": "12 Analytical Engine Road", "city": "London", "zip": "10001"},
          "tags": ["math", "poetry", "computing"],
          "orders": [{"sku": "AE-1", "quantity": 2, "note": "fragile, handle with care"},
                     {"sku": "BX-77", "quantity": 1, "note": "gift wrap"}]}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _fills(ids, fill, accept) -> dict:
    """Mean and max microseconds of ``fill()`` along ``ids`` (each then accepted)."""
    times = []
    for token in ids:
        _, dt = _timed(fill)
        times.append(dt)
        if not accept(token):
            raise RuntimeError(f"token {token} refused: the sample does not fit the schema")
    return dict(fill_us_mean=round(1e6 * sum(times) / len(times), 2),
                fill_us_max=round(1e6 * max(times), 1), tokens=len(ids))


def xgrammar_row(tok, vocab: int) -> dict:
    import xgrammar as xgr

    info, t_vocab = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    grammar, t_compile = _timed(lambda: compiler.compile_json_schema(
        json.dumps(STRUCTURED_SCHEMA), any_whitespace=False))
    matcher, mask = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, vocab)
    ids = tok.encode(json.dumps(SAMPLE), add_special_tokens=False)  # its ", " and ": "
    return dict(backend="xgrammar", vocab_s=round(t_vocab, 3), compile_ms=round(1e3 * t_compile, 2),
                **_fills(ids, lambda: matcher.fill_next_token_bitmask(mask), matcher.accept_token))


def llguidance_row(tok, vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ltok, t_vocab = _timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab))

    def build():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            STRUCTURED_SCHEMA, defaults={"whitespace_flexible": False})
        return llguidance.LLMatcher(ltok, grammar)

    matcher, t_compile = _timed(build)
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    ids = tok.encode(json.dumps(SAMPLE, separators=(",", ":")), add_special_tokens=False)
    return dict(backend="llguidance", vocab_s=round(t_vocab, 3),
                compile_ms=round(1e3 * t_compile, 2),
                **_fills(ids, lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask, 0),
                         matcher.consume_token))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.grammar_backends",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from spmd.config import resolve_model
    from spmd.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(args.tokenizer))
    rows = [xgrammar_row(tok, len(tok))]
    try:
        rows.append(llguidance_row(tok, len(tok)))
    except ImportError:
        print("llguidance is not installed: xgrammar only")
    for r in rows:
        print(f"{r['backend']:>10}: vocabulary {r['vocab_s']} s, compile {r['compile_ms']} ms, "
              f"mask fill {r['fill_us_mean']} µs mean / {r['fill_us_max']} µs max over "
              f"{r['tokens']} tokens")
    return emit_json(dict(results=rows, tokenizer=args.tokenizer, machine=machine_info(),
                          command=" ".join(["python -m bench.grammar_backends", *(
                              sys.argv[1:] if argv is None else argv)])), args.json_out)


if __name__ == "__main__":
    run_cli(main)
