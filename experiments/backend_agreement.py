"""How far apart the HF and llama.cpp backends are on one GGUF model, on real text.

Both backends load the same GGUF file: transformers dequantises its weights to fp32, llama.cpp
keeps them quantised and also quantises activations inside its matmuls (and keeps the KV cache
in f16). Each text (the first N HumanEval prompts with their canonical solutions) is teacher-forced
on both; per token we compare the log-probability of the actual next token (|Δ log p|) and the
whole next-token distributions (total variation, and whether the top-1 token agrees). Prints a
table and writes experiments/results/backend_agreement.json.

    python experiments/backend_agreement.py [--model qwen2.5-coder-0.5b-instruct] [--texts 8]
"""

from __future__ import annotations

import argparse

import torch

from smcdecode import Engine
from smcdecode.models import resolve
from smcdecode.tasks import humaneval

from common import print_table, write_results  # type: ignore[import-not-found]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-type", default="f16", choices=["f16", "f32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    hf = Engine.from_gguf(path, backend="hf")
    lc = Engine.from_gguf(path, backend="llamacpp", n_threads=args.threads, kv_type=args.kv_type)
    texts = [p["prompt"] + p["canonical_solution"] for p in humaneval.load()[: args.texts]]
    dlp, tv, top1 = [], [], []
    for text in texts:  # one at a time: no padding anywhere
        ids = hf.encode([text])
        a, b = hf.forward(ids).log_p[0, :-1], lc.forward(ids).log_p[0, :-1]  # [T-1, V]
        nxt = torch.tensor(ids[0][1:])[:, None]
        dlp.append((a.gather(1, nxt) - b.gather(1, nxt)).abs().view(-1))
        tv.append(0.5 * (a.exp() - b.exp()).abs().sum(-1))
        top1.append((a.argmax(-1) == b.argmax(-1)).float())
    d, t, k = torch.cat(dlp), torch.cat(tv), torch.cat(top1)
    row = {
        "tokens": int(d.numel()),
        "mean_abs_dlogp": float(d.mean()),
        "median_abs_dlogp": float(d.median()),
        "p99_abs_dlogp": float(d.quantile(0.99)),
        "max_abs_dlogp": float(d.max()),
        "mean_tv": float(t.mean()),
        "max_tv": float(t.max()),
        "top1_agreement": float(k.mean()),
    }
    print_table(list(row), [[f"{v:.4g}" if isinstance(v, float) else v for v in row.values()]])
    print(write_results("backend_agreement", {"model": path.rsplit("/", 1)[-1], "kv_type": args.kv_type, **row}))


if __name__ == "__main__":
    main()
