"""Interior-block MH (``BlockMH``, ``SMC(move="block"|"mix")``) against the exact enumerated
target: χ² of the chains, the exact one-move transition matrix (π K = π, built with the sampler's
own acceptance function), mutations of the ratio that break both, the stopped space (a new block
can make a stop complete earlier or no longer complete), and the cost of a move."""

from __future__ import annotations

import math

import pytest
import torch

from smcdecode import Engine, ReferenceBackend
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.errors import ArgumentError
from smcdecode.samplers import kernels
from smcdecode.spec import parse_method
from smcdecode.stopping import StopSet
from smcdecode.testing import chi2_pvalue, exact, tiny_llama, weighted_histogram

PROMPT = [1, 2]
MAX_NEW = 3
VOCAB_BYTES = [b"", b"a", b"b", b"ab", b"c"]


def length_reward(prompt, continuation):
    return 0.7 * len(continuation) - (1.0 if continuation and continuation[-1] == 3 else 0.0)


TARGETS = {
    "power3": lambda: T.Power(3),
    "contrast": lambda: T.LayerContrast(layer=1, beta=-0.5) ** 2,
    "power2_reward": lambda: T.Power(2) * T.Reward(length_reward),
}

STOPS = {
    "none": lambda: None,
    "ids": lambda: StopSet.build([[3], [1, 2]], 5),
    "string": lambda: StopSet.build(["ab"], 5, vocab_bytes=VOCAB_BYTES),
}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])


def counts_of(samples, where, size):
    c = torch.zeros(size, dtype=torch.float64)
    for s in samples:
        c[where[tuple(s.tokens)]] += 1  # KeyError: a sample outside the (stopped) space
    return c


def check_scalars(samples, ex):
    """The stored per-token scalars of the final chains (rescored suffixes included) are exact."""
    for s in samples[:300]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)
        assert math.isclose(s.log_q, float(ex.log_q[i]), abs_tol=1e-4)  # what later reverse proposals read


def block_kernel(ex, span: int, accept=kernels.block_log_accept, suffix_q: bool = False) -> torch.Tensor:
    """The exact one-move transition matrix K[x, x'] of the interior-block move at horizon =
    max_new_tokens, by enumeration: i ~ U{0..|x|−1}, e = min(i + span, |x|); interior (e < |x|):
    every x' of the space with x'_<i = x_<i, x'_≥e = x_≥e (the same length), proposed with
    q(x'_[i,e) | x_<i); tail: every x' of the space with x'_<i = x_<i and |x'| ≤ i + span, proposed
    with q(x'_≥i | x_<i). Proposals outside the space stay. The acceptance is the sampler's own
    function ``accept``; ``suffix_q`` is a mutation (q over block *and* suffix in the ratio)."""
    seqs, tq = ex.sequences, ex.token_log_q
    m = len(seqs)
    rows, cols, lq_fwd, lq_old, lq_new, n_old, n_new = [], [], [], [], [], [], []
    for a, x in enumerate(seqs):
        n = len(x)
        for i in range(n):
            e = min(i + span, n)
            for z, y in enumerate(seqs):
                if y[:i] != x[:i]:
                    continue
                if e < n and (len(y) != n or y[e:] != x[e:]):
                    continue
                if e == n and len(y) > i + span:
                    continue
                e_new = e if e < n else len(y)
                rows.append(a)
                cols.append(z)
                lq_fwd.append(sum(tq[z][i:e_new]) - math.log(n))
                lq_old.append(sum(tq[a][i:]) if suffix_q else sum(tq[a][i:e]))
                lq_new.append(sum(tq[z][i:]) if suffix_q else sum(tq[z][i:e_new]))
                n_old.append(n)
                n_new.append(len(y))
    r, c = torch.tensor(rows), torch.tensor(cols)
    log_a = accept(
        ex.log_target[c],
        ex.log_target[r],
        torch.tensor(lq_old, dtype=torch.float64),
        torch.tensor(lq_new, dtype=torch.float64),
        torch.tensor(n_old),
        torch.tensor(n_new),
        torch.ones(len(rows), dtype=torch.bool),
    ).double()
    move = torch.tensor(lq_fwd, dtype=torch.float64).exp() * log_a.clamp(max=0).exp()
    kernel = torch.zeros(m, m, dtype=torch.float64)
    kernel.index_put_((r, c), move, accumulate=True)
    proposed = torch.zeros(m, dtype=torch.float64).index_put_((r,), torch.tensor(lq_fwd).double().exp(), True)
    assert float(proposed.max()) < 1 + 1e-6  # the proposals onto the space are a sub-probability
    kernel += torch.diag(1 - kernel.sum(1))
    return kernel


@pytest.mark.parametrize("span", [1, 2, 3])
@pytest.mark.parametrize("stop", sorted(STOPS))
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_block_kernel_leaves_the_target_exactly_invariant(engine, name, stop, span):
    ex = exact(engine, TARGETS[name](), PROMPT, 4, proposal=Q.Tempered(1.0), stop=STOPS[stop]())
    kernel = block_kernel(ex, span)
    pi = ex.probs
    assert float(kernel.min()) > -1e-12
    assert float((pi @ kernel - pi).abs().max()) < 1e-6  # float32 forward: q sums to 1 within ~1e-7
    if span >= 2:  # every state can move (with span 1 a tail move is a one-token end: |x| is kept)
        assert float(kernel.diagonal().max()) < 1


@pytest.mark.parametrize("stop", ["none", "string"])
@pytest.mark.parametrize("name", ["contrast1", "power_half"])
def test_mutated_block_ratios_break_invariance(engine, name, stop):
    """The kernel test has power: a ratio with q over block and suffix (the suffix-MH ratio applied
    to a block move), one without the index term log|x| − log|x'| (tail moves change |x|), and one
    without the reverse proposal all leave π non-invariant, by 100x the float error above (the
    correct kernel's error is ~1e-16 here). Flat targets: on a peaked one (p^3, 87% of π on one
    sequence) the mutations shift π by only 1e-6 .. 1e-4."""
    target = {"contrast1": T.LayerContrast(layer=1, beta=-0.5), "power_half": T.Power(0.5)}[name]
    ex = exact(engine, target, PROMPT, 4, proposal=Q.Tempered(1.0), stop=STOPS[stop]())
    pi = ex.probs

    def no_length(lt_new, lt_old, lq_old, lq_new, n_old, n_new, valid):
        out = kernels.block_log_accept(lt_new, lt_old, lq_old, lq_new, n_old, n_new, valid)
        return out - torch.log(n_old.double()) + torch.log(n_new.double())

    def no_reverse(lt_new, lt_old, lq_old, lq_new, n_old, n_new, valid):
        return kernels.block_log_accept(lt_new, lt_old, torch.zeros_like(lq_old), lq_new, n_old, n_new, valid)

    for kernel in (
        block_kernel(ex, 2, suffix_q=True),
        block_kernel(ex, 2, accept=no_length),
        block_kernel(ex, 2, accept=no_reverse),
    ):
        assert float((pi @ kernel - pi).abs().sum()) > 1e-4


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_block_mh_matches_exact_target(engine, name):
    target, proposal = TARGETS[name](), Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal)
    res = S.BlockMH(target, proposal, chains=3000, block_size=2, steps=15, span=2).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=3
    )
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected
    check_scalars(res.samples[0], ex)
    moves = res.trace.of("move")
    assert {m["kernel"] for m in moves} == {"block"}
    interior = [i + 2 < n for m in moves for i, n in zip(m["i"], m["old_length"])]  # e = i + span < |x|
    assert any(interior) and not all(interior)  # both interior and tail moves ran


@pytest.mark.parametrize(
    "name, stop, span, suffix_every",
    [("power3", "ids", 2, 0), ("contrast", "string", 1, 2), ("power2_reward", "string", 2, 0)],
)
def test_block_mh_on_the_stopped_space(engine, name, stop, span, suffix_every):
    """With stops a new block can complete a stop earlier in the kept suffix, or its last token no
    longer completes one: those proposals are refused (counted as invalid) and π stays exact.
    (Block moves of one token alone keep |x|: span 1 runs mixed with suffix moves.)"""
    target, proposal = TARGETS[name](), Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal, stop=STOPS[stop]())
    sampler = S.BlockMH(target, proposal, chains=3000, block_size=2, steps=15, span=span, suffix_every=suffix_every)
    res = sampler.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=4, stop=STOPS[stop]())
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6
    check_scalars(res.samples[0], ex)
    assert sum(sum(m["invalid"]) for m in res.trace.of("move")) > 0


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mixed_cycle_matches_exact_target(engine, name):
    """Suffix and interior-block moves alternating (a fixed cycle of π-invariant kernels)."""
    target, proposal = TARGETS[name](), Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal)
    res = S.BlockMH(target, proposal, chains=3000, block_size=2, steps=12, span=1, suffix_every=2).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=5
    )
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6
    check_scalars(res.samples[0], ex)
    assert [m["kernel"] for m in res.trace.of("move")][:4] == ["block", "suffix", "block", "suffix"]


def test_a_mutated_sampler_ratio_fails_the_chi_square_test(engine, monkeypatch):
    """The χ² test has power against the likeliest mistake: q over block *and* suffix in the ratio."""
    real = kernels.span_log_q
    monkeypatch.setattr(kernels, "span_log_q", lambda chains, start, end: real(chains, start, chains.length))
    target, proposal = TARGETS["power3"](), Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal)
    res = S.BlockMH(target, proposal, chains=3000, block_size=3, steps=15, span=1).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=3
    )
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) < 1e-6


def test_smc_rejuvenation_with_block_and_mixed_moves_is_exact(engine):
    """SMC(move="block"|"mix") under annealing: the block's proposal and the rescored suffix's
    log q use each position's own α_t, so the rejuvenated particles stay exact."""
    target = T.Power(3)
    ex = exact(engine, target, PROMPT, MAX_NEW)
    for move, seed in (("block", 0), ("mix", 1)):
        sampler = S.SMC(
            target, Q.LocallyOptimal(), particles=4000, ess_threshold=1.0, anneal=3, rejuvenate=2, move=move, span=1
        )
        res = sampler.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=seed)
        w = torch.tensor([s.log_weight for s in res.samples[0]]).exp()
        h = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
        n_eff = 1.0 / float((w * w).sum())
        tol = 4.0 * 0.5 * float((ex.probs * (1 - ex.probs)).sqrt().sum()) / math.sqrt(n_eff)
        assert 0.5 * float((h - ex.probs).abs().sum()) < tol
        moves = res.trace.of("move")
        assert moves and any(any(m["accepted"]) for m in moves)


STREAMS = {
    "eglr": lambda eng: (T.Power(2), Q.EGLR(span=1, entropy_threshold=0.3, temperature=0.9)),
    "amateur": lambda eng: (
        T.Contrast(0.5, amateur=Engine(tiny_llama(vocab=5, layers=1, seed=7), eos_token_ids=[0])) ** 2,
        Q.Tempered(1.0),
    ),
    "cfg": lambda eng: (T.Contrast(-0.5, prompt=[3, 4, 4]), Q.LocallyOptimal()),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_rescoring_runs_every_stream_and_the_proposals_own_q(engine, name):
    """The rescored suffix's log π, log p and log q are exact when q re-applies layers at each
    scored position (EGLR), when the target reads an amateur engine's stream, and when q is the
    target's own factor over a second-prompt stream (LocallyOptimal × CFG)."""
    target, proposal = STREAMS[name](engine)
    ex = exact(engine, target, PROMPT, 4, proposal=proposal)
    res = S.BlockMH(target, proposal, chains=40, block_size=2, steps=6, span=1, suffix_every=3).run(
        engine, [PROMPT, [4, 3]], max_new_tokens=4, seed=1
    )
    check_scalars(res.samples[0], ex)
    moved = [
        a and r < p and i + 1 < n  # accepted, changed the block, interior (e = i + span < |x|)
        for m in res.trace.of("move")
        if m["kernel"] == "block"
        for a, r, p, i, n in zip(m["accepted"], m["reused"], m["proposed"], m["i"], m["old_length"])
    ]
    assert any(moved)  # accepted interior moves that changed the block (their suffix was rescored)


def test_block_move_rescores_the_suffix_in_one_forward(engine):
    """A block move on chains of length 3 with span 1 and i = 0: each row re-reads the distribution
    at j (1 token), draws the new block token, and one teacher-forced forward feeds it with the
    kept suffix (|s| tokens, less the last of a complete x'); no sequential decode of s."""
    from smcdecode.samplers.core import extend, make_problem, start_chains

    n = 400
    problem = make_problem(engine, [PROMPT], T.LM(), Q.Tempered(1.0), n, MAX_NEW, seed=2)
    decoder, chains = start_chains(problem)
    extend(problem, decoder, chains, MAX_NEW)
    full = chains.length == MAX_NEW
    rows = torch.nonzero(full).view(-1)
    decoder.keep_rows(rows)
    chains = chains.index_select(rows)
    engine.reset_counters()
    new, info = kernels.block_move(problem, decoder, chains, MAX_NEW, span=1, index=torch.zeros_like(chains.length))
    c = engine.counters
    moved = info.reused == 0  # j = i: the block token diverged (else y = x_[0,1) and nothing runs)
    assert bool(moved.any()) and not bool(moved.all())
    valid = moved & ~info.invalid
    # re-read (1) per moved row; the scored tokens: y_0, s_0 and s_1 unless x' is complete (it is:
    # |x'| = max_new_tokens), so 2 per valid row
    assert c["decode_tokens"] == int(moved.sum()) + 2 * int(valid.sum())
    assert c["forwards"] == 2  # the re-read (which the one block token needs) and the rescoring forward
    assert bool((info.new_length == MAX_NEW).all())
    # an accepted row keeps the new block and the old suffix
    acc = info.accepted & moved
    assert bool(acc.any())
    assert torch.equal(new.tokens[acc, 1:], chains.tokens[acc, 1:])
    assert bool((new.tokens[acc, 0] != chains.tokens[acc, 0]).all())


def test_block_mh_gives_the_same_samples_on_the_reference_backend():
    """BlockMH drives the backend seam only (score included): same seed, same samples."""
    model = tiny_llama(vocab=5, layers=2, seed=1)
    target = T.LayerContrast(layer=1, beta=-0.5) ** 2
    sampler = S.BlockMH(target, Q.Tempered(0.8), chains=3, block_size=3, steps=4, span=2)
    stop = StopSet.build(["ab"], 5, vocab_bytes=VOCAB_BYTES)
    kw = {"max_new_tokens": 5, "seed": 9, "stop": stop}
    a = sampler.run(Engine(model, eos_token_ids=[0]), [PROMPT, [3, 4, 1]], **kw)
    b = sampler.run(ReferenceBackend(model, eos_token_ids=[0]), [PROMPT, [3, 4, 1]], **kw)
    assert [[s.tokens for s in p] for p in a.samples] == [[s.tokens for s in p] for p in b.samples]
    assert any(any(m["accepted"]) and m["kernel"] == "block" for m in a.trace.of("move"))


def test_block_specs_and_arguments():
    m = parse_method("block:chains=2,block_size=8,steps=3,span=4,suffix_every=2 target=power:alpha=2")
    assert isinstance(m.sampler, S.BlockMH)
    assert (m.sampler.chains, m.sampler.span, m.sampler.suffix_every) == (2, 4, 2)
    m = parse_method("smc:particles=4,rejuvenate=2,move=mix,span=3 target=power:alpha=2")
    assert isinstance(m.sampler, S.SMC) and m.sampler.move == "mix" and m.sampler.span == 3
    with pytest.raises(ArgumentError, match="span"):
        S.BlockMH(T.Power(2), Q.Tempered(), span=0)
    with pytest.raises(ArgumentError, match="move"):
        S.SMC(T.Power(2), Q.Tempered(), move="sideways")
    with pytest.raises(ArgumentError, match="delimiter"):
        S.SMC(T.Power(2), Q.Tempered(), delimiter="b", rejuvenate=1, move="block")
    with pytest.raises(ArgumentError, match="accepts"):  # the error lists what is accepted
        parse_method("block:colour=red target=power:alpha=2")
