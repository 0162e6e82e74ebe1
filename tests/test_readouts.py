"""Readout keys: one value type for every readout, keys that compare by what they name, pure
requirements, and hooks that are registered once and stay idle when not asked for."""

import pickle

import pytest
import torch

from smcdecode import Engine, ReferenceBackend
from smcdecode import targets as T
from smcdecode.backends import CapabilityError
from smcdecode.errors import ArgumentTypeError
from smcdecode.readouts import HIDDEN, Aux, Layer, Readouts, Requirements
from smcdecode.testing import tiny_llama


def test_keys_compare_by_what_they_name():
    amateur = object()
    assert Layer(3) == Layer(3) and Layer(3) != Layer(2)
    assert Aux(prompt=[1, 2]) == Aux(prompt=(1, 2))  # a list prompt is frozen
    assert Aux(amateur, "x") == Aux(amateur, "x") and Aux(amateur, "x") != Aux(object(), "x")
    assert len({Aux(amateur), Aux(amateur), Layer(1), Layer(1), HIDDEN}) == 3
    other = object()
    req = Requirements([Layer(4), Aux(amateur)]) | Requirements([Layer(1), HIDDEN, Aux(other), Aux(amateur)])
    assert req.layers == (1, 4) and req.hidden and req.aux == (Aux(amateur), Aux(other))  # declaration order
    assert req.backend_keys() == (Layer(1), Layer(4), HIDDEN)
    assert req.capabilities() == ("layers", "hidden", "reapply")


def test_a_missing_readout_names_its_key():
    view = Readouts(torch.zeros(2, 5), {Layer(1): torch.zeros(2, 5)})
    assert Layer(1) in view and Layer(2) not in view
    with pytest.raises(KeyError, match=r"Layer\(index=2\).*requirements"):
        view[Layer(2)]
    both = view.where(torch.tensor([True, False]), Readouts(torch.ones(2, 5), {Layer(1): torch.ones(2, 5)}))
    assert both[Layer(1)][:, 0].tolist() == [0.0, 1.0]


def test_requirements_store_nothing_and_follow_the_backend():
    shallow = Engine(tiny_llama(vocab=5, layers=4, seed=1), eos_token_ids=[0])
    deep = Engine(tiny_llama(vocab=5, layers=8, seed=1), eos_token_ids=[0])
    target = T.LayerContrast("dynamic", beta=-0.5, candidates="high")
    before = dict(vars(target))
    assert target.requirements(shallow).layers == (2,)
    assert target.requirements(deep).layers == (4, 6)
    assert target.requirements(shallow).layers == (2,)  # the deep call left nothing behind
    assert vars(target) == before
    # the readouts say how deep the model is, so the preset picks the same layers at each step
    _, view = deep.prefill([[1, 2]], target.requirements(deep).backend_keys())
    assert view.num_layers == 8 and set(view) == {Layer(4), Layer(6)}
    target.token_log_factor(view)  # reads Layer(4) and Layer(6) only


def test_backends_refuse_keys_they_cannot_compute():
    model = tiny_llama(vocab=5, layers=2, seed=1)
    ref = ReferenceBackend(model, eos_token_ids=[0])
    with pytest.raises(CapabilityError, match="hidden"):
        ref.prefill([[1, 2]], [HIDDEN])
    with pytest.raises(ArgumentTypeError, match="readouts"):
        Engine(model, eos_token_ids=[0]).prefill([[1, 2]], [Aux(prompt=[3])])


def test_layer_hooks_are_registered_once_and_idle_otherwise():
    model = tiny_llama(vocab=5, layers=2, seed=1)
    engine = Engine(model, eos_token_ids=[0])
    layer1 = model.model.layers[0]
    n_hooks = len(layer1._forward_hooks)
    batch, r = engine.prefill([[1, 2], [3]], [Layer(1), HIDDEN])
    for t in range(4):
        r = engine.decode(batch, torch.tensor([t % 5, 2]))
    assert len(layer1._forward_hooks) == n_hooks + 1  # one hook, whatever the number of forwards
    assert r[Layer(1)].shape == (2, 5) and r[HIDDEN].shape == (2, 16)
    plain, out = engine.prefill([[1, 2]])
    out = engine.decode(plain, torch.tensor([3]))
    assert set(out) == set() and engine._capture.out == {}
    # a view with extra EOS ids, and a second backend on the same model, share the hooks
    other = engine.with_eos_tokens([4])
    b2, _ = other.prefill([[1]], [Layer(1)])
    Engine(model, eos_token_ids=[0]).prefill([[1, 2]], [Layer(1)])
    assert len(layer1._forward_hooks) == n_hooks + 1
    want = engine.prefill([[1, 2]], [Layer(1)])[1][Layer(1)]
    torch.testing.assert_close(other.decode(b2, torch.tensor([2]))[Layer(1)], want)
    pickle.loads(pickle.dumps(model))  # the hooks do not stop a model from being saved
    engine.remove_hooks()
    assert len(layer1._forward_hooks) == n_hooks
    torch.testing.assert_close(engine.prefill([[1, 2]], (k for k in [Layer(1)]))[1][Layer(1)], want)


def test_a_failed_forward_keeps_no_activations_and_keys_may_be_a_generator(monkeypatch):
    engine = Engine(tiny_llama(vocab=5, layers=2, seed=1), eos_token_ids=[0])
    ragged = [[1], [1, 2, 3, 4, 2, 3]]  # prefilled in two length groups
    _, r = engine.prefill(ragged, (k for k in (Layer(1), Layer(2))))  # a generator, read once
    assert r[Layer(1)].shape == r[Layer(2)].shape == (2, 5)
    batch, _ = engine.prefill([[1, 2]], [Layer(1)])
    norm = engine.model.model.layers[1]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(norm, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        engine.decode(batch, torch.tensor([3]))  # fails after layer 1's hook has fired
    assert engine._capture.out == {} and engine._capture.want == frozenset()
