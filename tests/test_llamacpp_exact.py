"""Exactness by enumeration on the llama.cpp backend: the toy model of the HF-backend
exactness tests (tiny_llama(vocab=5, layers=2, seed=1)) written to GGUF, with the exact target
enumerated on the llama.cpp backend itself (and checked once against the HF engine's).

llama.cpp has at most 256 sequence ids and every row, every row's MH snapshot and every fork row
holds one, so instead of one run of thousands of chains each test pools many independent runs of
at most ~100 rows with different seeds: MH chains are concatenated (χ² test); SMC runs are
pooled as independent islands, each run's normalised weights multiplied by its Ẑ (Σ_r Ẑ_r·h_r /
Σ_r Ẑ_r is consistent as the number of runs grows, whatever the particles per run), and the TV
tolerance comes from the pooled weights' effective sample size. Every distribution test also
shows it would reject the proposal's own law. Fixed seeds; tolerances derived from sample size.
Targets that need layers (LayerContrast) are refused by llama.cpp: not tested here.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from smcdecode import Engine  # noqa: E402
from smcdecode import proposals as Q  # noqa: E402
from smcdecode import samplers as S  # noqa: E402
from smcdecode import targets as T  # noqa: E402
from smcdecode.backends.llamacpp import LlamaCppBackend  # noqa: E402
from smcdecode.stopping import StopSet  # noqa: E402
from smcdecode.testing import chi2_pvalue, exact, tiny_llama  # noqa: E402
from smcdecode.tiny_gguf import write_llama_gguf  # noqa: E402

PROMPT = [1, 2]
MAX_NEW = 3
ALPHA = 3.0
# id 0 = EOS, 1 = BOS (control tokens: no text), then "a", "b" and "ab": the stop string "ab"
# spans two tokens or sits inside one (as the HF tests' made-up byte table)
ALPHABET = ["</s>", "<s>", "a", "b", "ab"]
VOCAB_BYTES = [b"", b"", b"a", b"b", b"ab"]
N_SEQ_MAX = 256  # llama.cpp's limit


def length_reward(prompt, continuation):
    return 0.7 * len(continuation) - (1.0 if continuation and continuation[-1] == 3 else 0.0)


TARGETS = {
    "power3": lambda: T.Power(ALPHA),
    "power2_reward": lambda: T.Power(2) * T.Reward(length_reward),
}

# "string" is resolved by the llama.cpp tokenizer (the sampler's stop=["ab"]); "ids" needs none
STOPS = {"none": None, "ids": [[3], [1, 2]], "string": ["ab"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=5, layers=2, seed=1)


@pytest.fixture(scope="module")
def path(model, tmp_path_factory):
    return write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny5.gguf", tokenizer_alphabet=ALPHABET)


@pytest.fixture(scope="module")
def llama(path):
    """Two backends on the same GGUF: ``"ids"`` without its tokenizer (rewards and stops see token
    ids, as on the HF engine), ``"text"`` with it (stop strings go through llama.cpp's vocabulary)."""
    ids = LlamaCppBackend(path, kv_type="f32", n_ctx=1024, n_seq_max=N_SEQ_MAX, n_threads=1)
    ids.tokenizer = None
    text = LlamaCppBackend(path, kv_type="f32", n_ctx=1024, n_seq_max=N_SEQ_MAX, n_threads=1)
    # a KV stream per sequence id (copies move data): 256 cells each, the least llama.cpp gives
    split = LlamaCppBackend(
        path, kv_type="f32", n_ctx=256 * N_SEQ_MAX, n_seq_max=N_SEQ_MAX, n_threads=1, kv_unified=False
    )
    split.tokenizer = None
    yield {"ids": ids, "text": text, "split": split, "exact": {}}
    ids.close()
    text.close()
    split.close()


def backend_for(llama, stop):
    return llama["text" if stop == "string" else "ids"]


def exact_llama(llama, name, stop, proposal=None):
    """The exact enumerated target on the llama.cpp backend (computed once per case)."""
    cache, key = llama["exact"], (name, stop, repr(proposal))
    if key not in cache:
        eng = backend_for(llama, stop)
        cache[key] = exact(eng, TARGETS[name](), PROMPT, MAX_NEW, proposal=proposal, stop=STOPS[stop])
    return cache[key]


def counts_of(samples, where, size):
    c = torch.zeros(size, dtype=torch.float64)
    for s in samples:
        c[where[tuple(s.tokens)]] += 1  # KeyError: a sample outside the (stopped) space
    return c


def check_scalars(samples, ex, log_q=False):
    for s in samples:
        i = ex.index()[tuple(s.tokens)]
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=1e-4)
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=1e-4)
        if log_q:
            assert math.isclose(s.log_q, float(ex.log_q[i]), abs_tol=1e-4)


def tv_tolerance(probs: torch.Tensor, n_eff: float, z: float = 4.0) -> float:
    """z × the bound E[TV] ≤ ½ Σ_i sqrt(π_i(1−π_i)/n) on the TV of an n-sample histogram."""
    return z * 0.5 * float((probs * (1 - probs)).sqrt().sum()) / math.sqrt(n_eff)


def pooled_chains(sampler, engine, runs, prompts, seed, stop=None):
    """The chains of ``runs`` independent runs (seeds seed, seed+1, ...), every prompt's pooled,
    and the traces of the moves."""
    samples, moves = [], []
    for r in range(runs):
        res = sampler.run(engine, prompts, max_new_tokens=MAX_NEW, seed=seed + r, stop=stop)
        assert len(res.samples) == len(prompts)
        for group in res.samples:
            samples += group
        moves += res.trace.of("move")
    return samples, moves


def pooled_smc(sampler, engine, runs, seed, ex, stop=None):
    """Independent SMC runs on one prompt pooled as islands: particle i of run r weighs
    w_ri · Ẑ_r / Σ_s Ẑ_s. Returns (pooled histogram, its ESS, all samples, the results)."""
    h = torch.zeros(len(ex.sequences), dtype=torch.float64)
    log_z, hists, samples, results = [], [], [], []
    sq = []
    for r in range(runs):
        res = sampler.run(engine, [PROMPT], max_new_tokens=MAX_NEW, seed=seed + r, stop=stop)
        w = torch.tensor([s.log_weight for s in res.samples[0]], dtype=torch.float64).exp()
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-4)
        hr = torch.zeros_like(h)
        for s, wi in zip(res.samples[0], w.tolist()):
            hr[ex.index()[tuple(s.tokens)]] += wi
        log_z.append(float(res.log_evidence[0]))
        hists.append(hr)
        sq.append(float((w * w).sum()))
        samples += res.samples[0]
        results.append(res)
    island = torch.softmax(torch.tensor(log_z, dtype=torch.float64), 0)  # Ẑ_r / Σ Ẑ
    for a, hr in zip(island.tolist(), hists):
        h += a * hr
    n_eff = 1.0 / sum(a * a * s for a, s in zip(island.tolist(), sq))
    return h, n_eff, samples, results


def evidence_ratios(sampler, engine, ex, runs, copies, seed, stop=None):
    """Ẑ/Z of ``runs`` × ``copies`` independent SMC replicates (``copies`` prompts per run)."""
    ratios, resampled = [], False
    for r in range(runs):
        res = sampler.run(engine, [PROMPT] * copies, max_new_tokens=MAX_NEW, seed=seed + r, stop=stop)
        ratios += res.log_evidence
        resampled = resampled or any(any(t["resampled"]) for t in res.trace.of("step"))
    assert resampled, "resampling really happened"
    return torch.tensor(ratios, dtype=torch.float64).sub(ex.log_z).exp()


# ----------------------------------------------------------------------------- the exact target


@pytest.mark.parametrize("name, stop", [("power3", "none"), ("power2_reward", "ids"), ("power3", "string")])
def test_exact_target_matches_the_hf_engine(llama, model, name, stop):
    """The enumeration on llama.cpp (its stop string resolved by the GGUF's own vocabulary) has
    the HF engine's sequence space, log π, log p and log q (Tempered) to 1e-4."""
    hf = Engine(model, eos_token_ids=[0])
    hf_stop = StopSet.build(["ab"], 5, vocab_bytes=VOCAB_BYTES) if stop == "string" else STOPS[stop]
    proposal = Q.Tempered(0.8)
    a = exact(hf, TARGETS[name](), PROMPT, MAX_NEW, proposal=proposal, stop=hf_stop)
    b = exact_llama(llama, name, stop, proposal=proposal)
    assert b.sequences == a.sequences
    if stop == "string":  # the string stops inside the token "ab" and across "a" + "b"
        assert (4,) in b.sequences and (2, 3) in b.sequences
    assert float((b.log_target - a.log_target).abs().max()) < 1e-4
    assert float((b.log_p - a.log_p).abs().max()) < 1e-4
    assert float((b.log_q - a.log_q).abs().max()) < 1e-4
    assert math.isclose(float(b.log_p.exp().sum()), 1.0, rel_tol=1e-5)


# ----------------------------------------------------------------------------- suffix MH


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_suffix_mh_matches_exact_target(llama, name):
    """3000 chains: 30 runs of 2 prompts × 50 chains (200 sequence ids with the snapshots)."""
    proposal = Q.Tempered(1.0)
    ex = exact_llama(llama, name, "none", proposal=proposal)
    sampler = S.SuffixMH(TARGETS[name](), proposal, chains=50, block_size=2, steps=20)
    samples, _ = pooled_chains(sampler, llama["ids"], 30, [PROMPT, PROMPT], seed=100)
    assert len(samples) == 3000
    c = counts_of(samples, ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected
    check_scalars(samples[:300], ex)
    assert all(math.isclose(s.log_weight, -math.log(50), abs_tol=1e-6) for s in samples[:300])


def test_split_kv_streams_sample_the_exact_target(llama):
    """With a KV stream per sequence, resampling and snapshots copy whole streams: SMC with a
    rejuvenation move after each resampling (30 runs of 100 particles pooled) and suffix MH
    (1500 chains) still draw the enumerated target."""
    name, proposal, eng = "power2_reward", Q.Tempered(1.0), llama["split"]
    ex = exact_llama(llama, name, "ids", proposal=proposal)
    smc = S.SMC(TARGETS[name](), proposal, particles=100, block_size=1, ess_threshold=0.9, rejuvenate=1)
    h, n_eff, samples, _ = pooled_smc(smc, eng, 30, seed=700, ex=ex, stop=STOPS["ids"])
    tol = tv_tolerance(ex.probs, n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol
    check_scalars(samples[:300], ex)
    ex = exact_llama(llama, name, "none", proposal=proposal)
    mh = S.SuffixMH(TARGETS[name](), proposal, chains=50, block_size=2, steps=20)
    chains, _ = pooled_chains(mh, eng, 15, [PROMPT, PROMPT], seed=800)
    c = counts_of(chains, ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3 and chi2_pvalue(c, ex.q_probs) < 1e-6


# ----------------------------------------------------------------------------- SMC, stopped space

SMC_CASES = [("power3", "string"), ("power2_reward", "ids")]


@pytest.mark.parametrize("name, stop", SMC_CASES)
def test_smc_on_the_stopped_space_and_its_evidence(llama, name, stop):
    """SMC token by token with a rejuvenation move after each resampling (2 ids a particle): 30
    runs of 100 particles pooled; then
    E[Ẑ/Z] = 1 over 600 replicates of 8 particles (20 runs of 30 prompts: 240 ids each)."""
    proposal = Q.Tempered(1.0)
    eng = backend_for(llama, stop)
    ex = exact_llama(llama, name, stop, proposal=proposal)
    sampler = S.SMC(TARGETS[name](), proposal, particles=100, block_size=1, ess_threshold=0.9, rejuvenate=1)
    h, n_eff, samples, results = pooled_smc(sampler, eng, 30, seed=200, ex=ex, stop=STOPS[stop])
    assert any(r.trace.of("move") for r in results), "rejuvenation moves ran"
    tol = tv_tolerance(ex.probs, n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol  # would reject the proposal's law
    check_scalars(samples[:300], ex)
    evid = S.SMC(TARGETS[name](), proposal, particles=8, ess_threshold=0.9)
    ratio = evidence_ratios(evid, eng, ex, runs=20, copies=30, seed=300, stop=STOPS[stop])
    se = float(ratio.std()) / math.sqrt(len(ratio))
    assert abs(float(ratio.mean()) - 1.0) < 3 * se + 1e-9


# ----------------------------------------------------------------------------- interior-block MH


def test_block_mh_on_the_stopped_space(llama):
    """BlockMH (span 2) on p^3 with stop ids: 3000 chains as 30 runs of 100 (200 ids each); both
    interior and tail moves ran, and some proposals were refused (a stop completing earlier)."""
    name, stop = "power3", "ids"
    proposal = Q.Tempered(1.0)
    ex = exact_llama(llama, name, stop, proposal=proposal)
    sampler = S.BlockMH(TARGETS[name](), proposal, chains=100, block_size=2, steps=15, span=2)
    samples, moves = pooled_chains(sampler, llama["ids"], 30, [PROMPT], seed=400, stop=STOPS[stop])
    c = counts_of(samples, ex.index(), len(ex.sequences))
    assert chi2_pvalue(c, ex.probs) > 1e-3
    assert chi2_pvalue(c, ex.q_probs) < 1e-6  # the test has power: q's own law is rejected
    check_scalars(samples[:300], ex, log_q=True)
    assert {m["kernel"] for m in moves} == {"block"}
    interior = [i + 2 < n for m in moves for i, n in zip(m["i"], m["old_length"])]
    assert any(interior) and not all(interior)
    assert sum(sum(m["invalid"]) for m in moves) > 0


# ----------------------------------------------------------------------------- lookahead


def test_smc_with_lookahead_matches_exact_power(llama):
    """SMC + Lookahead(K=2, M=2, H=2) with its twist: rows N, candidate forks N·K and rollout
    forks N·K·M are alive at once (7N ids), so 32 particles a run, 90 runs pooled; and its
    evidence is unbiased."""
    ex = exact_llama(llama, "power3", "none")
    proposal = Q.Lookahead(ALPHA, candidates=2, rollouts=2, horizon=2)
    sampler = S.SMC(T.Power(ALPHA), proposal, particles=32, ess_threshold=0.5, twist=True)
    h, n_eff, samples, results = pooled_smc(sampler, llama["ids"], 90, seed=500, ex=ex)
    tol = tv_tolerance(ex.probs, n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    p = ex.log_p.double().exp()
    assert 0.5 * float((h - p).abs().sum()) > 3 * tol  # the test has power: p itself is rejected
    check_scalars(samples[:300], ex)
    assert all(r.counters["rollout_tokens"] > 0 for r in results)
    # E[Ẑ/Z] = 1, resampling at every step: 300 replicates of 8 particles, 4 prompts a run (224 ids)
    evid = S.SMC(T.Power(ALPHA), proposal, particles=8, ess_threshold=1.0, twist=True)
    ratio = evidence_ratios(evid, llama["ids"], ex, runs=75, copies=4, seed=600)
    se = float(ratio.std()) / math.sqrt(len(ratio))
    assert abs(float(ratio.mean()) - 1.0) < 3 * se + 1e-9
