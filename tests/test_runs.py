"""A run directory holds one run: a resume with another definition is refused, naming the
differing fields; report keeps different runs apart."""

from __future__ import annotations

import errno
import json
from argparse import Namespace

import pytest

from smcdecode import Engine, runs
from smcdecode import proposals as Q
from smcdecode import samplers as S
from smcdecode.cli import main, model_identity
from smcdecode.errors import ArgumentError
from smcdecode.evaluate import TaskAdapter, run_eval
from smcdecode.records import read_jsonl
from smcdecode.report import load_records, summarise
from smcdecode.runs import check, claim, comparable, differences, file_identity, lock, run_id
from smcdecode.testing import CharTokenizer, tiny_llama


def toy_task(n: int = 4) -> TaskAdapter:
    problems = [{"unique_id": f"toy-{i}", "prompt": "ab"[i % 2] + "cd"[i % 2]} for i in range(n)]
    return TaskAdapter("toy", problems, lambda p: p["prompt"], lambda text: (text or "")[:1], lambda p, a: a == "a")


def toy_engine() -> Engine:
    return Engine(tiny_llama(vocab=5), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])


MODEL_A = {"model": {"name": "a", "path": "/models/a.gguf", "bytes": 10, "sha256": "aa"}, "prompt": "raw"}


def run(out, task=None, **kw):
    args = {"max_new_tokens": 3, "progress": False, "definition": MODEL_A, **kw}
    return run_eval(task or toy_task(), toy_engine(), S.Ancestral(Q.Tempered(1.0), n=2), "anc", str(out), **args)


def test_a_resume_with_another_definition_is_refused_naming_every_differing_field(tmp_path):
    path = run(tmp_path)
    assert len(list(read_jsonl(path))) == 4
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["seed"] == 0 and stored["max_new_tokens"] == 3 and stored["model"]["sha256"] == "aa"
    other_model = {**MODEL_A, "model": {**MODEL_A["model"], "sha256": "bb", "bytes": 11}}
    cases = [
        ({"definition": other_model}, ["model.bytes: 10 -> 11", 'model.sha256: "aa" -> "bb"']),
        ({"max_new_tokens": 4}, ["max_new_tokens: 3 -> 4"]),
        ({"definition": {**MODEL_A, "prompt": "chat"}}, ['prompt: "raw" -> "chat"']),
        ({"select": "weight", "seed": 1}, ['select: "sample" -> "weight"', "seed: 0 -> 1"]),
    ]
    for kw, named in cases:
        with pytest.raises(ArgumentError) as err:
            run(tmp_path, **kw)
        assert err.value.argument == "out"
        for field in named:
            assert field in str(err.value), (field, str(err.value))
    assert len(list(read_jsonl(path))) == 4  # nothing was computed or written


def test_the_same_definition_resumes_and_a_moved_model_file_is_the_same_run(tmp_path):
    path = run(tmp_path)
    lines = open(path).read().splitlines()
    moved = {**MODEL_A, "model": {**MODEL_A["model"], "path": "/elsewhere/a.gguf"}}
    assert run(tmp_path, definition=moved, batch_size=3) == path  # batch size does not define a run
    renamed = {**MODEL_A, "model": {"name": "a", "file": "b.gguf", "bytes": 10, "sha256": "aa"}}
    assert run(tmp_path, definition=renamed) == path  # a run.json of paths resumes under file names
    assert open(path).read().splitlines() == lines
    assert {r["run"] for r in read_jsonl(path)} == {run_id(_full())} == {claim(str(tmp_path), _full())}


def _full() -> dict:
    """The definition ``run`` stores: run_eval's own fields and the caller's."""
    return {"task": "toy", "method": "anc", "seed": 0, "max_new_tokens": 3, "select": "sample", "stop": None, **MODEL_A}


def test_a_directory_of_older_records_is_adopted_only_by_their_own_run(tmp_path):
    path = run(tmp_path)
    (tmp_path / "run.json").unlink()  # as written before runs had definitions
    with pytest.raises(ArgumentError, match="seed: 0 -> 5"):
        run(tmp_path, seed=5)
    run(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["model"]["sha256"] == "aa"
    assert len(open(path).read().splitlines()) == 4


def test_report_keeps_runs_of_other_seeds_and_definitions_apart(tmp_path):
    run(tmp_path / "s0")
    run(tmp_path / "s1", seed=1)
    run(tmp_path / "s0-again", definition={**MODEL_A, "prompt": "chat"})
    rows = summarise(load_records([str(tmp_path / d) for d in ("s0", "s1", "s0-again")]))
    assert sorted(r["n"] for r in rows) == [4, 4, 4]
    names = sorted(r["method"] for r in rows)
    assert all(n.startswith("anc [seed ") for n in names) and len(set(names)) == 3
    assert sum("seed 0" in n for n in names) == 2 and sum("seed 1" in n for n in names) == 1
    one = summarise(load_records([str(tmp_path / "s0")]))
    assert [(r["method"], r["n"]) for r in one] == [("anc", 4)]


def test_file_identity_is_name_size_and_content_without_the_folders(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    ident = file_identity(str(f))
    assert ident == {
        "file": "m.gguf",
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "w").write_bytes(b"abc")
    assert file_identity(str(tmp_path / "dir") + "/") == {"file": "dir", "bytes": 3, "sha256": ANY_HEX}
    with pytest.raises(ArgumentError, match="path"):
        file_identity(str(tmp_path / "missing"))


class _Hex:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 64 and all(c in "0123456789abcdef" for c in other)


ANY_HEX = _Hex()


@pytest.mark.skipif(runs.fcntl is None, reason="no file locks on this system")
def test_a_directory_being_written_is_refused_to_a_second_writer_and_free_after(tmp_path):
    """Two runs into one directory at once would both take its unrecorded problems: the second is
    refused (by the directory's lock, taken here as a concurrent run would hold it), writes
    nothing, and once the first ends the directory resumes as usual."""
    path = run(tmp_path, task=toy_task(2))
    with lock(str(tmp_path)):
        with pytest.raises(ArgumentError) as err:
            run(tmp_path)  # two problems left to do
        assert err.value.argument == "out" and "being written by another run" in str(err.value)
        with pytest.raises(ArgumentError, match="being written"):
            check(str(tmp_path), _full())  # the CLI's check before a model loads says the same
        assert len(list(read_jsonl(path))) == 2
    run(tmp_path)
    assert sorted(r["uid"] for r in read_jsonl(path)) == [f"toy-{i}" for i in range(4)]


def test_a_filesystem_without_locks_warns_and_runs_unlocked(tmp_path, monkeypatch):
    if runs.fcntl is None:
        pytest.skip("no file locks on this system")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="unlocked"):
        path = run(tmp_path)
    assert len(list(read_jsonl(path))) == 4


def test_a_model_given_by_path_is_identified_by_its_bytes_not_where_it_sits(tmp_path):
    """Two copies of one file are the same model, and a run.json written when a model given by
    path was named by that path still resumes."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.gguf").write_bytes(b"weights")
    ident_a, ident_b = (model_identity(Namespace(model=str(tmp_path / d / "m.gguf"))) for d in ("a", "b"))
    assert ident_a == ident_b and ident_a["file"] == "m.gguf" and "name" not in ident_a
    older = {"name": str(tmp_path / "a" / "m.gguf"), "path": str(tmp_path / "a" / "m.gguf"), **ident_a}
    del older["file"]
    assert differences(comparable({"model": older}), comparable({"model": ident_b})) == []
    assert run_id({"model": {**ident_a, "name": "qwen"}}) != run_id({"model": ident_a})  # a registry name counts


def test_the_cli_refuses_a_rerun_with_another_max_new_tokens_or_seed_before_loading_the_model(tmp_path, capsys):
    """As a new user would: the same --out, another --max-new-tokens, then another --seed."""
    out = str(tmp_path / "he")
    base = ["eval", "humaneval", "--method", "ancestral", "--limit", "1", "--out", out]
    assert main(base + ["--max-new-tokens", "2"]) == 0
    stored = json.loads((tmp_path / "he" / "run.json").read_text())
    assert stored["model"]["name"] == "embedded" and len(stored["model"]["sha256"]) == 64
    assert stored["backend"] == "hf" and stored["dtype"] == "float32" and stored["prompt"] == "raw"
    capsys.readouterr()
    assert main(base + ["--max-new-tokens", "3"]) == 2
    assert "max_new_tokens: 2 -> 3" in capsys.readouterr().err
    assert main(base + ["--max-new-tokens", "2", "--seed", "1"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err
    assert len(list(read_jsonl(f"{out}/results.jsonl"))) == 1
