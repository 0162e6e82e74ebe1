"""Decode throughput of the engine: against HF ``generate``, and backend against backend.

Default: the HF backend against HF ``generate`` on the embedded model. Same prompts, same number
of new tokens (EOS suppressed on both sides), multinomial sampling at temperature 1, batch sizes
1, 8, 32; then the engine with one layer readout requested. Writes
experiments/results/bench_engine.json.

    python experiments/bench_engine.py [--new-tokens 64] [--repeats 2]

``--backends``: one GGUF model on the HF backend (weights dequantised to fp32), the llama.cpp
backend (weights as stored), and a bare llama-cpp-python decode loop with no smcdecode around it
(one ``llama_batch`` of B sequences a step, logits -> torch softmax -> multinomial), same threads,
same batch sizes. Each measurement runs in its own process, so its peak RSS is its own. Then the
cost of one resampling step (``select`` with repeats) of 64 rows holding 1k tokens of context
(a shared 960-token prompt + 64 decoded tokens each): within the prompt's group (what SMC does)
and whole rows. Writes experiments/results/bench_backends.json.

    python experiments/bench_engine.py --backends --model qwen2.5-coder-0.5b-instruct \
        [--batches 1,8,32,64] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from smcdecode import Engine
from smcdecode.backends import Backend
from smcdecode.proposals import Tempered, sample
from smcdecode.readouts import Layer

from common import RESULTS, best_of, print_table, write_results  # type: ignore[import-not-found]

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


def engine_decode(engine: Backend, prompts: list[str], new_tokens: int, layers: tuple[int, ...], seed: int) -> None:
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


# ---------------------------------------------------------------------------------- --backends

RESAMPLE_ROWS, RESAMPLE_PROMPT, RESAMPLE_DECODE = 64, 960, 64


def load(kind: str, path: str, threads: int, rows: int) -> Backend:
    if kind == "hf":
        return Engine.from_gguf(path, backend="hf")
    return Engine.from_gguf(path, backend="llamacpp", n_threads=threads, n_ctx=max(4096, rows * 1100))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_decode(kind: str, path: str, batch: int, new_tokens: int, threads: int, repeats: int) -> dict[str, float]:
    """tok/s of ``new_tokens`` decode steps of ``batch`` rows (best of ``repeats``)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if kind == "bare":
        step = bare_llama_loop(path, prompts, threads)
        step(4)  # warm-up
        t = best_of(lambda: step(new_tokens), repeats)
    else:
        engine = load(kind, path, threads, batch)
        engine_decode(engine, prompts, 4, (), 0)  # warm-up
        t = best_of(lambda: engine_decode(engine, prompts, new_tokens, (), 0), repeats)
    return {"tok_per_s": batch * new_tokens / t, "peak_rss_mb": peak_rss_mb()}


def bare_llama_loop(path: str, prompts: list[str], threads: int):
    """A plain llama-cpp-python loop: B sequences in one unified KV cache, one batch a step."""
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    cp = L.llama_context_default_params()
    b = len(prompts)
    cp.n_ctx, cp.n_batch, cp.n_seq_max, cp.kv_unified = max(4096, b * 1100), 512, max(b, 1), True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(512, 0, 1)
    length = [0] * b

    def run(items: list[tuple[int, int, int, bool]]) -> torch.Tensor:  # (token, pos, seq, logits)
        for i, (t, p, sq, lg) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, lg
            batch.seq_id[i][0] = sq
        batch.n_tokens = len(items)
        assert L.llama_decode(ctx, batch) == 0
        n_out = sum(1 for it in items if it[3])
        ptr = L.llama_get_logits(ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab)).copy())

    logits = []
    for sq, text in enumerate(prompts):
        buf = (L.llama_token * 512)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 512, True, True)
        logits.append(run([(buf[i], i, sq, i == n - 1) for i in range(n)]))
        length[sq] = n
    state = {"logits": torch.cat(logits)}
    gen = torch.Generator().manual_seed(0)

    def step(n_steps: int) -> None:
        for _ in range(n_steps):
            tok = torch.multinomial(torch.softmax(state["logits"], -1), 1, generator=gen).view(-1).tolist()
            state["logits"] = run([(t, length[sq], sq, True) for sq, t in enumerate(tok)])
            for sq in range(b):
                length[sq] += 1

    return step


def child_resample(kind: str, path: str, threads: int, repeats: int) -> dict[str, float]:
    """Median ms of one select of 64 rows at 1k tokens of context (with repeats, multinomial)."""
    engine = load(kind, path, threads, RESAMPLE_ROWS)
    prompt = engine.encode([" ".join(PROMPTS) * 40])[0][:RESAMPLE_PROMPT]
    batch, r = engine.start([prompt], RESAMPLE_ROWS)
    gen = torch.Generator().manual_seed(0)
    proposal = Tempered(1.0)
    for _ in range(RESAMPLE_DECODE):
        tok, _lq = sample(proposal.log_q(r, lambda v: None), gen)
        r = engine.decode(batch, tok)
    out = {}
    for within in (True, False):
        times = []
        for _ in range(max(repeats, 10)):
            idx = torch.multinomial(torch.ones(RESAMPLE_ROWS), RESAMPLE_ROWS, replacement=True, generator=gen)
            t0 = time.perf_counter()
            engine.select(batch, idx, within_groups=within)
            times.append(time.perf_counter() - t0)
        out["within_group_ms" if within else "whole_rows_ms"] = 1e3 * statistics.median(times)
    r = engine.decode(batch, torch.zeros(RESAMPLE_ROWS, dtype=torch.long))  # the cache still decodes
    out["context"] = int(batch.lengths[0])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def compare_backends(args: argparse.Namespace) -> None:
    from smcdecode.models import resolve

    path = resolve(args.model)
    me = [sys.executable, __file__, "--model", path, "--threads", str(args.threads), "--repeats", str(args.repeats)]

    def child(*extra: str) -> dict[str, float]:
        out = subprocess.run([*me, *extra], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    kinds = ("hf", "llamacpp", "bare")
    # --merge: keep the other batches' rows (and the resampling figures) of an earlier run
    old = json.load(open(os.path.join(RESULTS, "bench_backends.json"))) if args.merge else {"rows": []}
    batches = [int(x) for x in args.batches.split(",")]
    kept = {int(r["batch"]): r for r in old["rows"] if int(r["batch"]) not in batches}
    records, rows = [], []
    for b in sorted({*batches, *kept}):
        if b in kept:
            rec = kept[b]
        else:
            rec = {"batch": b, "new_tokens": args.new_tokens}
        for kind in kinds if b not in kept else ():
            got = child("--child", kind, "--batch", str(b), "--new-tokens", str(args.new_tokens))
            rec[f"{kind}_tok_per_s"], rec[f"{kind}_peak_rss_mb"] = got["tok_per_s"], got["peak_rss_mb"]
            print(f"batch {b} {kind}: {got}", file=sys.stderr)
        records.append(rec)
        tps = {k: float(rec[f"{k}_tok_per_s"]) for k in kinds}  # type: ignore[arg-type]
        rss = {k: float(rec[f"{k}_peak_rss_mb"]) for k in kinds}  # type: ignore[arg-type]
        rows.append(
            [
                b,
                *(f"{tps[k]:.1f}" for k in kinds),
                f"{tps['llamacpp'] / tps['bare']:.2f}x",
                f"{tps['llamacpp'] / tps['hf']:.2f}x",
                *(f"{rss[k]:.0f}" for k in kinds),
            ]
        )
    print_table(
        [
            "batch",
            "HF tok/s",
            "llama.cpp tok/s",
            "bare loop tok/s",
            "llama.cpp / bare",
            "llama.cpp / HF",
            "HF RSS MB",
            "llama.cpp RSS MB",
            "bare RSS MB",
        ],
        rows,
    )
    if args.skip_resample and "resample" in old:
        resample = {k: v for k, v in old["resample"].items() if k != "rows"}
    else:
        resample = {kind: child("--child-resample", kind) for kind in ("hf", "llamacpp")}
    print_table(
        ["backend", "select within group (ms)", "select whole rows (ms)", "context tokens", "RSS MB"],
        [
            [k, f"{v['within_group_ms']:.2f}", f"{v['whole_rows_ms']:.2f}", v["context"], f"{v['peak_rss_mb']:.0f}"]
            for k, v in resample.items()
        ],
    )
    payload = {
        "model": path.rsplit("/", 1)[-1],
        "threads": args.threads,
        "rows": records,
        "resample": {"rows": RESAMPLE_ROWS, **resample},
    }
    print(write_results("bench_backends", payload))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--backends", action="store_true", help="HF vs llama.cpp backend vs a bare llama.cpp loop")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="GGUF file or registry name (--backends)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="--backends: keep the other batches of the last results")
    ap.add_argument("--skip-resample", action="store_true", help="--backends --merge: keep the resampling figures")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-resample", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_decode(args.child, args.model, args.batch, args.new_tokens, args.threads, args.repeats)))
        return
    if args.child_resample:
        print(json.dumps(child_resample(args.child_resample, args.model, args.threads, args.repeats)))
        return
    if args.backends:
        compare_backends(args)
        return
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
