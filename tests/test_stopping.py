"""Stop patterns compiled to a token automaton: agrees with a direct search on the decoded text."""

from __future__ import annotations

import itertools

import pytest
import torch

from smcdecode.errors import ArgumentError, ArgumentTypeError
from smcdecode.stopping import StopSet

# a toy vocabulary whose tokens split the stop strings across boundaries ("\ndef" = "\n" + "de" + "f")
VOCAB = [b"", b"\n", b"de", b"f", b"x", b"\nd", b"ef", "é".encode()[:1], "é".encode()[1:]]


def _first_stop_by_text(tokens, strings, ids):
    """The reference: the first t at which decode(x_≤t) contains a string or x_≤t ends with an id pattern."""
    for t in range(len(tokens)):
        text = b"".join(VOCAB[v] for v in tokens[: t + 1]).decode("utf-8", errors="replace")
        if any(s in text for s in strings):
            return t
        if any(list(tokens[: t + 1][-len(p) :]) == p for p in ids):
            return t
    return None


@pytest.mark.parametrize(
    "strings, ids",
    [(["\ndef"], []), (["\ndef", "ff", "é"], []), ([], [[4], [3, 4]]), (["\ndef", "xx"], [[6, 6], [2]])],
)
def test_automaton_finds_the_first_completion_of_every_sequence(strings, ids):
    stop = StopSet.build([*strings, *ids], len(VOCAB), vocab_bytes=VOCAB)
    assert stop is not None
    seqs = list(itertools.product(range(len(VOCAB)), repeat=4))
    expected = [_first_stop_by_text(s, strings, ids) for s in seqs]
    assert [stop.first_stop(s) for s in seqs] == expected
    # the batched scan agrees with the host reference, row by row
    tokens = torch.tensor(seqs)
    _, hits = stop.scan(stop.initial(len(seqs)), tokens)
    first = [int(h.nonzero()[0]) if h.any() else None for h in hits]
    assert first == expected
    assert sum(e is not None for e in expected) > 200  # the patterns do occur (281 of 6561 at the rarest)


def test_string_spanning_two_and_three_tokens():
    stop = StopSet.build(["\ndef"], len(VOCAB), vocab_bytes=VOCAB)
    assert stop.first_stop([4, 1, 2, 3, 4]) == 3  # "\n" "de" "f": completes at "f"
    assert stop.first_stop([5, 6]) == 1  # "\nd" "ef"
    assert stop.first_stop([4, 1, 2, 4, 3]) is None


def test_no_patterns_and_bad_input():
    assert StopSet.build(None, 5) is None
    assert StopSet.build([], 5) is None
    with pytest.raises(ArgumentTypeError, match="stop"):
        StopSet.build("\ndef", 5)
    with pytest.raises(ArgumentError, match="tokenizer"):
        StopSet.build(["\ndef"], 5)
    with pytest.raises(ArgumentError, match="outside"):
        StopSet.build([[7]], 5)
    with pytest.raises(ArgumentError, match="empty"):
        StopSet.build([""], 5, vocab_bytes=[b"a"] * 5)
    with pytest.raises(ArgumentError, match="non-empty"):
        StopSet.build([[]], 5)


def _tokenizer(path):
    import os

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


TEXTS = ["    return x\n\ndef foo():\n    pass", "Déjà vu: 中文 😀 \t\n\n  x=1", "if __name__ == '__main__':\n"]


@pytest.mark.integration
@pytest.mark.parametrize("model", ["embedded", "qwen2.5-coder-0.5b-instruct"])
def test_real_tokenizer_bytes_decode_and_a_stop_string_across_two_tokens(model):
    from smcdecode import models
    from smcdecode.backends import embedded_model_path
    from smcdecode.stopping import token_bytes

    if model == "embedded":
        path = embedded_model_path()
    else:
        path = models.available(model)
        if path is None:
            pytest.skip(f"{model} is not assembled here")
    tok = _tokenizer(path)
    vocab = token_bytes(tok, len(tok))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in ids).decode("utf-8") == tok.decode(ids)
    ids = tok.encode("    return x\n\ndef foo():", add_special_tokens=False)
    pieces = [vocab[i] for i in ids]
    stop = StopSet.build(["\ndef"], len(tok), tokenizer=tok)
    t = stop.first_stop(ids)
    assert t is not None and pieces[t].startswith(b"def")  # completed by the token after the newline(s)
    assert b"\n" in pieces[t - 1] and b"def" not in pieces[t - 1]  # the string spans two tokens
    assert stop.first_stop(tok.encode("    return x\n", add_special_tokens=False)) is None


@pytest.mark.integration
def test_samplers_on_the_embedded_model_end_at_the_first_stop_completion():
    import smcdecode as sd
    from smcdecode import proposals as Q
    from smcdecode import samplers as S
    from smcdecode import targets as T

    torch.set_num_threads(2)
    engine = sd.Engine.embedded()
    prompts = ["def add(a, b):\n    return", "Q: What is 2 + 3?\nA:"]
    stop = ["\n", "5"]
    stopped = 0
    for sampler in (S.Ancestral(Q.Tempered(1.0), n=3), S.SuffixMH(T.Power(2), Q.Tempered(0.5), block_size=4, steps=2)):
        res = sampler.run(engine, prompts, max_new_tokens=12, seed=0, stop=stop)
        for s in (s for per in res.samples for s in per):
            text, before = engine.decode_text(s.tokens), engine.decode_text(s.tokens[:-1])
            assert not any(p in before for p in stop)  # nothing completed a stop before the last token
            ended = any(p in text for p in stop) or s.tokens[-1] in engine.eos_token_ids
            assert ended or len(s.tokens) == 12
            stopped += any(p in text for p in stop)
    assert stopped >= 3  # the stops did end samples
