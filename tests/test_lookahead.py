"""Lookahead power sampling against the exact enumerated p^α: SMC with the
Lookahead proposal, with and without its twist, is exact whatever K, M, H (deliberately poor
settings included) and its evidence is unbiased; the standalone sampler is biased, less so as M
and H grow; and two mutations (no defensive mixture with a small K, dividing by a fresh
re-estimate of the twist) are detected. Fixed seeds; tolerances from the effective sample size."""

from __future__ import annotations

import math

import pytest
import torch

from smcdecode import ArgumentError, ArgumentTypeError, Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.samplers import core
from smcdecode.testing import exact, tiny_llama, weighted_histogram

PROMPT = [1, 2]
MAX_NEW = 3
ALPHA = 3.0


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])


@pytest.fixture(scope="module")
def ex(engine):
    return exact(engine, T.Power(ALPHA), PROMPT, MAX_NEW)


def tv_tolerance(probs: torch.Tensor, n_eff: float, z: float = 4.0) -> float:
    """z × the bound E[TV] ≤ ½ Σ_i sqrt(π_i(1−π_i)/n) on the TV of an n-sample histogram."""
    return z * 0.5 * float((probs * (1 - probs)).sqrt().sum()) / math.sqrt(n_eff)


def weighted_tv(res, ex) -> tuple[float, float, torch.Tensor]:
    """(TV of the weighted histogram to p^α, its tolerance from the ESS, the histogram)."""
    samples = res.samples[0]
    w = torch.tensor([s.log_weight for s in samples]).exp()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-4)
    h = weighted_histogram(samples, ex.index(), len(ex.sequences))
    return 0.5 * float((h - ex.probs).abs().sum()), tv_tolerance(ex.probs, 1.0 / float((w * w).sum())), h


SETTINGS = {
    "poor": dict(candidates=2, rollouts=1, horizon=1),
    "noisy": dict(candidates=5, rollouts=1, horizon=1),
    "good": dict(candidates=4, rollouts=4, horizon=2),
    "jackknife": dict(candidates=3, rollouts=3, horizon=1, jackknife=True),
}


@pytest.mark.parametrize("twist", [False, True])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_smc_with_lookahead_matches_exact_power(engine, ex, setting, twist):
    proposal = Q.Lookahead(ALPHA, **SETTINGS[setting])
    res = S.SMC(T.Power(ALPHA), proposal, particles=4000, ess_threshold=0.5, twist=twist).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=21
    )
    tv, tol, h = weighted_tv(res, ex)
    print(f"\nSMC + Lookahead {setting} twist={twist}: TV {tv:.4f} (tolerance {tol:.4f})")
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"
    p = ex.log_p.double().exp()
    assert 0.5 * float((h - p).abs().sum()) > 3 * tol  # the test has power: p itself is rejected
    for s in res.samples[0][:100]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)
    c = res.counters
    assert c["rollout_tokens"] > 0 and c["rollout_forwards"] > 0
    assert c["forwards"] >= c["rollout_forwards"]


def evidence_ratio(engine, ex, twist: bool, reps: int = 300):
    """(result, Ẑ/Z per replicate, its standard error): SMC + Lookahead with K = 2, M = 1, H = 1,
    8 particles resampled at every step, ``reps`` independent copies of the prompt."""
    proposal = Q.Lookahead(ALPHA, candidates=2, rollouts=1, horizon=1)
    res = S.SMC(T.Power(ALPHA), proposal, particles=8, ess_threshold=1.0, twist=twist).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=13
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    return res, ratio, float(ratio.std()) / math.sqrt(reps)


@pytest.mark.parametrize("twist", [False, True])
def test_smc_with_lookahead_evidence_is_unbiased(engine, ex, twist):
    """E[Ẑ/Z] = 1 with the poorest settings (K = 2, M = 1, H = 1) and resampling at every step."""
    res, ratio, se = evidence_ratio(engine, ex, twist)
    print(f"\nSMC + Lookahead (K=2, M=1, H=1) twist={twist}: E[Z^/Z] = {float(ratio.mean()):.4f} +- {se:.4f}")
    assert abs(float(ratio.mean()) - 1.0) < 3 * se + 1e-9
    assert any(any(r["resampled"]) for r in res.trace.of("step"))


def test_rejuvenation_with_the_twist_stays_exact(engine, ex):
    """Rejuvenation moves target the twisted intermediate target p^α·Ẑ with fresh rollouts."""
    proposal = Q.Lookahead(ALPHA, candidates=2, rollouts=2, horizon=1)
    res = S.SMC(T.Power(ALPHA), proposal, particles=3000, ess_threshold=0.9, rejuvenate=1, twist=True).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=17
    )
    assert res.trace.of("move"), "rejuvenation moves ran"
    tv, tol, _ = weighted_tv(res, ex)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"


def test_standalone_lookahead_bias_shrinks_with_rollouts_and_horizon():
    """The paper's sampler (ε = 0, K = V) is approximate: its TV to p^α shrinks as M and H grow.
    A softer toy (lm_head scale 8) with 4 new tokens, so that the horizon matters: with H = 1 more
    rollouts only converge to the truncated-horizon answer; with H = 3 (the whole remaining
    space) only the ratio bias O(1/M) remains."""
    eng = Engine(tiny_llama(vocab=5, layers=2, seed=1, scale=8.0), eos_token_ids=[0])
    ex = exact(eng, T.Power(ALPHA), PROMPT, 4)
    n = 4000
    noise = tv_tolerance(ex.probs, n)  # 4 × the sampling noise bound of an exact sampler's histogram
    table = {}
    for m, h in ((1, 1), (4, 1), (32, 1), (1, 3), (4, 3), (32, 3)):
        res = S.Ancestral(Q.Lookahead(ALPHA, candidates=5, rollouts=m, horizon=h, epsilon=0.0), n=n).run(
            eng, [PROMPT], max_new_tokens=4, seed=5
        )
        hist = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
        table[(m, h)] = 0.5 * float((hist - ex.probs).abs().sum())
    print(f"\nstandalone Lookahead (K = V = 5, eps = 0), TV to p^alpha, n = {n} (4-sigma noise bound {noise:.4f}):")
    print("  M  H  TV")
    for (m, h), tv in table.items():
        print(f"{m:3d} {h:2d}  {tv:.4f}")
    assert min(table[(m, 1)] for m in (1, 4, 32)) > noise  # a short horizon is detectably biased
    for m in (4, 32):  # (one long rollout, M = 1, is noisier than one short one: worse)
        assert table[(m, 3)] < table[(m, 1)]
    assert table[(32, 3)] < table[(4, 3)] < table[(1, 3)]
    assert table[(32, 3)] < noise  # near-exact: whole horizon, many rollouts


def test_mutation_no_defensive_mixture_is_detected(engine, ex):
    """ε = 0 with K = 1 < V: q misses tokens π needs, and SMC cannot correct what it never
    proposes. (With K = 2 the missing mass is too small to see on this toy at α = 3.)"""
    proposal = Q.Lookahead(ALPHA, candidates=1, rollouts=2, horizon=1, epsilon=0.0)
    res = S.SMC(T.Power(ALPHA), proposal, particles=4000, twist=True).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=21
    )
    tv, tol, _ = weighted_tv(res, ex)
    assert tv > 2 * tol, f"the mutation went unnoticed: TV {tv:.4f}, tolerance {tol:.4f}"


def test_mutation_not_dividing_by_the_stored_twist_is_detected(engine, ex, monkeypatch):
    """The increment is Ẑ(x_≤t) / Ẑ(x_<t) with the twist stored with the prefix; multiplying by
    the new twist without dividing by the stored one (the bookkeeping bug this guards) leaves
    Π_t Ẑ(x_≤t) in the weights, and the evidence check that passes with the right bookkeeping
    (test_smc_with_lookahead_evidence_is_unbiased, same settings and seed) fails: E[Ẑ/Z] ≈ 0.5."""
    monkeypatch.setattr(core, "twist_increment", lambda chains, drawn: drawn.log_twist)
    _, ratio, se = evidence_ratio(engine, ex, twist=True)
    assert abs(float(ratio.mean()) - 1.0) > 3 * se, f"the mutation went unnoticed: {float(ratio.mean()):.4f} ± {se:.4f}"


def test_rollout_tokens_are_counted_apart_from_decode_tokens(engine):
    """every = 100: rollouts only at the first step, H = 1: each candidate that does not end
    the sequence is fed once (before the M copies are made), in one forward."""
    k, m, n = 2, 3, 50
    res0 = S.Ancestral(Q.Tempered(1.0), n=1).run(engine, [PROMPT], max_new_tokens=1, seed=0)
    assert res0.counters["rollout_tokens"] == 0
    top = engine.prefill([PROMPT])[1].log_p[0].topk(k).indices.tolist()
    fed_per_row = sum(1 for v in top if v not in engine.eos_token_ids)
    assert fed_per_row >= 1
    proposal = Q.Lookahead(ALPHA, candidates=k, rollouts=m, horizon=1, every=100)
    res = S.SMC(T.Power(ALPHA), proposal, particles=n).run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=1)
    c = res.counters
    assert c["rollout_tokens"] == n * fed_per_row and c["rollout_forwards"] == 1
    assert c["decode_tokens"] <= n * (MAX_NEW - 1)  # the kept tokens only
    gated = Q.Lookahead(ALPHA, candidates=k, rollouts=m, horizon=1, entropy_threshold=1e9)
    res = S.SMC(T.Power(ALPHA), gated, particles=n).run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=1)
    assert res.counters["rollout_tokens"] == 0 and res.counters["rollout_forwards"] == 0


def test_lookahead_argument_errors(engine):
    with pytest.raises(ArgumentError, match="twist"):
        S.SMC(T.Power(2), Q.Tempered(), twist=True)
    with pytest.raises(ArgumentError, match="jackknife"):
        Q.Lookahead(2, rollouts=1, jackknife=True)
    with pytest.raises(ArgumentError, match="epsilon"):
        Q.Lookahead(2, epsilon=1.5)
    with pytest.raises(ArgumentError, match="candidates"):
        Q.Lookahead(2, candidates=0)
    with pytest.raises(ArgumentTypeError, match="proposal"):
        exact(engine, T.Power(2), PROMPT, MAX_NEW, proposal=Q.Lookahead(2))
    with pytest.raises(ArgumentError, match="move"):  # interior-block moves keep rollouts drawn for another prefix
        S.SMC(T.Power(2), Q.Lookahead(2), rejuvenate=1, move="block")
    with pytest.raises(ArgumentError, match="proposal"):
        S.BlockMH(T.Power(2), Q.Lookahead(2))


def test_spec_strings_and_eval_records_carry_rollout_tokens(tmp_path):
    """``lookahead:...`` as a proposal spec (SMC's ``twist`` too), and eval records report the
    rollout tokens apart from the decode tokens, for SMC and for the standalone sampler."""
    from smcdecode.evaluate import run_eval
    from smcdecode.records import read_jsonl
    from smcdecode.spec import SpecError, parse_method
    from smcdecode.testing import toy_eval

    spec = (
        "smc:particles=8,twist=true;target=power:alpha=4;proposal=lookahead:alpha=4,candidates=4,rollouts=4,horizon=16"
    )
    m = parse_method(spec)
    assert isinstance(m.sampler, S.SMC) and m.sampler.twist
    p = m.sampler.proposal
    assert isinstance(p, Q.Lookahead) and (p.alpha, p.candidates, p.rollouts, p.horizon) == (4.0, 4, 4, 16)
    anc = parse_method("ancestral:n=2 proposal=lookahead:alpha=2,candidates=2,rollouts=2,horizon=2,epsilon=0,every=2")
    assert isinstance(anc.sampler.proposal, Q.Lookahead) and anc.sampler.proposal.every == 2
    blk = parse_method("block-lookahead:alpha=4,particles=2,block_size=8,candidates=4,keep=2 target=power:alpha=4")
    assert isinstance(blk.sampler, S.BlockLookahead) and blk.sampler.keep == 2 and blk.sampler.block_size == 8
    with pytest.raises(SpecError, match="target"):
        parse_method("block-lookahead:alpha=4 target=power:alpha=2")
    with pytest.raises(SpecError, match="alpha"):
        parse_method("ancestral:n=2 proposal=lookahead:candidates=2")
    with pytest.raises(SpecError, match="rollouts"):
        parse_method("ancestral:n=2 proposal=lookahead:alpha=2,rolouts=2")
    task, engine, _ = toy_eval(problems=2)
    for name, method in (("smc", m), ("anc", anc)):
        path = run_eval(task, engine, method.sampler, name, str(tmp_path / name), max_new_tokens=3, progress=False)
        recs = list(read_jsonl(path))
        assert len(recs) == 2
        for r in recs:
            assert r["rollout_tokens"] > 0 and r["decode_tokens"] > 0 and "error" not in r


@pytest.mark.parametrize("kind", ["ids", "string"])
def test_smc_with_lookahead_on_the_stopped_space(engine, kind):
    """Rollouts and candidates end at stop completions too; SMC + Lookahead (twist and a
    rejuvenation move) matches p^α on the stopped space."""
    from smcdecode.stopping import StopSet

    stop = (
        StopSet.build([[3], [1, 2]], 5)
        if kind == "ids"
        else StopSet.build(["ab"], 5, vocab_bytes=[b"", b"a", b"b", b"ab", b"c"])
    )
    ex = exact(engine, T.Power(ALPHA), PROMPT, MAX_NEW, stop=stop)
    proposal = Q.Lookahead(ALPHA, candidates=2, rollouts=2, horizon=2)
    res = S.SMC(T.Power(ALPHA), proposal, particles=3000, ess_threshold=0.7, rejuvenate=1, twist=True).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=5, stop=stop
    )
    tv, tol, h = weighted_tv(res, ex)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"
    assert 0.5 * float((h - ex.log_p.double().exp()).abs().sum()) > 3 * tol


def test_suffix_mh_with_lookahead_is_exact(engine, ex):
    """Suffix MH accepts the Lookahead proposal: q(x_t | x_<t, u_t) with the stored log q is an
    MH proposal on the extended space (x, rollouts), provided each move draws fresh rollouts
    (the coupling with the current suffix is turned off for proposals with auxiliary draws)."""
    from smcdecode.testing import chi2_pvalue

    proposal = Q.Lookahead(ALPHA, candidates=2, rollouts=1, horizon=1, epsilon=0.3)
    res = S.SuffixMH(T.Power(ALPHA), proposal, chains=2000, block_size=MAX_NEW, steps=4).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=7
    )
    c = torch.zeros(len(ex.sequences), dtype=torch.float64)
    for s in res.samples[0]:
        c[ex.index()[tuple(s.tokens)]] += 1
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.log_p.double().exp()) < 1e-6  # the test has power: p itself is rejected
    assert all(r == 0 for m in res.trace.of("move") for r in m["reused"])  # never coupled


def test_block_lookahead_nested_importance_sampling_is_exact(engine, ex):
    """The block variant chooses a block among its L candidates in proportion to the estimated
    weights and increments by their mean (nested IS): exact for p^α, evidence unbiased, even with
    L = 2, M = 1, H = 1; the approximate top-K mode (the paper's) runs and is unweighted."""
    sampler = S.BlockLookahead(ALPHA, particles=4000, block_size=2, candidates=2, rollouts=1, horizon=1)
    res = sampler.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=23)
    tv, tol, h = weighted_tv(res, ex)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"
    assert 0.5 * float((h - ex.log_p.double().exp()).abs().sum()) > 3 * tol
    for s in res.samples[0][:100]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
    assert res.counters["rollout_tokens"] > 0
    reps = 300
    res = S.BlockLookahead(
        ALPHA, particles=8, block_size=2, candidates=2, rollouts=1, horizon=1, ess_threshold=1.0
    ).run(engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=29)
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    se = float(ratio.std()) / math.sqrt(reps)
    assert abs(float(ratio.mean()) - 1.0) < 3 * se + 1e-9
    approx = S.BlockLookahead(ALPHA, particles=50, block_size=2, candidates=4, rollouts=2, horizon=1, keep=2)
    res = approx.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=1)
    assert res.log_evidence == [None] and "approximate" in repr(approx)
    assert all(math.isclose(s.log_weight, -math.log(50), abs_tol=1e-6) for s in res.samples[0])
    with pytest.raises(ArgumentError, match="keep"):
        S.BlockLookahead(ALPHA, candidates=2, keep=3)
