"""Targets and proposals: shipped contract checks on every potential, formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch

from smcdecode import ArgumentError, ArgumentTypeError, Engine, RewardError
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.readouts import Layer, Readouts
from smcdecode.testing import check_algebra, check_potential, check_proposal, exact, tiny_llama

PROMPT = [1, 2]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(vocab=5, layers=3, seed=1), eos_token_ids=[0])


@pytest.fixture(scope="module")
def amateur():
    return Engine(tiny_llama(vocab=5, layers=1, seed=7), eos_token_ids=[0])


def length_reward(prompt, continuation):
    return 0.5 * len(continuation)


def all_targets(amateur):
    return [
        T.LM(),
        T.LM(temperature=0.7),
        T.Power(3.0),
        T.LM() ** 2.5,
        T.LayerContrast(layer=1, beta=-0.5),
        T.LayerContrast(layer=2, beta=0.4, plausibility=0.1) ** 2,
        T.LayerContrast("dynamic", beta=-0.5, candidates=[0, 1, 2]),
        T.LayerContrast("dynamic", beta=-1.0, candidates="low"),
        T.Contrast(0.5, prompt=[3, 3]),
        T.Contrast(-0.5, amateur=amateur, plausibility=0.05),
        T.Power(2) * T.Reward(length_reward, weight=1.0),
        T.Reward(length_reward, weight=-0.3) * T.LayerContrast(layer=1, beta=-0.5) ** 2,
    ]


def test_every_target_passes_the_token_factor_contract(engine, amateur):
    for target in all_targets(amateur):
        check_potential(engine, target, PROMPT, max_new_tokens=3)


def test_algebra_products_add_and_powers_scale(engine, amateur):
    check_algebra(engine, T.Power(2), T.LayerContrast(layer=1, beta=0.3), PROMPT, 3)
    check_algebra(engine, T.Contrast(0.5, amateur=amateur), T.Reward(length_reward), PROMPT, 3)


def test_power_is_lm_to_the_alpha_not_token_temperature(engine):
    ex_pow = exact(engine, T.Power(3), PROMPT, 3)
    ex_lm = exact(engine, T.LM() ** 3, PROMPT, 3)
    ex_temp = exact(engine, T.LM(temperature=1 / 3), PROMPT, 3)
    torch.testing.assert_close(ex_pow.log_target, ex_lm.log_target)
    torch.testing.assert_close(ex_pow.log_target, 3 * ex_pow.log_p)
    assert (ex_pow.probs - ex_temp.probs).abs().max() > 1e-3  # different distributions


@pytest.mark.parametrize(
    "proposal,target",
    [
        (Q.Tempered(1.0), None),
        (Q.Tempered(0.5, top_k=2), None),
        (Q.Tempered(1.3, top_p=0.8), None),
        (Q.Tempered(0.8, top_k=3, top_p=0.9), None),
        (Q.LocallyOptimal(), T.Power(3)),
        (Q.LocallyOptimal(), T.LayerContrast(layer=1, beta=-0.5) ** 2),
    ],
)
def test_every_proposal_passes_the_log_q_contract(engine, proposal, target):
    check_proposal(engine, proposal, target, PROMPT, 3, n=3000)


def test_locally_optimal_for_power_is_temperature_one_over_alpha(engine):
    a = exact(engine, T.Power(4), PROMPT, 3, proposal=Q.LocallyOptimal())
    b = exact(engine, None, PROMPT, 3, proposal=Q.Tempered(0.25))
    torch.testing.assert_close(a.log_q, b.log_q)


def test_top_p_keeps_the_smallest_nucleus_by_hand():
    log_q = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = Q.truncate(log_q, None, 0.8).exp()[0]  # 0.5 + 0.3 reaches 0.8: two tokens
    torch.testing.assert_close(out, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    out = Q.truncate(log_q, None, 0.81).exp()[0]  # needs the third
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    out = Q.truncate(log_q, 1, None).exp()[0]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def view_of(log_p, layers=None, aux=None):
    values = {Layer(k): torch.log_softmax(v, -1) for k, v in (layers or {}).items()}
    values.update({k: torch.log_softmax(v, -1) for k, v in (aux or {}).items()})
    return Readouts(torch.log_softmax(log_p, -1), values)


def test_plausibility_mask_by_hand():
    p_n = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    p_l = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    view = view_of(p_n.log(), {1: p_l.log()})
    beta, rho = -0.5, 0.2  # keep tokens with p_N >= 0.2 * 0.6 = 0.12: tokens 0 and 1
    f = T.LayerContrast(layer=1, beta=beta, plausibility=rho).token_log_factor(view)[0]
    g = (1 - beta) * p_n[0, :2].log() + beta * p_l[0, :2].log()
    expected = torch.full((4,), -math.inf)
    expected[:2] = g - torch.logsumexp(g, 0)
    torch.testing.assert_close(f, expected)


def test_dynamic_layer_choice_is_per_row_max_js():
    torch.manual_seed(0)
    final = torch.randn(3, 6) * 2
    layers = {
        0: final + 0.1 * torch.randn(3, 6),
        2: final + 0.01 * torch.randn(3, 6),
        4: final + 0.1 * torch.randn(3, 6),
    }
    layers[0][0] = -final[0]  # row 0 is far from layer 0, row 1 far from layer 4
    layers[4][1] = -2 * final[1]
    view = view_of(final, layers)
    target = T.LayerContrast("dynamic", beta=-0.5, candidates=[0, 2, 4])
    got = target.token_log_factor(view)
    for row in range(3):
        p = view.log_p[row].exp()
        best, best_js = None, -1.0
        for layer in (0, 2, 4):
            q = view[Layer(layer)][row].exp()
            m = 0.5 * (p + q)
            js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
            if js > best_js:
                best, best_js = layer, float(js)
        g = 1.5 * view.log_p[row] - 0.5 * view[Layer(best)][row]
        torch.testing.assert_close(got[row], torch.log_softmax(g, -1))
    # rows differ in their choice in this fixture, so a batch-averaged choice would fail
    assert (
        len(
            {
                int(js_arg)
                for js_arg in torch.stack([T.js_divergence(view.log_p, view[Layer(k)]) for k in (0, 2, 4)]).argmax(0)
            }
        )
        > 1
    )


def test_cfg_and_contrastive_decoding_follow_the_formula(engine, amateur):
    beta = -0.7
    for target, aux_engine, aux_prompt in [
        (T.Contrast(beta, prompt=[4]), engine, [4]),
        (T.Contrast(beta, amateur=amateur), amateur, PROMPT),
    ]:
        ex = exact(engine, target, PROMPT, 2)
        for i, seq in enumerate(ex.sequences):
            want = 0.0
            for t, x in enumerate(seq):
                with torch.no_grad():
                    lp = torch.log_softmax(engine.model(torch.tensor([PROMPT + list(seq[:t])])).logits[0, -1], -1)
                    la = torch.log_softmax(
                        aux_engine.model(torch.tensor([aux_prompt + list(seq[:t])])).logits[0, -1], -1
                    )
                want += float(torch.log_softmax((1 - beta) * lp + beta * la, -1)[x])
            assert math.isclose(float(ex.log_target[i]), want, abs_tol=1e-4)


def test_dola_presets():
    assert T.dola_candidates(30, "low") == list(range(0, 15, 2))
    assert T.dola_candidates(30, "high") == list(range(15, 30, 2))
    assert T.dola_candidates(48, "high") == list(range(28, 48, 2))


def test_bad_arguments_raise_typed_errors_naming_them(engine):
    cases = [
        (lambda: T.Power(0), "alpha"),
        (lambda: T.Power(-1), "alpha"),
        (lambda: T.Power(float("inf")), "alpha"),
        (lambda: T.LM() ** float("nan"), "alpha"),
        (lambda: T.LayerContrast(1, beta=float("nan")), "beta"),
        (lambda: T.LayerContrast(1, beta=0.5, plausibility=1.0), "plausibility"),
        (lambda: T.LayerContrast(1, beta=0.5, plausibility=-0.1), "plausibility"),
        (lambda: T.LayerContrast("top", beta=0.5), "layer"),
        (lambda: T.LM(temperature=0), "temperature"),
        (lambda: Q.Tempered(-1.0), "temperature"),
        (lambda: Q.Tempered(1.0, top_p=0.0), "top_p"),
        (lambda: Q.Tempered(1.0, top_p=1.5), "top_p"),
        (lambda: Q.Tempered(1.0, top_k=0), "top_k"),
        (lambda: T.LayerContrast(9, beta=0.5).requirements(engine), "layer"),
        (lambda: T.LayerContrast(3, beta=0.5).requirements(engine), "layer"),  # the final layer itself
        (
            lambda: T.Contrast(0.5, amateur=Engine(tiny_llama(vocab=7), eos_token_ids=[0])).requirements(engine),
            "amateur",
        ),
        (lambda: T.Contrast(0.5), "amateur"),
    ]
    for make, name in cases:
        with pytest.raises((ArgumentError, ArgumentTypeError)) as e:
            make()
        assert e.value.argument == name, (name, e.value)


def test_reward_errors_say_which_prompt_and_sample(engine):
    def bad(prompt, continuation):
        if len(continuation) >= 2:
            return float("nan")
        return 0.0

    def raises(prompt, continuation):
        raise KeyError("boom")

    sampler = S.Ancestral(Q.Tempered(1.0), n=8, target=T.Power(2) * T.Reward(bad))
    with pytest.raises(RewardError, match="prompt") as e:
        sampler.run(engine, [PROMPT, [3]], max_new_tokens=3, seed=0)
    assert e.value.prompt_index in (0, 1) and 0 <= e.value.sample_index < 8
    with pytest.raises(RewardError, match="KeyError"):
        S.Ancestral(Q.Tempered(1.0), n=2, target=T.Reward(raises)).run(engine, [PROMPT], max_new_tokens=2, seed=0)


def test_batched_reward_matches_unbatched(engine):
    def batched(prompts, continuations):
        return [0.5 * len(c) for c in continuations]

    a = exact(engine, T.Reward(length_reward), PROMPT, 3)
    b = exact(engine, T.Reward(batched, batched=True), PROMPT, 3)
    torch.testing.assert_close(a.log_target, b.log_target)
