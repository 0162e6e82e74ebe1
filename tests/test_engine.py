"""Engine: cached decode parity with uncached forwards, readouts, scoring, select/rollback, errors."""

from __future__ import annotations

import pytest
import torch

from smcdecode import ArgumentError, ArgumentTypeError, Engine, Layer
from smcdecode.testing import tiny_gemma3, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}
ATOL = 1e-5


def reference_log_p(model, seq: list[int]) -> torch.Tensor:
    """Next-token log-probs after ``seq`` from one plain, uncached HF forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)


@pytest.fixture(params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def test_cached_decode_matches_uncached_forward_through_select_and_rollback(model):
    engine = Engine(model, eos_token_ids=[0])
    prompts = [[1, 2, 3], [2], [3, 3, 1, 2, 4]]  # ragged: left padding inside
    batch, readout = engine.prefill(prompts)
    seqs = [list(p) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    for step in range(7):
        for i, s in enumerate(seqs):
            torch.testing.assert_close(readout.log_p[i], reference_log_p(model, s), atol=ATOL, rtol=0)
        tok = torch.multinomial(readout.log_p.exp(), 1, generator=gen).view(-1)
        seqs = [s + [int(t)] for s, t in zip(seqs, tok)]
        readout = engine.decode(batch, tok)
        if step == 2:  # resampling with repeats
            idx = torch.tensor([2, 0, 2])
            engine.select(batch, idx)
            readout = readout.index_select(idx)
            seqs = [list(seqs[i]) for i in idx.tolist()]
        if step == 4:  # per-row rollback to different lengths, then re-extension
            keep = [len(seqs[0]) - 3, len(seqs[1]) - 1, len(seqs[2]) - 5]
            engine.rollback(batch, torch.tensor(keep) - 1)
            readout = engine.decode(batch, torch.tensor([seqs[i][keep[i] - 1] for i in range(3)]))
            seqs = [s[:k] for s, k in zip(seqs, keep)]
        if step == 5:
            assert engine.compact(batch, force=True)


def test_restore_rows_returns_rejected_rows_to_their_snapshot():
    model = tiny_llama()
    engine = Engine(model, eos_token_ids=[0])
    batch, _ = engine.prefill([[1, 2], [3, 4, 2]])
    engine.decode(batch, torch.tensor([3, 3]))
    engine.save_rows(batch, torch.tensor([True, True]))
    engine.rollback(batch, torch.tensor([1, 2]))
    engine.decode(batch, torch.tensor([4, 1]))
    engine.restore_rows(batch, torch.tensor([False, True]))
    out = engine.decode(batch, torch.tensor([2, 2]))
    torch.testing.assert_close(out.log_p[0], reference_log_p(model, [1, 4, 2]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.log_p[1], reference_log_p(model, [3, 4, 2, 3, 2]), atol=ATOL, rtol=0)


def independent_readout(model, name: str, seq: list[int], layer: int) -> torch.Tensor:
    """lm_head(final_norm(h_L)) written out by hand from output_hidden_states."""
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_hidden_states=True)
        h = out.hidden_states[layer][0, -1].float()
        if name == "llama":
            w, eps = model.model.norm.weight.float(), model.config.rms_norm_eps
            x = h * torch.rsqrt(h.pow(2).mean() + eps) * w
            logits = x @ model.lm_head.weight.float().T
        elif name == "gemma3":
            w, eps = model.model.norm.weight.float(), model.config.rms_norm_eps
            x = h * torch.rsqrt(h.pow(2).mean() + eps) * (1.0 + w)
            cap = model.config.final_logit_softcapping
            logits = torch.tanh((x @ model.lm_head.weight.float().T) / cap) * cap
        else:
            ln = model.transformer.ln_f
            x = torch.nn.functional.layer_norm(h, h.shape, ln.weight.float(), ln.bias.float(), ln.eps)
            logits = x @ model.lm_head.weight.float().T
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layer_readouts(name):
    model = BUILDERS[name]()
    engine = Engine(model, eos_token_ids=[0])
    n = engine.num_layers
    prompts = [[1, 2, 3, 1], [4, 2]]
    batch, r = engine.prefill(prompts, [Layer(i) for i in range(n + 1)])
    for i, p in enumerate(prompts):
        torch.testing.assert_close(r[Layer(n)][i], r.log_p[i], atol=ATOL, rtol=0)  # L = N is the model
        for layer in range(n):  # hidden_states[N] is already normed in HF: only L < N here
            torch.testing.assert_close(
                r[Layer(layer)][i], independent_readout(model, name, p, layer), atol=1e-4, rtol=0
            )
    r2 = engine.decode(batch, torch.tensor([2, 3]))
    torch.testing.assert_close(r2[Layer(n)], r2.log_p, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        r2[Layer(1)][0], independent_readout(model, name, prompts[0] + [2], 1), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_score_equals_step_by_step_decode(name):
    model = BUILDERS[name]()
    engine = Engine(model, eos_token_ids=[0])
    tokens = torch.tensor([[0, 3, 1, 2], [4, 4, 1, 3]])
    n_tok = torch.tensor([3, 4])  # row 0 has 3 real tokens (left-padded)
    b1, _ = engine.prefill([[1, 2], [2, 3, 1]])
    scored = engine.score(b1, tokens, n_tok)
    b2, _ = engine.prefill([[1, 2], [2, 3, 1]])
    stepwise = []
    for j in range(4):
        active = j >= (4 - n_tok)
        stepwise.append(engine.decode(b2, tokens[:, j], active=active).log_p)
    for j in range(4):
        for row in range(2):
            if j >= 4 - int(n_tok[row]):
                torch.testing.assert_close(scored.log_p[row, j], stepwise[j][row], atol=ATOL, rtol=0)


def test_counters_count_real_tokens():
    engine = Engine(tiny_llama(), eos_token_ids=[0])
    batch, _ = engine.prefill([[1, 2, 3], [4, 2]])
    engine.decode(batch, torch.tensor([1, 1]), active=torch.tensor([True, False]))
    c = engine.counters
    assert c["prefill_tokens"] == 5 and c["decode_tokens"] == 1
    assert c["positions_computed"] == 2 * 3 + 2 and c["forwards"] == 2


def test_bad_input_errors_name_the_argument():
    engine = Engine(tiny_llama(), eos_token_ids=[0])
    with pytest.raises(ArgumentError, match="prompts") as e:
        engine.prefill([[1, 2], []])
    assert e.value.argument == "prompts"
    with pytest.raises(ArgumentError, match="longer than the context"):
        engine.prefill([[1] * 65])
    with pytest.raises(ArgumentError, match="layer"):
        engine.prefill([[1]], [Layer(engine.num_layers + 1)])
    with pytest.raises(ArgumentError, match="layer"):
        engine.prefill([[1]], [Layer(-1)])
    with pytest.raises(ArgumentTypeError, match="tokenizer"):
        engine.prefill(["hello"])
    with pytest.raises(ArgumentError, match="prompts"):
        engine.prefill([])
    model = tiny_llama()
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    with pytest.raises(ArgumentError, match="eos_token_ids"):
        Engine(model)
    from smcdecode.backends.hf import _check_dtype

    with pytest.raises(ArgumentError, match="dtype"):
        _check_dtype(torch.float16, torch.device("cpu"))
    with pytest.raises(ArgumentError, match="dtype"):
        _check_dtype(torch.int64, torch.device("cpu"))
    with pytest.raises(ArgumentError, match="device"):
        Engine.from_pretrained("x", device="not-a-device")


def test_grouped_prefill_of_very_ragged_prompts_matches_reference():
    model = tiny_llama()
    engine = Engine(model, eos_token_ids=[0])
    prompts = [[1] * 20 + [2, 3], [4], [2, 2, 3, 1, 4, 1, 2, 3, 1], [3, 1]]  # padding waste >> 25%
    batch, r = engine.prefill(prompts)
    assert engine.counters["positions_computed"] < 4 * 22  # not one padded forward
    for i, p in enumerate(prompts):
        torch.testing.assert_close(r.log_p[i], reference_log_p(model, p), atol=ATOL, rtol=0)
    r = engine.decode(batch, torch.tensor([1, 2, 3, 4]))
    for i, p in enumerate(prompts):
        torch.testing.assert_close(r.log_p[i], reference_log_p(model, p + [i + 1]), atol=ATOL, rtol=0)


def test_select_within_groups_copies_only_after_the_shared_prompt():
    model = tiny_llama()
    engine = Engine(model, eos_token_ids=[0])
    batch, r = engine.prefill([[1, 2, 3], [4, 2]])
    rep = torch.tensor([0, 0, 0, 1, 1, 1])
    engine.select(batch, rep)
    batch.state.rows.shared = batch.state.rows.width  # what start() marks: the prompt is shared
    seqs = [[1, 2, 3]] * 3 + [[4, 2]] * 3
    gen = torch.Generator().manual_seed(0)
    out = r.index_select(rep)
    for step in range(6):
        tok = torch.multinomial(out.log_p.exp(), 1, generator=gen).view(-1)
        active = torch.tensor([True, step < 3, True, True, step < 2, True])  # some rows stop early
        seqs = [s + [int(t)] if a else s for s, t, a in zip(seqs, tok, active)]
        new = engine.decode(batch, tok, active)
        out = new.where(active, out)
        if step in (1, 3):  # resample within each group of three
            idx = torch.tensor([2, 0, 2, 4, 4, 3])
            engine.select(batch, idx, within_groups=True)
            out, seqs = out.index_select(idx), [list(seqs[i]) for i in idx.tolist()]
        if step == 4:
            assert engine.compact(batch, force=True)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out.log_p[i], reference_log_p(model, s), atol=ATOL, rtol=0)
