"""Spec strings, the CLI's error path and plot command, diagnostics against hand computations."""

from __future__ import annotations

import math
import os

import pytest
import torch

from smcdecode import ArgumentError, Engine
from smcdecode import diagnostics as D
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T
from smcdecode.cli import main
from smcdecode.samplers.result import MoveTrace, Result
from smcdecode.spec import parse_method, parse_proposal, parse_target
from smcdecode.testing import tiny_llama


def test_spec_strings_build_the_named_objects():
    t = parse_target("contrast:layer=20,beta=-0.5,alpha=2")
    assert isinstance(t, T.Scaled) and t.exponent == 2 and t.base.layer == 20 and t.base.beta == -0.5
    assert parse_target("power:alpha=4").exponent == 4
    p = parse_proposal("tempered:temperature=0.25,top_k=5")
    assert p.temperature == 0.25 and p.top_k == 5
    m = parse_method("smc:particles=16,resampling=stratified target=power:alpha=3 proposal=optimal")
    assert isinstance(m.sampler, S.SMC) and m.sampler.particles == 16 and m.sampler.resampling == "stratified"
    assert isinstance(m.sampler.proposal, Q.LocallyOptimal)


def test_every_sampler_argument_is_reachable_from_a_spec():
    """The spec registry reads constructor signatures, so a new argument cannot be forgotten."""
    m = parse_method("mh:chains=2,steps=3,reuse_suffix=false target=power:alpha=2")
    assert isinstance(m.sampler, S.SuffixMH) and m.sampler.reuse_suffix is False and m.sampler.steps == 3
    m = parse_method("smc:particles=4,anneal=8,rejuvenate=1 target=power:alpha=2")
    assert m.sampler.anneal == 8 and m.sampler.rejuvenate == 1
    with pytest.raises(ArgumentError, match="reuse_suffix"):  # the error lists what is accepted
        parse_method("mh:colour=red target=power:alpha=2")


def test_eglr_and_the_rollout_pool_have_spec_strings():
    e = parse_proposal("eglr:span=3,max_iters=2,temperature=0.5")
    assert isinstance(e, Q.EGLR) and (e.span, e.max_iters, e.temperature) == (3, 2, 0.5)
    pool = parse_method("pool:spans=0/2,temperatures=0.5/1.0,per_cell=3").sampler
    assert isinstance(pool, S.RolloutPool) and pool.spans == [0, 2] and pool.temperatures == [0.5, 1.0]
    assert parse_method("pool:spans=2,temperatures=1").sampler.spans == [2]
    with pytest.raises(ArgumentError, match="target"):
        parse_method("pool:spans=0,temperatures=1 target=power:alpha=2")
    with pytest.raises(ArgumentError, match="proposal"):
        parse_method("pool:spans=0,temperatures=1 proposal=tempered:temperature=0.5")
    with pytest.raises(ArgumentError, match="spans"):
        parse_method("pool:spans=a/b,temperatures=1")
    with pytest.raises(ArgumentError, match="accepts span"):
        parse_proposal("eglr:spam=3")
    res = parse_method("pool:spans=0/1,temperatures=1.0").sampler.run(
        Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0]), [[1, 2]], max_new_tokens=3, seed=0
    )
    assert sorted((s.meta["span"], s.meta["temperature"]) for s in res.samples[0]) == [(0, 1.0), (1, 1.0)]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("mystery:alpha=2", "accepted: lm, power, contrast"),
        ("power:alpha=2,gamma=1", "accepts alpha"),
        ("power:alpha", "not key=value"),
        ("power:alpha=-1", "alpha"),
    ],
)
def test_bad_target_specs_list_what_is_accepted(spec, needle):
    with pytest.raises(ArgumentError, match=needle):
        parse_target(spec)


def test_cli_reports_bad_specs_with_exit_code_2(capsys):
    assert main(["sample", "hi", "--sampler", "beam:n=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'beam'" in err and "ancestral, mh, block, smc" in err


def test_cli_plot_draws_pngs_from_saved_results(tmp_path):
    engine = Engine(tiny_llama(), eos_token_ids=[0])
    smc = S.SMC(T.Power(2), Q.Tempered(1.0), particles=8, ess_threshold=0.9, rejuvenate=1)
    res = smc.run(engine, [[1, 2], [3]], max_new_tokens=4, seed=0)
    path = tmp_path / "r.json"
    res.save(str(path))
    again = Result.load(str(path))
    assert again.log_evidence == res.log_evidence and again.trace.records == res.trace.records
    assert D.acceptance_by_block(again) == D.acceptance_by_block(res) and D.acceptance_rate(res) is not None
    assert torch.equal(D.ess_trace(again)[0], D.ess_trace(res)[0].double())
    # a move record written before the typed trace (SuffixMH's block/step keys) still loads
    old = {"kind": "move", "block": 2, "step": 1, "accepted": [True, False], "index": [0, 1], "reused": [0, 0]}
    old.update(old_length=[2, 3], new_length=[3, 3], log_target=[-1.0, -2.0])
    (m,) = Result.from_dict({"samples": [], "trace": [old]}).trace.infos(MoveTrace)
    assert (m.stage, m.sweep, m.kernel, m.proposed.tolist(), m.invalid.tolist()) == (2, 1, "suffix", [3, 2], [0, 0])
    assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0
    for name in ("ess.png", "acceptance.png", "loglik.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_weight_ess_by_hand():
    assert float(D.weight_ess(torch.zeros(7))) == pytest.approx(7.0)
    assert float(D.weight_ess(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(1.0)
    w = torch.tensor([0.2, 0.3, 0.5])
    assert float(D.weight_ess(w.log())) == pytest.approx(1 / (0.04 + 0.09 + 0.25))
    two = torch.stack([torch.zeros(4), torch.tensor([0.0, -math.inf, -math.inf, -math.inf])])
    torch.testing.assert_close(D.weight_ess(two, dim=1), torch.tensor([4.0, 1.0]))


def test_split_rhat_matches_the_formula():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 1.0, 0.5]]], dtype=torch.float64)  # [P=1, chains=2, 4]
    halves = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 2.5], [1.0, 0.5]], dtype=torch.float64)
    n = 2
    w = halves.var(1).mean()
    b_over_n = halves.mean(1).var()
    expected = math.sqrt(float(((n - 1) / n * w + b_over_n) / w))
    assert float(D.rhat(x)[0]) == pytest.approx(expected, rel=1e-6)


def test_suffix_reuse_by_hand():
    from smcdecode.samplers.result import Trace

    trace = Trace()
    # proposals of 4, 2 and 3 tokens (new_length − index), of which 4, 1 and 0 kept from x
    t = torch.tensor
    index, new = t([0, 1, 2]), t([4, 3, 5])
    move = MoveTrace(1, 0, "suffix", t([True, True, False]), index, t([4, 1, 0]), new - index, t([False] * 3), new, new)
    trace.log(move)
    with pytest.raises(TypeError, match="MoveTrace"):
        trace.log({"kind": "move"})
    res = Result([[]], [None], trace)
    assert D.suffix_reuse(res) == pytest.approx({"tokens": 5 / 9, "unchanged": 1 / 3})
    assert D.summary(res)["reused_tokens"] == pytest.approx(5 / 9)
    assert D.suffix_reuse(Result([[]], [None], Trace())) is None


def test_mh_diagnostics_from_a_run():
    engine = Engine(tiny_llama(), eos_token_ids=[0])
    res = S.SuffixMH(T.Power(2), Q.Tempered(1.0), chains=4, block_size=2, steps=5).run(
        engine, [[1, 2], [3]], max_new_tokens=4, seed=0
    )
    x = D.chain_log_target(res)
    assert x.shape == (2, 4, 10)
    moves = res.trace.of("move")
    assert x[1, 2, 3] == pytest.approx(moves[3]["log_target"][4 + 2])  # prompt 1, chain 2, move 3
    acc = D.acceptance_by_block(res)
    assert set(acc) == {1, 2}
    first = [a for m in moves if m["stage"] == 1 for a in m["accepted"]]
    assert acc[1] == pytest.approx(sum(first) / len(first))
    assert D.chain_ess(x).shape == (2,) and D.summary(res)["max_rhat"] is not None
    assert D.unique_particles(res)[0] <= 4
    reuse = D.suffix_reuse(res)
    assert reuse is not None and 0.0 < reuse["tokens"] < 1.0 and 0.0 < reuse["unchanged"] < 1.0


def test_every_cli_option_has_help_and_every_command_an_example():
    import argparse

    from smcdecode.cli import build_parser

    def parsers(p, path):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")

    seen = 0
    for path, p in parsers(build_parser(), "smcdecode"):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{path} {action.option_strings or action.dest} has no help"
            seen += 1
        if path not in ("smcdecode", "smcdecode eval"):
            assert p.epilog and "example" in p.epilog and "smcdecode" in p.epilog, f"{path}: no example"
    assert seen > 40


def test_loglik_histograms_are_densities_and_step_axes_integers(tmp_path, monkeypatch):
    """Methods with 8 samples a prompt and with 1 are drawn on one scale: each histogram's area is 1."""
    from smcdecode import plots

    engine = Engine(tiny_llama(), eos_token_ids=[0])
    smc = S.SMC(T.Power(2), Q.Tempered(1.0), particles=8, ess_threshold=0.9, rejuvenate=1)
    few = S.Ancestral(Q.Tempered(1.0), n=1)
    results = [
        ("smc", smc.run(engine, [[1, 2], [3]], max_new_tokens=4, seed=0)),
        ("ancestral", few.run(engine, [[1, 2], [3]], max_new_tokens=4, seed=0)),
    ]
    seen = {}
    real_finish = plots.finish

    def spy(fig, ax, path, *args, **kwargs):
        seen[os.path.basename(path)] = (
            [sum(b.get_height() * b.get_width() for b in c) for c in ax.containers],
            [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
        )
        return real_finish(fig, ax, path, *args, **kwargs)

    monkeypatch.setattr(plots, "finish", spy)
    plots.plot_all(results, str(tmp_path))
    areas, _ = seen["loglik.png"]
    assert len(areas) == 2 and all(a == pytest.approx(1.0) for a in areas)
    for name in ("ess.png", "acceptance.png"):
        assert all(float(t).is_integer() for t in seen[name][1]), name
