"""The backend seam: what a sampler needs from a language-model runtime.

A :class:`Backend` runs batches of rows (one row = one chain or particle: prompt + generated
tokens) and returns next-token readouts. Its operations, all on a :class:`Batch`:

* ``start(prompt_ids, rows_per_prompt)``: prefill each prompt once, repeat its rows; the rows of
  one prompt share the prompt's columns (``Rows.shared``);
* ``decode(batch, tokens [B], active [B])``: append one token per active row, return the readout
  after it, [B, V];
* ``score(batch, tokens [B, Q], n_tokens [B])``: teacher-forced, ragged (row b appends its last
  n_tokens[b] tokens), readouts at every appended position, [B, Q, V]; the last column is each
  row's next-token readout (an interior-block MH move rescores the kept suffix with it);
* ``select(batch, idx)``: row b becomes row idx[b] (resampling; repeats allowed);
* ``truncate(batch, rows, lengths)``: keep each row's first ``lengths`` tokens; the next decode
  returns the distribution after them (the backend re-feeds whatever it must);
* ``save_rows`` / ``restore_rows``: a per-row checkpoint (an MH move's old context);
* ``fork(batch, rows)``: a *new* batch whose row r is a copy of row ``rows[r]`` (cache included,
  no re-prefill; the original batch is untouched): lookahead rollouts branch from live rows.
  Forwards on a fork count as ``rollout_tokens`` / ``rollout_forwards``, not as decode work;
* ``compact``: drop dead cache columns; ``counters``: tokens and forwards so far.

Row bookkeeping is backend-agnostic (:class:`~smcdecode.backends.rows.Rows`); a backend supplies
the forward and what it does to its cache on select and compaction. Optional capabilities —
``"layers"`` (intermediate-layer readouts), ``"hidden"`` (the last layer's output) and
``"reapply"`` (running the top layers again on a latent, EGLR) — are declared in
:attr:`Backend.capabilities` and checked once per run against what the target and the proposal
require (:meth:`Backend.require`).

Readouts (:class:`~smcdecode.readouts.Readouts`) are float32 log-softmax tensors: ``log_p`` of the
final logits plus, keyed, the readouts a batch was started with: ``Layer(L)``, layer L's logit-lens
readout (0 = embeddings, N = final layer, equal to ``log_p``) and ``HIDDEN``, the last layer's
output. ``Aux`` keys are not a backend's business: the sampler runs them as separate streams.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smcdecode.backends.rows import Rows
from smcdecode.errors import ArgumentError, ArgumentTypeError, SmcdecodeError
from smcdecode.readouts import HIDDEN, Key, Layer, Readouts

Prompts = Sequence[str] | Sequence[Sequence[int]]

CAPABILITIES = ("layers", "hidden", "reapply")


class CapabilityError(SmcdecodeError, TypeError):
    """A target or proposal needs something this backend cannot provide."""

    def __init__(self, backend: str, capability: str, who: str):
        self.backend, self.capability, self.who = backend, capability, who
        super().__init__(f"{who} needs the capability {capability!r}, which the backend {backend} does not provide")


@dataclass
class Batch:
    """A backend's state for B rows: its cache (backend-specific) and the row bookkeeping."""

    cache: Any
    rows: Rows
    readouts: tuple[Key, ...] = ()  # keys computed by every forward on this batch (Layer, HIDDEN)
    counter: str = "decode_tokens"  # what decode/score on this batch count ("rollout_tokens" on a fork)

    @property
    def size(self) -> int:
        return self.rows.size

    @property
    def valid(self) -> Tensor:
        return self.rows.valid

    @property
    def pos(self) -> Tensor:
        return self.rows.pos

    @property
    def lengths(self) -> Tensor:
        return self.rows.lengths

    @property
    def shared(self) -> int:
        return self.rows.shared

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(k.index for k in self.readouts if isinstance(k, Layer))

    @property
    def hidden(self) -> bool:
        return HIDDEN in self.readouts


class Backend(ABC):
    """Subclasses set ``device``, ``dtype``, ``tokenizer`` (or None), ``vocab_size``,
    ``eos_token_ids``, ``num_layers``, ``max_positions`` and implement the forward."""

    capabilities: frozenset[str] = frozenset()
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    vocab_size: int
    eos_token_ids: list[int]
    num_layers: int
    max_positions: int
    _eos: Tensor

    def _init_counters(self) -> None:
        self._counters = {
            "prefill_tokens": torch.zeros((), dtype=torch.long, device=self.device),
            "decode_tokens": torch.zeros((), dtype=torch.long, device=self.device),
            "rollout_tokens": torch.zeros((), dtype=torch.long, device=self.device),
        }
        self._positions_computed = 0
        self._forwards = 0
        self._rollout_forwards = 0

    # ------------------------------------------------------------------ what subclasses implement
    @abstractmethod
    def _forward(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readouts:
        """Append ``tokens`` [B, Q] (row b's real tokens are its last ``n_real[b]``) to the batch
        — cache and rows (``batch.rows.append``) — count them under ``kind``, and return the
        readouts after every position ([B, Q, V], ``keep_all``) or after the last one ([B, V])."""

    @abstractmethod
    def _empty_batch(self, size: int, readouts: tuple[Key, ...]) -> Batch: ...

    def _select_cache(self, batch: Batch, idx: Tensor, start: int) -> None:
        """Reorder the cache's rows (columns from ``start`` on when the batch size is kept).
        A backend without a cache has nothing to do."""
        return None

    def _gather_cache(self, batch: Batch, order: Tensor) -> None:
        """Keep the cache columns ``order`` [B, S'] of each row (compaction)."""
        return None

    def _splice_cache(self, batch: Batch, part: Batch, rows: Tensor) -> None:
        """Widen the cache by ``part``'s width Q and write ``part``'s KV into the new columns of
        ``rows`` (the other rows' new columns are never read: their ``valid`` bits are off)."""
        return None

    def _concat_caches(self, parts: list[Batch], width: int) -> Any:
        """One cache holding the rows of ``parts``, each left-padded to ``width`` columns."""
        return None

    def _fork_cache(self, batch: Batch, idx: Tensor, reserve: int) -> Any:
        """A new cache whose row r is a copy of ``batch``'s row ``idx[r]`` (room for ``reserve``
        more columns when the cache preallocates). A backend without a cache returns None."""
        return None

    # ------------------------------------------------------------------ capabilities
    def require(self, needs: Iterable[str], who: str) -> None:
        """Raise :class:`CapabilityError` naming the first capability in ``needs`` we lack."""
        for cap in needs:
            if cap not in self.capabilities:
                raise CapabilityError(type(self).__name__, cap, who)

    # ------------------------------------------------------------------ vocabulary
    def encode(self, prompts: Prompts) -> list[list[int]]:
        """Token ids of each prompt; strings need a tokenizer."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ArgumentTypeError("prompts", "expected a list of strings or of token-id lists")
        if len(prompts) == 0:
            raise ArgumentError("prompts", "no prompts given")
        out: list[list[int]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ArgumentTypeError("prompts", "string prompts need a tokenizer; pass token-id lists instead")
                ids = list(self.tokenizer.encode(p))
            elif isinstance(p, torch.Tensor):
                ids = [int(t) for t in p.reshape(-1).tolist()]
            elif isinstance(p, Sequence):
                ids = [int(t) for t in p]  # type: ignore[call-overload]
            else:
                raise ArgumentTypeError("prompts", f"prompt {i} is a {type(p).__name__}")
            if not ids:
                raise ArgumentError("prompts", f"prompt {i} is empty")
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise ArgumentError("prompts", f"prompt {i} has token ids outside [0, {self.vocab_size})")
            if len(ids) > self.max_positions:
                raise ArgumentError(
                    "prompts", f"prompt {i} has {len(ids)} tokens, longer than the context ({self.max_positions})"
                )
            out.append(ids)
        return out

    def decode_text(self, tokens: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        ids = [t for t in tokens if t not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_ids_containing(self, text: str) -> list[int]:
        """Ids whose decoded piece contains ``text`` (needs a tokenizer)."""
        if self.tokenizer is None:
            raise ArgumentTypeError("text", "needs an engine with a tokenizer")
        return [i for i in range(self.vocab_size) if text in self.tokenizer.decode([i])]

    def is_eos(self, tokens: Tensor) -> Tensor:
        return torch.isin(tokens, self._eos)

    def with_eos_tokens(self, extra: Iterable[int]) -> Backend:
        """A view of this backend (same model, tokenizer and counters) in which ``extra`` ids also
        end a sequence: e.g. a task whose answers end at a newline."""
        other = copy.copy(self)
        other.eos_token_ids = sorted(set(self.eos_token_ids) | {int(i) for i in extra})
        other._eos = torch.tensor(other.eos_token_ids, device=self.device)
        return other

    def check_readouts(self, readouts: Iterable[Key]) -> tuple[Key, ...]:
        """The keys a forward of this backend will compute: ``Layer`` keys in 0..N (sorted, then
        ``HIDDEN``); anything else, or a key whose capability is missing, raises."""
        keys = set(readouts)
        for key in keys:
            if not isinstance(key, Layer) and key is not HIDDEN:
                raise ArgumentTypeError(
                    "readouts", f"{key!r} is not a backend readout (Layer(L) or HIDDEN; Aux keys are separate streams)"
                )
        layers = self.check_layers(k.index for k in keys if isinstance(k, Layer))
        if layers:
            self.require(("layers",), "layer readouts")
        if HIDDEN in keys:
            self.require(("hidden",), "the HIDDEN readout")
        return (*(Layer(i) for i in layers), *((HIDDEN,) if HIDDEN in keys else ()))

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ArgumentTypeError("layer", f"expected an int layer index, got {layer!r}")
            if not 0 <= layer <= self.num_layers:
                raise ArgumentError("layer", f"{layer} is outside 0..{self.num_layers} for this model")
            out.append(layer)
        return tuple(sorted(set(out)))

    # ------------------------------------------------------------------ counters
    @property
    def counters(self) -> dict[str, int]:
        """Forward tokens so far: real prompt tokens prefilled, real tokens decoded (or scored)
        on the sampler's own rows, real tokens fed to lookahead rollouts (forks), positions
        computed including padding, forward calls (all of them: the sequential depth) and forward
        calls on forks. Reading it synchronises."""
        return {
            "prefill_tokens": int(self._counters["prefill_tokens"]),
            "decode_tokens": int(self._counters["decode_tokens"]),
            "rollout_tokens": int(self._counters["rollout_tokens"]),
            "positions_computed": self._positions_computed,
            "forwards": self._forwards,
            "rollout_forwards": self._rollout_forwards,
        }

    def reset_counters(self) -> None:
        for v in self._counters.values():
            v.zero_()
        self._positions_computed = 0
        self._forwards = 0
        self._rollout_forwards = 0

    def _count(self, kind: str, n_real: Tensor, positions: int) -> None:
        self._counters[kind] += n_real.sum()
        self._positions_computed += positions
        self._forwards += 1
        if kind == "rollout_tokens":
            self._rollout_forwards += 1

    # ------------------------------------------------------------------ operations
    def _left_padded(self, prompts: Prompts, readouts: Iterable[Key]) -> tuple[Batch, Tensor, Tensor]:
        ids = self.encode(prompts)
        batch = self._empty_batch(len(ids), self.check_readouts(readouts))
        q = max(len(p) for p in ids)
        tokens = torch.zeros(len(ids), q, dtype=torch.long)
        for b, p in enumerate(ids):
            tokens[b, q - len(p) :] = torch.tensor(p)
        n_real = torch.tensor([len(p) for p in ids], device=self.device)
        return batch, tokens.to(self.device), n_real

    @torch.no_grad()
    def prefill(
        self, prompts: Prompts, readouts: Iterable[Key] = (), max_padding: float = 0.25
    ) -> tuple[Batch, Readouts]:
        """Run the prompts (ragged lengths) and return the batch and the readouts of the
        next-token distribution after each prompt; every forward on the batch computes the keys
        ``readouts`` (``Layer(L)``, ``HIDDEN``).

        One left-padded forward when padding would add at most ``max_padding`` of the real
        tokens; otherwise prompts are prefilled in groups of similar length and the caches are
        merged (padding columns are dead), so long and short prompts do not waste compute."""
        ids = self.encode(prompts)
        readouts = self.check_readouts(readouts)  # once: a generator would feed only the first group
        groups = _length_groups([len(p) for p in ids], max_padding)
        if len(groups) == 1:
            groups = [list(range(len(ids)))]  # one forward, in the given order
        parts = []
        for g in groups:
            batch, tokens, n_real = self._left_padded([ids[i] for i in g], readouts)
            parts.append((batch, self._forward(batch, tokens, n_real, keep_all=False, kind="prefill_tokens")))
        if len(parts) == 1:
            return parts[0]
        batches = [b for b, _ in parts]
        rows = Rows.stack([b.rows for b in batches])
        batch = Batch(self._concat_caches(batches, rows.width), rows, batches[0].readouts)
        readout = Readouts.cat([r for _, r in parts])
        order = torch.empty(len(ids), dtype=torch.long)
        order[torch.tensor([i for g in groups for i in g])] = torch.arange(len(ids))
        self.select(batch, order.to(self.device))
        return batch, readout.index_select(order.to(self.device))

    @torch.no_grad()
    def start(
        self, prompt_ids: list[list[int]], rows_per_prompt: int, readouts: Iterable[Key] = ()
    ) -> tuple[Batch, Readouts]:
        """Prefill each prompt once and repeat it into ``rows_per_prompt`` rows (prompt-major);
        the rows of a prompt share its columns, so resampling within a prompt copies only what
        follows them."""
        batch, readout = self.prefill(prompt_ids, readouts)
        rep = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(rows_per_prompt)
        self.select(batch, rep)
        batch.rows.shared = batch.rows.width
        return batch, readout.index_select(rep)

    @torch.no_grad()
    def forward(self, sequences: Prompts, readouts: Iterable[Key] = ()) -> Readouts:
        """One uncached forward over whole sequences (left-padded to Q): readouts at every
        position, [B, Q, V]. Row b's sequence occupies its last len(sequences[b]) positions."""
        return self.forward_batch(sequences, readouts)[1]

    @torch.no_grad()
    def forward_batch(self, sequences: Prompts, readouts: Iterable[Key] = ()) -> tuple[Batch, Readouts]:
        """:meth:`forward`, also returning the batch whose cache holds the sequences."""
        batch, tokens, n_real = self._left_padded(sequences, readouts)
        return batch, self._forward(batch, tokens, n_real, keep_all=True, kind="prefill_tokens")

    @torch.no_grad()
    def decode(self, batch: Batch, tokens: Tensor, active: Tensor | None = None) -> Readouts:
        """Append one token per row (``tokens``: [B]) and return the next-token readout [B, V].

        Rows with ``active`` False are computed but their column is dead (never attended to).
        Rows left pending by :meth:`truncate` feed their pending token instead (and are active)."""
        act = torch.ones_like(batch.lengths, dtype=torch.bool) if active is None else active
        tok, act = batch.rows.take_pending(tokens.to(self.device), act.to(self.device))
        return self._forward(batch, tok.view(-1, 1), act.long(), keep_all=False, kind=batch.counter)

    @torch.no_grad()
    def admit(self, batch: Batch, rows: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        """Rows ``rows`` (long [k], distinct) start afresh on ``prompt_ids`` (one prompt per row):
        their old context, snapshot and pending re-feed are dropped; the prompts are prefilled on
        their own (no forward over the batch's other rows) and their KV is written into new
        columns. Returns the admitted rows' next-token readouts ([k], with the batch's keys). The
        other rows are unchanged. Used to keep a batch full: a finished problem's rows take the
        next problem (dead columns go at the next compaction)."""
        idx = rows.to(self.device).long().view(-1)
        k = int(idx.shape[0])
        if k == 0 or bool(((idx < 0) | (idx >= batch.size)).any()) or int(idx.unique().shape[0]) != k:
            raise ArgumentError("rows", f"expected distinct row indices in [0, {batch.size}), got {idx.tolist()}")
        if not isinstance(prompt_ids, list) or len(prompt_ids) != k:
            raise ArgumentError("prompt_ids", f"expected one prompt per admitted row ({k})")
        for p in prompt_ids:
            if not p or len(p) > self.max_positions:
                raise ArgumentError("prompt_ids", f"a prompt needs 1 to {self.max_positions} tokens, got {len(p)}")
        part, readout = self.prefill(prompt_ids, batch.readouts)
        self._splice_cache(batch, part, idx)
        batch.rows.admit(idx, part.rows)
        return readout

    @torch.no_grad()
    def score(self, batch: Batch, tokens: Tensor, n_tokens: Tensor | None = None) -> Readouts:
        """Teacher-forced: append ``tokens`` [B, Q] to every row's context in one forward and
        return readouts at every position, [B, Q, V]: position j is the distribution of the token
        that follows ``tokens[:, :j+1]``.

        Ragged rows: row b's real tokens are its *last* ``n_tokens[b]`` (0 ≤ n ≤ Q; left
        padding, never attended to), so ``readout[:, -1]`` is every row's next-token distribution
        after its new context (a placeholder for rows with n = 0, whose context is unchanged).
        Counted as decode tokens (rollout tokens on a :meth:`fork`). Rows left pending by
        :meth:`truncate` must be re-read with :meth:`decode` first (their pending token would
        otherwise be lost): that is refused."""
        if bool((batch.rows.pending >= 0).any()):  # one host sync per call
            raise ArgumentError("batch", "rows truncated by truncate() must be re-read with decode() before score()")
        n_real = torch.full_like(batch.lengths, tokens.shape[1]) if n_tokens is None else n_tokens.to(self.device)
        return self._forward(batch, tokens.to(self.device), n_real, keep_all=True, kind=batch.counter)

    def select(self, batch: Batch, indices: Tensor, within_groups: bool = False) -> None:
        """Row b becomes old row ``indices[b]``; repeats allowed (SMC resampling).

        With ``within_groups`` (every index stays inside its row's group, so rows agree on the
        first ``batch.shared`` columns: the prompt) only the columns after the shared prefix are
        copied, in place; otherwise whole rows are gathered."""
        idx = indices.to(self.device)
        start = batch.rows.shared if within_groups else 0
        self._select_cache(batch, idx, start)
        batch.rows.select(idx)

    @torch.no_grad()
    def fork(self, batch: Batch, rows: Tensor, reserve: int = 0) -> Batch:
        """A new batch of R = len(``rows``) rows (long [R], repeats allowed): row r is a copy of
        ``batch``'s row ``rows[r]`` — its cache columns and bookkeeping, a pending re-feed included
        — so decoding on it continues that row's context without any re-prefill. ``batch`` is
        untouched; the fork has no snapshot (``save_rows``), shares no prefix across rows, computes
        no readouts beyond ``log_p``, and counts its forwards as ``rollout_tokens`` /
        ``rollout_forwards`` (lookahead work, reported apart from the sampler's own decode work).
        ``reserve``: columns the fork is expected to grow by (a preallocating cache makes room).
        Cost: a copy of the R rows' cache."""
        idx = rows.to(self.device).long().view(-1)
        if idx.numel() == 0 or bool(((idx < 0) | (idx >= batch.size)).any()):
            raise ArgumentError("rows", f"expected row indices in [0, {batch.size}), got {idx.tolist()}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ArgumentError("reserve", f"must be an int >= 0, got {reserve!r}")
        cache = self._fork_cache(batch, idx, reserve)
        return Batch(cache, batch.rows.fork(idx), (), counter="rollout_tokens")

    def truncate(self, batch: Batch, rows: Tensor, lengths: Tensor) -> None:
        """For ``rows`` (bool [B]): keep the first ``lengths[b]`` ≥ 1 tokens of the context. The
        next :meth:`decode` returns the distribution after them for these rows (whatever token
        is passed for them), re-feeding the last kept token."""
        batch.rows.truncate(rows.to(self.device), lengths.to(self.device))

    def save_rows(self, batch: Batch, rows: Tensor) -> None:
        """Snapshot the context of ``rows`` (bool [B]) so :meth:`restore_rows` can return to it
        later, whatever is appended or rolled back in between (compaction keeps its columns)."""
        batch.rows.save(rows.to(self.device))

    def restore_rows(self, batch: Batch, rows: Tensor) -> None:
        """Return ``rows`` to their last :meth:`save_rows` snapshot."""
        batch.rows.restore(rows.to(self.device))

    def rollback(self, batch: Batch, lengths: Tensor) -> None:
        """Truncate row b's context to its first ``lengths[b]`` tokens (values above the current
        length change nothing). O(B·S); the dropped columns stay until :meth:`compact`."""
        batch.rows.rollback(lengths.to(self.device))

    compact_ratio: float = 0.75

    def compact(self, batch: Batch, force: bool = False) -> bool:
        """Drop dead columns when fewer than ``compact_ratio`` of them are live. Synchronises once."""
        order = batch.rows.compact_order(self.compact_ratio, force)
        if order is None:
            return False
        self._gather_cache(batch, order)
        return True

    def reapply(
        self, batch: Batch, hidden: Tensor, span: int, positions: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run the top ``span`` decoder layers again on a latent (capability ``"reapply"``)."""
        raise CapabilityError(type(self).__name__, "reapply", "latent re-application")


def _length_groups(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Indices grouped (sorted by length) so each group's padded size is at most
    (1 + max_padding) × its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            padded = lengths[i] * (len(g) + 1)
            real = sum(lengths[j] for j in g) + lengths[i]
            if padded <= (1 + max_padding) * real:
                g.append(i)
                continue
        groups.append([i])
    return groups
