"""Stop patterns through the evaluation path and the command line."""

from __future__ import annotations

import argparse
import json

import pytest

from smcdecode import Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode.cli import _default_stop, parse_stop
from smcdecode.errors import ArgumentError, SmcdecodeError
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.tasks import humaneval
from smcdecode.testing import CharTokenizer, tiny_llama


def _task(n: int = 4) -> TaskAdapter:
    problems = [{"unique_id": f"p{k}", "prompt": "ab"[k % 2] + "c"} for k in range(n)]
    return TaskAdapter("toy", problems, lambda p: p["prompt"], lambda t: t, lambda p, a: a.endswith("ac"))


def test_eval_stops_samples_records_the_stops_and_refuses_mixing(tmp_path):
    engine = Engine(tiny_llama(vocab=5), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])
    sampler = S.Ancestral(Q.Tempered(1.0), n=6)
    path = run_eval(_task(), engine, sampler, "anc", str(tmp_path), max_new_tokens=8, stop=["ac"], progress=False)
    recs = [json.loads(x) for x in open(path)]
    assert len(recs) == 4 and all(r["stop"] == ["ac"] for r in recs)
    texts = [s["text"] for r in recs for s in r["samples"]]
    for text, n in ((s["text"], s["tokens"]) for r in recs for s in r["samples"]):
        assert "ac" not in text[:-1]  # nothing stops before the end
        assert text.endswith("ac") or n == 8 or len(text) < n  # stop, max_new_tokens, or EOS
    assert any(t.endswith("ac") for t in texts)
    assert all(r["decode_tokens"] > 0 for r in recs)
    # the same stops resume (nothing to do); other stops are refused
    assert run_eval(_task(), engine, sampler, "anc", str(tmp_path), max_new_tokens=8, stop=["ac"]) == path
    assert len(open(path).read().splitlines()) == 4
    with pytest.raises(ArgumentError, match="stop"):
        run_eval(_task(), engine, sampler, "anc", str(tmp_path), max_new_tokens=8, stop=None)


def test_stop_option_parsing_and_task_defaults():
    assert parse_stop(["\\ndef", "ids:198,750", "é"]) == ["\ndef", [198, 750], "é"]
    assert parse_stop(None) is None and parse_stop(["none"]) is None
    assert parse_stop(None, ("a",)) == ["a"]
    with pytest.raises(SmcdecodeError, match="ids:"):
        parse_stop(["ids:1,x"])
    he = argparse.Namespace(task="humaneval", prompt="raw")
    assert _default_stop(he) == humaneval.STOP_SEQUENCES
    assert _default_stop(argparse.Namespace(task="humaneval", prompt="chat"))[-1] == "\n```"
    assert _default_stop(argparse.Namespace(task="math500", prompt="raw")) is None
    # generation stops where the extractor cuts: the extracted completion never holds a stop
    text = "    return x\n\ndef main():\n    pass"
    assert humaneval.extract(text) == "    return x\n"
