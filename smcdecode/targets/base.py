"""Potentials: unnormalised log densities over complete continuations x of a prompt c,

    log π(x) = Σ_t log φ_t(x_t | c, x_<t) + log ψ(c, x),

token factors φ computed from the backend's readouts at each step (``smcdecode.readouts``) plus
sequence potentials ψ.

Algebra: ``a * b`` is the product of densities (log densities add: both the token factors and the
sequence potentials); ``a ** k`` scales a log density by k (a power of the density). Each potential
declares in :meth:`Potential.requirements` the readout keys it reads (``Layer(L)``, ``Aux(...)``,
``HIDDEN``), so one forward pass serves every factor of a product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smcdecode.errors import ArgumentError, ArgumentTypeError, check_finite
from smcdecode.readouts import Readouts, Requirements

if TYPE_CHECKING:
    from smcdecode.backends import Backend


@dataclass
class Sequences:
    """Rows handed to sequence potentials: row r continues prompt ``prompt_index[r]`` with
    ``tokens[r]`` (EOS included when produced); ``sample_index[r]`` is its row within the prompt.

    Args:
        prompts: The run's prompts, as given to the sampler.
        prompt_index: Per row, the index of its prompt.
        sample_index: Per row, its row within its prompt.
        tokens: Per row, the generated token ids.
        decode: Token ids to text (None without a tokenizer).
    """

    prompts: Sequence[Any]
    prompt_index: list[int]
    sample_index: list[int]
    tokens: list[list[int]]
    decode: Callable[[Sequence[int]], str | None]

    def texts(self) -> tuple[list[Any], list[Any]]:
        """(prompts, continuations) per row: strings when a tokenizer exists, else token ids."""
        prompts = [self.prompts[i] for i in self.prompt_index]
        conts: list[Any] = []
        for toks in self.tokens:
            text = self.decode(toks)
            conts.append(list(toks) if text is None else text)
        return prompts, conts


class Potential:
    """Base class of targets: an unnormalised log density log π(x) = Σ_t log φ_t + log ψ.

    Subclasses override ``token_log_factor`` and/or ``sequence_log_potential``, and
    ``requirements`` when they read more than the final layer. ``a * b`` is the product of two
    potentials (``Product``), ``a ** k`` the k-th power of one (``Scaled``).
    """

    #: True when the sequence potential is also defined on partial sequences and should be used
    #: as an SMC twist at block boundaries.
    prefix: bool = False

    def requirements(self, engine: Backend) -> Requirements:
        """The readout keys this potential reads, checked against ``engine``.

        Pure: nothing is stored; the keys may depend on the model's depth.

        Args:
            engine: The backend the potential will run on.

        Returns:
            The keys (``Layer(L)``, ``Aux(...)``, ``HIDDEN``); empty when only the final layer is read.

        Raises:
            CapabilityError: the backend cannot compute a key.
            ArgumentError: a key is invalid for this model (e.g. a layer out of range).
        """
        return Requirements()

    def token_log_factor(self, view: Readouts) -> Tensor | None:
        """The token factor log φ_t(v) for every vocabulary item v.

        Args:
            view: The step's readouts: ``view.log_p`` [B, V] and the keys of ``requirements``.

        Returns:
            log φ_t, [B, V]; None when this potential has no token factor (it then contributes 0).
        """
        return None

    def sequence_log_potential(self, seqs: Sequences) -> Tensor | None:
        """The sequence potential log ψ(c, x) of each row.

        Args:
            seqs: The rows: their prompts and generated tokens.

        Returns:
            log ψ per row, [B] (float64 on CPU); None when there is no sequence potential.
        """
        return None

    @property
    def has_sequence_potential(self) -> bool:
        """True when ``sequence_log_potential`` returns values (a ``Reward`` factor)."""
        return False

    def __mul__(self, other: Potential) -> Potential:
        if not isinstance(other, Potential):
            return NotImplemented
        return Product((self, other))

    def __pow__(self, exponent: float) -> Potential:
        return Scaled(self, exponent)

    def exponent_split(self) -> tuple[Potential, float]:
        """(base, α) with self = base ** α (α = 1 when self is not a power)."""
        return self, 1.0


class Product(Potential):
    """log π = Σ_i log π_i: token factors add, sequence potentials add; what ``a * b`` builds.

    Args:
        factors: The potentials multiplied; nested products are flattened.
    """

    def __init__(self, factors: Sequence[Potential]):
        flat: list[Potential] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, Product) else (f,))
        self.factors: tuple[Potential, ...] = tuple(flat)
        self.prefix = any(f.prefix for f in self.factors)

    def requirements(self, engine: Backend) -> Requirements:
        req = Requirements()
        for f in self.factors:
            req = req | f.requirements(engine)
        return req

    def token_log_factor(self, view: Readouts) -> Tensor | None:
        parts = [p for f in self.factors if (p := f.token_log_factor(view)) is not None]
        return None if not parts else torch.stack(parts).sum(0)

    def sequence_log_potential(self, seqs: Sequences) -> Tensor | None:
        parts = [p for f in self.factors if (p := f.sequence_log_potential(seqs)) is not None]
        return None if not parts else torch.stack(parts).sum(0)

    @property
    def has_sequence_potential(self) -> bool:
        return any(f.has_sequence_potential for f in self.factors)

    def __repr__(self) -> str:
        return " * ".join(repr(f) for f in self.factors)


class Scaled(Potential):
    """log π = k · log π_base (the density raised to the power k); what ``base ** k`` builds.

    Args:
        base: The potential raised to the power; a ``Scaled`` base multiplies the exponents.
        exponent: The power k > 0.

    Raises:
        ArgumentTypeError: ``base`` is not a Potential.
        ArgumentError: ``exponent`` is not finite and positive.
    """

    def __init__(self, base: Potential, exponent: float):
        if not isinstance(base, Potential):
            raise ArgumentTypeError("base", f"expected a Potential, got {type(base).__name__}")
        k = check_finite("alpha", exponent)
        if k <= 0:
            raise ArgumentError("alpha", f"must be > 0, got {exponent}")
        if isinstance(base, Scaled):
            k = base.exponent * k
            base = base.base
        self.base: Potential = base
        self.exponent: float = k
        self.prefix = base.prefix

    def requirements(self, engine: Backend) -> Requirements:
        return self.base.requirements(engine)

    def token_log_factor(self, view: Readouts) -> Tensor | None:
        f = self.base.token_log_factor(view)
        return None if f is None else self.exponent * f

    def sequence_log_potential(self, seqs: Sequences) -> Tensor | None:
        f = self.base.sequence_log_potential(seqs)
        return None if f is None else self.exponent * f

    @property
    def has_sequence_potential(self) -> bool:
        return self.base.has_sequence_potential

    def exponent_split(self) -> tuple[Potential, float]:
        return self.base, self.exponent

    def __repr__(self) -> str:
        return f"({self.base!r}) ** {self.exponent:g}"


def log_relative_top_mask(log_p: Tensor, plausibility: float | None) -> Tensor | None:
    """DoLa / CD relative-top rule: True where p(v) < ρ · max_v p(v) (these get −inf)."""
    if plausibility is None or plausibility == 0:
        return None
    return log_p < (log_p.max(dim=-1, keepdim=True).values + math.log(plausibility))


def check_plausibility(plausibility: float | None) -> float | None:
    if plausibility is None:
        return None
    v = check_finite("plausibility", plausibility)
    if not 0 <= v < 1:
        raise ArgumentError("plausibility", f"must lie in [0, 1), got {plausibility}")
    return v
