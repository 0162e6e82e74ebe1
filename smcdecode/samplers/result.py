"""What every sampler returns: samples per prompt, SMC's log evidence, and a diagnostics trace."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Sample:
    tokens: list[int]  # generated ids, EOS included when produced
    text: str | None  # None without a tokenizer
    log_weight: float  # normalised over the prompt's samples (exp's sum to 1)
    log_p: float  # base-model log-prob of tokens
    log_target: float | None  # unnormalised log π (None for samplers without a target)
    log_q: float = 0.0  # proposal log-prob of tokens, as stored at sampling time (last proposal)
    meta: dict[str, Any] | None = None  # e.g. the RolloutPool cell that drew it


class Trace:
    """Per-step diagnostics. ``log(kind, **values)`` keeps tensors on device (no sync); ``records``
    converts them to Python lists once, at the end."""

    def __init__(self) -> None:
        self._raw: list[tuple[str, dict[str, Any]]] = []
        self._records: list[dict[str, Any]] | None = None

    def log(self, kind: str, **values: Any) -> None:
        self._raw.append((kind, values))
        self._records = None

    @property
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            out = []
            for kind, values in self._raw:
                rec: dict[str, Any] = {"kind": kind}
                for k, v in values.items():
                    rec[k] = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v
                out.append(rec)
            self._records = out
        return self._records

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]


@dataclass
class Result:
    samples: list[list[Sample]]
    log_evidence: list[float | None]
    trace: Trace = field(default_factory=Trace)
    method: str = ""
    wall_time: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "wall_time": self.wall_time,
            "counters": self.counters,
            "log_evidence": self.log_evidence,
            "samples": [[asdict(s) for s in per] for per in self.samples],
            "trace": self.trace.records,
        }

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        trace = Trace()
        for rec in d.get("trace", []):
            rec = dict(rec)
            kind = rec.pop("kind")
            trace.log(kind, **rec)
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
        with open(path) as f:
            return cls.from_dict(json.load(f))
