"""A cache-free reference backend: every forward recomputes each row's whole sequence.

For row b the context is ``rows.tok[b, rows.valid[b]]`` (prompt + generated tokens, in position
order); appending tokens y runs the model once, uncached and unpadded, on context ⊕ y and reads
the distributions after each token of y:

    log_p[b, j]     = log softmax(logits(context ⊕ y)[|context| + j])
    Layer(L)[b, j]  = log softmax(readout(h_L(context ⊕ y)[|context| + j]))   (L < N; L = N is log_p)

No cache means select, rollback, checkpoints, forks and compaction have nothing to do beyond the
ids and lengths every backend shares (:class:`~smcdecode.backends.base.Batch`), so the backend is
obviously correct and slow (O(T²) per sequence). It exists to prove the backend
seam: :func:`smcdecode.testing.check_backend` runs on it and on the HF backend, and every sampler
must give the same samples on both. It offers intermediate-layer readouts but not the last
layer's pre-norm output nor latent re-application (EGLR).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from smcdecode.backends.base import Backend, Batch, left_padded
from smcdecode.backends.hf import HFBackend
from smcdecode.readouts import Key, Layer, Readouts


class ReferenceBackend(Backend):
    """A backend that recomputes every row from scratch at every forward (no KV cache): the obviously
    correct implementation that the conformance suite and the samplers are checked against.

    Slow (each forward re-runs every row's whole context); for tests and tiny models.

    Args:
        model: A Hugging Face causal-LM module.
        tokenizer: Its tokenizer (None: prompts are token-id lists, texts are None).
        eos_token_ids: The ids that end a sequence (default: the model's configuration).
    """

    capabilities = frozenset({"layers"})

    def __init__(self, model: nn.Module, tokenizer: Any = None, eos_token_ids: Iterable[int] | None = None):
        self._hf = HFBackend(model, tokenizer, eos_token_ids)  # module discovery and the logit-lens readout
        self.model = self._hf.model
        for name in ("device", "dtype", "tokenizer", "vocab_size", "eos_token_ids", "num_layers", "max_positions"):
            setattr(self, name, getattr(self._hf, name))
        self._eos = self._hf._eos
        self._init_counters()

    # ------------------------------------------------------------------ the backend operations
    # No cache: the shared ids and lengths the base keeps are the whole state, so every operation
    # but the forward has nothing to do.
    def _new_batch(self, size: int, readouts: tuple[Key, ...]) -> Batch:
        return self._empty(None, size, readouts)

    def _append(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readouts:
        readouts = self._run(batch.contexts(), batch.layers, tokens, n_real, kind)
        return readouts if keep_all else readouts.column(-1)

    def _admit(self, batch: Batch, idx: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        tokens, n_real = left_padded(prompt_ids, self.device)
        return self._run([[] for _ in prompt_ids], batch.layers, tokens, n_real, "prefill_tokens").column(-1)

    def _rollback(self, batch: Batch, lengths: Tensor) -> None:
        pass

    def _checkpoint(self, batch: Batch, rows: Tensor) -> None:
        pass

    def _restore(self, batch: Batch, rows: Tensor) -> None:
        pass

    def _select(self, batch: Batch, idx: Tensor, within_groups: bool) -> None:
        pass

    def _fork(self, batch: Batch, idx: Tensor, reserve: int) -> None:
        return None

    def _release(self, batch: Batch) -> None:
        pass

    def _compact(self, batch: Batch, force: bool) -> bool:
        return False

    def _mark_shared_prefix(self, batch: Batch) -> None:
        pass

    def _run(
        self, contexts: list[list[int]], layer_keys: tuple[int, ...], tokens: Tensor, n_real: Tensor, kind: str
    ) -> Readouts:
        """Readouts after every position of ``tokens`` [B, Q] appended (row b's last n_real[b])
        to ``contexts``, one uncached forward per row: [B, Q, V] (uniform where not real)."""
        b, q = tokens.shape
        counts = n_real.tolist()
        uniform = torch.full((b, q, self.vocab_size), -math.log(self.vocab_size), device=self.device)
        log_p = uniform.clone()  # positions without a real token keep a uniform placeholder
        layers = {layer: uniform.clone() for layer in layer_keys}
        for r in range(b):
            n = counts[r]
            if n == 0:
                continue
            seq = torch.tensor([contexts[r] + tokens[r, q - n :].tolist()], device=self.device)
            out = self.model(input_ids=seq, output_hidden_states=bool(layer_keys), use_cache=False)
            log_p[r, q - n :] = torch.log_softmax(out.logits[0, -n:].float(), dim=-1)
            for layer in layer_keys:
                if layer == self.num_layers:
                    layers[layer][r, q - n :] = log_p[r, q - n :]
                else:
                    h = out.hidden_states[layer][0, -n:]
                    layers[layer][r, q - n :] = torch.log_softmax(self._hf._readout(h), dim=-1)
        self._count(kind, n_real, sum(len(c) for c in contexts) + int(n_real.sum()))
        return Readouts(log_p, {Layer(k): v for k, v in layers.items()}, self.num_layers)
