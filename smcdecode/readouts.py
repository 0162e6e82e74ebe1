"""Readouts: what a forward pass computes at a row's next position, named by keys.

For a row with context x_<t (prompt + generated tokens) and a model of N decoder layers whose
layer-L output is h_L (h_0 = the embeddings):

    log_p          = log softmax(lm_head(norm(h_N)))        [B, V]  always computed
    Layer(L)       = log softmax(lm_head(norm(h_L)))        [B, V]  the logit lens; Layer(N) = log_p
    Aux(engine, c) = log p_aux(x_t | c ⊕ y_<t)              [B, V]  a second stream: another model
                                                                    and/or another prompt c, fed the
                                                                    row's generated tokens y_<t
    HIDDEN         = h_N (before the final norm)            [B, D]  latent recursion (EGLR)

A target or proposal declares the keys it reads in ``requirements(backend)`` (a pure function:
it computes, checks and returns, and stores nothing), the sampler asks the backend once for the
layer and hidden keys and opens one stream per ``Aux`` key, and every step hands the factors a
:class:`Readouts` value indexed by those keys: ``view[Layer(8)]``, ``view[aux]``,
``view[HIDDEN]``. A new kind of readout is a new key here plus the backend code that computes it.
Teacher-forced forwards return the same value with a column axis: [B, Q, V].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layer:
    """Layer ``index``'s logit-lens readout (0 = the embeddings, N = the final layer).

    Args:
        index: The layer, 0..N.
    """

    index: int


@dataclass(frozen=True, eq=False)
class Aux:
    """The final-layer log-probs of a second stream fed the same continuation tokens: another
    backend (``engine``: contrastive decoding's amateur) and/or another prompt (``prompt``:
    classifier-free guidance's unconditional context). ``engine=None`` is the main backend;
    ``prompt=None`` is each row's own prompt. Two keys are equal when they name the same engine
    object and the same prompt (``Aux(None, c)`` and ``Aux(main_backend, c)`` are two keys, so two
    identical streams: name the main backend as ``None``).

    Args:
        engine: The stream's backend (None: the main backend).
        prompt: The stream's prompt, a string or token ids (None: each row's own prompt).
    """

    engine: Any = None
    prompt: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and not isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))

    def prompt_ids(self, backend: Any) -> list[int] | None:
        """The stream's own prompt as ``backend``'s token ids (None: each row's own prompt).

        Args:
            backend: The backend that encodes a string prompt (its ``encode``).
        """
        if self.prompt is None:
            return None
        return list(backend.encode([self.prompt if isinstance(self.prompt, str) else list(self.prompt)])[0])

    def _id(self) -> tuple[int, Any]:
        return id(self.engine), self.prompt

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aux) and self._id() == other._id()

    def __hash__(self) -> int:
        return hash(("aux", *self._id()))


class _Hidden:
    """The last decoder layer's output (before the final norm), [B, D]."""

    def __repr__(self) -> str:
        return "HIDDEN"

    def __reduce__(self) -> str:
        return "HIDDEN"


HIDDEN = _Hidden()

Key = Layer | Aux | _Hidden


@dataclass(frozen=True)
class Requirements:
    """The readout keys a potential or proposal reads beyond ``log_p``, in the order they were
    declared (duplicates dropped), so the auxiliary streams always open in the same order.

    Args:
        keys: Readout keys (``Layer(L)``, ``HIDDEN``, ``Aux(...)``).
    """

    keys: tuple[Key, ...] = ()

    def __init__(self, keys: Iterable[Key] = ()):
        object.__setattr__(self, "keys", tuple(dict.fromkeys(keys)))

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements((*self.keys, *other.keys))

    @property
    def layers(self) -> tuple[int, ...]:
        """The indices of the ``Layer`` keys, sorted."""
        return tuple(sorted(k.index for k in self.keys if isinstance(k, Layer)))

    @property
    def aux(self) -> tuple[Aux, ...]:
        """The ``Aux`` keys: auxiliary streams run beside the main one."""
        return tuple(k for k in self.keys if isinstance(k, Aux))

    @property
    def hidden(self) -> bool:
        """Whether ``HIDDEN`` is required."""
        return HIDDEN in self.keys

    def backend_keys(self) -> tuple[Key, ...]:
        """The keys the main backend computes itself (layers, hidden); ``Aux`` keys are streams."""
        return (*(Layer(i) for i in self.layers), *((HIDDEN,) if self.hidden else ()))

    def capabilities(self) -> tuple[str, ...]:
        """The optional backend capabilities these keys need (see ``Backend.require``)."""
        return (("layers",) if self.layers else ()) + (("hidden", "reapply") if self.hidden else ())


@dataclass
class Readouts:
    """``log_p`` plus the requested readouts, keyed (see the module docstring). Shapes: [B, V]
    (or [B, D] for ``HIDDEN``) at one position per row, or [B, Q, ·] at every scored column.

    ``num_layers``: the model's depth N (so ``Layer(N)`` is ``log_p``), set by the backend.
    ``recur(hidden, span) -> (hidden', log_p')`` re-applies the top ``span`` layers at this
    step's position; the sampler binds it to the live cache just before a proposal that needs it
    (EGLR) draws.

    Args:
        log_p: Float32 [B, V] (or [B, Q, V]), the final layer's log-softmax.
        values: The other readouts by key: ``Layer(L)`` and ``Aux`` [B, V] log-probs,
            ``HIDDEN`` [B, D].
        num_layers: The model's depth N (None: unknown).
        recur: The re-application function bound by the sampler (None: unbound).
    """

    log_p: Tensor
    values: dict[Key, Tensor] = field(default_factory=dict)
    num_layers: int | None = None
    recur: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None = None

    def __getitem__(self, key: Key) -> Tensor:
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(f"the readout {key!r} was not computed: declare it in requirements()") from None

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def __iter__(self) -> Iterator[Key]:
        return iter(self.values)

    def get(self, key: Key) -> Tensor | None:
        """The readout of ``key`` [B, V] (or [B, D] for ``HIDDEN``), or None when it was not computed.

        Args:
            key: A readout key (``Layer(L)``, ``HIDDEN``, ``Aux(...)``).
        """
        return self.values.get(key)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Readouts:
        """``fn`` applied to every tensor (``recur`` is not carried over: it is position-bound).

        Args:
            fn: A function from a tensor to a tensor, applied to ``log_p`` and every value.
        """
        return Readouts(fn(self.log_p), {k: fn(v) for k, v in self.values.items()}, self.num_layers)

    def index_select(self, rows: Tensor) -> Readouts:
        """The readouts of the given rows only (``rows``: long [B'] indices).

        Args:
            rows: Long [B'], row indices (repeats allowed).

        Returns:
            Readouts with B' rows.
        """
        return self.map(lambda t: t[rows])

    def column(self, k: int) -> Readouts:
        """Column ``k`` of a teacher-forced readout ([B, Q, ·] → [B, ·]).

        Args:
            k: The column, in [−Q, Q) (−1: after every row's last token).
        """
        return self.map(lambda t: t[:, k])

    def where(self, mask: Tensor, other: Readouts) -> Readouts:
        """Rows where ``mask`` [B] is True from ``self``, the others from ``other`` (same keys).

        Args:
            mask: Bool [B].
            other: Readouts of the same shapes with (at least) the same keys.
        """

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)

        values = {k: pick(v, other.values[k]) for k, v in self.values.items()}
        return Readouts(pick(self.log_p, other.log_p), values, self.num_layers)

    def merged(self, extra: dict[Key, Tensor]) -> Readouts:
        """These readouts plus ``extra`` (the auxiliary streams' log-probs).

        Args:
            extra: Tensors by key (``Aux`` keys: [B, V] log-probs), added to (or replacing) ``values``.
        """
        return Readouts(self.log_p, {**self.values, **extra}, self.num_layers, self.recur)

    @staticmethod
    def cat(parts: Sequence[Readouts]) -> Readouts:
        """Rows of ``parts`` stacked in order (every part has the same keys).

        Args:
            parts: Readouts of B_1, B_2, .. rows, with the same keys.

        Returns:
            Readouts of B_1 + B_2 + .. rows (``recur`` is not carried over).
        """
        keys = list(parts[0].values)
        values = {k: torch.cat([r.values[k] for r in parts]) for k in keys}
        return Readouts(torch.cat([r.log_p for r in parts]), values, parts[0].num_layers)
