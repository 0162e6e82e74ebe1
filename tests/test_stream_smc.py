"""SMC on the continuous-batching schedule (samplers/multiplex.py): each problem runs its own SMC
loop on its rows of one shared batch. A streamed problem is the problem run alone with its seed
(tokens, weights, log Ẑ), whatever shares the batch; the pooled law is the exact target; run_eval
streams SMC and resumes; an error in one problem's thread reaches the caller and ends every thread."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from smcdecode import Engine, RewardError
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.evaluate import TaskAdapter, problem_seed, run_eval
from smcdecode.records import read_jsonl
from smcdecode.samplers.core import Decoder
from smcdecode.testing import CharTokenizer, exact, tiny_llama, weighted_histogram

MAX_NEW = 4
# prompts of different lengths, so admissions change the batch's width and the rows' positions
PROMPTS = {"a": [1, 2], "b": [3], "c": [4, 1, 2, 3], "d": [2, 2]}
SEEDS = {k: 100 + ord(k) for k in PROMPTS}
AMATEUR = Engine(tiny_llama(vocab=5, layers=1, seed=2), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=2, seed=1), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])


def length_reward(prompt, continuation):
    return 0.7 * len(continuation) - (1.0 if continuation and continuation[-1] == 3 else 0.0)


def twist(prompt, continuation):
    return 0.8 * sum(1 for t in continuation if t == 2) - 0.3 * len(continuation)


def smc(target=None, **kw):
    kw = {"particles": 6, "ess_threshold": 0.9, **kw}
    return S.SMC(target if target is not None else T.Power(2), Q.Tempered(1.0), **kw)


CASES = {
    "power": (lambda: smc(), None),
    **{f"scheme_{s}": (lambda s=s: smc(resampling=s), None) for s in sorted(S.SCHEMES)},
    "block2": (lambda: smc(block_size=2), None),
    "anneal": (lambda: smc(T.Power(3), anneal=2), None),
    "suffix": (lambda: smc(rejuvenate=2, move="suffix"), None),
    "block": (lambda: smc(rejuvenate=2, move="block", span=1), None),
    "mix": (lambda: smc(T.Power(3), rejuvenate=3, move="mix", span=1, anneal=3), None),
    "prefix_twist": (lambda: smc(T.Power(2) * T.Reward(twist, prefix=True), rejuvenate=1), None),
    "contrast": (lambda: smc(T.LayerContrast(layer=1, beta=-0.5) ** 2), None),
    "cfg": (lambda: smc(T.Contrast(-0.7, prompt=[4]) ** 2, rejuvenate=2, move="mix", span=1), None),
    "amateur": (lambda: smc(T.Contrast(-0.7, amateur=AMATEUR) ** 2, rejuvenate=1), None),
    "stop": (lambda: smc(rejuvenate=2, move="mix", span=1), ["ca", [2, 2]]),
    "delimiter": (lambda: smc(T.Power(3), delimiter="b", block_size=None), None),
}


def streamed(sampler, engine, keys, in_flight, stop=None, max_new=MAX_NEW):
    problems = [(k, PROMPTS[k], SEEDS[k]) for k in keys]
    out = list(sampler.stream(engine, problems, in_flight=in_flight, max_new_tokens=max_new, stop=stop))
    assert sorted(f.key for f in out) == sorted(keys)  # each problem exactly once
    return {f.key: f for f in out}


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(Decoder, name)

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, name, spy)
    return calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_streamed_problem_is_the_problem_run_alone(engine, name, monkeypatch):
    """Among 3 others, in flight 2 and 4, in two admission orders: the same tokens, log weights,
    log Ẑ and decode work as ``SMC.run(engine, [prompt], seed)``."""
    make, stop = CASES[name]
    sampler = make()
    assert sampler.streams(engine)
    scores = count_calls(monkeypatch, "score")
    alone = {}
    for k in PROMPTS:
        engine.reset_counters()
        alone[k] = sampler.run(engine, [PROMPTS[k]], max_new_tokens=MAX_NEW, seed=SEEDS[k], stop=stop)
    assert any(any(r["resampled"]) for k in PROMPTS for r in alone[k].trace.of("step"))
    if sampler.rejuvenate:
        assert any(alone[k].trace.of("move") for k in PROMPTS)
    if sampler.move != "suffix":
        assert scores, "an interior-block move rescored its suffix"
        scores.clear()
    for in_flight in (2, 4):
        for keys in (list(PROMPTS), ["c", "a", "d", "b"]):
            together = streamed(sampler, engine, keys, in_flight, stop)
            for k in PROMPTS:
                a, b = alone[k].samples[0], together[k].samples
                assert [s.tokens for s in b] == [s.tokens for s in a], (k, in_flight, keys)
                for x, y in zip(a, b):
                    assert y.log_weight == pytest.approx(x.log_weight, abs=1e-5)
                    assert y.log_target == pytest.approx(x.log_target, abs=1e-5)
                    assert y.log_q == pytest.approx(x.log_q, abs=1e-5)
                assert together[k].log_evidence == pytest.approx(alone[k].log_evidence[0], abs=1e-5)
                assert together[k].decode_tokens == alone[k].counters["decode_tokens"], k
                assert together[k].prefill_tokens == len(PROMPTS[k])
    if sampler.move != "suffix":
        assert scores, "interior-block moves rescored through the merged score"


def tv_tolerance(probs: torch.Tensor, n_eff: float, z: float = 4.0) -> float:
    """z × the bound E[TV] ≤ ½ Σ_i sqrt(π_i(1−π_i)/n) on the TV of an n-sample histogram."""
    return z * 0.5 * float((probs * (1 - probs)).sqrt().sum()) / math.sqrt(n_eff)


def test_streamed_problems_pool_to_the_exact_target_and_z_hat_is_unbiased(engine):
    """300 problems on one prompt (different seeds), 16 in flight: nearly every problem enters
    the batch by admission into freed rows. E[Ẑ/Z] = 1, and pooled with weights Ẑ_p·W_{p,i}
    (unbiased for Z·π: resampling, adaptive or not, is conditionally unbiased) the histogram
    matches the exact π in TV and not q's law. (No rejuvenation here: moves triggered by the ESS
    test are exact only as the particles grow, see the next test.)"""
    target, proposal = T.Power(2) * T.Reward(length_reward), Q.Tempered(1.0)
    ex = exact(engine, target, [1, 2], 3, proposal=proposal)
    sampler = S.SMC(target, proposal, particles=16, ess_threshold=0.9)
    steps = sampler.run(engine, [[1, 2]] * 20, max_new_tokens=3, seed=0).trace.of("step")
    assert any(any(r["resampled"]) for r in steps)  # resampling really happens
    reps = 300
    problems = [(i, [1, 2], i) for i in range(reps)]
    where, m = ex.index(), len(ex.sequences)
    y = torch.zeros(reps, m, dtype=torch.float64)  # per problem: Ẑ/Z · Σ_i W_i δ(x_i)
    ratio = torch.zeros(reps, dtype=torch.float64)
    for f in sampler.stream(engine, problems, in_flight=16, max_new_tokens=3):
        ratio[f.key] = math.exp(f.log_evidence - float(ex.log_z))
        for s in f.samples:
            y[f.key, where[tuple(s.tokens)]] += ratio[f.key] * math.exp(s.log_weight)
    assert bool((ratio > 0).all())  # every problem came back
    assert abs(float(ratio.mean()) - 1.0) < 3 * float(ratio.std()) / math.sqrt(reps) + 1e-9
    h = y.sum(0) / ratio.sum()
    se = (y - h[None, :] * ratio[:, None]).pow(2).sum(0).sqrt() / ratio.sum()  # delta method, per sequence
    tol = 4.0 * 0.5 * float(se.sum())  # z × the bound E[TV] ≤ ½ Σ_j se_j
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol  # the test would reject q's own law


def test_streamed_problems_with_annealing_and_moves_follow_the_exact_target(engine):
    """8 problems of 500 particles, 4 in flight, with annealing and rejuvenation (suffix and
    block moves): every problem's weighted histogram, pooled, matches the exact π in TV."""
    target, proposal = T.Power(3), Q.Tempered(1.0)
    ex = exact(engine, target, [1, 2], 3, proposal=proposal)
    sampler = S.SMC(target, proposal, particles=500, ess_threshold=0.7, anneal=2, rejuvenate=2, move="mix", span=1)
    where, m = ex.index(), len(ex.sequences)
    h, n_eff = torch.zeros(m, dtype=torch.float64), 0.0
    fins = list(sampler.stream(engine, [(i, [1, 2], 50 + i) for i in range(8)], in_flight=4, max_new_tokens=3))
    for f in fins:
        w = torch.tensor([s.log_weight for s in f.samples]).exp()
        n_eff += 1.0 / float((w * w).sum())
        h += weighted_histogram(f.samples, where, m) / len(fins)
    tol = tv_tolerance(ex.probs, n_eff)
    assert 0.5 * float((h - ex.probs).abs().sum()) < tol
    assert 0.5 * float((h - ex.q_probs).abs().sum()) > 3 * tol  # would reject the proposal's law


def toy_task(n: int) -> TaskAdapter:
    problems = [{"unique_id": f"toy-{i}", "prompt": "abcd"[i % 4] + "cd"[i % 2]} for i in range(n)]
    return TaskAdapter("toy", problems, lambda p: p["prompt"], lambda text: (text or "")[:1], lambda p, a: a == "a")


def by_uid(path):
    return {r["uid"]: r for r in read_jsonl(path)}


def test_run_eval_streams_smc_resumes_and_matches_batch_size_one(engine, tmp_path):
    task = toy_task(7)
    sampler = smc(rejuvenate=1, particles=4)
    kw = {"max_new_tokens": MAX_NEW, "progress": False, "seed": 3}
    one = by_uid(run_eval(task, engine, sampler, "smc", str(tmp_path / "one"), batch_size=1, **kw))
    path = run_eval(task, engine, sampler, "smc", str(tmp_path / "four"), batch_size=4, **kw)
    four = by_uid(path)
    assert set(one) == set(four) == {p["unique_id"] for p in task.problems}
    for uid, rec in four.items():
        assert rec["streamed"] is True and rec["decode_tokens"] > 0 and rec["prefill_tokens"] == 2
        assert [s["text"] for s in rec["samples"]] == [s["text"] for s in one[uid]["samples"]], uid
        for x, y in zip(rec["samples"], one[uid]["samples"]):
            assert x["log_weight"] == pytest.approx(y["log_weight"], abs=1e-5)
        assert rec["log_evidence"] == pytest.approx(one[uid]["log_evidence"], abs=1e-5)
        assert rec["answer"] == one[uid]["answer"]
    # each problem is its own run with its own seed
    p = task.problems[5]
    alone = sampler.run(engine, [p["prompt"]], max_new_tokens=MAX_NEW, seed=problem_seed(3, p["unique_id"]))
    assert [s.text for s in alone.samples[0]] == [s["text"] for s in four[p["unique_id"]]["samples"]]
    # a crash after 3 records and half of the 4th; the restart completes the rest
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with pytest.warns(Warning, match="torn"):
        run_eval(task, engine, sampler, "smc", str(tmp_path / "four"), batch_size=4, **kw)
    recs = list(read_jsonl(path))
    assert sorted(r["uid"] for r in recs) == sorted(four)  # nothing lost, nothing twice
    for r in recs:
        assert [s["text"] for s in r["samples"]] == [s["text"] for s in four[r["uid"]]["samples"]]


def problem_threads():
    return [t for t in threading.enumerate() if t.name.startswith("smcdecode-problem-") and t.is_alive()]


def test_an_error_in_one_problem_reaches_the_caller_and_no_thread_is_left(engine):
    def reward(prompt, continuation):
        if prompt == [3]:
            raise ValueError("bad problem")
        return 0.1 * len(continuation)

    sampler = smc(T.Power(2) * T.Reward(reward, prefix=True), rejuvenate=1)
    problems = [(k, PROMPTS[k], SEEDS[k]) for k in ["a", "c", "b", "d"]]
    with pytest.raises(RewardError, match="bad problem"):
        list(sampler.stream(engine, problems, in_flight=2, max_new_tokens=MAX_NEW))
    assert problem_threads() == []
    # closing the stream early ends the other problems' threads too
    problems = [(i, PROMPTS["abcd"[i % 4]], i) for i in range(12)]
    gen = smc().stream(engine, problems, in_flight=2, max_new_tokens=8)
    for _ in gen:
        if problem_threads():  # a problem is parked mid-run
            break
    assert problem_threads()
    gen.close()
    assert problem_threads() == []
    # the engine is still usable
    assert len(smc().run(engine, [[1, 2]], max_new_tokens=MAX_NEW, seed=0).samples[0]) == 6


@pytest.mark.parametrize("proposal", ["lookahead", "eglr"])
def test_rollout_and_hidden_state_proposals_run_one_problem_at_a_time(engine, proposal):
    """Lookahead (rollouts: its rollout tokens stay its own) and EGLR (the hidden state, re-applied
    on its own cache) run one problem at a time, with the same samples and log Ẑ as running alone;
    an empty problem list yields nothing."""
    q = {
        "lookahead": lambda: Q.Lookahead(2.0, candidates=2, rollouts=1, horizon=1),
        "eglr": lambda: Q.EGLR(span=2, max_iters=2, entropy_threshold=0.0, tol=1e-4),
    }[proposal]()
    sampler = S.SMC(T.Power(2), q, particles=3)
    assert not sampler.streams(engine)
    fin = streamed(sampler, engine, ["a", "b"], 2)
    for k in ("a", "b"):
        alone = sampler.run(engine, [PROMPTS[k]], max_new_tokens=MAX_NEW, seed=SEEDS[k])
        assert [s.tokens for s in fin[k].samples] == [s.tokens for s in alone.samples[0]]
        assert fin[k].log_evidence == pytest.approx(alone.log_evidence[0])
        assert fin[k].forwards is not None  # it ran alone
    assert list(smc().stream(engine, [], in_flight=2, max_new_tokens=MAX_NEW)) == []
