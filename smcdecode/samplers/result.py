"""What every sampler returns: samples per prompt, SMC's log evidence, and a diagnostics trace."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass
class Sample:
    """One sample: a continuation of its prompt with its weight and log-probabilities.

    Attributes:
        tokens: The generated token ids, EOS included when produced.
        text: Their text (None without a tokenizer).
        log_weight: The log weight, normalised over the prompt's samples (their exp's sum to 1).
        log_p: The base model's log-probability of ``tokens``.
        log_target: The unnormalised log π (None for samplers without a target).
        log_q: The proposal's log-probability of ``tokens``, as stored at sampling time.
        meta: Extra labels, e.g. the ``RolloutPool`` cell that drew it.
    """

    tokens: list[int]  # generated ids, EOS included when produced
    text: str | None  # None without a tokenizer
    log_weight: float  # normalised over the prompt's samples (exp's sum to 1)
    log_p: float  # base-model log-prob of tokens
    log_target: float | None  # unnormalised log π (None for samplers without a target)
    log_q: float = 0.0  # proposal log-prob of tokens, as stored at sampling time (last proposal)
    meta: dict[str, Any] | None = None  # e.g. the RolloutPool cell that drew it


class ExtendTrace(NamedTuple):
    """An MH sampler grew every chain to its next horizon (trace kind ``extend``); [B] per row."""

    block: int  # 1-based MH block
    old_length: Tensor  # long
    new_length: Tensor  # long


class MoveTrace(NamedTuple):
    """One MH move of every row (kind ``move``); tensors [B], one per row."""

    stage: int  # the MH block it ran in (SuffixMH, BlockMH; 1-based) or the SMC step it rejuvenated
    sweep: int  # the move's index within its stage
    kernel: str  # "suffix" or "block"
    accepted: Tensor  # bool
    i: Tensor  # long: the regeneration point (a block move: the block's start)
    reused: Tensor  # long: proposal tokens kept from the current state
    proposed: Tensor  # long: tokens the proposal covered (suffix: |x'| − i)
    invalid: Tensor  # bool: the proposal left the sequence space (A = 0)
    old_length: Tensor  # long: |x|
    new_length: Tensor  # long: |x'|
    horizon: int | None = None  # the length cap in force (MH samplers)
    log_target: Tensor | None = None  # log π of each chain after the move (MH samplers)


class StepTrace(NamedTuple):
    """One SMC step (kind ``step``); tensors [P], one per prompt."""

    step: int
    ess: Tensor  # effective sample size before resampling
    resampled: Tensor  # bool
    log_z_increment: Tensor  # log of the mean incremental weight
    horizon: int | None = None  # the length every particle has reached (token-synchronous SMC)
    unique: Tensor | None = None  # distinct ancestors after the step


class ShrinkTrace(NamedTuple):
    """SuffixMH dropped finished rows from its batch (kind ``shrink``)."""

    iteration: int
    rows: int  # rows left


class CellTrace(NamedTuple):
    """One cell of a RolloutPool grid (kind ``cell``)."""

    span: int
    temperature: float
    wall_time: float


KINDS: dict[str, Any] = {
    "extend": ExtendTrace,
    "move": MoveTrace,
    "step": StepTrace,
    "shrink": ShrinkTrace,
    "cell": CellTrace,
}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}


class Trace:
    """Per-step diagnostics as typed infos (:data:`KINDS`). ``log(info)`` keeps tensors on the
    device (no sync); :meth:`infos` returns them by type (what :mod:`smcdecode.diagnostics`
    reads); ``records`` converts them to JSON-ready dicts once, at the end."""

    def __init__(self) -> None:
        self._infos: list[Any] = []
        self._records: list[dict[str, Any]] | None = None

    def log(self, info: Any) -> None:
        """Append one info (an ``ExtendTrace``, ``MoveTrace``, ``StepTrace``, ...), kept on its device.

        Args:
            info: A trace info of one of the types of :data:`KINDS`.

        Raises:
            TypeError: ``info`` is not one of the trace's info types.
        """
        if type(info) not in _KIND_OF:
            raise TypeError(f"trace infos are one of {sorted(c.__name__ for c in _KIND_OF)}, got {type(info).__name__}")
        self._infos.append(info)
        self._records = None

    def infos(self, cls: type[T]) -> list[T]:
        """The infos of type ``cls`` (e.g. ``MoveTrace``), in the order they were logged.

        Args:
            cls: An info type of :data:`KINDS`.
        """
        return [i for i in self._infos if isinstance(i, cls)]

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every info as a JSON-ready dict with its ``kind`` (tensors become lists)."""
        if self._records is None:
            out = []
            for info in self._infos:
                rec: dict[str, Any] = {"kind": _KIND_OF[type(info)]}
                for k, v in info._asdict().items():
                    rec[k] = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v
                out.append(rec)
            self._records = out
        return self._records

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind (``"extend"``, ``"move"``, ``"step"``, ``"shrink"``, ``"cell"``).

        Args:
            kind: The record kind.
        """
        return [r for r in self.records if r["kind"] == kind]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> Trace:
        """The inverse of :attr:`records` (lists become CPU tensors). Move records written before
        the typed trace (``block``/``step`` and ``step``/``rejuvenation`` instead of
        ``stage``/``sweep``) are read too; unknown kinds are skipped.

        Args:
            records: JSON-ready dicts, each with its ``kind``.
        """
        trace = cls()
        for rec in records:
            rec = dict(rec)
            info_cls = KINDS.get(rec.pop("kind", ""))
            if info_cls is None:
                continue
            if info_cls is MoveTrace and "stage" not in rec:
                stage, sweep = ("block", "step") if "block" in rec else ("step", "rejuvenation")
                rec["stage"], rec["sweep"], rec["i"] = rec.pop(stage), rec.pop(sweep, 0), rec.pop("index")
                n = len(rec["accepted"])
                rec.setdefault("kernel", "suffix")
                rec.setdefault("proposed", [b - a for a, b in zip(rec["i"], rec["new_length"])])
                rec.setdefault("invalid", [False] * n)
            values: dict[str, Any] = {k: _tensor(v) if isinstance(v, list) else v for k, v in rec.items()}
            trace.log(info_cls(**{k: v for k, v in values.items() if k in info_cls._fields}))
        return trace


def _tensor(values: list[Any]) -> Tensor:
    t = torch.tensor(values)
    return torch.tensor(values, dtype=torch.float64) if t.is_floating_point() else t  # exact round trip


@dataclass
class Result:
    """What every sampler returns.

    Attributes:
        samples: ``samples[p]`` is the list of prompt p's samples.
        log_evidence: ``log_evidence[p]`` is SMC's estimate log Ẑ of the target's log normaliser
            for prompt p (None for MH and ancestral samplers).
        trace: Per-step diagnostics (``Trace``).
        method: The sampler's repr.
        wall_time: Seconds the run took.
        counters: The backend's counters over the run: ``decode_tokens``, ``prefill_tokens``,
            ``forwards`` (sequential depth), ``rollout_tokens``, ...
    """

    samples: list[list[Sample]]
    log_evidence: list[float | None]
    trace: Trace = field(default_factory=Trace)
    method: str = ""
    wall_time: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (what ``save`` writes)."""
        return {
            "method": self.method,
            "wall_time": self.wall_time,
            "counters": self.counters,
            "log_evidence": self.log_evidence,
            "samples": [[asdict(s) for s in per] for per in self.samples],
            "trace": self.trace.records,
        }

    def save(self, path: str) -> None:
        """Write the result to ``path`` as JSON (``Result.load`` reads it back).

        Args:
            path: The JSON file to write (overwritten).
        """
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """The inverse of ``to_dict``.

        Args:
            d: A dict written by ``to_dict`` (missing optional fields take their defaults).
        """
        trace = Trace.from_records(d.get("trace", []))
        samples = [[Sample(**s) for s in per] for per in d["samples"]]
        return cls(
            samples,
            d.get("log_evidence", [None] * len(samples)),
            trace,
            d.get("method", ""),
            d.get("wall_time", 0.0),
            d.get("counters", {}),
        )

    @classmethod
    def load(cls, path: str) -> Result:
        """Read a result written by ``save``.

        Args:
            path: The JSON file.
        """
        with open(path) as f:
            return cls.from_dict(json.load(f))
