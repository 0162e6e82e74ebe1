"""The llama.cpp backend: a GGUF model run by llama.cpp (through llama-cpp-python's ctypes API),
with weights kept as stored (quantised or not).

Cache layout. The backend owns one llama.cpp context whose KV cache is *unified*: ``n_ctx`` cells
shared by up to ``n_seq_max`` sequence ids. A cell holds one position of one token and the set of
sequence ids that include it, so copying a sequence (``llama_memory_seq_cp``) only adds an id to
its cells: no KV data moves. Each row of a :class:`~smcdecode.backends.base.Batch` owns one
sequence id. The backend operations map to llama.cpp's memory API:

* append (decode / score / prefill): one ``llama_batch`` of every active row's new tokens, with
  their positions, their row's sequence id and an output flag, in one ``llama_decode`` (several
  only when more than ``n_batch`` tokens are appended at once); the logits of the flagged tokens
  come back as one [n_out, V] array;
* rollback / truncate: ``llama_memory_seq_rm(id, L, -1)``;
* save_rows: the row's snapshot is a second sequence id, a ``seq_cp`` of the row;
  restore_rows: ``seq_rm(id)`` then ``seq_cp(snapshot, id)``;
* select (SMC resampling): the first row that takes an old row keeps its id, each repeat gets a
  fresh id by ``seq_cp``, and the ids of rows nobody takes are cleared and freed;
* fork: fresh ids, ``seq_cp`` from the forked rows; release: clear and free every id of a batch
  (also done when a batch is garbage-collected);
* admit: ``seq_rm`` of the row's id, then its prompt is prefilled into it (once per distinct
  prompt: rows admitted on the same prompt get ``seq_cp`` copies, sharing its cells);
* compact: nothing to do (freed cells are reused by llama.cpp).

Limits. A row, a row's snapshot and a fork row each hold one sequence id: running out of them
raises :class:`~smcdecode.backends.base.CapacityError` naming ``n_seq_max``. Every position of
every sequence needs a KV cell (positions shared through ``seq_cp`` share one cell): when
``llama_decode`` finds no room it reports it and the backend raises ``CapacityError`` naming
``n_ctx`` with a value that fits (an upper bound: shared cells are counted once per sequence).

Readouts are float32 log-softmax tensors on the CPU. llama.cpp exposes only the final logits, so
the backend has no capability: targets that need intermediate layers, the hidden state or latent
re-application are refused (:class:`~smcdecode.backends.base.CapabilityError`).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smcdecode.backends.base import Backend, Batch, CapacityError
from smcdecode.errors import ArgumentError, ArgumentTypeError, SmcdecodeError
from smcdecode.readouts import Key, Readouts

KV_TYPES = ("f16", "f32")

_initialised = False
_log_callback: Any = None  # kept alive: llama.cpp holds the pointer
_verbose = False


def _lib() -> Any:
    """The ``llama_cpp`` bindings, initialised once per process (log filter, backend init)."""
    global _initialised, _log_callback
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the llamacpp backend needs llama-cpp-python: pip install 'smcdecode[llamacpp]'"
        ) from e
    if not _initialised:
        last = [0]

        @llama_cpp.llama_log_callback
        def log(level: int, text: bytes, user_data: Any) -> None:
            # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous message
            level = last[0] if level == 5 else level
            last[0] = level
            if _verbose or level >= 4:
                print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

        _log_callback = log
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True
    return llama_cpp


class DecodeError(SmcdecodeError, RuntimeError):
    """``llama_decode`` failed for a reason other than a full KV cache; ``code`` is its return value."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"llama_decode returned {code}")


class LlamaCppTokenizer:
    """llama.cpp's tokenizer behind the part of the Hugging Face tokenizer interface smcdecode
    uses: ``encode``, ``decode``, ``eos_token_id``, ``chat_template`` / ``apply_chat_template`` (a
    Jinja template from the GGUF metadata ``tokenizer.chat_template``), and the pieces
    (``convert_ids_to_tokens``, ``all_special_ids``, ``added_tokens_decoder``) that
    :func:`smcdecode.stopping.token_bytes` reads."""

    def __init__(self, lib: Any, native: _Native, vocab: Any):
        self._lib, self._native, self._vocab = lib, native, vocab  # the model lives while we do
        model = native.model
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        eos, bos = int(lib.llama_vocab_eos(vocab)), int(lib.llama_vocab_bos(vocab))
        self.eos_token_id: int | None = eos if eos >= 0 else None
        self.bos_token_id: int | None = bos if bos >= 0 else None
        self.eos_token = self._text(eos) if eos >= 0 else ""
        self.bos_token = self._text(bos) if bos >= 0 else ""
        template = lib.llama_model_chat_template(model, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self._pieces: list[str] | None = None
        self._special: list[int] | None = None
        self._added: dict[int, Any] | None = None

    def _text(self, i: int) -> str:
        return bytes(self._lib.llama_vocab_get_text(self._vocab, i) or b"").decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token text (``<|im_start|>``) is parsed as those tokens,
        and a BOS is added when the model asks for one and ``add_special_tokens``."""
        self._native.check()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special_tokens, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise SmcdecodeError(f"llama_tokenize failed on a text of {len(data)} bytes")

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        self._native.check()
        toks = [int(t) for t in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        if not toks:
            return ""
        arr = (self._lib.llama_token * len(toks))(*toks)
        cap = 16 * len(toks) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(
                self._vocab, arr, len(toks), buf, cap, skip_special_tokens, not skip_special_tokens
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n + 1
        raise SmcdecodeError(f"llama_detokenize failed on {len(toks)} tokens")

    def _vocabulary(self) -> None:
        lib, vocab = self._lib, self._vocab
        attrs = [int(lib.llama_vocab_get_attr(vocab, i)) for i in range(self.vocab_size)]
        self._pieces = [self._text(i) for i in range(self.vocab_size)]
        self._special = [i for i, a in enumerate(attrs) if a & lib.LLAMA_TOKEN_ATTR_CONTROL]
        user = [i for i, a in enumerate(attrs) if a & lib.LLAMA_TOKEN_ATTR_USER_DEFINED]
        self._added = {i: _AddedToken(self._pieces[i]) for i in user}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's pieces (as in the GGUF file: ``Ġthe``, ``▁the``, ``<0x0A>``)."""
        if self._pieces is None:
            self._vocabulary()
        assert self._pieces is not None
        return [self._pieces[int(i)] for i in ids]

    @property
    def all_special_ids(self) -> list[int]:
        if self._special is None:
            self._vocabulary()
        return list(self._special or [])

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        if self._added is None:
            self._vocabulary()
        return dict(self._added or {})

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``conversation`` with the model's chat template (or ``chat_template``), as
        ``transformers``' method of that name does; ``tokenize``: return ids (no BOS added:
        the template writes its own)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ArgumentError("chat_template", "this GGUF model has no tokenizer.chat_template")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template, self.eos_token, self.bos_token, add_generation_prompt)
        text = fmt(messages=conversation, **kwargs).prompt  # type: ignore[arg-type]
        return self.encode(text, add_special_tokens=False) if tokenize else text


class _AddedToken:
    """A user-defined token (``added_tokens_decoder`` entry): its text, not special."""

    special = False

    def __init__(self, content: str):
        self.content = content


class _Seqs:
    """The sequence ids a batch holds: ``ids[b]`` row b's, ``snap[b]`` its snapshot's (−1: none)."""

    __slots__ = ("ids", "snap")

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.snap = np.full_like(ids, -1)


class _State:
    """``Batch.state``: the batch's ids; when it is garbage-collected (or released) they are freed."""

    __slots__ = ("seqs", "free", "__weakref__")

    def __init__(self, backend: LlamaCppBackend, ids: np.ndarray):
        self.seqs = _Seqs(ids)
        self.free = weakref.finalize(self, backend._drop, self.seqs)
        self.free.atexit = False


class _Native:
    """The llama.cpp model and context, freed when the last backend using them is collected
    (``with_eos_tokens`` views share them) or on :meth:`LlamaCppBackend.close`."""

    def __init__(self, lib: Any, model: Any, ctx: Any):
        self.model, self.ctx, self.closed = model, ctx, False
        self._free = weakref.finalize(self, _free_native, lib, model, ctx)
        self._free.atexit = False

    def close(self) -> None:
        self.closed = True
        self._free()

    def check(self) -> None:
        if self.closed:
            raise ArgumentError("backend", "was closed: create a new LlamaCppBackend")


def _free_native(lib: Any, model: Any, ctx: Any) -> None:
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp (see the module docstring).

    ``LlamaCppBackend(model_path, n_ctx=None, n_seq_max=256, n_threads=None, n_batch=512,
    kv_type="f16", eos_token_ids=None, kv_unified=True)``: ``n_ctx`` KV cells (default 32768,
    e.g. 64 rows of 512 tokens; llama.cpp rounds it up to a multiple of 256); a sequence's
    positions stop at the model's training context (``max_positions``);
    ``n_seq_max`` sequence ids (one per row, per snapshot, per fork row; llama.cpp allows at most
    ``llama_max_parallel_sequences()``); ``n_batch`` the most tokens one ``llama_decode`` takes;
    ``n_threads`` llama.cpp's threads (default: half the CPUs; torch's intra-op threads compete
    for the same cores); ``kv_type`` "f16" or "f32" (exact comparisons); ``eos_token_ids``
    defaults to the vocabulary's EOS and EOT ids; ``n_gpu_layers`` offloads layers on a GPU
    build; ``flash_attn``: None lets llama.cpp decide with an f16 cache and turns it off with an
    f32 cache (llama.cpp's CPU flash attention rounds through f16, about 1e-3 in log p).

    ``kv_unified``: True (the default) keeps one pool of ``n_ctx`` cells for every sequence:
    copies (resampling, snapshots, rows sharing a prompt) share cells and move no data, but each
    token's attention walks every live cell of the pool (masking other sequences'), so a step
    costs more as the batch's *total* context grows. False gives each sequence id its own stream
    of ``n_ctx // n_seq_max`` cells (``max_positions``): attention sees only the row's own
    cells, and a copy duplicates the whole stream (deferred to the next forward). Measured on
    Qwen2.5-Coder-0.5B Q4_K_M, one thread: 128 rows of 400-token contexts decode at 11.9 tok/s
    unified and 25.4 split, 128 rows of 16 tokens at 72.7 and 30.1 (split pays a per-stream
    cost, paid for every stream, live or not); size ``n_ctx`` to ``n_seq_max`` times the longest
    sequence, and ``n_seq_max`` to about the rows that will be live, when splitting (with 256
    sequence ids and 32 live rows of 400–900 tokens, an evaluation ran much slower split)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_seq_max: int = 256,
        n_threads: int | None = None,
        n_batch: int = 512,
        kv_type: str = "f16",
        eos_token_ids: Iterable[int] | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        kv_unified: bool = True,
        verbose: bool = False,
    ):
        global _verbose
        _verbose = bool(verbose)
        lib = _lib()
        self._lib = lib
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise ArgumentError("model_path", f"no such GGUF file: {path}")
        if kv_type not in KV_TYPES:
            raise ArgumentError("kv_type", f"expected one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        limit = int(lib.llama_max_parallel_sequences())
        for name, value, low in (
            ("n_seq_max", n_seq_max, 1),
            ("n_batch", n_batch, 1),
            ("n_gpu_layers", n_gpu_layers, -1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ArgumentTypeError(name, f"expected an int, got {type(value).__name__}")
            if value < low:
                raise ArgumentError(name, f"must be >= {low}, got {value}")
        if n_seq_max > limit:
            raise ArgumentError("n_seq_max", f"llama.cpp allows at most {limit} sequences, got {n_seq_max}")
        for name, opt in (("n_ctx", n_ctx), ("n_threads", n_threads)):
            if opt is not None and (isinstance(opt, bool) or not isinstance(opt, int) or opt < 1):
                raise ArgumentError(name, f"must be None or an int >= 1, got {opt!r}")

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = lib.llama_model_load_from_file(path.encode("utf-8"), mparams)
        if not model:
            raise ArgumentError("model_path", f"llama.cpp could not load {path} (pass verbose=True to see why)")
        train = int(lib.llama_model_n_ctx_train(model))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx if n_ctx is not None else 32768
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_seq_max
        cparams.n_outputs_max = 0  # = n_batch: every token of a decode may be an output
        cparams.n_outputs_max_per_seq = 0
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)  # llama-cpp-python's default
        cparams.n_threads = cparams.n_threads_batch = threads
        kv = lib.GGML_TYPE_F32 if kv_type == "f32" else lib.GGML_TYPE_F16
        cparams.type_k = cparams.type_v = kv
        if flash_attn is None:  # llama.cpp's CPU flash attention rounds through f16 (~1e-3 in log p)
            flash_attn = None if kv_type == "f16" else False
        cparams.flash_attn_type = {
            None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        cparams.kv_unified = bool(kv_unified)
        cparams.embeddings = False
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise ArgumentError(
                "n_ctx",
                f"llama.cpp could not create a context (n_ctx={cparams.n_ctx}, "
                f"n_seq_max={n_seq_max}, kv_type={kv_type}); pass verbose=True to see why",
            )
        self._native = _Native(lib, model, ctx)
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        vocab = lib.llama_model_get_vocab(model)

        self.model_path = path
        self.n_seq_max = n_seq_max
        self.n_ctx = int(lib.llama_n_ctx(ctx))
        self.n_batch = int(lib.llama_n_batch(ctx))
        self.kv_type = kv_type
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.tokenizer = LlamaCppTokenizer(lib, self._native, vocab)
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        self.num_layers = int(lib.llama_model_n_layer(model))
        self.kv_unified = bool(kv_unified)
        per_seq = int(lib.llama_n_ctx_seq(ctx))  # = n_ctx unified, n_ctx // n_seq_max split
        self.max_positions = min(per_seq, train) if train > 0 else per_seq  # a sequence's positions
        if eos_token_ids is None:
            ids = [int(lib.llama_vocab_eos(vocab)), int(lib.llama_vocab_eot(vocab))]
            eos_token_ids = [i for i in ids if i >= 0]
        self.eos_token_ids = sorted({int(i) for i in eos_token_ids})
        if not self.eos_token_ids:
            raise ArgumentError("eos_token_ids", "the vocabulary names no EOS id: pass eos_token_ids=[...]")
        if any(i < 0 or i >= self.vocab_size for i in self.eos_token_ids):
            raise ArgumentError("eos_token_ids", f"ids must lie in [0, {self.vocab_size})")
        self._eos = torch.tensor(self.eos_token_ids, device=self.device)
        self._free: list[int] = list(range(n_seq_max - 1, -1, -1))  # a stack: id 0 first
        self._uniform = -math.log(self.vocab_size)

        # the llama_batch's arrays, owned here (one token per slot, one sequence id per token)
        cap = self.n_batch
        self._tok = np.zeros(cap, dtype=np.int32)
        self._pos = np.zeros(cap, dtype=np.int32)
        self._nseq = np.ones(cap, dtype=np.int32)
        self._seq = np.zeros(cap, dtype=np.int32)
        self._seqp = (self._seq.ctypes.data + 4 * np.arange(cap, dtype=np.uint64)).astype(np.uint64)
        self._out = np.zeros(cap, dtype=np.int8)
        b = lib.llama_batch()
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        b.embd = None
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        b.n_seq_id = self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seqp.ctypes.data, ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b
        self._init_counters()

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], **kwargs: Any) -> LlamaCppBackend:
        """``LlamaCppBackend(path, **kwargs)``; ``path`` may be ``"embedded"`` (SmolLM2-135M).

        Args:
            path: A ``.gguf`` file, or ``"embedded"``.
            **kwargs: The constructor's other arguments (``n_ctx``, ``n_seq_max``, ...).
        """
        if str(path) == "embedded":
            from smcdecode.backends.hf import embedded_model_path

            path = embedded_model_path()
        return cls(path, **kwargs)

    def close(self) -> None:
        """Free the llama.cpp context and model now (the backend is unusable afterwards)."""
        self._native.close()

    def __repr__(self) -> str:
        return (
            f"LlamaCppBackend({os.path.basename(self.model_path)!r}, n_ctx={self.n_ctx}, "
            f"n_seq_max={self.n_seq_max}, kv_type={self.kv_type!r}, kv_unified={self.kv_unified})"
        )

    def _open(self) -> None:
        self._native.check()

    # ------------------------------------------------------------------ sequence ids
    def _alloc(self, k: int) -> list[int]:
        if k > len(self._free):
            used = self.n_seq_max - len(self._free)
            raise CapacityError(
                "n_seq_max",
                self.n_seq_max,
                used + k,
                "every row, row snapshot (save_rows) and fork row holds one llama.cpp sequence id "
                f"({used} held now; llama.cpp allows at most {self._lib.llama_max_parallel_sequences()})",
            )
        out = self._free[len(self._free) - k :]
        del self._free[len(self._free) - k :]
        return out

    def _clear(self, seq: int) -> None:
        self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free.append(int(seq))

    def _copy(self, src: int, dst: int) -> None:
        self._lib.llama_memory_seq_cp(self._mem, int(src), int(dst), -1, -1)

    def _drop(self, seqs: _Seqs) -> None:
        """Free a batch's ids (its finaliser: on release or when it is garbage-collected)."""
        if self._native.closed:
            return
        for s in (*seqs.ids.tolist(), *seqs.snap.tolist()):
            if s >= 0:
                self._clear(s)

    def _seqs(self, batch: Batch) -> _Seqs:
        state: _State = batch.state
        return state.seqs

    # ------------------------------------------------------------------ the forward
    def _run(self, tok: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> Tensor:
        """Decode tokens ``tok`` at positions ``pos`` of sequences ``seq`` (flat, in order) and
        return the log-softmax of the logits after the tokens flagged in ``out``: [n_out, V]."""
        lib, total, cap = self._lib, int(tok.shape[0]), self.n_batch
        parts = []
        for a in range(0, total, cap):
            k = min(cap, total - a)
            self._tok[:k], self._pos[:k], self._seq[:k], self._out[:k] = (
                tok[a : a + k],
                pos[a : a + k],
                seq[a : a + k],
                out[a : a + k],
            )
            self._batch.n_tokens = k
            rc = lib.llama_decode(self._ctx, self._batch)
            if rc != 0:
                self._failed(rc, pos[: a + k], seq[: a + k], total)
            m = int(np.count_nonzero(out[a : a + k]))
            if m:
                parts.append(np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(m, self.vocab_size)).copy())
        if not parts:
            return torch.empty(0, self.vocab_size)
        logits = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return torch.log_softmax(logits, dim=-1)

    def _failed(self, rc: int, pos: np.ndarray, seq: np.ndarray, total: int) -> None:
        """Undo the chunks of this append already decoded, and raise."""
        for s in np.unique(seq).tolist():
            self._lib.llama_memory_seq_rm(self._mem, s, int(pos[seq == s].min()), -1)
        if rc != 1:
            raise DecodeError(rc)
        held = set(range(self.n_seq_max)) - set(self._free)
        cells = sum(int(self._lib.llama_memory_seq_pos_max(self._mem, s)) + 1 for s in held)
        raise CapacityError(
            "n_ctx",
            self.n_ctx,
            cells + total,
            f"llama.cpp's KV cache has no room for {total} more tokens (the live sequences hold at most "
            f"{cells} cells; positions shared by seq_cp copies are counted once per sequence)",
        )

    def _append(self, batch: Batch, tokens: Tensor, n_real: Tensor, keep_all: bool, kind: str) -> Readouts:
        self._open()
        ids = self._seqs(batch).ids
        tok, n = tokens.cpu().numpy(), n_real.cpu().numpy()
        b, q = tok.shape
        j = np.arange(q)
        first = q - n  # row b's real tokens are columns first[b]..q-1
        real = j[None, :] >= first[:, None]  # [B, Q]
        pos = batch.lengths.cpu().numpy()[:, None] + (j[None, :] - first[:, None])
        want = real if keep_all else real & (j[None, :] == q - 1)
        log_p = self._run(tok[real], pos[real], np.broadcast_to(ids[:, None], (b, q))[real], want[real])
        self._count(kind, n_real, int(n.sum()))
        if keep_all:
            out = torch.full((b, q, self.vocab_size), self._uniform)
            out[torch.from_numpy(real)] = log_p
        else:
            out = torch.full((b, self.vocab_size), self._uniform)
            out[torch.from_numpy(n > 0)] = log_p
        return Readouts(out, {}, self.num_layers)

    # ------------------------------------------------------------------ the other operations
    def _new_batch(self, size: int, readouts: tuple[Key, ...]) -> Batch:
        self._open()
        return self._empty(_State(self, np.array(self._alloc(size), dtype=np.int32)), size, readouts)

    def _admit(self, batch: Batch, idx: Tensor, prompt_ids: list[list[int]]) -> Readouts:
        self._open()
        seqs = self._seqs(batch)
        rows = idx.cpu().numpy()
        for r in rows.tolist():
            self._lib.llama_memory_seq_rm(self._mem, int(seqs.ids[r]), -1, -1)
            if seqs.snap[r] >= 0:
                self._clear(int(seqs.snap[r]))
                seqs.snap[r] = -1
        first: dict[tuple[int, ...], int] = {}  # a prompt -> its first row among idx
        src = np.array([first.setdefault(tuple(p), k) for k, p in enumerate(prompt_ids)])  # [k]
        uniq = np.array(sorted(first.values()))  # rows prefilled; the others copy their cells
        lens = np.array([len(prompt_ids[k]) for k in uniq.tolist()])
        tok = np.concatenate([np.asarray(prompt_ids[k], dtype=np.int32) for k in uniq.tolist()])
        pos = np.concatenate([np.arange(n) for n in lens.tolist()])
        out = np.zeros(len(tok), dtype=np.int8)
        out[np.cumsum(lens) - 1] = 1
        log_p = self._run(tok, pos, np.repeat(seqs.ids[rows[uniq]], lens), out)  # [len(uniq), V]
        for k in np.nonzero(src != np.arange(len(src)))[0].tolist():  # repeats share the prompt's cells
            self._copy(seqs.ids[rows[src[k]]], seqs.ids[rows[k]])
        every = torch.tensor([len(p) for p in prompt_ids])  # counted as admitted; computed: lens
        self._count("prefill_tokens", every, int(lens.sum()))
        log_p = log_p[torch.from_numpy(np.searchsorted(uniq, src))]
        return Readouts(log_p, {}, self.num_layers)

    def _rollback(self, batch: Batch, lengths: Tensor) -> None:
        self._open()
        ids, new, old = self._seqs(batch).ids, lengths.cpu().numpy(), batch.lengths.cpu().numpy()
        for r in np.nonzero(new < old)[0].tolist():
            if not self._lib.llama_memory_seq_rm(self._mem, int(ids[r]), int(new[r]), -1):
                raise SmcdecodeError("llama.cpp cannot truncate a sequence of this model (recurrent or SWA cache)")

    def _checkpoint(self, batch: Batch, rows: Tensor) -> None:
        self._open()
        seqs = self._seqs(batch)
        sel = np.nonzero(rows.cpu().numpy())[0]
        fresh = iter(self._alloc(int((seqs.snap[sel] < 0).sum())))
        for r in sel.tolist():
            if seqs.snap[r] < 0:
                seqs.snap[r] = next(fresh)
            else:
                self._lib.llama_memory_seq_rm(self._mem, int(seqs.snap[r]), -1, -1)
            self._copy(seqs.ids[r], seqs.snap[r])

    def _restore(self, batch: Batch, rows: Tensor) -> None:
        self._open()
        seqs = self._seqs(batch)
        for r in np.nonzero(rows.cpu().numpy() & (seqs.snap >= 0))[0].tolist():
            self._lib.llama_memory_seq_rm(self._mem, int(seqs.ids[r]), -1, -1)
            self._copy(seqs.snap[r], seqs.ids[r])

    def _select(self, batch: Batch, idx: Tensor, within_groups: bool) -> None:
        self._open()
        seqs = self._seqs(batch)
        src = idx.cpu().numpy()
        first = np.zeros(len(src), dtype=bool)
        first[np.unique(src, return_index=True)[1]] = True
        repeat = np.nonzero(~first)[0]
        unused = np.setdiff1d(np.arange(len(seqs.ids)), src)
        need = len(repeat) + int((seqs.snap[src[repeat]] >= 0).sum())
        freed = len(unused) + int((seqs.snap[unused] >= 0).sum())
        if need > len(self._free) + freed:
            self._alloc(need - freed)  # raises, naming n_seq_max, before anything changes
        for r in unused.tolist():
            self._clear(int(seqs.ids[r]))
            if seqs.snap[r] >= 0:
                self._clear(int(seqs.snap[r]))
        ids, snap = seqs.ids[src], seqs.snap[src]
        fresh = iter(self._alloc(need))
        for r in repeat.tolist():
            ids[r] = next(fresh)
            self._copy(seqs.ids[src[r]], ids[r])
            if snap[r] >= 0:
                snap[r] = next(fresh)
                self._copy(seqs.snap[src[r]], snap[r])
        seqs.ids, seqs.snap = ids, snap

    def _fork(self, batch: Batch, idx: Tensor, reserve: int) -> _State:
        self._open()
        src = self._seqs(batch).ids[idx.cpu().numpy()]
        state = _State(self, np.array(self._alloc(len(src)), dtype=np.int32))
        for s, d in zip(src.tolist(), state.seqs.ids.tolist()):
            self._copy(s, d)
        return state

    def _release(self, batch: Batch) -> None:
        state: _State = batch.state
        state.free()

    def _compact(self, batch: Batch, force: bool) -> bool:
        return False  # llama.cpp reuses freed cells; there is nothing to reclaim

    def _mark_shared_prefix(self, batch: Batch) -> None:
        pass  # select's seq_cp already shares the prompt's cells
