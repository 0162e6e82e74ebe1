"""Decode throughput of the engine against HF ``generate`` on the embedded model.

Same prompts, same number of new tokens (EOS suppressed on both sides), multinomial sampling at
temperature 1, batch sizes 1, 8, 32; then the engine with one layer readout requested. Prints a
table and writes experiments/results/bench_engine.json.

    python experiments/bench_engine.py [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse

import torch

from smcdecode import Engine
from smcdecode.proposals import Tempered, sample
from smcdecode.readouts import Layer

from common import best_of, print_table, write_results  # type: ignore[import-not-found]

PROMPTS = [
    "Q: What is 17 + 25?\nA:",
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Explain why the sky is blue.",
    "1, 1, 2, 3, 5, 8,",
    "Paris is the capital of",
    "The derivative of x^2 is",
]


def engine_decode(engine: Engine, prompts: list[str], new_tokens: int, layers: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    proposal = Tempered(1.0)
    batch, r = engine.prefill(prompts, [Layer(i) for i in layers])
    for _ in range(new_tokens):
        tok, _lq = sample(proposal.log_q(r, lambda v: None), gen)
        r = engine.decode(batch, tok)


def hf_generate(engine: Engine, prompts: list[str], new_tokens: int, seed: int) -> None:
    tok = engine.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        engine.model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tok.pad_token_id,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = Engine.embedded()
    layer = engine.num_layers // 2
    rows, records = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        engine_decode(engine, prompts, 4, (), 0)  # warm-up
        t_hf = best_of(lambda: hf_generate(engine, prompts, args.new_tokens, 0), args.repeats)
        t_eng = best_of(lambda: engine_decode(engine, prompts, args.new_tokens, (), 0), args.repeats)
        t_layer = best_of(lambda: engine_decode(engine, prompts, args.new_tokens, (layer,), 0), args.repeats)
        toks = b * args.new_tokens
        rec = {
            "batch": b,
            "new_tokens": args.new_tokens,
            "hf_generate_s": t_hf,
            "engine_s": t_eng,
            "engine_layer_readout_s": t_layer,
            "hf_tok_per_s": toks / t_hf,
            "engine_tok_per_s": toks / t_eng,
            "speedup_vs_generate": t_hf / t_eng,
            "readout_overhead": t_layer / t_eng - 1,
        }
        records.append(rec)
        rows.append(
            [
                b,
                f"{rec['hf_tok_per_s']:.0f}",
                f"{rec['engine_tok_per_s']:.0f}",
                f"{rec['speedup_vs_generate']:.2f}x",
                f"{toks / t_layer:.0f}",
                f"{100 * rec['readout_overhead']:+.1f}%",
            ]
        )
    print_table(
        [
            "batch",
            "generate tok/s",
            "engine tok/s",
            "engine vs generate",
            f"engine+layer {layer} tok/s",
            "readout cost",
        ],
        rows,
    )
    print(
        write_results(
            "bench_engine",
            {"model": "SmolLM2-135M-Instruct (embedded GGUF, fp32, CPU)", "layer": layer, "rows": records},
        )
    )


if __name__ == "__main__":
    main()
