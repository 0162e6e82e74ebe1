"""Samplers on the stopped sequence space, against the exact enumerated target.

The toy model's vocabulary {0 = EOS, 1, 2, 3, 4} gets a stop token set ({3}), a two-token stop
sequence ([1, 2]) and, through a made-up byte table, a stop *string* "ab" that spans two tokens
("a" + "b") or sits inside one ("ab"). A continuation ends at EOS, at the first completion of a
pattern, or at max_new_tokens; π and q are both defined on that space.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from smcdecode import Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.stopping import StopSet
from smcdecode.testing import chi2_pvalue, continuations, exact, tiny_llama, weighted_histogram

PROMPT = [1, 2]
MAX_NEW = 3
VOCAB_BYTES = [b"", b"a", b"b", b"ab", b"c"]


def length_reward(prompt, continuation):
    return 0.5 * len(continuation) - (1.0 if continuation and continuation[-1] == 4 else 0.0)


TARGETS = {
    "power3": lambda: T.Power(3),
    "contrast": lambda: T.LayerContrast(layer=1, beta=-0.5) ** 2,
    "power2_reward": lambda: T.Power(2) * T.Reward(length_reward),
}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])


STOPS = {
    "ids": lambda: StopSet.build([[3], [1, 2]], 5),
    "string": lambda: StopSet.build(["ab"], 5, vocab_bytes=VOCAB_BYTES),
}


def _first_end(seq, stop):
    """Reference: where a sequence of the unstopped space would end on the stopped one."""
    for t, v in enumerate(seq):
        if v == 0 or stop.first_stop(seq[: t + 1]) == t:
            return t + 1
    return len(seq)


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_stopped_space_is_the_unstopped_space_cut_at_the_first_end(engine, kind):
    stop = STOPS[kind]()
    seqs = set(continuations(engine, MAX_NEW, stop))
    cut = {tuple(s[: _first_end(s, stop)]) for s in itertools.product(range(1, 5), repeat=MAX_NEW)}
    full = set(continuations(engine, MAX_NEW))
    cut |= {tuple(s[: _first_end(s, stop)]) for s in full}
    assert seqs == cut
    assert len(seqs) < len(full)  # the patterns do stop sequences early
    ex = exact(engine, None, PROMPT, MAX_NEW, stop=stop)
    assert math.isclose(float(ex.log_p.exp().sum()), 1.0, rel_tol=1e-6)  # p is a distribution on it


def counts_of(samples, where, size):
    c = torch.zeros(size, dtype=torch.float64)
    for s in samples:
        c[where[tuple(s.tokens)]] += 1  # KeyError: a sample outside the stopped space
    return c


def _check_scalars(samples, ex):
    for s in samples[:200]:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)


CASES = [("power3", "ids"), ("contrast", "string"), ("power2_reward", "string")]


@pytest.mark.parametrize("name, kind", CASES)
def test_suffix_mh_on_the_stopped_space(engine, name, kind):
    target, stop = TARGETS[name](), STOPS[kind]()
    proposal = Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal, stop=stop)
    res = S.SuffixMH(target, proposal, chains=3000, block_size=2, steps=20).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=3, stop=stop
    )
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected
    _check_scalars(res.samples[0], ex)


@pytest.mark.parametrize("name, kind", CASES)
def test_smc_on_the_stopped_space_and_its_evidence(engine, name, kind):
    target, stop = TARGETS[name](), STOPS[kind]()
    proposal = Q.Tempered(1.0)
    ex = exact(engine, target, PROMPT, MAX_NEW, proposal=proposal, stop=stop)
    res = S.SMC(target, proposal, particles=3000, ess_threshold=0.5, rejuvenate=1).run(
        engine, [PROMPT], max_new_tokens=MAX_NEW, seed=5, stop=stop
    )
    samples = res.samples[0]
    w = torch.tensor([s.log_weight for s in samples]).exp()
    n_eff = 1.0 / float((w * w).sum())
    h = weighted_histogram(samples, ex.index(), len(ex.sequences))
    tol = 4.0 * 0.5 * float((ex.probs * (1 - ex.probs)).sqrt().sum()) / math.sqrt(n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol
    _check_scalars(samples, ex)
    # log Ẑ is unbiased for the stopped space's Z: 300 independent 8-particle runs
    reps = 300
    res = S.SMC(target, proposal, particles=8, ess_threshold=0.9).run(
        engine, [PROMPT] * reps, max_new_tokens=MAX_NEW, seed=11, stop=stop
    )
    ratio = torch.tensor(res.log_evidence, dtype=torch.float64).sub(ex.log_z).exp()
    assert abs(float(ratio.mean()) - 1.0) < 3 * float(ratio.std()) / math.sqrt(reps) + 1e-9


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_ancestral_follows_q_on_the_stopped_space(engine, kind):
    stop = STOPS[kind]()
    proposal = Q.Tempered(0.7)
    ex = exact(engine, None, PROMPT, MAX_NEW, proposal=proposal, stop=stop)
    res = S.Ancestral(proposal, n=4000).run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=1, stop=stop)
    c = counts_of(res.samples[0], ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.q_probs) > 1e-3
    for s in res.samples[0][:200]:
        assert math.isclose(s.log_q, float(ex.log_q[ex.index()[tuple(s.tokens)]]), abs_tol=1e-4)


def test_stop_argument_is_checked(engine):
    from smcdecode.errors import ArgumentError, ArgumentTypeError

    sampler = S.Ancestral(Q.Tempered(1.0))
    with pytest.raises(ArgumentError, match="tokenizer"):
        sampler.run(engine, [PROMPT], max_new_tokens=2, stop=["ab"])  # no tokenizer on the toy engine
    with pytest.raises(ArgumentTypeError, match="stop"):
        sampler.run(engine, [PROMPT], max_new_tokens=2, stop="ab")
