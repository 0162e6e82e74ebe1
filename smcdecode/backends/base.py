"""The backend seam: the contract a language-model runtime implements so that every sampler runs on it.

A :class:`Backend` runs a :class:`Batch` of B rows (one row = one chain or particle: prompt +
generated tokens) and returns next-token readouts. What every backend shares is written once,
here: the rows' token ids and lengths that samplers read (``Batch.tokens`` [B, C] holds row b's
context token at position p < ``Batch.lengths[b]``), argument checks, the counters, checkpoint
copies of the ids, and the *re-feed rule*: readouts are never stored per position, so truncating a
row to k tokens rolls its cache back to k − 1 and queues token k − 1 to be fed again by the next
:meth:`Backend.decode`, which then returns the distribution after k tokens.

Each row operation of the public API calls one backend operation. A backend implements all of them
(a concrete subclass that misses one fails when the class is defined, naming it):

=====================  =============================================  =====================================
public method          backend operation                              what it does to the backend's state
=====================  =============================================  =====================================
prefill / start        ``_new_batch`` + ``_admit``                    rows start on prompts (prefill)
decode / score         ``_append(tokens [B, Q], n_real [B], ...)``    row b appends its last n_real[b]
                                                                      tokens at positions lengths[b]..,
                                                                      returns readouts after each
truncate / rollback    ``_rollback(lengths [B])``                     drop every position ≥ lengths[b]
save_rows              ``_checkpoint(rows [B] bool)``                 snapshot the rows' context
restore_rows           ``_restore(rows [B] bool)``                    return to the snapshot
select                 ``_select(idx [B'], within_groups)``           row b becomes old row idx[b]
                                                                      (repeats allowed, SMC resampling)
fork / release         ``_fork(idx [R], reserve)`` / ``_release``     a new batch copying rows idx (no
                                                                      re-prefill); free a batch
admit                  ``_admit(idx [k], prompt_ids)``                rows idx restart on new prompts
compact                ``_compact(force)``                            reclaim dead cache space
start                  ``_mark_shared_prefix``                        rows of a prompt share its context
=====================  =============================================  =====================================

The base updates ``tokens``, ``lengths`` and ``pending`` *after* the backend's operation, so an
``_append`` reads the positions of its new tokens from ``batch.lengths``.

Optional capabilities — ``"layers"`` (intermediate-layer readouts), ``"hidden"`` (the last layer's
output) and ``"reapply"`` (running the top layers again on a latent, EGLR) — are declared in
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

from smcdecode.errors import ArgumentError, ArgumentTypeError, SmcdecodeError
from smcdecode.readouts import HIDDEN, Key, Layer, Readouts

Prompts = Sequence[str] | Sequence[Sequence[int]]

CAPABILITIES = ("layers", "hidden", "reapply")

# The backend operations every concrete backend implements (see the module docstring).
OPERATIONS = (
    "_new_batch",
    "_append",
    "_rollback",
    "_checkpoint",
    "_restore",
    "_select",
    "_fork",
    "_release",
    "_admit",
    "_compact",
    "_mark_shared_prefix",
)


class CapabilityError(SmcdecodeError, TypeError):
    """A target or proposal needs something this backend cannot provide.

    Args:
        backend: The backend's class name.
        capability: The missing capability (one of ``"layers"``, ``"hidden"``, ``"reapply"``).
        who: What needs it (a target, a proposal or a readout), named in the message.
    """

    def __init__(self, backend: str, capability: str, who: str):
        self.backend, self.capability, self.who = backend, capability, who
        super().__init__(f"{who} needs the capability {capability!r}, which the backend {backend} does not provide")


class CapacityError(SmcdecodeError, RuntimeError):
    """A backend ran out of a fixed resource (sequence ids, KV cells); names the limit and a value
    that would fit.

    Args:
        limit: The name of the setting that is too small (e.g. a constructor argument).
        value: Its current value.
        needed: The least value that would fit.
        hint: Extra advice appended to the message (empty: none).
    """

    def __init__(self, limit: str, value: int, needed: int, hint: str = ""):
        self.limit, self.value, self.needed = limit, value, needed
        extra = f"; {hint}" if hint else ""
        super().__init__(f"{limit}={value} is too small: this needs at least {needed}{extra}")


def left_padded(ids: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token-id lists as one [B, Q] tensor, row b's ids in its last len(ids[b]) columns (left
    padding with 0), and their counts [B]: the ragged layout of ``_append``.

    Args:
        ids: B non-empty token-id lists; Q is the longest one's length.
        device: Where the returned tensors live.

    Returns:
        ``(tokens, n_real)``: long [B, Q] left-padded ids and long [B] real-token counts.
    """
    q = max(len(p) for p in ids)
    tokens = torch.zeros(len(ids), q, dtype=torch.long)
    for b, p in enumerate(ids):
        tokens[b, q - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    return tokens.to(device), torch.tensor([len(p) for p in ids], device=device)


def appended_positions(lengths: Tensor, n_real: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """For Q appended columns whose row b's real tokens are its last ``n_real[b]``, written at
    positions ``lengths[b]``..: which columns are real, [B, Q] bool, and each column's position,
    [B, Q] long (padding columns get the positions before, clamped at 0).

    Args:
        lengths: Long [B], each row's context length before the append.
        n_real: Long [B], each row's real tokens among the Q columns (0 ≤ n_real[b] ≤ Q).
        q: Q, the number of appended columns.

    Returns:
        ``(real, pos)``: bool [B, Q] and long [B, Q].
    """
    j = torch.arange(q, device=lengths.device)
    offset = q - n_real  # [B]
    real = j[None, :] >= offset[:, None]  # [B, Q]
    pos = (lengths[:, None] + j[None, :] - offset[:, None]).clamp_min(0)  # [B, Q]
    return real, pos


@dataclass(eq=False)
class Batch:
    """B rows: the ids and lengths every backend shares, and the backend's own ``state``.

    ``tokens`` [B, C] long: row b's context (prompt + generated) token at position p, for
    p < ``lengths[b]`` (C grows by doubling); ``pending`` [B]: a token the next decode re-feeds
    (−1: none); ``saved_tokens`` / ``saved_lengths``: the last :meth:`Backend.save_rows` copy.

    Args:
        state: The backend's own state of the batch (its cache).
        tokens: Long [B, C], the rows' contexts.
        lengths: Long [B], the rows' context lengths.
        pending: Long [B], the token the next decode re-feeds per row (−1: none).
        readouts: The keys every forward on the batch computes (``Layer``, ``HIDDEN``).
        counter: What decode/score on the batch count (``"rollout_tokens"`` on a fork).
        saved_tokens: [B, C] the last snapshot's contexts (None before any save).
        saved_lengths: [B] the last snapshot's lengths (None before any save).
        bound: An upper bound of max(lengths), known on the host.
        released: Whether the batch was released.
    """

    state: Any
    tokens: Tensor
    lengths: Tensor
    pending: Tensor
    readouts: tuple[Key, ...] = ()  # keys computed by every forward on this batch (Layer, HIDDEN)
    counter: str = "decode_tokens"  # what decode/score on this batch count ("rollout_tokens" on a fork)
    saved_tokens: Tensor | None = None
    saved_lengths: Tensor | None = None
    bound: int = 0  # an upper bound of max(lengths), known on the host (capacity without syncs)
    released: bool = False

    @property
    def size(self) -> int:
        """Rows B of the batch."""
        return int(self.lengths.shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer indices whose readouts each forward computes."""
        return tuple(k.index for k in self.readouts if isinstance(k, Layer))

    @property
    def hidden(self) -> bool:
        """Whether each forward keeps the last layer's hidden state (``HIDDEN``)."""
        return HIDDEN in self.readouts

    def contexts(self) -> list[list[int]]:
        """Each row's current context (prompt + generated tokens), without a pending re-feed."""
        return [t[:n] for t, n in zip(self.tokens.tolist(), self.lengths.tolist())]

    def _reserve(self, columns: int) -> None:
        """Capacity for ``columns`` positions per row (doubling)."""
        self.bound = max(self.bound, columns)
        if columns > self.tokens.shape[1]:
            new = self.tokens.new_zeros(self.tokens.shape[0], max(64, 2 * columns))
            new[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = new
            if self.saved_tokens is not None:
                saved = new.new_zeros(new.shape)
                saved[:, : self.saved_tokens.shape[1]] = self.saved_tokens
                self.saved_tokens = saved

    def _write(self, tokens: Tensor, n_real: Tensor) -> None:
        """Row b's last ``n_real[b]`` of ``tokens`` [B, Q] go at positions lengths[b].. ."""
        self._reserve(self.bound + tokens.shape[1])
        real, pos = appended_positions(self.lengths, n_real, tokens.shape[1])
        self.tokens.scatter_(1, pos, torch.where(real, tokens, self.tokens.gather(1, pos)))
        self.lengths = self.lengths + n_real


class Backend(ABC):
    """Subclasses set ``device``, ``dtype``, ``tokenizer`` (or None), ``vocab_size``,
    ``eos_token_ids``, ``num_layers``, ``max_positions``, call :meth:`_init_counters`, and implement
    every operation of :data:`OPERATIONS` (see the module docstring)."""

    capabilities: frozenset[str] = frozenset()
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    vocab_size: int
    eos_token_ids: list[int]
    num_layers: int
    max_positions: int
    _eos: Tensor

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        missing = [op for op in OPERATIONS if getattr(cls, op) is getattr(Backend, op)]
        if missing:
            raise TypeError(
                f"{cls.__name__} does not implement the backend operation(s) {', '.join(missing)} "
                "(every row operation is the backend's; see smcdecode.backends.base)"
            )

    def _init_counters(self) -> None:
        self._counters = {
            "prefill_tokens": torch.zeros((), dtype=torch.long, device=self.device),
            "decode_tokens": torch.zeros((), dtype=torch.long, device=self.device),
            "rollout_tokens": torch.zeros((), dtype=torch.long, device=self.device),
        }
        self._positions_computed = 0
        self._forwards = 0
        self._rollout_forwards = 0

    # ------------------------------------------------------------------ what backends implement
    @abstractmethod
    def _new_batch(self, size: int, readouts: tuple[Key, ...]) -> Batch:
        """An empty batch of ``size`` rows (no context yet): build it with :meth:`_empty`."""

    @abstractmethod
    def _append(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readouts:
        """Append ``tokens`` [B, Q] to the cache (row b's real tokens are its last ``n_real[b]``,
        written at positions ``batch.lengths[b]``..), count them with :meth:`_count` under
        ``kind``, and return the readouts after every position ([B, Q, V], ``keep_all``) or after
        the last one ([B, V]); rows with ``n_real`` 0 get a placeholder. The base then records the
        tokens in ``batch.tokens`` / ``batch.lengths``."""

    @abstractmethod
    def _rollback(self, batch: Batch, lengths: Tensor) -> None:
        """Drop every cached position ≥ ``lengths[b]`` of row b (``lengths`` ≤ ``batch.lengths``)."""

    @abstractmethod
    def _checkpoint(self, batch: Batch, rows: Tensor) -> None:
        """Snapshot the cached context of ``rows`` (bool [B]), replacing their previous snapshot."""

    @abstractmethod
    def _restore(self, batch: Batch, rows: Tensor) -> None:
        """Return ``rows`` (bool [B]) to their snapshot, whatever was appended or rolled back since."""

    @abstractmethod
    def _select(self, batch: Batch, idx: Tensor, within_groups: bool) -> None:
        """Row b becomes old row ``idx[b]`` (long [B'], repeats allowed; B' may differ from B),
        snapshot included. ``within_groups``: every index stays in its row's prompt group."""

    @abstractmethod
    def _fork(self, batch: Batch, idx: Tensor, reserve: int) -> Any:
        """The state of a new batch whose row r copies row ``idx[r]`` (no snapshot); ``batch`` is
        untouched. ``reserve``: positions the fork is expected to grow by."""

    @abstractmethod
    def _release(self, batch: Batch) -> None:
        """Free what ``batch`` holds (it is not used again)."""

    @abstractmethod
    def _admit(self, batch: Batch, idx: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        """Rows ``idx`` (long [k], distinct) drop their context and snapshot and are prefilled with
        ``prompt_ids`` (counted as ``prefill_tokens``); returns their next-token readouts [k] with
        the batch's keys. Also how a fresh :meth:`_new_batch` is prefilled."""

    @abstractmethod
    def _compact(self, batch: Batch, force: bool) -> bool:
        """Reclaim dead cache space if it is worth it (always with ``force``); True if done."""

    @abstractmethod
    def _mark_shared_prefix(self, batch: Batch) -> None:
        """After :meth:`start`: every row's whole context is its prompt, shared by its group."""

    def _empty(self, state: Any, size: int, readouts: tuple[Key, ...] = (), counter: str = "decode_tokens") -> Batch:
        z = torch.zeros(size, dtype=torch.long, device=self.device)
        tokens = torch.zeros(size, 64, dtype=torch.long, device=self.device)
        return Batch(state, tokens, z, torch.full_like(z, -1), readouts, counter)

    # ------------------------------------------------------------------ capabilities
    def require(self, needs: Iterable[str], who: str) -> None:
        """Raise :class:`CapabilityError` naming the first capability in ``needs`` we lack.

        Args:
            needs: Capability names (``"layers"``, ``"hidden"``, ``"reapply"``).
            who: What needs them, named in the error.

        Raises:
            CapabilityError: a capability in ``needs`` is not in :attr:`capabilities`.
        """
        for cap in needs:
            if cap not in self.capabilities:
                raise CapabilityError(type(self).__name__, cap, who)

    # ------------------------------------------------------------------ vocabulary
    def encode(self, prompts: Prompts) -> list[list[int]]:
        """Token ids of each prompt; strings need a tokenizer.

        Args:
            prompts: A list of strings, or of token-id sequences (lists or 1-D tensors).

        Returns:
            One token-id list per prompt.

        Raises:
            ArgumentTypeError: ``prompts`` is not a list, a prompt has an unsupported type, or
                a string prompt is given to a backend without a tokenizer.
            ArgumentError: no prompts, an empty prompt, a token id outside [0, V) or a prompt
                longer than :attr:`max_positions`.
        """
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
        """The text of ``tokens`` without EOS ids and special tokens; None without a tokenizer.

        Args:
            tokens: Token ids (e.g. a sample's generated tokens).
        """
        if self.tokenizer is None:
            return None
        ids = [t for t in tokens if t not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_ids_containing(self, text: str) -> list[int]:
        """Ids whose decoded piece contains ``text`` (needs a tokenizer).

        Args:
            text: The substring to look for in each vocabulary entry's decoded piece.

        Returns:
            The matching token ids, ascending.

        Raises:
            ArgumentTypeError: the backend has no tokenizer.
        """
        if self.tokenizer is None:
            raise ArgumentTypeError("text", "needs an engine with a tokenizer")
        return [i for i in range(self.vocab_size) if text in self.tokenizer.decode([i])]

    def is_eos(self, tokens: Tensor) -> Tensor:
        """Which of ``tokens`` (any shape) are EOS ids: a bool tensor of the same shape.

        Args:
            tokens: Long token ids of any shape, on the backend's device.
        """
        return torch.isin(tokens, self._eos)

    def with_eos_tokens(self, extra: Iterable[int]) -> Backend:
        """A view of this backend (same model, tokenizer and counters) in which ``extra`` ids also
        end a sequence: e.g. a task whose answers end at a newline.

        Args:
            extra: Token ids to add to :attr:`eos_token_ids`.

        Returns:
            A shallow copy of this backend with the extended EOS set.
        """
        other = copy.copy(self)
        other.eos_token_ids = sorted(set(self.eos_token_ids) | {int(i) for i in extra})
        other._eos = torch.tensor(other.eos_token_ids, device=self.device)
        return other

    def check_readouts(self, readouts: Iterable[Key]) -> tuple[Key, ...]:
        """The keys a forward of this backend will compute: ``Layer`` keys in 0..N (sorted, then
        ``HIDDEN``); anything else, or a key whose capability is missing, raises.

        Args:
            readouts: Readout keys (``Layer(L)``, ``HIDDEN``).

        Returns:
            The deduplicated keys: ``Layer`` keys sorted by index, then ``HIDDEN`` if requested.

        Raises:
            ArgumentTypeError: a key is neither a ``Layer`` nor ``HIDDEN`` (e.g. an ``Aux`` key),
                or a layer index is not an int.
            ArgumentError: a layer index is outside 0..N.
            CapabilityError: the backend lacks ``"layers"`` or ``"hidden"`` for the keys asked.
        """
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
        """The layer indices sorted and deduplicated, each checked to lie in 0..N (0 = embeddings).

        Args:
            layers: Layer indices (N = :attr:`num_layers`).

        Raises:
            ArgumentTypeError: an index is not an int.
            ArgumentError: an index is outside 0..N.
        """
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
        """Set every counter of ``counters`` to zero."""
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
    def _live(self, batch: Batch) -> None:
        if batch.released:
            raise ArgumentError("batch", "was released: start a new batch")

    def _admitted(self, batch: Batch, idx: Tensor, prompt_ids: list[list[int]]) -> None:
        """Record rows ``idx``'s new prompts in the shared ids (after ``_admit``)."""
        q = max(len(p) for p in prompt_ids)
        batch._reserve(q)
        new = torch.zeros(len(prompt_ids), batch.tokens.shape[1], dtype=torch.long)
        for r, p in enumerate(prompt_ids):
            new[r, : len(p)] = torch.tensor(p)
        new = new.to(self.device)
        lengths = torch.tensor([len(p) for p in prompt_ids], device=self.device)
        batch.tokens[idx] = new
        batch.lengths = batch.lengths.index_put((idx,), lengths)
        batch.pending = batch.pending.index_put((idx,), torch.full_like(lengths, -1))
        if batch.saved_tokens is not None and batch.saved_lengths is not None:
            batch.saved_tokens[idx] = new
            batch.saved_lengths = batch.saved_lengths.index_put((idx,), lengths)

    @torch.no_grad()
    def prefill(self, prompts: Prompts, readouts: Iterable[Key] = ()) -> tuple[Batch, Readouts]:
        """Run the prompts (ragged lengths) and return the batch and the readouts of the
        next-token distribution after each prompt; every forward on the batch computes the keys
        ``readouts`` (``Layer(L)``, ``HIDDEN``).

        Args:
            prompts: B prompts, strings or token-id lists (see :meth:`encode`).
            readouts: Keys every forward on the batch computes besides ``log_p``.

        Returns:
            ``(batch, readouts)``: the new batch of B rows and the next-token readouts [B, V].

        Raises:
            ArgumentError: see :meth:`encode` and :meth:`check_readouts`.
            ArgumentTypeError: see :meth:`encode` and :meth:`check_readouts`.
            CapabilityError: a key needs a capability the backend lacks.
        """
        ids = self.encode(prompts)
        batch = self._new_batch(len(ids), self.check_readouts(readouts))
        idx = torch.arange(len(ids), device=self.device)
        out = self._admit(batch, idx, ids)
        self._admitted(batch, idx, ids)
        return batch, out

    @torch.no_grad()
    def start(
        self, prompt_ids: list[list[int]], rows_per_prompt: int, readouts: Iterable[Key] = ()
    ) -> tuple[Batch, Readouts]:
        """Prefill each prompt once and repeat it into ``rows_per_prompt`` rows (prompt-major);
        the rows of a prompt share its context, so resampling within a prompt can copy only what
        follows it.

        Args:
            prompt_ids: P prompts as token-id lists.
            rows_per_prompt: R, the rows (chains or particles) per prompt.
            readouts: Keys every forward on the batch computes besides ``log_p``.

        Returns:
            ``(batch, readouts)``: a batch of B = P·R rows (row b runs prompt b // R) and its
            next-token readouts [B, V].
        """
        batch, readout = self.prefill(prompt_ids, readouts)
        rep = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(rows_per_prompt)
        self.select(batch, rep)
        self._mark_shared_prefix(batch)
        return batch, readout.index_select(rep)

    @torch.no_grad()
    def forward(self, sequences: Prompts, readouts: Iterable[Key] = ()) -> Readouts:
        """One forward over whole sequences (left-padded to Q): readouts at every position,
        [B, Q, V]. Row b's sequence occupies its last len(sequences[b]) positions.

        Args:
            sequences: B sequences, strings or token-id lists (see :meth:`encode`).
            readouts: Keys to compute besides ``log_p``.

        Returns:
            Readouts [B, Q, V]; the batch used is released. Counted as ``prefill_tokens``.
        """
        batch, out = self.forward_batch(sequences, readouts)
        self.release(batch)
        return out

    @torch.no_grad()
    def forward_batch(self, sequences: Prompts, readouts: Iterable[Key] = ()) -> tuple[Batch, Readouts]:
        """:meth:`forward`, also returning the batch whose cache holds the sequences.

        Args:
            sequences: B sequences, strings or token-id lists (see :meth:`encode`).
            readouts: Keys every forward on the batch computes besides ``log_p``.

        Returns:
            ``(batch, readouts)``: the batch (row b's context is sequences[b]; :meth:`release`
            it when done) and the readouts [B, Q, V].
        """
        ids = self.encode(sequences)
        batch = self._new_batch(len(ids), self.check_readouts(readouts))
        tokens, n_real = left_padded(ids, self.device)
        out = self._append(batch, tokens, n_real, True, "prefill_tokens")
        batch._write(tokens, n_real)
        return batch, out

    @torch.no_grad()
    def decode(self, batch: Batch, tokens: Tensor, active: Tensor | None = None) -> Readouts:
        """Append one token per row (``tokens``: [B]) and return the next-token readout [B, V].

        Rows with ``active`` False append nothing (their readout is a placeholder). Rows left
        pending by :meth:`truncate` feed their pending token instead (and are active).

        Args:
            batch: A live batch of B rows.
            tokens: Long [B], the token each row appends.
            active: Bool [B], the rows that append (None: all).

        Returns:
            The next-token readouts [B, V] with the batch's keys.

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        tok = tokens.to(self.device)
        act = torch.ones_like(batch.lengths, dtype=torch.bool) if active is None else active.to(self.device)
        pending = batch.pending >= 0
        tok = torch.where(pending, batch.pending, tok).view(-1, 1)  # [B, 1]
        n_real = (act | pending).long()
        batch.pending = torch.full_like(batch.pending, -1)
        out = self._append(batch, tok, n_real, False, batch.counter)
        batch._write(tok, n_real)
        return out

    @torch.no_grad()
    def admit(self, batch: Batch, rows: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        """Rows ``rows`` (long [k], distinct) start afresh on ``prompt_ids`` (one prompt per row):
        their old context, snapshot and pending re-feed are dropped and the prompts are prefilled
        (no forward over the batch's other rows). Returns the admitted rows' next-token readouts
        ([k], with the batch's keys). The other rows are unchanged. Used to keep a batch full: a
        finished problem's rows take the next problem.

        Args:
            batch: A live batch of B rows.
            rows: Long [k], distinct row indices in [0, B).
            prompt_ids: k token-id lists, prompt i for row ``rows[i]``.

        Returns:
            The admitted rows' next-token readouts [k, V].

        Raises:
            ArgumentError: ``batch`` was released, ``rows`` is empty, out of range or repeats an
                index, ``prompt_ids`` is not a list of k prompts, or a prompt is empty or longer
                than :attr:`max_positions`.
        """
        self._live(batch)
        idx = rows.to(self.device).long().view(-1)
        k = int(idx.shape[0])
        if k == 0 or bool(((idx < 0) | (idx >= batch.size)).any()) or int(idx.unique().shape[0]) != k:
            raise ArgumentError("rows", f"expected distinct row indices in [0, {batch.size}), got {idx.tolist()}")
        if not isinstance(prompt_ids, list) or len(prompt_ids) != k:
            raise ArgumentError("prompt_ids", f"expected one prompt per admitted row ({k})")
        for p in prompt_ids:
            if not p or len(p) > self.max_positions:
                raise ArgumentError("prompt_ids", f"a prompt needs 1 to {self.max_positions} tokens, got {len(p)}")
        ids = [[int(t) for t in p] for p in prompt_ids]
        out = self._admit(batch, idx, ids)
        self._admitted(batch, idx, ids)
        return out

    @torch.no_grad()
    def score(self, batch: Batch, tokens: Tensor, n_tokens: Tensor | None = None) -> Readouts:
        """Teacher-forced: append ``tokens`` [B, Q] to every row's context in one forward and
        return readouts at every position, [B, Q, V]: position j is the distribution of the token
        that follows ``tokens[:, :j+1]``.

        Ragged rows: row b's real tokens are its *last* ``n_tokens[b]`` (0 ≤ n ≤ Q; left
        padding), so ``readout[:, -1]`` is every row's next-token distribution after its new
        context (a placeholder for rows with n = 0, whose context is unchanged). Counted as
        decode tokens (rollout tokens on a :meth:`fork`). Rows left pending by :meth:`truncate`
        must be re-read with :meth:`decode` first (their pending token would otherwise be lost):
        that is refused.

        Args:
            batch: A live batch of B rows.
            tokens: Long [B, Q], the tokens to append (left-padded when ragged).
            n_tokens: Long [B], each row's real tokens (its last n_tokens[b] columns; None: all Q).

        Returns:
            Readouts [B, Q, V] with the batch's keys.

        Raises:
            ArgumentError: ``batch`` was released, or a row is pending a re-feed from
                :meth:`truncate`.
        """
        self._live(batch)
        if bool((batch.pending >= 0).any()):  # one host sync per call
            raise ArgumentError("batch", "rows truncated by truncate() must be re-read with decode() before score()")
        tok = tokens.to(self.device)
        n_real = torch.full_like(batch.lengths, tok.shape[1]) if n_tokens is None else n_tokens.to(self.device)
        out = self._append(batch, tok, n_real, True, batch.counter)
        batch._write(tok, n_real)
        return out

    def select(self, batch: Batch, indices: Tensor, within_groups: bool = False) -> None:
        """Row b becomes old row ``indices[b]``; repeats allowed (SMC resampling), and the number
        of rows may change (finished rows leave). ``within_groups``: every index stays inside its
        row's prompt group (a backend may then copy only what follows the shared prompt).

        Args:
            batch: A live batch of B rows.
            indices: Long [B'], old row indices in [0, B); B' becomes the batch's size.
            within_groups: The caller promises every index stays in its row's prompt group.

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        idx = indices.to(self.device).long().view(-1)
        self._select(batch, idx, within_groups)
        batch.tokens, batch.lengths, batch.pending = batch.tokens[idx], batch.lengths[idx], batch.pending[idx]
        if batch.saved_tokens is not None and batch.saved_lengths is not None:
            batch.saved_tokens, batch.saved_lengths = batch.saved_tokens[idx], batch.saved_lengths[idx]

    @torch.no_grad()
    def fork(self, batch: Batch, rows: Tensor, reserve: int = 0) -> Batch:
        """A new batch of R = len(``rows``) rows (long [R], repeats allowed): row r is a copy of
        ``batch``'s row ``rows[r]`` (its cached context and a pending re-feed), so decoding on it
        continues that row's context without any re-prefill. ``batch`` is untouched; the fork has
        no snapshot, computes no readouts beyond ``log_p``, and counts its forwards as
        ``rollout_tokens`` / ``rollout_forwards`` (lookahead work, reported apart from the
        sampler's own decode work). ``reserve``: positions the fork is expected to grow by.
        :meth:`release` it when done.

        Args:
            batch: A live batch of B rows.
            rows: Long [R], row indices in [0, B) (repeats allowed).
            reserve: Positions each forked row is expected to grow by (≥ 0; a capacity hint).

        Returns:
            The new batch of R rows.

        Raises:
            ArgumentError: ``batch`` was released, ``rows`` is empty or out of range, or
                ``reserve`` is not an int ≥ 0.
        """
        self._live(batch)
        idx = rows.to(self.device).long().view(-1)
        if idx.numel() == 0 or bool(((idx < 0) | (idx >= batch.size)).any()):
            raise ArgumentError("rows", f"expected row indices in [0, {batch.size}), got {idx.tolist()}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ArgumentError("reserve", f"must be an int >= 0, got {reserve!r}")
        out = self._empty(self._fork(batch, idx, reserve), int(idx.shape[0]), (), "rollout_tokens")
        out.tokens, out.lengths, out.pending = batch.tokens[idx], batch.lengths[idx].clone(), batch.pending[idx].clone()
        out.bound = batch.bound
        return out

    def release(self, batch: Batch) -> None:
        """Free what ``batch`` holds in the backend (a fork after its rollouts, a finished run's
        batch); using it afterwards raises. Releasing twice does nothing.

        Args:
            batch: The batch to free.
        """
        if not batch.released:
            self._release(batch)
            batch.released = True

    def truncate(self, batch: Batch, rows: Tensor, lengths: Tensor) -> None:
        """For ``rows`` (bool [B]): keep the first ``lengths[b]`` ≥ 1 tokens of the context. The
        next :meth:`decode` returns the distribution after them for these rows (whatever token
        is passed for them), re-feeding the last kept token.

        Args:
            batch: A live batch of B rows.
            rows: Bool [B], the rows to truncate.
            lengths: Long [B], the tokens to keep per row (≥ 1 and ≤ the row's length where
                ``rows`` is True; ignored elsewhere).

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        rows, lengths = rows.to(self.device), lengths.to(self.device)
        last = batch.tokens.gather(1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
        kept = torch.where(rows, lengths - 1, batch.lengths)
        self._rollback(batch, kept)
        batch.lengths = kept
        batch.pending = torch.where(rows, last, batch.pending)

    def rollback(self, batch: Batch, lengths: Tensor) -> None:
        """Truncate row b's context to its first ``lengths[b]`` tokens (values above the current
        length change nothing).

        Args:
            batch: A live batch of B rows.
            lengths: Long [B], the tokens to keep per row.

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        kept = torch.minimum(batch.lengths, lengths.to(self.device))
        self._rollback(batch, kept)
        batch.lengths = kept

    def save_rows(self, batch: Batch, rows: Tensor) -> None:
        """Snapshot the context of ``rows`` (bool [B]) so :meth:`restore_rows` can return to it
        later, whatever is appended or rolled back in between.

        Args:
            batch: A live batch of B rows.
            rows: Bool [B], the rows whose snapshot is replaced.

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        rows = rows.to(self.device)
        self._checkpoint(batch, rows)
        if batch.saved_tokens is None or batch.saved_lengths is None:
            batch.saved_tokens, batch.saved_lengths = batch.tokens.clone(), batch.lengths.clone()
        else:
            batch.saved_tokens = torch.where(rows[:, None], batch.tokens, batch.saved_tokens)
            batch.saved_lengths = torch.where(rows, batch.lengths, batch.saved_lengths)

    def restore_rows(self, batch: Batch, rows: Tensor) -> None:
        """Return ``rows`` to their last :meth:`save_rows` snapshot (a pending re-feed is dropped).

        Args:
            batch: A live batch of B rows.
            rows: Bool [B], the rows to restore (each must have been saved).

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        if batch.saved_tokens is None or batch.saved_lengths is None:
            return  # nothing was ever saved: callers only restore rows they saved
        rows = rows.to(self.device)
        self._restore(batch, rows)
        batch.tokens = torch.where(rows[:, None], batch.saved_tokens, batch.tokens)
        batch.lengths = torch.where(rows, batch.saved_lengths, batch.lengths)
        batch.pending = torch.where(rows, -1, batch.pending)

    def compact(self, batch: Batch, force: bool = False) -> bool:
        """Reclaim dead cache space when the backend finds it worth it (always with ``force``).

        Args:
            batch: A live batch.
            force: Compact even when the backend would not find it worth it.

        Returns:
            True if the cache was compacted.

        Raises:
            ArgumentError: ``batch`` was released.
        """
        self._live(batch)
        done = self._compact(batch, force)
        if done:
            batch.bound = int(batch.lengths.max())  # the host's bound tightens when the cache shrinks
        return done

    def reapply(
        self, batch: Batch, hidden: Tensor, span: int, positions: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run the top ``span`` decoder layers again on a latent (capability ``"reapply"``).

        Args:
            batch: A live batch of B rows whose cache holds the rows' contexts.
            hidden: [R, D], the last layer's output at one position per row.
            span: The number of top decoder layers to run again (1..N).
            positions: Long [R], the position id of each row's latent.
            rows: Long [R], the batch rows the latents belong to (None: all, R = B).

        Returns:
            ``(hidden, log_p)``: the new hidden state [R, D] and its log-probs [R, V].

        Raises:
            CapabilityError: the backend lacks ``"reapply"`` (this base implementation always raises).
        """
        raise CapabilityError(type(self).__name__, "reapply", "latent re-application")
