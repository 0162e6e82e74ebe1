"""Token-factor targets built from the model's own readouts.

* ``LM(T)``:            log φ_t(v) = log softmax(z_N / T)[v]
* ``Power(α)``:         log φ_t(v) = α · log p_N(v)        (≡ ``LM() ** α``: sequence-level p^α)
* ``LayerContrast``:    g_t = (1−β)·log p_N + β·log p_L,   log φ_t(v) = log softmax(g_t)[v],
                        with v masked to −inf where p_N(v) < ρ·max p_N when ``plausibility=ρ``.
                        ``layer="dynamic"`` picks per row and step the candidate L maximising
                        JS(p_N ‖ p_L) (DoLa).
* ``Contrast``:         the same formula with log p_L replaced by an auxiliary stream's final
                        log-probs: a second model (contrastive decoding) or a second prompt
                        (classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smcdecode.distributions import entropy, js_divergence
from smcdecode.errors import ArgumentError, ArgumentTypeError, check_finite, check_finite_positive
from smcdecode.readouts import Aux, Layer, Readouts, Requirements
from smcdecode.targets.base import Potential, Scaled, check_plausibility, log_relative_top_mask

if TYPE_CHECKING:
    from smcdecode.backends import Backend


class LM(Potential):
    """The base model at temperature T: log φ_t = log softmax(z_N / T)[x_t].

    Args:
        temperature: T > 0 (1: the model itself).

    Raises:
        ArgumentError: ``temperature`` is not finite and positive.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = check_finite_positive("temperature", temperature)

    def token_log_factor(self, view: Readouts) -> Tensor:
        if self.temperature == 1.0:
            return view.log_p
        return torch.log_softmax(view.log_p / self.temperature, dim=-1)

    def __repr__(self) -> str:
        return "LM()" if self.temperature == 1.0 else f"LM(temperature={self.temperature:g})"


class Power(Scaled):
    """p(x)^α at the sequence level (not token temperature 1/α): ``Power(α) ≡ LM() ** α``.

    Args:
        alpha: The power α > 0.

    Raises:
        ArgumentError: ``alpha`` is not finite and positive.
    """

    def __init__(self, alpha: float):
        a = check_finite("alpha", alpha)
        if a <= 0:
            raise ArgumentError("alpha", f"must be > 0, got {alpha}")
        super().__init__(LM(), a)

    def __repr__(self) -> str:
        return f"Power({self.exponent:g})"


class EntropyGate:
    """Entropy-gated β schedule: β_t = ``above`` when H(p_N) > ``threshold`` (nats), else ``below``.

    Extrapolate (β < 0) only at uncertain steps, interpolate or do nothing elsewhere. β_t depends on
    the prefix only (through p_N), so the token factor stays a function of the prefix and every
    exactness argument still holds.

    Args:
        threshold: The entropy threshold in nats.
        above: β where the entropy exceeds the threshold.
        below: β elsewhere.
    """

    def __init__(self, threshold: float, above: float = -0.5, below: float = 0.0):
        self.threshold = check_finite("threshold", threshold)
        self.above = check_finite("above", above)
        self.below = check_finite("below", below)

    def __call__(self, log_p_final: Tensor) -> Tensor:
        """β per row, [B, 1], from the final-layer log-probs [B, V]."""
        h = entropy(log_p_final)[:, None]
        return torch.where(h > self.threshold, torch.tensor(self.above), torch.tensor(self.below)).to(log_p_final)

    def __repr__(self) -> str:
        return f"EntropyGate({self.threshold:g}, above={self.above:g}, below={self.below:g})"


def dola_candidates(num_layers: int, bucket: str) -> list[int]:
    """DoLa's candidate premature layers (0 = embeddings).

    Args:
        num_layers: The model's depth N.
        bucket: ``"low"`` or ``"high"``: even layers of the lower or upper half for N ≤ 40, else the
            20 lowest / highest.

    Raises:
        ArgumentError: ``bucket`` is neither preset.
    """
    n = num_layers
    if bucket == "low":
        return list(range(0, n // 2, 2)) if n <= 40 else list(range(0, 20, 2))
    if bucket == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    raise ArgumentError("candidates", f"unknown preset {bucket!r}; use 'low', 'high' or a list of layers")


def _guided(log_p: Tensor, other: Tensor, beta: float | EntropyGate, plausibility: float | None) -> Tensor:
    b = beta(log_p) if isinstance(beta, EntropyGate) else beta
    g = (1.0 - b) * log_p + b * other
    mask = log_relative_top_mask(log_p, plausibility)
    if mask is not None:
        g = g.masked_fill(mask, -math.inf)
    return torch.log_softmax(g, dim=-1)


class LayerContrast(Potential):
    """Layer contrast: guided log-probs g = (1−β)·log p_N + β·log p_L, token factor log softmax(g).

    Needs a backend with the ``layers`` capability (the HF backend).

    Args:
        layer: The premature layer L, an int in 0..N−1 (0 = embeddings), or ``"dynamic"``: per row
            and step the candidate of largest Jensen–Shannon divergence from p_N (DoLa).
        beta: β (negative extrapolates away from layer L), or an ``EntropyGate``.
        plausibility: ρ: tokens with p_N(v) < ρ·max p_N get −inf (DoLa's relative-top rule).
        candidates: For ``layer="dynamic"``: a list of layers, or DoLa's preset ``"low"`` / ``"high"``.

    Raises:
        ArgumentTypeError: ``layer`` is neither an int nor ``"dynamic"``.
        ArgumentError: a value is out of range.
    """

    def __init__(
        self,
        layer: int | str,
        beta: float | EntropyGate,
        plausibility: float | None = None,
        candidates: str | Sequence[int] = "high",
    ):
        if isinstance(layer, str):
            if layer != "dynamic":
                raise ArgumentError("layer", f"expected an int or 'dynamic', got {layer!r}")
        elif isinstance(layer, bool) or not isinstance(layer, int):
            raise ArgumentTypeError("layer", f"expected an int or 'dynamic', got {type(layer).__name__}")
        elif layer < 0:
            raise ArgumentError("layer", f"must be >= 0, got {layer}")
        self.layer = layer
        self.beta = beta if isinstance(beta, EntropyGate) else check_finite("beta", beta)
        self.plausibility = check_plausibility(plausibility)
        if isinstance(candidates, str):
            if candidates not in ("low", "high"):
                raise ArgumentError("candidates", f"unknown preset {candidates!r}; use 'low' or 'high'")
        self.candidates = candidates

    def _candidates(self, num_layers: int) -> list[int]:
        if self.layer != "dynamic":
            return [int(self.layer)]
        if isinstance(self.candidates, str):
            return dola_candidates(num_layers, self.candidates)
        return list(self.candidates)

    def requirements(self, engine: Backend) -> Requirements:
        cands = self._candidates(engine.num_layers)
        if not cands:
            raise ArgumentError("candidates", "no candidate layers")
        layers = engine.check_layers(cands)
        if engine.num_layers in layers:
            raise ArgumentError(
                "layer", f"layer {engine.num_layers} is the final layer itself; use 0..{engine.num_layers - 1}"
            )
        return Requirements(Layer(i) for i in layers)

    def premature(self, view: Readouts) -> Tensor:
        """log p_L per row: the fixed layer, or per row the candidate of largest JS divergence.

        Args:
            view: The step's readouts: ``log_p`` [B, V] and the ``Layer`` readouts [B, V] of the
                fixed layer or of every candidate (``num_layers`` set for a DoLa preset).

        Returns:
            The premature layer's log-probs [B, V].

        Raises:
            ArgumentError: a DoLa preset is used but ``view.num_layers`` is None.
        """
        if self.layer != "dynamic":
            return view[Layer(int(self.layer))]
        if isinstance(self.candidates, str) and view.num_layers is None:
            raise ArgumentError("view", "a DoLa preset needs the readouts' num_layers (set by the backend)")
        cands = sorted(set(self._candidates(view.num_layers or 0)))
        stacked = torch.stack([view[Layer(c)] for c in cands])  # [C, B, V]
        choice = js_divergence(view.log_p[None], stacked).argmax(0)  # [B]
        return stacked.gather(0, choice[None, :, None].expand(1, *stacked.shape[1:]))[0]

    def token_log_factor(self, view: Readouts) -> Tensor:
        return _guided(view.log_p, self.premature(view), self.beta, self.plausibility)

    def __repr__(self) -> str:
        beta = repr(self.beta) if isinstance(self.beta, EntropyGate) else f"{self.beta:g}"
        return f"LayerContrast(layer={self.layer!r}, beta={beta})"


class Contrast(Potential):
    """Contrastive decoding or classifier-free guidance: g = (1−β)·log p + β·log p_aux, token factor
    log softmax(g).

    Args:
        beta: β (negative extrapolates away from the auxiliary stream).
        amateur: A second engine (contrastive decoding), with the same vocabulary.
        prompt: A second context, string or token ids (classifier-free guidance).
        plausibility: ρ of the relative-top rule, as in ``LayerContrast``.

    Raises:
        ArgumentError: neither ``amateur`` nor ``prompt`` is given, or a value is out of range.
        ArgumentTypeError: ``prompt`` is neither a string nor token ids.
    """

    def __init__(
        self,
        beta: float,
        *,
        amateur: Any = None,
        prompt: Any = None,
        plausibility: float | None = None,
    ):
        if amateur is None and prompt is None:
            raise ArgumentError("amateur", "give amateur=<Engine> or prompt=<context>")
        self.beta = check_finite("beta", beta)
        self.plausibility = check_plausibility(plausibility)
        if prompt is not None and not isinstance(prompt, str):
            if not isinstance(prompt, Sequence) or not all(isinstance(t, int) for t in prompt):
                raise ArgumentTypeError("prompt", "expected a string or a list of token ids")
        self.stream = Aux(engine=amateur, prompt=prompt)

    def requirements(self, engine: Backend) -> Requirements:
        amateur = self.stream.engine
        if amateur is not None and amateur.vocab_size != engine.vocab_size:
            raise ArgumentError(
                "amateur",
                f"vocabulary size {amateur.vocab_size} differs from the main model's {engine.vocab_size}",
            )
        return Requirements([self.stream])

    def token_log_factor(self, view: Readouts) -> Tensor:
        return _guided(view.log_p, view[self.stream], self.beta, self.plausibility)

    def __repr__(self) -> str:
        kind = "amateur" if self.stream.engine is not None else "prompt"
        return f"Contrast(beta={self.beta:g}, {kind}=...)"
