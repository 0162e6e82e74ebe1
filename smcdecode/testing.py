"""Exactness tooling shipped with the library.

* ``tiny_llama`` / ``tiny_gemma3`` / ``tiny_gpt2``: random-initialised HF models small enough
  that the continuation space of a prompt can be enumerated (vocab ≈ 5, max_new_tokens ≤ 4).
* :func:`exact` enumerates every complete continuation (ending in EOS, or truncated at
  ``max_new_tokens``) and computes, from one *uncached* forward over the full sequences,
  log π(x), log p(x) and log q(x) exactly.
* ``check_*``: the contracts every potential and proposal must satisfy. They raise
  ``AssertionError`` with a message when violated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smcdecode.backends import Backend, Engine
from smcdecode.errors import ArgumentError
from smcdecode.proposals.base import Proposal
from smcdecode.readouts import Layer, Readouts
from smcdecode.stopping import StopSet, StopSpec, stop_set
from smcdecode.targets.base import Potential, Sequences

# ---------------------------------------------------------------------------------- tiny models


def tiny_llama(
    vocab: int = 5, layers: int = 2, seed: int = 0, hidden: int = 16, scale: float = 40.0
) -> torch.nn.Module:
    """A randomly initialised Llama small enough to enumerate its sequence space (CPU, eval mode).

    Args:
        vocab: Vocabulary size V (id 0 is EOS).
        layers: Decoder layers N.
        seed: Seed of the random weights.
        hidden: Hidden size.
        scale: Factor on the output head, so next-token distributions are far from uniform.

    Returns:
        A ``LlamaForCausalLM``; wrap it as ``ReferenceBackend(model, eos_token_ids=[0])`` or
        ``Engine(model, eos_token_ids=[0])``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=0,
        bos_token_id=1,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than the default init, so distributions are far from uniform
        model.lm_head.weight.mul_(scale)
    return model.eval()


def tiny_gemma3(vocab: int = 7, layers: int = 3, seed: int = 0, sliding_window: int = 3) -> torch.nn.Module:
    """A randomly initialised Gemma3 text model with sliding-window layers, small enough to enumerate.

    Args:
        vocab: Vocabulary size V (id 0 is EOS).
        layers: Decoder layers N.
        seed: Seed of the random weights.
        sliding_window: The window of its sliding-window layers.

    Returns:
        A ``Gemma3ForCausalLM`` in eval mode.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["sliding_attention", "full_attention"] * layers
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=sliding_window,
        layer_types=types[:layers],
        final_logit_softcapping=3.0,
        eos_token_id=0,
        bos_token_id=1,
        pad_token_id=2,
    )
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)  # exercise the (1 + w) RMSNorm
    return model.eval()


def tiny_gpt2(vocab: int = 6, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised GPT-2, small enough to enumerate.

    Args:
        vocab: Vocabulary size V (id 0 is EOS).
        layers: Decoder layers N.
        seed: Seed of the random weights.

    Returns:
        A ``GPT2LMHeadModel`` in eval mode.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=layers, n_head=2, n_positions=64, eos_token_id=0, bos_token_id=1
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20.0)
    return model.eval()


# ---------------------------------------------------------------------------------- enumeration


def continuations(engine: Backend, max_new_tokens: int, stop: StopSet | None = None) -> list[tuple[int, ...]]:
    """Every complete continuation: ends in an EOS id, at the token that first completes a stop
    pattern of ``stop``, or has exactly max_new_tokens tokens.

    Args:
        engine: The backend whose vocabulary and EOS ids are enumerated (keep V tiny: there are
            up to V^max_new_tokens continuations).
        max_new_tokens: The longest continuation.
        stop: The stop automaton (None: no stop patterns).

    Returns:
        The continuations as token-id tuples, depth-first in token-id order.
    """
    eos = set(engine.eos_token_ids)
    out: list[tuple[int, ...]] = []
    next_state = stop.next_state.cpu().tolist() if stop is not None else None
    completes = stop.completes.cpu().tolist() if stop is not None else None

    def grow(prefix: tuple[int, ...], state: int) -> None:
        if len(prefix) == max_new_tokens:
            out.append(prefix)
            return
        for v in range(engine.vocab_size):
            if v in eos or (completes is not None and completes[state][v]):
                out.append(prefix + (v,))
            else:
                grow(prefix + (v,), next_state[state][v] if next_state is not None else 0)

    grow((), 0)
    return out


@dataclass
class Exact:
    """The enumerated sequence space of one prompt.

    Args:
        sequences: The M complete continuations.
        log_target: [M] unnormalised log π of each.
        log_p: [M] the model's log-probability of each.
        log_q: [M] the proposal's sequence log-prob (None without a proposal).
        token_log_q: Per sequence, the proposal's log q of each generated token (None without a
            proposal).
    """

    sequences: list[tuple[int, ...]]
    log_target: Tensor  # [M] unnormalised log π
    log_p: Tensor  # [M]
    log_q: Tensor | None  # [M] proposal's sequence log-prob (when a proposal was given)
    token_log_q: list[list[float]] | None = None  # per sequence, per generated token

    @property
    def log_z(self) -> float:
        """The exact log normaliser log Σ_x π(x)."""
        return float(torch.logsumexp(self.log_target.double(), 0))

    @property
    def probs(self) -> Tensor:
        """[M] the exact normalised target probability of each sequence."""
        return torch.softmax(self.log_target.double(), 0)

    @property
    def q_probs(self) -> Tensor:
        """[M] the proposal's probability of each sequence (needs ``proposal``)."""
        assert self.log_q is not None
        return self.log_q.double().exp()

    def index(self) -> dict[tuple[int, ...], int]:
        """Position of each sequence in ``sequences``."""
        return {s: i for i, s in enumerate(self.sequences)}


def _views(
    engine: Backend, target: Potential | None, proposal: Proposal | None, prompt: list[int], seqs: list[tuple[int, ...]]
) -> list[tuple[int, Readouts, list[int]]]:
    """Per generated position t: the Readouts of the rows that have a token t (from one
    uncached forward over prompt + x per engine/stream), and which rows those are."""
    req = target.requirements(engine) if target is not None else None
    if proposal is not None:
        r2 = proposal.requirements(engine)
        req = r2 if req is None else req | r2
    full = [prompt + list(s) for s in seqs]
    want_hidden = req is not None and req.hidden
    batch, main = engine.forward_batch(full, req.backend_keys() if req is not None else ())
    q = main.log_p.shape[1]
    aux: dict[Any, tuple[Tensor, int, int]] = {}
    for a in req.aux if req is not None else ():
        eng = a.engine if a.engine is not None else engine
        ctx = a.prompt_ids(eng) or prompt
        r = eng.forward([ctx + list(s) for s in seqs])
        aux[a] = (r.log_p, r.log_p.shape[1], len(ctx))
    out = []
    t_max = max(len(s) for s in seqs)
    for t in range(t_max):
        rows = [i for i, s in enumerate(seqs) if len(s) > t]
        ridx = torch.tensor(rows)
        # position predicting x_t: the token before it sits at index len(prompt)+t-1 of the row
        col = torch.tensor([q - len(full[i]) + len(prompt) + t - 1 for i in rows])
        view = main.map(lambda v: v[ridx, col]).merged(
            {
                k: lp[ridx, torch.tensor([qa - (plen + len(seqs[i])) + plen + t - 1 for i in rows])]
                for k, (lp, qa, plen) in aux.items()
            }
        )
        if want_hidden:  # re-apply layers over this forward's cache, attending to positions < P+t−1
            position = torch.full((len(rows),), len(prompt) + t - 1)
            view.recur = lambda h, span, r=ridx, p=position: engine.reapply(batch, h, span, p, rows=r)
        out.append((t, view, rows))
    return out


def exact(
    engine: Backend,
    target: Potential | None,
    prompt: Sequence[int] | str,
    max_new_tokens: int,
    proposal: Proposal | None = None,
    stop: StopSpec | StopSet | None = None,
) -> Exact:
    """Enumerate and score every complete continuation of ``prompt`` exactly.

    Args:
        engine: A backend over a tiny model (V^max_new_tokens sequences at most).
        target: The potential scored on every sequence (None: only log p).
        prompt: Token ids or a string.
        max_new_tokens: The horizon.
        proposal: Also score each sequence's exact log q under this proposal.
        stop: Enumerate the space stopped by these patterns (see ``smcdecode.stopping``).

    Returns:
        The sequences with their log π, log p and (with a proposal) log q; ``log_z`` is the exact
        log normaliser.
    """
    ids = engine.encode([prompt])[0]  # type: ignore[arg-type]
    stops = stop if isinstance(stop, StopSet) or stop is None else stop_set(engine, stop)
    seqs = continuations(engine, max_new_tokens, stops)
    m = len(seqs)
    log_t = torch.zeros(m, dtype=torch.float64)
    log_p = torch.zeros(m, dtype=torch.float64)
    log_q = torch.zeros(m, dtype=torch.float64) if proposal is not None else None
    token_log_q: list[list[float]] = [[] for _ in range(m)]
    with torch.no_grad():
        for t, view, rows in _views(engine, target, proposal, ids, seqs):
            ridx = torch.tensor(rows)
            x = torch.tensor([seqs[i][t] for i in rows])[:, None]
            log_p[ridx] += view.log_p.gather(1, x)[:, 0].double().cpu()
            if target is not None:
                f = target.token_log_factor(view)
                if f is not None:
                    log_t[ridx] += f.gather(1, x)[:, 0].double().cpu()
            if proposal is not None and log_q is not None:
                lq = proposal.log_q(view, target.token_log_factor if target is not None else (lambda v: None))
                step_q = lq.gather(1, x)[:, 0].double().cpu()
                log_q[ridx] += step_q
                for r, v in zip(rows, step_q.tolist()):
                    token_log_q[r].append(v)
    if target is not None and target.has_sequence_potential:
        seq = Sequences([prompt], [0] * m, list(range(m)), [list(s) for s in seqs], engine.decode_text)
        psi = target.sequence_log_potential(seq)
        if psi is not None:
            log_t += psi.double().cpu()
    return Exact(seqs, log_t, log_p, log_q, token_log_q if proposal is not None else None)


# ---------------------------------------------------------------------------------- contracts


def check_potential(
    engine: Backend,
    potential: Potential,
    prompt: Sequence[int],
    max_new_tokens: int,
    n: int = 64,
    seed: int = 0,
    atol: float = 1e-4,
) -> None:
    """Check that the incremental (cached) sampler path computes the potential exactly: the sum of
    per-token factors of sampled sequences equals the log density of one uncached forward.

    Args:
        engine: A backend over a tiny model.
        potential: The potential checked.
        prompt: Token ids.
        max_new_tokens: The horizon.
        n: Sequences sampled.
        seed: Seed of the sampling.
        atol: Absolute tolerance on log π and log p.

    Raises:
        AssertionError: a sequence's incremental log π or log p differs, naming it.
    """
    from smcdecode.proposals import Tempered
    from smcdecode.samplers import Ancestral

    ex = exact(engine, potential, prompt, max_new_tokens)
    where = ex.index()
    res = Ancestral(Tempered(1.0), n=n, target=potential).run(
        engine, [list(prompt)], max_new_tokens=max_new_tokens, seed=seed
    )
    for s in res.samples[0]:
        i = where[tuple(s.tokens)]
        assert s.log_target is not None
        assert math.isclose(s.log_target, float(ex.log_target[i]), abs_tol=atol, rel_tol=1e-5), (
            f"{potential!r}: incremental log π {s.log_target} != full-forward {float(ex.log_target[i])} for {s.tokens}"
        )
        assert math.isclose(s.log_p, float(ex.log_p[i]), abs_tol=atol), f"log p mismatch for {s.tokens}"


def check_algebra(
    engine: Backend,
    a: Potential,
    b: Potential,
    prompt: Sequence[int],
    max_new_tokens: int,
    k: float = 2.5,
    atol: float = 1e-4,
) -> None:
    """Check the algebra of potentials: log(a*b) = log a + log b and log(a**k) = k·log a on every
    sequence.

    Args:
        engine: A backend over a tiny model.
        a: A potential.
        b: Another.
        prompt: Token ids.
        max_new_tokens: The horizon.
        k: The exponent checked.
        atol: Absolute tolerance.

    Raises:
        AssertionError: the product or the power is wrong.
    """
    ea, eb = exact(engine, a, prompt, max_new_tokens), exact(engine, b, prompt, max_new_tokens)
    eab, eak = exact(engine, a * b, prompt, max_new_tokens), exact(engine, a**k, prompt, max_new_tokens)
    assert torch.allclose(eab.log_target, ea.log_target + eb.log_target, atol=atol), "product is not the sum"
    assert torch.allclose(eak.log_target, k * ea.log_target, atol=atol), "power does not scale"


def check_proposal(
    engine: Backend,
    proposal: Proposal,
    target: Potential | None,
    prompt: Sequence[int],
    max_new_tokens: int,
    n: int = 4000,
    seed: int = 0,
) -> None:
    """Check a proposal: q sums to one over the sequence space, the stored log q of every sampled
    sequence equals its exact log-probability, and the samples follow q (χ² test, p > 1e-3 at a
    fixed seed).

    Args:
        engine: A backend over a tiny model.
        proposal: The proposal checked.
        target: The target whose token factor the proposal may read (None for most proposals).
        prompt: Token ids.
        max_new_tokens: The horizon.
        n: Sequences sampled for the χ² test.
        seed: Seed of the sampling.

    Raises:
        AssertionError: one of the three checks fails, naming the proposal.
    """
    from smcdecode.samplers import Ancestral

    ex = exact(engine, target, prompt, max_new_tokens, proposal=proposal)
    assert ex.log_q is not None
    total = float(ex.q_probs.sum())
    assert abs(total - 1.0) < 1e-4, f"{proposal!r}: sequence probabilities sum to {total}, not 1"
    res = Ancestral(proposal, n=n, target=target).run(engine, [list(prompt)], max_new_tokens=max_new_tokens, seed=seed)
    where = ex.index()
    counts = torch.zeros(len(ex.sequences), dtype=torch.float64)
    for s in res.samples[0]:
        i = where[tuple(s.tokens)]
        counts[i] += 1
        assert math.isclose(s.log_q, float(ex.log_q[i]), abs_tol=1e-4), (
            f"{proposal!r}: stored log q {s.log_q} != exact {float(ex.log_q[i])} for {s.tokens}"
        )
    p = chi2_pvalue(counts, ex.q_probs)
    assert p > 1e-3, f"{proposal!r}: samples do not follow q (chi-square p = {p:.2g})"


# ---------------------------------------------------------------------------------- backends


def check_backend(backend: Backend, atol: float = 1e-4) -> None:
    """The conformance suite of the backend seam: drive ``backend`` through every operation a
    sampler uses and check, after each, that every row's readout equals the readout of a fresh
    prefill of the context the row should hold (the backend's own uncached answer), and that the
    counters count the real tokens. Raises ``AssertionError`` naming the operation that broke.

    Needs a vocabulary of at least 7 ids. Operations: ``start`` over ragged prompts (several
    prefill groups), ``decode`` with inactive rows, ``save_rows`` / ``truncate`` (down to the
    prompt itself) / the re-feeding decode / ``restore_rows``, ``admit`` (new prompts into some
    rows while another holds a snapshot and a pending re-feed), ``select`` within prompt groups
    with repeats and across groups with a new size, ``compact``, ``score`` against step-by-step
    decoding, and an interior-block move (``score`` refused on rows pending a re-feed, a ragged
    ``score`` after truncation with a row scoring nothing, one row kept and one restored),
    ``release`` (a released fork refuses use) and the recorded contexts; layer readouts too when
    the backend has the ``layers`` capability. A backend missing an operation cannot even be
    defined (see :data:`smcdecode.backends.base.OPERATIONS`).

    Args:
        backend: The backend under test, over a model with at least 7 vocabulary ids
            (``tiny_llama(vocab=8)``).
        atol: Absolute tolerance on the readouts.

    Raises:
        AssertionError: an operation broke a row's context, readout or counters (named).
    """
    assert backend.vocab_size >= 7, "check_backend needs a vocabulary of at least 7 ids"
    layers = (0, 1, backend.num_layers) if "layers" in backend.capabilities else ()
    keys = [Layer(i) for i in layers]
    prompts = [[1, 2, 3], [4, 2], [2, 2, 5, 6, 1, 3, 4, 5, 6, 2]]  # ragged: prefilled in two groups
    n = 2
    batch, out = backend.start(prompts, n, keys)
    seqs = [list(p) for p in prompts for _ in range(n)]
    gen = torch.Generator().manual_seed(0)

    def check(
        op: str, readout: Any, rows: Sequence[int] | None = None, contexts: list[list[int]] | None = None
    ) -> None:
        ctx = seqs if contexts is None else contexts
        for r in range(len(ctx)) if rows is None else rows:
            fresh, want = backend.prefill([ctx[r]], keys)
            backend.release(fresh)
            got_p = readout.log_p[r].float().cpu()
            if not torch.allclose(got_p, want.log_p[0].float().cpu(), atol=atol, rtol=0):
                raise AssertionError(f"{op}: row {r} (context {ctx[r]}) reads a different next-token distribution")
            if contexts is not None:
                continue  # a fork computes no layer readouts
            for key in keys:
                if not torch.allclose(readout[key][r].cpu(), want[key][0].cpu(), atol=atol, rtol=0):
                    raise AssertionError(f"{op}: row {r}, {key} readout differs")

    def draw(readout: Any) -> Tensor:
        return torch.multinomial(readout.log_p.float().exp().cpu(), 1, generator=gen).view(-1).to(backend.device)

    check("start", out)
    before = backend.counters["decode_tokens"]
    fed = 0
    for step in range(3):  # decode, some rows inactive
        tok = draw(out)
        active = torch.tensor([(r + step) % 3 != 0 for r in range(len(seqs))], device=backend.device)
        new = backend.decode(batch, tok, active)
        for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
            if a:
                seqs[r].append(t)
                fed += 1
        out = new.where(active, out)
        check(f"decode step {step}", out)
    # an MH move: checkpoint, truncate (row 0 to its prompt, row 3 by one token), re-read, extend, restore
    rows = torch.tensor([r in (0, 3) for r in range(len(seqs))], device=backend.device)
    old = {r: list(seqs[r]) for r in (0, 3)}
    plen = torch.tensor([len(p) for p in prompts for _ in range(n)], device=backend.device)
    keep = torch.tensor([len(seqs[r]) - plen[r].item() - (r == 3) if r in (0, 3) else 0 for r in range(len(seqs))])
    keep[0] = 0
    backend.save_rows(batch, rows)
    backend.truncate(batch, rows, plen + keep.to(backend.device))
    for r in (0, 3):
        seqs[r] = seqs[r][: int(plen[r]) + int(keep[r])]
    reread = backend.decode(batch, torch.zeros_like(plen), rows)
    fed += 2
    check("truncate + decode (re-feed)", reread, rows=[0, 3])
    out = reread.where(rows, out)
    tok = draw(out)
    out = backend.decode(batch, tok, rows).where(rows, out)
    fed += 2
    for r in (0, 3):
        seqs[r].append(int(tok[r]))
    check("decode after truncate", out, rows=[0, 3])
    backend.restore_rows(batch, torch.tensor([r == 3 for r in range(len(seqs))], device=backend.device))
    seqs[3] = old[3]
    tok = draw(out)
    out3 = backend.decode(batch, tok, torch.tensor([r == 3 for r in range(len(seqs))], device=backend.device))
    seqs[3].append(int(tok[3]))
    fed += 1
    check("restore_rows + decode", out3, rows=[3])
    out = out3.where(torch.tensor([r == 3 for r in range(len(seqs))], device=backend.device), out)
    # resample within prompt groups (row 0 re-fed its prompt's last token: its columns must travel)
    idx = torch.tensor([0, 0, 3, 3, 5, 4], device=backend.device)
    backend.select(batch, idx, within_groups=True)
    seqs, out = [list(seqs[i]) for i in idx.tolist()], out.index_select(idx)
    tok = draw(out)
    out = backend.decode(batch, tok)
    fed += len(seqs)
    seqs = [s + [t] for s, t in zip(seqs, tok.tolist())]
    check("select within groups + decode", out)
    backend.compact(batch, force=True)
    tok = draw(out)
    out = backend.decode(batch, tok)
    fed += len(seqs)
    seqs = [s + [t] for s, t in zip(seqs, tok.tolist())]
    check("compact + decode", out)
    # admission (continuous batching): rows 4 and 5 take a new prompt, row 1 a longer one, while
    # row 2 holds a snapshot and a pending re-feed; then row 2 re-reads and returns to its snapshot
    dev = backend.device
    r2 = torch.tensor([r == 2 for r in range(len(seqs))], device=dev)
    old2 = list(seqs[2])
    backend.save_rows(batch, r2)
    backend.truncate(batch, r2, torch.full_like(plen, len(seqs[2]) - 1))
    seqs[2] = seqs[2][:-1]
    # fork (lookahead rollouts): copies of row 2 (its pending re-feed travels with it) and row 0
    # decode on their own, twice; the batch is untouched (its rows are checked below)
    rolled = backend.counters["rollout_tokens"]
    src = [2, 0, 0]
    fork = backend.fork(batch, torch.tensor(src, device=dev), reserve=2)
    forked = [list(seqs[r]) for r in src]
    fout = out.index_select(torch.tensor(src, device=dev))
    for step in range(2):
        tok = draw(fout)
        fout = backend.decode(fork, tok)
        forked = [s if (step == 0 and r == 0) else s + [int(t)] for r, (s, t) in enumerate(zip(forked, tok.tolist()))]
        check(f"fork + decode step {step}", fout, contexts=forked)
    if backend.counters["rollout_tokens"] - rolled != 2 * len(src):
        raise AssertionError("fork: decodes on a fork must count as rollout_tokens")
    backend.release(fork)
    try:
        backend.decode(fork, tok)
    except ArgumentError:
        pass
    else:
        raise AssertionError("release: a released batch must refuse further use")
    new_prompts = [[6, 5], [6, 5], [3, 1, 4, 1, 5, 2, 6, 2, 3, 4, 5, 1, 2]]
    prefilled = backend.counters["prefill_tokens"]
    first = backend.admit(batch, torch.tensor([4, 5, 1], device=dev), new_prompts)
    assert backend.counters["prefill_tokens"] - prefilled == sum(map(len, new_prompts)), "admit: prefill counter"
    for r, p in zip((4, 5, 1), new_prompts):
        seqs[r] = list(p)
    admitted = torch.tensor([r in (1, 4, 5) for r in range(len(seqs))], device=dev)
    out = first.index_select(torch.tensor([0, 2, 0, 0, 0, 1], device=dev)).where(admitted, out)
    check("admit", out, rows=[1, 4, 5])
    active = admitted | r2
    tok = draw(out)
    new = backend.decode(batch, tok, active)
    for r in (1, 4, 5):
        seqs[r].append(int(tok[r]))
    fed += 4
    out = new.where(active, out)
    check("decode after admit (row 2 re-feeds)", out, rows=[1, 2, 4, 5])
    backend.restore_rows(batch, r2)
    seqs[2] = old2
    tok = draw(out)
    out = backend.decode(batch, tok, r2).where(r2, out)
    seqs[2].append(int(tok[2]))
    fed += 1
    check("restore_rows after admit", out, rows=[2])
    backend.compact(batch, force=True)
    tok = draw(out)
    out = backend.decode(batch, tok)
    fed += len(seqs)
    seqs = [s + [t] for s, t in zip(seqs, tok.tolist())]
    check("admit + compact + decode", out)
    # a new batch size (finished rows leave), then teacher-forced scoring of 3 tokens
    keep_rows = torch.tensor([5, 1, 2], device=backend.device)
    backend.select(batch, keep_rows)
    seqs, out = [seqs[i] for i in keep_rows.tolist()], out.index_select(keep_rows)
    block = torch.tensor([[3, 4, 5], [0, 6, 1], [2, 5, 5]], device=backend.device)
    n_tok = torch.tensor([3, 2, 3], device=backend.device)  # row 1's real tokens are its last 2
    scored = backend.score(batch, block, n_tok)
    fed += 8
    for j in range(3):
        step_seqs = seqs
        seqs = [
            s + block[r, 3 - int(n_tok[r]) :][: j + 1 - (3 - int(n_tok[r]))].tolist() for r, s in enumerate(step_seqs)
        ]
        rows_j = [r for r in range(3) if j >= 3 - int(n_tok[r])]
        check(f"score position {j}", scored.column(j), rows_j)
        seqs = step_seqs
    seqs = [s + block[r, 3 - int(n_tok[r]) :].tolist() for r, s in enumerate(seqs)]
    tok = draw(scored.column(-1))
    out = backend.decode(batch, tok)
    fed += 3
    seqs = [s + [t] for s, t in zip(seqs, tok.tolist())]
    check("decode after score", out)
    # an interior-block MH move: checkpoint rows 0 and 2 and cut them back; score refuses rows
    # pending a re-feed; re-read them, then one ragged score appends a new block's last token and
    # the kept suffix (row 0: 4 tokens, row 1: none, row 2: 2); row 2 is rejected (restore_rows),
    # row 0 accepted, and every row decodes on from its readout
    moved = torch.tensor([True, False, True], device=backend.device)
    old2 = list(seqs[2])
    cut = torch.tensor([len(seqs[0]) - 3, len(seqs[1]), len(seqs[2]) - 2], device=backend.device)
    backend.save_rows(batch, moved)
    backend.truncate(batch, moved, cut)
    seqs = [s[: int(c)] for s, c in zip(seqs, cut.tolist())]
    block = torch.tensor([[6, 1, 2, 3], [0, 0, 0, 0], [0, 0, 4, 4]], device=backend.device)
    n_tok = torch.tensor([4, 0, 2], device=backend.device)
    try:
        backend.score(batch, block, n_tok)
    except ArgumentError:
        pass
    else:
        raise AssertionError("score over rows pending a re-feed (after truncate) must be refused")
    reread = backend.decode(batch, torch.zeros_like(n_tok), moved)
    fed += 2
    check("truncate + decode before score", reread, rows=[0, 2])
    scored = backend.score(batch, block, n_tok)
    fed += 6
    q = block.shape[1]
    for j in range(q):
        rows_j = [r for r in (0, 2) if j >= q - int(n_tok[r])]
        before_j = [list(s) for s in seqs]
        for r in rows_j:
            seqs[r] = seqs[r] + block[r, q - int(n_tok[r]) : j + 1].tolist()
        check(f"ragged score after truncate, position {j}", scored.column(j), rows_j)
        seqs = before_j
    seqs[0] = seqs[0] + block[0].tolist()
    seqs[2] = seqs[2] + block[2, 2:].tolist()
    backend.restore_rows(batch, torch.tensor([False, False, True], device=backend.device))
    seqs[2] = old2
    out = scored.column(-1).where(torch.tensor([True, False, False], device=backend.device), out)
    tok = draw(out)
    out = backend.decode(batch, tok)
    fed += 3
    seqs = [s + [t] for s, t in zip(seqs, tok.tolist())]
    check("decode after a scored row is kept and another restored", out)
    counted = backend.counters["decode_tokens"] - before
    if counted != fed:
        raise AssertionError(f"counters: decode_tokens grew by {counted}, but {fed} real tokens were fed")
    if batch.contexts() != seqs:
        raise AssertionError("tokens/lengths: the batch's recorded contexts differ from what was fed")
    backend.release(batch)


def chi2_pvalue(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> float:
    """χ² goodness-of-fit p-value of ``counts`` against ``probs``, pooling cells whose expected
    count is below ``min_expected`` into one cell (a cell with expected 0 and a count fails).

    Args:
        counts: Observed counts [M].
        probs: The cells' probabilities [M] (summing to 1).
        min_expected: Cells with a smaller expected count are pooled.

    Returns:
        The p-value (0.0 when a count falls in a cell of expected 0; 1.0 with fewer than two cells).
    """
    from scipy.stats import chisquare

    n = float(counts.sum())
    exp = probs.double() * n
    if bool(((exp <= 1e-12) & (counts > 0)).any()):
        return 0.0
    big = exp >= min_expected
    obs_cells = counts[big].tolist()
    exp_cells = exp[big].tolist()
    small = ~big & (exp > 1e-12)
    if bool(small.any()):
        obs_cells.append(float(counts[small].sum()))
        exp_cells.append(float(exp[small].sum()))
    if len(obs_cells) < 2:
        return 1.0
    scale = sum(obs_cells) / sum(exp_cells)  # absorb float rounding of the probabilities
    return float(chisquare(obs_cells, [e * scale for e in exp_cells]).pvalue)


def weighted_histogram(samples: Sequence[Any], where: dict[tuple[int, ...], int], size: int) -> Tensor:
    """Σ of normalised weights per enumerated sequence.

    Args:
        samples: Samples with ``tokens`` and ``log_weight`` (normalised within the prompt).
        where: The index of each enumerated sequence (``Exact.index()``).
        size: M, the number of enumerated sequences.

    Returns:
        Float64 [M]: the summed weights of each sequence.
    """
    h = torch.zeros(size, dtype=torch.float64)
    for s in samples:
        h[where[tuple(s.tokens)]] += math.exp(s.log_weight)
    return h


class CharTokenizer:
    """A tokenizer for tiny models: id 0 is EOS, ids 1.. are the characters of ``alphabet``.

    Args:
        alphabet: The characters, id i + 1 for ``alphabet[i]``.
    """

    def __init__(self, alphabet: str = "abcd"):
        self.alphabet = alphabet
        self.eos_token_id = 0
        self.eos_token = "</s>"
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        """The ids of the characters of ``text`` that are in the alphabet.

        Args:
            text: The text (characters outside the alphabet are dropped).
        """
        return [self.alphabet.index(c) + 1 for c in text if c in self.alphabet]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (EOS and unknown ids dropped).

        Args:
            ids: Token ids.
            skip_special_tokens: Accepted for compatibility with HF tokenizers; EOS is always dropped.
        """
        return "".join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))


# ------------------------------------------------------------------- a toy evaluation recipe


def toy_eval(device: str = "cpu", *, problems: int = 12, delay: float = 0.0, poison: str | None = None) -> Any:
    """``(task, engine, sampler)`` of a toy evaluation, built from plain values so that an
    executor can build it inside a worker (``functools.partial(toy_eval, problems=12)``).

    Problems ``toy-0 ..`` have two-character prompts; the sampler is SMC on p^2 with 4 particles.
    ``delay`` seconds of sleep per prompt make a run last long enough to kill a worker mid-run;
    the ``poison`` problem's prompt kills the process that evaluates it (for fault tests).

    Args:
        device: Where the tiny model lives.
        problems: The number of problems.
        delay: Seconds of sleep per prompt.
        poison: The ``unique_id`` of a problem whose prompt exits the process with status 13
            (None: none).
    """
    import os
    import time

    from smcdecode import proposals, samplers, targets
    from smcdecode.evaluate import TaskAdapter

    def prompt(p: dict[str, Any]) -> str:
        if p["unique_id"] == poison:
            os._exit(13)
        time.sleep(delay)
        return str(p["prompt"])

    items = [{"unique_id": f"toy-{i}", "prompt": "abcd"[i % 4] + "abcd"[(i // 4) % 4]} for i in range(problems)]
    task = TaskAdapter("toy", items, prompt, lambda text: (text or "")[:1], lambda p, a: a == "a")
    engine = Engine(tiny_llama(vocab=5).to(device), tokenizer=CharTokenizer("abcd"), eos_token_ids=[0])
    sampler = samplers.SMC(targets.Power(2.0), proposals.Tempered(1.0), particles=4)
    return task, engine, sampler
