"""Continuous batching (samplers/stream.py): a problem's samples do not depend on the problems
sharing its batch, the law is still the exact target, and each problem's work is its own."""

from __future__ import annotations

import pytest
import torch

from smcdecode import ArgumentError, Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.testing import chi2_pvalue, exact, tiny_llama

MAX_NEW = 3


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])


SAMPLERS = {
    "ancestral": lambda: S.Ancestral(Q.Tempered(1.0), n=2),
    "mh": lambda: S.SuffixMH(T.Power(2), Q.Tempered(1.0), chains=2, block_size=2, steps=3),
    "mh_contrast": lambda: S.SuffixMH(T.LayerContrast(layer=1, beta=-0.5) ** 2, Q.Tempered(1.0), chains=2, steps=2),
}
# prompts of different lengths, so admissions change the batch's width and the rows' positions
PROMPTS = {"a": [1, 2], "b": [3], "c": [4, 1, 2, 3], "d": [2, 2], "e": [1]}


def run(sampler, engine, keys, in_flight, max_new=MAX_NEW, stop=None):
    problems = [(k, PROMPTS[k], 100 + ord(k)) for k in keys]
    out = list(sampler.stream(engine, problems, in_flight=in_flight, max_new_tokens=max_new, stop=stop))
    return {f.key: f for f in out}, [f.key for f in out]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_do_not_depend_on_the_batch(engine, name):
    """Same seed, same samples: alone, or admitted into rows another problem freed, among others."""
    sampler = SAMPLERS[name]()
    alone = {k: run(sampler, engine, [k], 1)[0][k] for k in PROMPTS}
    together, order = run(sampler, engine, list(PROMPTS), 2)
    assert sorted(order) == sorted(PROMPTS)  # each problem exactly once
    for k in PROMPTS:
        assert [s.tokens for s in together[k].samples] == [s.tokens for s in alone[k].samples], k
        assert together[k].decode_tokens == alone[k].decode_tokens
    # with stop patterns too (the automaton state is per row)
    stop = [[3, 4], [2]]
    alone = run(sampler, engine, ["c"], 1, stop=stop)[0]["c"]
    together = run(sampler, engine, ["a", "b", "c", "d"], 3, stop=stop)[0]["c"]
    assert [s.tokens for s in together.samples] == [s.tokens for s in alone.samples]


def test_ancestral_decode_tokens_are_the_problems_own(engine):
    """Every generated token is fed once, except a sample's last (it ends the sample or hits the
    horizon), so a problem's decode work is Σ (|x| − 1) over its samples."""
    fin, _ = run(S.Ancestral(Q.Tempered(1.0), n=3), engine, list(PROMPTS), 2)
    for k, f in fin.items():
        assert f.decode_tokens == sum(len(s.tokens) - 1 for s in f.samples), k
        assert f.prefill_tokens == len(PROMPTS[k])


def test_streamed_suffix_mh_matches_the_exact_target(engine):
    """300 problems on one prompt, 10 chains each, 40 in flight: nearly every problem enters the
    batch by admission into freed rows; the pooled samples follow the exact π."""
    target, proposal = T.Power(3), Q.Tempered(1.0)
    ex = exact(engine, target, [1, 2], MAX_NEW, proposal=proposal)
    sampler = S.SuffixMH(target, proposal, chains=10, block_size=2, steps=20)
    problems = [(i, [1, 2], i) for i in range(300)]
    where = ex.index()
    c = torch.zeros(len(ex.sequences), dtype=torch.float64)
    n = 0
    for f in sampler.stream(engine, problems, in_flight=40, max_new_tokens=MAX_NEW):
        for s in f.samples:
            c[where[tuple(s.tokens)]] += 1
        n += 1
    assert n == 300
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected


def test_stream_rejects_bad_arguments(engine):
    sampler = S.Ancestral(Q.Tempered(1.0))
    with pytest.raises(ArgumentError, match="in_flight"):
        list(sampler.stream(engine, [("a", [1], 0)], in_flight=0, max_new_tokens=2))
    with pytest.raises(ArgumentError, match="max_new_tokens"):
        list(sampler.stream(engine, [("a", [1], 0)], in_flight=1, max_new_tokens=10_000))
    assert list(sampler.stream(engine, [], in_flight=2, max_new_tokens=2)) == []


def test_a_finished_problems_rows_take_the_next_problem_at_once(engine):
    """On the CPU the loop checks for finished problems after every forward: with one problem in
    flight, the forwards are each problem's prefill plus at most one per generated token (a check
    every 8 forwards left the row idle for up to 7 forwards per problem: 45 forwards here)."""
    problems = [(k, PROMPTS[k], 100 + ord(k)) for k in PROMPTS]
    engine.reset_counters()
    fin = list(S.Ancestral(Q.Tempered(1.0), n=1).stream(engine, problems, in_flight=1, max_new_tokens=20))
    generated = sum(len(f.samples[0].tokens) for f in fin)
    assert engine.counters["forwards"] <= len(problems) + generated
