"""PNG plots of sampler diagnostics (matplotlib, Agg backend): acceptance per MH block, SMC ESS
over steps with resampling marks, and per-token log-likelihood histograms by method."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from smcdecode import diagnostics as D
from smcdecode.samplers.result import Result


def figure(size: tuple[float, float] = (6, 3.5)) -> tuple[Any, Any]:
    """A new (figure, axes) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def finish(
    fig: Any,
    ax: Any,
    path: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    legend_size: int = 7,
) -> str:
    """Label, save as PNG and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def integer_ticks(ax: Any) -> None:
    """Only whole numbers on the x axis (blocks, steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_acceptance(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    rows = [(name, D.acceptance_by_block(r)) for name, r in results]
    rows = [(n, a) for n, a in rows if a]
    if not rows:
        return None
    fig, ax = figure()
    for name, acc in rows:
        ax.plot(list(acc), list(acc.values()), marker="o", label=name)
    integer_ticks(ax)
    return finish(fig, ax, path, "block (MH) / step (SMC rejuvenation)", "acceptance rate", (0, 1))


def plot_ess(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    rows = [(name, *D.ess_trace(r), r) for name, r in results]
    rows = [row for row in rows if row[1].numel()]
    if not rows:
        return None
    fig, ax = figure()
    for name, ess, resampled, r in rows:
        n = len(r.samples[0]) if r.samples else 1
        mean = ess.mean(1) / n
        line = ax.plot(range(len(mean)), mean, label=f"{name} (mean over prompts)")[0]
        marks = resampled.any(1).nonzero().view(-1).tolist()
        ax.scatter(marks, [float(mean[i]) for i in marks], marker="v", color=line.get_color(), s=14)
    integer_ticks(ax)
    return finish(fig, ax, path, "SMC step", "ESS / N  (▼ = resampling)", (0, 1.05))


def plot_loglik(results: Sequence[tuple[str, Result]], path: str) -> str | None:
    fig, ax = figure()
    for name, r in results:
        vals = D.per_token_log_likelihood(r)
        if vals:
            # density: methods draw different numbers of samples (SMC's particles against one sample)
            ax.hist(vals, bins=30, alpha=0.5, density=True, label=f"{name} ({len(vals)} samples)")
    return finish(fig, ax, path, "per-token log-likelihood log p(x)/|x|", "density (each method's area = 1)")


def plot_all(results: Sequence[tuple[str, Result]], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    made = [
        plot_acceptance(results, os.path.join(out_dir, "acceptance.png")),
        plot_ess(results, os.path.join(out_dir, "ess.png")),
        plot_loglik(results, os.path.join(out_dir, "loglik.png")),
    ]
    return [p for p in made if p]
