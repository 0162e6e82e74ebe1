"""Samplers against the exact enumerated target. Fixed seeds; tolerances derived from
the sample size; every distribution test also shows it would reject the proposal's own law."""

from __future__ import annotations

import math

import pytest
import torch

from smcdecode import ArgumentError, Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.testing import chi2_pvalue, exact, tiny_llama, weighted_histogram

PROMPT = [1, 2]
MAX_NEW = 3


def length_reward(prompt, continuation):
    return 0.7 * len(continuation) - (1.0 if continuation and continuation[-1] == 3 else 0.0)


TARGETS = {
    "power3": lambda: T.Power(3),
    "contrast": lambda: T.LayerContrast(layer=1, beta=-0.5) ** 2,
    "power2_reward": lambda: T.Power(2) * T.Reward(length_reward),
}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])


def counts_of(samples, where, size):
    c = torch.zeros(size, dtype=torch.float64)
    for s in samples:
        c[where[tuple(s.tokens)]] += 1
    return c


def tv_tolerance(probs: torch.Tensor, n_eff: float, z: float = 4.0) -> float:
    """z × the bound E[TV] ≤ ½ Σ_i sqrt(π_i(1−π_i)/n) on the TV of an n-sample histogram."""
    return z * 0.5 * float((probs * (1 - probs)).sqrt().sum()) / math.sqrt(n_eff)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_suffix_mh_matches_exact_target(engine, name):
    target = TARGETS[name]()
    proposal = Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal)
    res = S.SuffixMH(target, proposal, chains=4000, block_size=2, steps=30).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=3
    )
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected
    for s in res.samples[0][:200]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)
        assert math.isclose(s.log_weight, -math.log(4000), abs_tol=1e-6)


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("block_size", [1, 2])
def test_smc_matches_exact_target(engine, name, block_size):
    target = TARGETS[name]()
    proposal = Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal)
    res = S.SMC(target, proposal, particles=4000, block_size=block_size).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=5
    )
    samples = res.samples[0]
    w = torch.tensor([s.log_weight for s in samples]).exp()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-4)
    n_eff = 1.0 / float((w * w).sum())
    h = weighted_histogram(samples, ex.index(), len(ex.sequences))
    tol = tv_tolerance(ex.probs, n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol  # would reject the proposal's law
    for s in samples[:200]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)


@pytest.mark.parametrize("resampling", sorted(S.SCHEMES))
def test_smc_evidence_is_unbiased(engine, resampling):
    target = TARGETS["power2_reward"]()
    ex = exact(engine, target, PROMPT, MAX_NEW)
    reps = 400
    res = S.SMC(target, Q.Tempered(1.0), particles=8, ess_threshold=0.9, resampling=resampling).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=11
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    se = float(ratio.std()) / math.sqrt(reps)
    assert abs(float(ratio.mean()) - 1.0) < 3 * se + 1e-9
    assert any(any(r["resampled"]) for r in res.trace.of("step"))  # resampling really happened


def test_locally_optimal_power_smc_has_token_independent_weights(engine):
    """Power-SMC: with q ∝ p^α the increment is logsumexp_v α log p(v); Ẑ is unbiased."""
    ex = exact(engine, T.Power(3), PROMPT, MAX_NEW)
    reps = 300
    res = S.SMC(T.Power(3), Q.LocallyOptimal(), particles=4, ess_threshold=0.0).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=2
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    assert abs(float(ratio.mean()) - 1.0) < 3 * float(ratio.std()) / math.sqrt(reps) + 1e-9


@pytest.mark.parametrize("scheme", sorted(S.SCHEMES))
def test_resampling_schemes_are_unbiased(scheme):
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])
    g, n = 20000, 5
    idx = S.SCHEMES[scheme](gen, w.expand(g, n).contiguous(), n)
    assert idx.shape == (g, n) and int(idx.min()) >= 0 and int(idx.max()) < n
    copies = torch.nn.functional.one_hot(idx, n).sum(1).double()  # [G, N]
    se = copies.std(0) / math.sqrt(g)
    assert bool(((copies.mean(0) - n * w.double()).abs() <= 4 * se + 1e-3).all())


def test_anneal_and_rejuvenate_keep_smc_exact(engine):
    target = T.Power(3)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=Q.Tempered(1.0))
    res = S.SMC(target, Q.Tempered(1.0), particles=4000, ess_threshold=0.7, anneal=2, rejuvenate=2).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=9
    )
    w = torch.tensor([s.log_weight for s in res.samples[0]]).exp()
    h = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
    tol = tv_tolerance(ex.probs, 1.0 / float((w * w).sum()))
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert res.trace.of("move"), "rejuvenation moves ran"
    reps = 300
    res = S.SMC(target, Q.Tempered(1.0), particles=8, anneal=3).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=4
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    assert abs(float(ratio.mean()) - 1.0) < 3 * float(ratio.std()) / math.sqrt(reps) + 1e-9


def test_ancestral_samples_follow_the_proposal(engine):
    proposal = Q.Tempered(0.8, top_p=0.95)
    ex = exact(engine, None, PROMPT, MAX_NEW, proposal=proposal)
    res = S.Ancestral(proposal, n=3000).run(engine, [PROMPT, [3, 4]], max_new_tokens=MAX_NEW, seed=0)
    assert len(res.samples) == 2 and all(len(s) == 3000 for s in res.samples)
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.q_probs) > 1e-3
    assert res.log_evidence == [None, None]


def test_coupled_proposal_follows_q(engine):
    """A move's proposal, drawn coupled with the current suffix (keep x_j with probability
    q(x_j | x_<j), then draw y_j ≠ x_j), has exactly the law q(· | x_<i) for a fixed x and i."""
    from smcdecode.samplers.core import extend, make_problem, start_chains
    from smcdecode.samplers.kernels import propose

    n, proposal = 4000, Q.Tempered(1.0)
    problem = make_problem(engine, [PROMPT], None, proposal, n, MAX_NEW, seed=11)
    decoder, chains = start_chains(problem)
    extend(problem, decoder, chains, MAX_NEW)
    first = int(torch.nonzero(chains.length == MAX_NEW)[0])  # a current state with no EOS
    rows = torch.full((n,), first, dtype=torch.long)
    decoder.select(rows)
    chains = chains.index_select(rows)
    x = tuple(chains.tokens[0].tolist())
    ex = exact(engine, None, PROMPT, MAX_NEW, proposal=proposal)
    for i in (0, 1):
        prop, move = propose(problem, decoder, chains, MAX_NEW, index=torch.full((n,), i))
        keep = move.j
        decoder.restore_rows(torch.ones(n, dtype=torch.bool))
        assert bool((keep > i).any()) and bool((keep < MAX_NEW).any())  # both paths were taken
        cond = torch.tensor([float(q) if s[:i] == x[:i] else 0.0 for s, q in zip(ex.sequences, ex.q_probs)])
        cond = cond / cond.sum()
        samples = [tuple(t) for t in prop.token_lists()]
        c = torch.zeros(len(ex.sequences), dtype=torch.float64)
        for s in samples:
            c[ex.index()[s]] += 1
        assert chi2_pvalue(c, cond) > 1e-3
        # the stored log q are q's own, not those of the conditioned first draw
        for r in range(50):
            lq = float(prop.log_q[r, i : len(samples[r])].sum())
            assert math.isclose(lq, math.log(float(cond[ex.index()[samples[r]]])), abs_tol=1e-4)
        # power: without the conditioning y_j ≠ x_j the law of "y = x_≥i" would be q(2 − q) per token
        p_same = float(cond[ex.index()[x]])
        frac_same = sum(s == x for s in samples) / n
        assert abs(frac_same - p_same) < 4 * math.sqrt(p_same * (1 - p_same) / n)


def test_mh_move_costs_regenerated_tokens_and_no_prefill(engine):
    """With one block (horizon = max_new_tokens) a move that leaves x at j = i + reused feeds
    exactly |x'| − j tokens (x_{j−1} fed again, then y except its final token), none when it never
    leaves x; the initial extension feeds |x0| − 1; no prefill."""
    engine.reset_counters()
    prompts = [PROMPT, [3, 1, 4]]
    res = S.SuffixMH(T.Power(2), Q.Tempered(1.0), chains=3, block_size=MAX_NEW, steps=6).run(
        engine, prompts, max_new_tokens=MAX_NEW, seed=1
    )
    moves = res.trace.of("move")
    assert len(moves) == 6 and all(len(m["accepted"]) == 6 for m in moves)
    regenerated = sum(n - i - r for m in moves for n, i, r in zip(m["new_length"], m["i"], m["reused"], strict=True))
    reused = [r for m in moves for r in m["reused"]]
    assert min(reused) >= 0 and sum(reused) > 0
    (extension,) = res.trace.of("extend")
    assert extension["old_length"] == [0] * 6 and all(n >= 1 for n in extension["new_length"])
    first_draw = sum(n - 1 for n in extension["new_length"])
    c = res.counters
    assert c["prefill_tokens"] == len(PROMPT) + 3  # each prompt prefilled once, its chains share it
    assert c["decode_tokens"] == first_draw + regenerated


def test_suffix_mh_drops_finished_chains_and_returns_rows_in_order(engine):
    """Finished chains leave the batch; every sample still belongs to its own prompt (its log p
    and its prompt-dependent reward are those of that prompt)."""

    def by_prompt(prompt, continuation):
        return 0.4 * len(continuation) * (1.0 if prompt[0] == 1 else -1.0)

    target = T.Power(2) * T.Reward(by_prompt)
    prompts = [PROMPT, [3, 1, 4]]
    res = S.SuffixMH(target, Q.Tempered(1.0), chains=40, block_size=1, steps=4).run(
        engine, prompts, max_new_tokens=MAX_NEW, seed=2
    )
    sizes = [r["rows"] for r in res.trace.of("shrink")]
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[0] < 80
    for k, p in enumerate(prompts):
        ex = exact(engine, target, p, MAX_NEW)
        assert len(res.samples[k]) == 40
        for s in res.samples[k]:
            i = ex.index()[tuple(s.tokens)]
            assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
            assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)


def test_rejuvenation_under_annealing_proposes_with_the_annealed_q(engine):
    """With q ∝ φ^α_t (LocallyOptimal under anneal) a rejuvenation move must propose token t with
    the α_t it was first drawn with, or its reverse proposal is wrong; with that fixed SMC is exact
    (drawing every token with the final α instead leaves a TV of ~0.017 here, above the bound)."""
    target = T.Power(3)
    ex = exact(engine, target, PROMPT, MAX_NEW)
    sampler = S.SMC(target, Q.LocallyOptimal(), particles=16000, ess_threshold=1.0, anneal=3, rejuvenate=3)
    res = sampler.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=0)
    w = torch.tensor([s.log_weight for s in res.samples[0]]).exp()
    h = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
    assert res.trace.of("move")
    assert 0.5 * float((h - ex.probs).abs().sum()) < tv_tolerance(ex.probs, 1.0 / float((w * w).sum()))


def test_same_seed_same_samples(engine):
    sampler = S.SMC(T.Power(2), Q.Tempered(1.0), particles=6, rejuvenate=1)
    a = sampler.run(engine, [PROMPT, [4]], max_new_tokens=MAX_NEW, seed=7)
    b = sampler.run(engine, [PROMPT, [4]], max_new_tokens=MAX_NEW, seed=7)
    assert [[s.tokens for s in p] for p in a.samples] == [[s.tokens for s in p] for p in b.samples]
    assert a.log_evidence == b.log_evidence


def test_sampler_argument_errors(engine):
    with pytest.raises(ArgumentError, match="resampling"):
        S.SMC(T.Power(2), Q.Tempered(), resampling="bogus")
    with pytest.raises(ArgumentError, match="particles"):
        S.SMC(T.Power(2), Q.Tempered(), particles=0)
    with pytest.raises(ArgumentError, match="anneal"):
        S.SMC(T.LM(), Q.Tempered(), anneal=3).run(engine, [PROMPT], max_new_tokens=2)
    with pytest.raises(ArgumentError, match="max_new_tokens"):
        S.Ancestral(Q.Tempered()).run(engine, [PROMPT], max_new_tokens=0)
    with pytest.raises(ArgumentError, match="max_new_tokens"):
        S.Ancestral(Q.Tempered()).run(engine, [PROMPT], max_new_tokens=100)
    with pytest.raises(ArgumentError, match="chains"):
        S.SuffixMH(T.Power(2), Q.Tempered(), chains=0)


def suffix_mh_kernel(ex, drop_length_term: bool = False) -> torch.Tensor:
    """The exact one-move transition matrix K[x, x'] of suffix MH at horizon = max_new_tokens,
    built by enumeration with the sampler's own acceptance function."""
    from smcdecode.samplers.kernels import mh_log_accept

    seqs, tq = ex.sequences, ex.token_log_q
    m = len(seqs)
    kernel = torch.zeros(m, m, dtype=torch.float64)
    for a, x in enumerate(seqs):
        for i in range(len(x)):
            for z, y in enumerate(seqs):
                if y[:i] != x[:i]:
                    continue
                lq_old, lq_new = sum(tq[a][i:]), sum(tq[z][i:])
                log_a = mh_log_accept(
                    ex.log_target[z : z + 1],
                    ex.log_target[a : a + 1],
                    torch.tensor([lq_old]),
                    torch.tensor([lq_new], dtype=torch.float64),
                    torch.tensor([len(x)]),
                    torch.tensor([len(y)]),
                ).double()
                if drop_length_term:
                    log_a = log_a - math.log(len(x)) + math.log(len(y))
                move = math.exp(lq_new) / len(x) * min(1.0, math.exp(float(log_a)))
                kernel[a, z] += move
                kernel[a, a] += math.exp(lq_new) / len(x) - move
    return kernel


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_suffix_mh_kernel_leaves_the_target_exactly_invariant(engine, name):
    ex = exact(engine, TARGETS[name](), PROMPT, MAX_NEW, proposal=Q.Tempered(1.0))
    kernel = suffix_mh_kernel(ex)
    torch.testing.assert_close(kernel.sum(1), torch.ones(len(ex.sequences), dtype=torch.float64))
    pi = ex.probs
    assert float((pi @ kernel - pi).abs().max()) < 1e-6  # float32 forward: q sums to 1 within ~1e-7
    # without the index-selection term log|x| − log|x'| (the reference code) π is not invariant
    biased = suffix_mh_kernel(ex, drop_length_term=True)
    assert float((pi @ biased - pi).abs().sum()) > 1e-4  # 100x the float error above


def test_rejuvenation_move_targets_the_twisted_intermediate_target(engine):
    """SMC's rejuvenation moves leave its intermediate target p^α·exp(α ψ(x_≤t)) invariant, so an
    unfinished proposal carries its prefix twist exactly as the current particle does; after the
    move every particle's stored ψ is its own prefix's twist (the next weight increment divides
    by it). A proposal scored with ψ = 0 (the bug this guards) leaves accepted rows at 0."""
    from smcdecode.samplers.core import extend, make_problem, start_chains
    from smcdecode.samplers.kernels import mh_move

    def r(prompt, continuation):
        return 1.0 + 0.8 * sum(1 for t in continuation if t == 2)

    n = 64
    problem = make_problem(engine, [PROMPT], T.Power(2) * T.Reward(r, prefix=True), Q.Tempered(1.0), n, MAX_NEW, seed=5)
    decoder, chains = start_chains(problem)
    extend(problem, decoder, chains, 2)
    partial = ~problem.complete(chains)
    assert bool(partial.any())
    problem.update_psi(chains, partial, partial_ok=True)
    moved, info = mh_move(problem, decoder, chains, 2, partial_ok=True)
    assert bool((info.accepted & ~problem.complete(moved)).any())  # accepted unfinished proposals exist
    for row, toks in enumerate(moved.token_lists()):
        if not bool(problem.complete(moved)[row]):
            assert float(moved.log_psi[row]) == pytest.approx(r(PROMPT, toks))


def test_prefix_reward_twist_keeps_smc_exact_and_unbiased(engine):
    """Reward(prefix=True): r on partial sequences is a twist at block boundaries, replaced by
    the final value at completion, so the target (and Z) are those of the plain reward."""

    def r(prompt, continuation):
        return 0.8 * sum(1 for t in continuation if t == 2) - 0.3 * len(continuation)

    twisted = T.Power(2) * T.Reward(r, prefix=True)
    plain = T.Power(2) * T.Reward(r)
    ex = exact(engine, plain, PROMPT, MAX_NEW, proposal=Q.Tempered(1.0))
    torch.testing.assert_close(exact(engine, twisted, PROMPT, MAX_NEW).log_target, ex.log_target)
    res = S.SMC(twisted, Q.Tempered(1.0), particles=4000, ess_threshold=0.7).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=8
    )
    w = torch.tensor([s.log_weight for s in res.samples[0]]).exp()
    h = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
    assert 0.5 * float((h - ex.probs).abs().sum()) < tv_tolerance(ex.probs, 1.0 / float((w * w).sum()))
    reps = 300
    res = S.SMC(twisted, Q.Tempered(1.0), particles=8, ess_threshold=0.9).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=3
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    assert abs(float(ratio.mean()) - 1.0) < 3 * float(ratio.std()) / math.sqrt(reps) + 1e-9


def test_smc_steps_up_to_a_delimiter_are_exact():
    from smcdecode.testing import CharTokenizer

    eng = Engine(tiny_llama(vocab=5, layers=2, seed=1), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])
    target = T.Power(3)
    ex = exact(eng, target, PROMPT, MAX_NEW, proposal=Q.Tempered(1.0))
    res = S.SMC(target, Q.Tempered(1.0), particles=4000, delimiter="b", ess_threshold=0.8).run(
        eng, [PROMPT], max_new_tokens=MAX_NEW, seed=6
    )
    steps = res.trace.of("step")
    assert len(steps) >= 2  # the delimiter 'b' (id 2) split generation into several steps
    w = torch.tensor([s.log_weight for s in res.samples[0]]).exp()
    h = weighted_histogram(res.samples[0], ex.index(), len(ex.sequences))
    assert 0.5 * float((h - ex.probs).abs().sum()) < tv_tolerance(ex.probs, 1.0 / float((w * w).sum()))
