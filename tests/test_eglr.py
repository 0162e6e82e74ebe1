"""EGLR latent recursion, the rollout pool and the entropy-gated β schedule."""

from __future__ import annotations

import math

import pytest
import torch

from smcdecode import ArgumentError, Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.readouts import HIDDEN, Layer, Readouts
from smcdecode.testing import check_proposal, chi2_pvalue, exact, tiny_gpt2, tiny_llama

PROMPT = [1, 2]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=3, seed=1), eos_token_ids=[0])


def live_view(engine, prompts, tokens):
    """Prefill + one decode with hidden states, and the recur handle bound to the live cache."""
    batch, _ = engine.prefill(prompts, [HIDDEN])
    view = engine.decode(batch, torch.tensor(tokens))
    view.recur = lambda h, span: engine.reapply(batch, h, span, batch.lengths - 1)
    return batch, view


def test_recursion_leaves_the_kv_cache_exactly_as_a_plain_forward(engine):
    batch, view = live_view(engine, [[1, 2, 3], [4, 2]], [3, 1])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in batch.state.cache.layers]
    valid, lengths = batch.state.rows.valid.clone(), batch.lengths.clone()
    Q.EGLR(span=2, max_iters=4, entropy_threshold=-1.0, tol=1e-9).log_q(view, lambda v: None)
    for (k, v), layer in zip(before, batch.state.cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    assert torch.equal(valid, batch.state.rows.valid) and torch.equal(lengths, batch.lengths)
    plain, _ = engine.prefill([[1, 2, 3, 3], [4, 2, 1]])  # and decoding continues as without recursion
    r1 = engine.decode(batch, torch.tensor([2, 2]))
    r2 = engine.decode(plain, torch.tensor([2, 2]))
    torch.testing.assert_close(r1.log_p, r2.log_p, atol=1e-5, rtol=0)


def test_max_iters_zero_is_tempered_exactly(engine):
    _, view = live_view(engine, [[1, 2, 3], [4, 2]], [3, 1])
    a = Q.EGLR(span=2, max_iters=0, entropy_threshold=-1.0, temperature=0.7).log_q(view, lambda v: None)
    b = Q.Tempered(0.7).log_q(view, lambda v: None)
    assert torch.equal(a, b)


def test_recursion_triggers_only_above_the_threshold(engine):
    _, view = live_view(engine, [[1, 2, 3], [4, 2], [3, 3, 3]], [3, 1, 4])
    h = Q.entropy(view.log_p)
    threshold = float(h.median())
    p = Q.EGLR(span=2, max_iters=3, entropy_threshold=threshold, tol=1e-9)
    rec, iters, gated = p.recursed_log_p(view)
    assert torch.equal(gated, h > threshold)
    assert bool((iters[~gated] == 0).all()) and bool((iters[gated] >= 1).all())
    torch.testing.assert_close(rec[~gated], view.log_p[~gated])
    assert float((rec[gated] - view.log_p[gated]).abs().max()) > 1e-4  # recursion changed them


def test_one_iteration_by_hand(engine):
    """One re-application of the top 2 layers, recomputed without any cache: layer li runs over
    the first pass's inputs to li at earlier positions and the recursed state at the last one."""
    seq = [1, 2, 3, 3]
    _, view = live_view(engine, [seq[:-1]], [seq[-1]])
    h_rec, lp_rec = view.recur(view[HIDDEN], 2)
    model, n = engine.model, engine.num_layers
    with torch.no_grad():
        inputs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states  # [k] = input to layer k
        pos = torch.arange(len(seq))[None]
        mask = torch.full((len(seq), len(seq)), float("-inf")).triu(1)[None, None]
        h = view[HIDDEN][0]
        for li in range(n - 2, n):
            x = inputs[li].clone()
            x[0, -1] = h
            emb = model.model.rotary_emb(x, position_ids=pos)
            y = model.model.layers[li](x, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            h = (y[0] if isinstance(y, tuple) else y)[0, -1]
        want = torch.log_softmax(model.lm_head(model.model.norm(h)), -1)
    torch.testing.assert_close(h_rec[0], h, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp_rec[0], want, atol=1e-5, rtol=0)


def test_eglr_log_q_is_the_distribution_sampled_from(engine):
    p = Q.EGLR(span=2, max_iters=3, entropy_threshold=0.0, tol=1e-4, temperature=0.9)
    ex = exact(engine, None, PROMPT, 3, proposal=p)
    base = exact(engine, None, PROMPT, 3, proposal=Q.Tempered(0.9))
    assert float((ex.q_probs - base.q_probs).abs().max()) > 1e-3  # recursion matters here
    check_proposal(engine, p, None, PROMPT, 3, n=3000)  # stored log q == exact, samples follow q


def test_suffix_mh_with_eglr_proposal_targets_power2_exactly(engine):
    target = T.Power(2)
    p = Q.EGLR(span=2, max_iters=2, entropy_threshold=0.0, tol=1e-4)
    ex = exact(engine, target, PROMPT, 3, proposal=p)
    res = S.SuffixMH(target, p, chains=3000, block_size=3, steps=25).run(engine, [PROMPT], max_new_tokens=3, seed=2)
    counts = torch.zeros(len(ex.sequences), dtype=torch.float64)
    for s in res.samples[0]:
        counts[ex.index()[tuple(s.tokens)]] += 1
    assert chi2_pvalue(counts, ex.probs) > 1e-3
    assert chi2_pvalue(counts, ex.q_probs) < 1e-6


def test_entropy_gate_beta_by_hand():
    gate = T.EntropyGate(threshold=1.0, above=-0.5, below=0.25)
    sharp = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    flat = torch.log(torch.full((4,), 0.25))  # H = log 4 = 1.386 > 1
    beta = gate(torch.stack([sharp, flat]))
    torch.testing.assert_close(beta, torch.tensor([[0.25], [-0.5]]))
    p_l = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    view = Readouts(torch.stack([sharp, flat]), {Layer(1): torch.stack([p_l, p_l])})
    f = T.LayerContrast(layer=1, beta=gate).token_log_factor(view)
    for row, b in ((0, 0.25), (1, -0.5)):
        g = (1 - b) * view.log_p[row] + b * p_l
        torch.testing.assert_close(f[row], torch.log_softmax(g, -1))


def test_entropy_gated_contrast_is_exact_under_mh(engine):
    target = T.LayerContrast(layer=1, beta=T.EntropyGate(0.5, above=-0.7, below=0.3)) ** 2
    ex = exact(engine, target, PROMPT, 3, proposal=Q.Tempered(1.0))
    res = S.SuffixMH(target, Q.Tempered(1.0), chains=3000, block_size=3, steps=25).run(
        engine, [PROMPT], max_new_tokens=3, seed=4
    )
    counts = torch.zeros(len(ex.sequences), dtype=torch.float64)
    for s in res.samples[0]:
        counts[ex.index()[tuple(s.tokens)]] += 1
    assert chi2_pvalue(counts, ex.probs) > 1e-3


def test_rollout_pool_labels_every_cell(engine):
    pool = S.RolloutPool(spans=[0, 1, 2], temperatures=[0.5, 1.0], per_cell=3, entropy_threshold=0.0)
    res = pool.run(engine, [PROMPT, [4]], max_new_tokens=3, seed=0)
    assert [len(p) for p in res.samples] == [18, 18]
    cells = {(s.meta["span"], s.meta["temperature"]) for s in res.samples[0]}
    assert cells == {(a, b) for a in (0, 1, 2) for b in (0.5, 1.0)}
    assert all(math.isclose(s.log_weight, -math.log(18)) for s in res.samples[0])


def test_eglr_errors(engine):
    with pytest.raises(ArgumentError, match="span"):
        Q.EGLR(span=0)
    with pytest.raises(ArgumentError, match="span"):
        S.Ancestral(Q.EGLR(span=9)).run(engine, [PROMPT], max_new_tokens=2)
    gpt2 = Engine(tiny_gpt2(), eos_token_ids=[0])
    with pytest.raises(TypeError, match="Llama-style"):
        S.Ancestral(Q.EGLR(span=1, entropy_threshold=-1.0)).run(gpt2, [PROMPT], max_new_tokens=2)
