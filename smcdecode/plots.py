"""PNG plots of sampler diagnostics (matplotlib, Agg backend): acceptance per MH block, SMC ESS
over steps with resampling marks, and per-token log-likelihood histograms by method. The plots
draw :class:`PlotData`, sums that merge, so a method run in chunks of problems is drawn whole."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smcdecode import diagnostics as D
from smcdecode.samplers.result import MoveTrace, Result


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


@dataclass
class PlotData:
    """What the plots draw from one method's runs, in sums that merge: one method run in chunks
    of problems (``smcdecode demo``, or several saved Results of one method) is drawn as one run
    without keeping the chunks' Results. Memory: a few numbers per MH block and SMC step, plus one
    float per sample for the log-likelihood histogram."""

    accepted: dict[int, list[int]] = field(default_factory=dict)  # stage -> [accepted moves, moves]
    ess: dict[int, list[float]] = field(default_factory=dict)  # step -> [sum of ESS / N, prompts]
    resampled: dict[int, bool] = field(default_factory=dict)  # step -> some prompt resampled
    loglik: list[float] = field(default_factory=list)  # per-token log-likelihood of every sample

    @classmethod
    def of(cls, result: Result) -> PlotData:
        data = cls()
        for m in result.trace.infos(MoveTrace):
            counts = data.accepted.setdefault(m.stage, [0, 0])
            counts[0] += int(m.accepted.sum())
            counts[1] += int(m.accepted.numel())
        ess, resampled = D.ess_trace(result)
        n = len(result.samples[0]) if result.samples and result.samples[0] else 1
        for step in range(ess.shape[0]):
            data.ess[step] = [float(ess[step].sum()) / n, float(ess.shape[1])]
            data.resampled[step] = bool(resampled[step].any())
        data.loglik = D.per_token_log_likelihood(result)
        return data

    def merge(self, other: PlotData) -> PlotData:
        """Add ``other`` (another chunk of the same method's problems) into this one; returns self."""
        for stage, (k, n) in other.accepted.items():
            counts = self.accepted.setdefault(stage, [0, 0])
            counts[0] += k
            counts[1] += n
        for step, (total, prompts) in other.ess.items():
            sums = self.ess.setdefault(step, [0.0, 0.0])
            sums[0] += total
            sums[1] += prompts
            self.resampled[step] = self.resampled.get(step, False) or other.resampled[step]
        self.loglik.extend(other.loglik)
        return self

    def acceptance(self) -> dict[int, float]:
        """Per stage: the fraction of moves accepted (as ``diagnostics.acceptance_by_block``)."""
        return {stage: k / n for stage, (k, n) in sorted(self.accepted.items()) if n}

    def mean_ess(self) -> list[float]:
        """Per SMC step: ESS / N averaged over the prompts that reached it."""
        return [total / prompts for _, (total, prompts) in sorted(self.ess.items())]


def plot_acceptance(results: Sequence[tuple[str, PlotData]], path: str) -> str | None:
    rows = [(name, d.acceptance()) for name, d in results]
    rows = [(n, a) for n, a in rows if a]
    if not rows:
        return None
    fig, ax = figure()
    for name, acc in rows:
        ax.plot(list(acc), list(acc.values()), marker="o", label=name)
    integer_ticks(ax)
    return finish(fig, ax, path, "block (MH) / step (SMC rejuvenation)", "acceptance rate", (0, 1))


def plot_ess(results: Sequence[tuple[str, PlotData]], path: str) -> str | None:
    rows = [(name, d) for name, d in results if d.ess]
    if not rows:
        return None
    fig, ax = figure()
    for name, d in rows:
        mean = d.mean_ess()
        line = ax.plot(range(len(mean)), mean, label=f"{name} (mean over prompts)")[0]
        marks = [i for i, step in enumerate(sorted(d.ess)) if d.resampled[step]]
        ax.scatter(marks, [mean[i] for i in marks], marker="v", color=line.get_color(), s=14)
    integer_ticks(ax)
    return finish(fig, ax, path, "SMC step", "ESS / N  (▼ = resampling)", (0, 1.05))


def plot_loglik(results: Sequence[tuple[str, PlotData]], path: str) -> str | None:
    fig, ax = figure()
    for name, d in results:
        if d.loglik:
            # density: methods draw different numbers of samples (SMC's particles against one sample)
            ax.hist(d.loglik, bins=30, alpha=0.5, density=True, label=f"{name} ({len(d.loglik)} samples)")
    return finish(fig, ax, path, "per-token log-likelihood log p(x)/|x|", "density (each method's area = 1)")


def plot_all(results: Sequence[tuple[str, Result | PlotData]], out_dir: str) -> list[str]:
    """The three plots of ``results``; entries with the same name (chunks of one method's
    problems) are merged into one series."""
    merged: dict[str, PlotData] = {}
    for name, r in results:
        data = PlotData.of(r) if isinstance(r, Result) else r
        if name in merged:
            merged[name] = PlotData().merge(merged[name]).merge(data)
        else:
            merged[name] = data
    rows = list(merged.items())
    os.makedirs(out_dir, exist_ok=True)
    made = [
        plot_acceptance(rows, os.path.join(out_dir, "acceptance.png")),
        plot_ess(rows, os.path.join(out_dir, "ess.png")),
        plot_loglik(rows, os.path.join(out_dir, "loglik.png")),
    ]
    return [p for p in made if p]
