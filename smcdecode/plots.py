"""PNG plots of sampler diagnostics (matplotlib, Agg backend): acceptance per MH block, SMC ESS
over steps with resampling marks, and per-token log-likelihood histograms by method."""

from __future__ import annotations

import os
from collections.abc import Sequence

from smcdecode import diagnostics as D
from smcdecode.samplers.result import Result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acceptance(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    rows = [(name, D.acceptance_by_block(r)) for name, r in results]
    rows = [(n, a) for n, a in rows if a]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, acc in rows:
        ax.plot(list(acc), list(acc.values()), marker="o", label=name)
    ax.set_xlabel("block (MH) / step (SMC rejuvenation)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ess(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    rows = [(name, *D.ess_trace(r), r) for name, r in results]
    rows = [row for row in rows if row[1].numel()]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ess, resampled, r in rows:
        n = len(r.samples[0]) if r.samples else 1
        mean = ess.mean(1) / n
        line = ax.plot(range(len(mean)), mean, label=f"{name} (mean over prompts)")[0]
        marks = resampled.any(1).nonzero().view(-1).tolist()
        ax.scatter(marks, [float(mean[i]) for i in marks], marker="v", color=line.get_color(), s=14)
    ax.set_xlabel("SMC step")
    ax.set_ylabel("ESS / N  (▼ = resampling)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loglik(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results:
        vals = D.per_token_log_likelihood(r)
        if vals:
            ax.hist(vals, bins=30, alpha=0.5, label=name)
    ax.set_xlabel("per-token log-likelihood log p(x)/|x|")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(results: Sequence[tuple[str, Result]], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    made = [
        plot_acceptance(results, os.path.join(out_dir, "acceptance.png")),
        plot_ess(results, os.path.join(out_dir, "ess.png")),
        plot_loglik(results, os.path.join(out_dir, "loglik.png")),
    ]
    return [p for p in made if p]
