"""Stop patterns through the evaluation path and the command line."""

from __future__ import annotations

import json

import pytest

from smcdecode import Engine
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode.cli import parse_stop
from smcdecode.errors import ArgumentError, SmcdecodeError
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.tasks import TASKS, humaneval, load_task
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
    assert load_task("humaneval").stop == humaneval.STOP_SEQUENCES
    assert load_task("humaneval", prompt="chat").stop == (*humaneval.STOP_SEQUENCES, "\n```")
    # generation stops where the extractor cuts: the extracted completion never holds a stop
    text = "    return x\n\ndef main():\n    pass"
    assert humaneval.extract(text) == "    return x\n"


def test_task_registry(tmp_path):
    """Every task is built by name, with its rewards and default stops; bad arguments are named."""
    assert sorted(TASKS) == ["humaneval", "math500"]
    data = tmp_path / "m.jsonl"
    rows = [
        {"problem": "1+1?", "answer": "2", "level": 1, "subject": "Algebra", "unique_id": "a"},
        {"problem": "2+2?", "answer": "4", "level": 2, "subject": "Algebra", "unique_id": "b"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = load_task("math500", data=str(data), levels=[1])
    assert [p["unique_id"] for p in m.adapter.problems] == ["a"] and m.stop is None
    assert m.adapter.grade(m.adapter.problems[0], "2") and not m.adapter.grade(m.adapter.problems[0], "3")
    assert set(m.rewards) == {"boxed"}
    he = load_task("humaneval")
    assert len(he.adapter.problems) == 164 and set(he.rewards) == {"public-tests"}
    with pytest.raises(ArgumentError, match="task"):
        load_task("gsm8k")
    with pytest.raises(ArgumentError, match="data"):
        load_task("math500")
    with pytest.raises(ArgumentError, match="levels"):
        load_task("humaneval", levels=[1])
    with pytest.raises(ArgumentError, match="prompt"):
        load_task("humaneval", prompt="fewshot")


def test_eval_skip_and_limit_select_a_held_out_slice(capsys):
    """``--skip N`` leaves out the first N problems before ``--limit`` (a held-out split); a
    negative count is refused by the parser."""
    from smcdecode.cli import _task, build_parser

    args = build_parser().parse_args(["eval", "humaneval", "--method", "ancestral", "--out", "x", "--skip", "144"])
    uids = [p["unique_id"] for p in _task(args, None).adapter.problems]
    assert len(uids) == 20 and uids[0] == "HumanEval/144" and uids[-1] == "HumanEval/163"
    args = build_parser().parse_args(
        ["eval", "humaneval", "--method", "ancestral", "--out", "x", "--skip", "2", "--limit", "3"]
    )
    assert [p["unique_id"] for p in _task(args, None).adapter.problems] == [f"HumanEval/{i}" for i in (2, 3, 4)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "humaneval", "--method", "ancestral", "--out", "x", "--skip", "-1"])
    assert "--skip" in capsys.readouterr().err
