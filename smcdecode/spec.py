"""Command-line spec strings for targets, proposals and samplers: ``name:key=value,key=value``.

    --target   power:alpha=4 | lm:temperature=0.7 | contrast:layer=20,beta=-0.5,alpha=2[,plausibility=0.1]
               | contrast:layer=dynamic,beta=-0.5,candidates=high
    --proposal tempered:temperature=0.25[,top_k=50,top_p=0.95] | optimal
               | lookahead:alpha=4,candidates=4,rollouts=4,horizon=16[,epsilon=0.05,jackknife=true,
               every=1,entropy_threshold=2.0]
               | eglr:span=4[,max_iters=4,entropy_threshold=2.0,tol=0.001,temperature=1.0]
    --sampler  ancestral:n=8 | mh:chains=1,block_size=192,steps=10[,reuse_suffix=false]
               | block:chains=1,block_size=192,steps=10,span=16[,suffix_every=2]
               | smc:particles=16,block_size=1,
               ess_threshold=0.5,resampling=systematic,rejuvenate=0[,anneal=32,twist=true][,move=block,span=16]
               | block-lookahead:alpha=4,particles=8,block_size=16,candidates=4,rollouts=4,horizon=16[,keep=2]
               | pool:spans=0/4/8,temperatures=0.5/1.0[,per_cell=2,max_iters=4,entropy_threshold=2.0,tol=0.001]

Lists are written with ``/`` (``candidates=12/16/20``). ``targets.Contrast`` (a second model or a
second prompt) has no spec string: its amateur is an engine object, so it is built in Python.

A method spec joins them with spaces or semicolons, e.g. ``"smc:particles=16 target=power:alpha=4
proposal=tempered:temperature=0.25"``; see :func:`parse_method`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smcdecode import proposals, samplers, targets
from smcdecode.errors import ArgumentError


class SpecError(ArgumentError):
    def __init__(self, kind: str, message: str):
        super().__init__(kind, message)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def split_spec(kind: str, spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise SpecError(kind, f"{part!r} in {spec!r} is not key=value")
        kwargs[key.strip()] = _value(val.strip())
    return name.strip().lower(), kwargs


def _call(kind: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any], allowed: list[str]) -> Any:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise SpecError(kind, f"{name} does not take {', '.join(unknown)}; it accepts {', '.join(allowed)}")
    return factory(**kwargs)


def _params(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """The keyword arguments a spec may give ``cls``: its constructor's, less ``skip``."""
    params = inspect.signature(cls).parameters.values()
    named = (p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return [n for n in named if n not in ("self", *skip)]


TARGETS = {
    "lm": _params(targets.LM),
    "power": _params(targets.Power),
    "contrast": _params(targets.LayerContrast) + ["alpha"],
    "reward": ["name", "weight", "prefix"],
}

Rewards = dict[str, Callable[..., Any]]


def parse_target(spec: str, rewards: Rewards | None = None) -> targets.Potential:
    """One target, or a product ``a*b`` (e.g. ``power:alpha=4*reward:name=boxed,weight=2``)."""
    if "*" in spec:
        parts = [parse_target(s, rewards) for s in spec.split("*")]
        out = parts[0]
        for p in parts[1:]:
            out = out * p
        return out
    name, kw = split_spec("target", spec)
    if name == "reward":
        available = rewards or {}
        rname = kw.pop("name", None)
        if rname not in available:
            raise SpecError("target", f"unknown reward {rname!r}; available here: {', '.join(available) or 'none'}")
        return _call("target", name, lambda **k: targets.Reward(available[rname], **k), kw, ["weight", "prefix"])
    if name == "lm":
        return _call("target", name, targets.LM, kw, TARGETS[name])
    if name == "power":
        return _call("target", name, targets.Power, kw, TARGETS[name])
    if name == "contrast":
        alpha = kw.pop("alpha", 1.0)
        if "candidates" in kw and isinstance(kw["candidates"], str) and "/" in kw["candidates"]:
            kw["candidates"] = [int(x) for x in kw["candidates"].split("/")]
        base = _call("target", name, targets.LayerContrast, kw, TARGETS[name][:-1])
        return base if alpha == 1.0 else base**alpha
    raise SpecError("target", f"unknown target {name!r}; accepted: {', '.join(TARGETS)} (e.g. power:alpha=4)")


def method_name(spec: str) -> str:
    """A canonical, filesystem- and record-friendly form of a method spec."""
    return " ".join(p for p in spec.replace(";", " ").split() if p)


PROPOSALS = {
    "tempered": _params(proposals.Tempered),
    "optimal": _params(proposals.LocallyOptimal),
    "lookahead": _params(proposals.Lookahead),
    "eglr": _params(proposals.EGLR),
}


def parse_proposal(spec: str) -> proposals.Proposal:
    name, kw = split_spec("proposal", spec)
    if name == "tempered":
        return _call("proposal", name, proposals.Tempered, kw, PROPOSALS[name])
    if name in ("optimal", "locally-optimal", "locallyoptimal"):
        return _call("proposal", name, proposals.LocallyOptimal, kw, [])
    if name == "lookahead":
        if "alpha" not in kw:
            raise SpecError("proposal", "lookahead needs alpha (the target's exponent), e.g. lookahead:alpha=4")
        return _call("proposal", name, proposals.Lookahead, kw, PROPOSALS[name])
    if name == "eglr":
        return _call("proposal", name, proposals.EGLR, kw, PROPOSALS[name])
    raise SpecError(
        "proposal", f"unknown proposal {name!r}; accepted: {', '.join(PROPOSALS)} (e.g. tempered:temperature=0.25)"
    )


SAMPLERS = {
    "ancestral": _params(samplers.Ancestral, ("proposal", "target")),
    "mh": _params(samplers.SuffixMH, ("target", "proposal")),
    "block": _params(samplers.BlockMH, ("target", "proposal")),
    "smc": _params(samplers.SMC, ("target", "proposal")),
    "block-lookahead": _params(samplers.BlockLookahead),
    "pool": _params(samplers.RolloutPool),
}


@dataclass
class Method:
    """A named sampler with its target and proposal."""

    spec: str
    sampler: samplers.Sampler


def build_sampler(
    spec: str, target: targets.Potential | None, given: proposals.Proposal | None = None
) -> samplers.Sampler:
    """The sampler of ``spec`` on ``target`` with the proposal ``given`` (default: T = 1)."""
    name, kw = split_spec("sampler", spec)
    proposal = given or proposals.Tempered(1.0)
    if name == "ancestral":
        return _call("sampler", name, lambda **k: samplers.Ancestral(proposal, target=target, **k), kw, SAMPLERS[name])
    if name in ("mh", "suffix-mh", "suffixmh"):
        if target is None:
            raise SpecError("target", "the mh sampler needs a target (e.g. --target power:alpha=4)")
        return _call("sampler", name, lambda **k: samplers.SuffixMH(target, proposal, **k), kw, SAMPLERS["mh"])
    if name in ("block", "block-mh", "blockmh"):
        if target is None:
            raise SpecError("target", "the block sampler needs a target (e.g. --target power:alpha=4)")
        return _call("sampler", name, lambda **k: samplers.BlockMH(target, proposal, **k), kw, SAMPLERS["block"])
    if name == "smc":
        if target is None:
            raise SpecError("target", "the smc sampler needs a target (e.g. --target power:alpha=4)")
        return _call("sampler", name, lambda **k: samplers.SMC(target, proposal, **k), kw, SAMPLERS[name])
    if name in ("block-lookahead", "blocklookahead"):
        if "alpha" not in kw:
            raise SpecError("sampler", "block-lookahead needs alpha, e.g. block-lookahead:alpha=4,particles=8")
        sampler = _call("sampler", name, samplers.BlockLookahead, kw, SAMPLERS["block-lookahead"])
        if target is not None and repr(target) != repr(sampler.target):
            raise SpecError("target", f"block-lookahead samples {sampler.target!r} (its alpha); got target {target!r}")
        return sampler
    if name == "pool":
        if target is not None or given is not None:
            which = "target" if target is not None else "proposal"
            raise SpecError(which, f"the pool sampler draws from its own EGLR cells; it takes no {which}")
        for key, cast in (("spans", int), ("temperatures", float)):
            if key in kw:
                try:
                    kw[key] = [cast(x) for x in str(kw[key]).split("/")]
                except ValueError:
                    msg = f"pool: {key}={kw[key]!r} is not a /-separated list of numbers"
                    raise SpecError("sampler", msg) from None
        return _call("sampler", name, samplers.RolloutPool, kw, SAMPLERS[name])
    raise SpecError("sampler", f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)} (e.g. smc:particles=16)")


def parse_method(spec: str, rewards: Rewards | None = None) -> Method:
    """``"SAMPLER [target=TARGET] [proposal=PROPOSAL]"`` (parts separated by spaces or ';')."""
    parts = [p for p in spec.replace(";", " ").split() if p]
    if not parts:
        raise SpecError("method", "empty method spec")
    sampler_spec, target, proposal = parts[0], None, None
    for part in parts[1:]:
        key, eq, val = part.partition("=")
        if key == "target" and eq:
            target = parse_target(val, rewards)
        elif key == "proposal" and eq:
            proposal = parse_proposal(val)
        else:
            raise SpecError("method", f"{part!r}: expected target=... or proposal=...")
    return Method(spec, build_sampler(sampler_spec, target, proposal))
