"""The backend seam: the conformance suite passes on the HF backend and on the cache-free
reference backend, the two agree, a backend-specific bug is caught, and a missing capability
gives a clear error naming the backend."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from smcdecode import Engine, ReferenceBackend, proposals, samplers
from smcdecode.backends import CapabilityError
from smcdecode.backends.rows import Rows
from smcdecode.readouts import Layer
from smcdecode.testing import check_backend, tiny_gemma3, tiny_gpt2, tiny_llama

MODELS = {
    "llama": lambda: tiny_llama(vocab=8, layers=2),
    "gemma3": lambda: tiny_gemma3(vocab=8),
    "gpt2": lambda: tiny_gpt2(vocab=8),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["hf", "reference"])
def test_conformance(name, kind):
    model = MODELS[name]()
    backend = Engine(model, eos_token_ids=[0]) if kind == "hf" else ReferenceBackend(model, eos_token_ids=[0])
    check_backend(backend)


def test_backends_agree_on_layer_readouts():
    model = tiny_gemma3(vocab=8)
    hf, ref = Engine(model, eos_token_ids=[0]), ReferenceBackend(model, eos_token_ids=[0])
    seqs = [[1, 2, 3, 4, 5], [6, 2]]
    keys = [Layer(0), Layer(1), Layer(3)]
    a, b = hf.forward(seqs, keys), ref.forward(seqs, keys)
    torch.testing.assert_close(a.log_p[0], b.log_p[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.log_p[1, -2:], b.log_p[1, -2:], atol=1e-4, rtol=0)
    for key in keys:
        torch.testing.assert_close(a[key][0], b[key][0], atol=1e-4, rtol=0)


def test_check_backend_catches_rows_that_lose_a_refed_prompt_token(monkeypatch):
    """The bug the redesign found: resampling within prompt groups kept each row's own flags for
    the prompt's columns, so a row that had re-fed the prompt's last token (a move from i = 0)
    and was copied elsewhere lost or duplicated that token."""
    real = Rows.select

    def own_prefix_flags(self, idx):
        shared, valid = self.shared, self.valid.clone()
        real(self, idx)
        if idx.numel() == self.size and shared:
            self._valid[:, :shared] = valid[:, :shared]

    monkeypatch.setattr(Rows, "select", own_prefix_flags)
    with pytest.raises(AssertionError, match="select within groups"):
        check_backend(Engine(tiny_llama(vocab=8), eos_token_ids=[0]))


def test_a_backend_missing_an_operation_fails_when_defined_naming_it():
    from smcdecode.backends import OPERATIONS, Backend

    class Partial(ReferenceBackend, abstract=True):  # an intermediate class may leave them out
        pass

    with pytest.raises(TypeError, match="_checkpoint, _restore"):

        class NoCheckpoints(Backend):  # every operation but the checkpoint pair
            locals().update({op: (lambda self, *a: None) for op in OPERATIONS if op not in ("_checkpoint", "_restore")})

    assert issubclass(Partial, Backend)


def test_missing_capability_names_the_backend_and_what_needs_it():
    ref = ReferenceBackend(tiny_llama(vocab=8), eos_token_ids=[0])
    sampler = samplers.Ancestral(proposals.EGLR(span=1))
    with pytest.raises(CapabilityError, match="ReferenceBackend") as err:
        sampler.run(ref, [[1, 2]], max_new_tokens=2)
    assert err.value.capability == "hidden" and "EGLR" in str(err.value)


_spec = importlib.util.spec_from_file_location("golden", os.path.join(os.path.dirname(__file__), "golden.py"))
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.mark.parametrize("name", ["ancestral_stop", "mh_power_stop", "mh_contrast", "smc_rejuvenate_anneal"])
def test_samplers_give_the_same_samples_on_the_reference_backend(monkeypatch, name):
    """Every sampler drives the seam only: on the cache-free backend it reproduces the HF
    backend's recorded samples token for token."""
    monkeypatch.setattr(golden, "_engine", lambda: ReferenceBackend(golden._model(), eos_token_ids=[0]))
    with open(golden.PATH) as f:
        want = json.load(f)[name]
    assert golden.record(name)["tokens"] == want["tokens"]


def test_admit_rejects_bad_rows_and_prompts():
    from smcdecode import ArgumentError

    backend = Engine(tiny_llama(vocab=8, layers=2, seed=0), eos_token_ids=[0])
    batch, _ = backend.start([[1, 2], [3]], 2)
    for rows, prompts, name in (
        (torch.tensor([4]), [[1]], "rows"),  # out of range
        (torch.tensor([1, 1]), [[1], [2]], "rows"),  # repeated
        (torch.tensor([0, 1]), [[1]], "prompt_ids"),  # one prompt for two rows
        (torch.tensor([0]), [[]], "prompt_ids"),  # empty
    ):
        with pytest.raises(ArgumentError, match=name):
            backend.admit(batch, rows, prompts)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forwards_pass_the_cache_under_the_name_the_model_takes(name):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40): decoding, and the latent recursion that calls decoder layers directly, must use the
    name the installed version takes, so no deprecation warning is raised."""
    import warnings

    engine = Engine(MODELS[name](), eos_token_ids=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        samplers.Ancestral(proposals.Tempered(1.0), n=2).run(engine, [[1, 2, 3]], max_new_tokens=3, seed=0)
        if name == "llama":  # the one architecture latent recursion supports
            proposal = proposals.EGLR(span=1, max_iters=2, entropy_threshold=-1.0)
            samplers.Ancestral(proposal, n=2).run(engine, [[1, 2, 3]], max_new_tokens=3, seed=0)
