"""Stop sequences as a token-level automaton, so that "has x_≤t just completed a stop?" is a gather.

The stopped sequence space: a continuation x ends at EOS, at ``max_new_tokens``, or at the first
token x_t such that a stop pattern occurs in x_≤t but not in x_<t. Patterns are

- token-id sequences (``[198, 750]``), matched against the generated ids, and
- strings (``"\\ndef"``), matched against the generated *text*, wherever the string falls across
  token boundaries. The text of x is the concatenation of its tokens' bytes (``token_bytes``),
  which is what ``tokenizer.decode`` returns (some SentencePiece tokenizers also drop one leading
  space of the first token; a stop string that begins the continuation with a space is matched
  on the bytes). UTF-8 is self-synchronising, so a string occurs in the text iff its bytes occur
  in the byte string.

Both kinds are compiled into one Aho–Corasick automaton per alphabet (bytes, token ids) and lifted
to tokens: ``next_state[s, v]`` is the automaton state after reading token v from state s, and
``completes[s, v]`` says whether a pattern ends inside v's bytes/id. Per row the sampler carries
one integer state, so a decode step costs two gathers on the device and no host sync:

    state_t = next_state[state_{t-1}, x_t]          # [B]
    stop_t  = completes[state_{t-1}, x_t]           # [B] bool

The combined state is ``byte_state * n_id_states + id_state``; the tables are [S, V] with
S = (1 + Σ|string bytes|) · (1 + Σ|id pattern|), small for real stop lists (HumanEval's five
strings: S ≈ 30).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smcdecode.errors import ArgumentError, ArgumentTypeError

StopSpec = Sequence[str | Sequence[int]]


def _aho_corasick(patterns: Sequence[Sequence[int]], alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense DFA of the patterns over symbols [0, alphabet): (goto [S, A] int32, accept [S] bool)."""
    children: list[dict[int, int]] = [{}]
    accept = [False]
    for pat in patterns:
        s = 0
        for a in pat:
            if a not in children[s]:
                children[s][a] = len(children)
                children.append({})
                accept.append(False)
            s = children[s][a]
        accept[s] = True
    n = len(children)
    goto = np.zeros((n, alphabet), dtype=np.int32)
    fail = [0] * n
    for a, c in children[0].items():
        goto[0, a] = c
    queue = deque(children[0].values())
    while queue:
        s = queue.popleft()
        accept[s] = accept[s] or accept[fail[s]]
        goto[s] = goto[fail[s]]
        for a, c in children[s].items():
            fail[c] = int(goto[fail[s], a])
            goto[s, a] = c
            queue.append(c)
    return goto, np.array(accept, dtype=bool)


def _lift_bytes(goto: np.ndarray, accept: np.ndarray, vocab: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Token-level tables from a byte DFA: feed every token's bytes from every state at once."""
    n_states, n_vocab = goto.shape[0], len(vocab)
    state = np.repeat(np.arange(n_states, dtype=np.int32)[:, None], n_vocab, axis=1)  # [S, V]
    hit = np.zeros((n_states, n_vocab), dtype=bool)
    lengths = np.array([len(b) for b in vocab])
    order = np.argsort(-lengths, kind="stable")  # longest first: the active set is a prefix
    for j in range(int(lengths.max(initial=0))):
        active = order[: int((lengths > j).sum())]
        byte = np.array([vocab[v][j] for v in active], dtype=np.int64)
        nxt = goto[state[:, active], byte[None, :]]
        state[:, active] = nxt
        hit[:, active] |= accept[nxt]
    return state, hit


def _bytes_to_unicode() -> dict[int, str]:
    """The byte ↔ printable-character map of byte-level BPE vocabularies (GPT-2, Llama-3, Qwen, SmolLM)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each token id's bytes, so that ``b"".join(...)`` decodes to ``tokenizer.decode(ids)``.

    Byte-level BPE tokens are mapped back through the byte ↔ character table, SentencePiece tokens
    through ``▁`` → space and ``<0xNN>`` byte fallback; special tokens and ids past the tokenizer's
    vocabulary have no text (b"").
    """
    if not hasattr(tokenizer, "convert_ids_to_tokens"):  # a minimal tokenizer: decode ids one by one
        return [tokenizer.decode([i]).encode("utf-8") for i in range(vocab_size)]
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    regular = [p for i, p in enumerate(pieces) if p and i not in special and i not in added]
    byte_level = all(ch in inverse for p in regular for ch in p)
    out: list[bytes] = []
    for i in range(vocab_size):
        piece = pieces[i] if i < len(pieces) else None
        if piece is None or i in special:
            out.append(b"")
        elif i in added:
            out.append(piece.encode("utf-8"))
        elif byte_level:
            out.append(bytes(inverse[ch] for ch in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out


class StopSet:
    """Compiled stop patterns over a vocabulary of ``vocab_size`` ids (see the module docstring).

    ``StopSet.build(stop, vocab_size, tokenizer=None)``: ``stop`` is a list whose entries are strings
    (need a tokenizer, or ``vocab_bytes``) or non-empty lists of token ids.
    """

    def __init__(self, next_state: Tensor, completes: Tensor, patterns: tuple[Any, ...]):
        self.next_state = next_state  # [S, V] long
        self.completes = completes  # [S, V] bool
        self.patterns = patterns

    @classmethod
    def build(
        cls,
        stop: StopSpec | None,
        vocab_size: int,
        *,
        tokenizer: Any = None,
        vocab_bytes: list[bytes] | None = None,
        device: str | torch.device = "cpu",
    ) -> StopSet | None:
        """None when there is nothing to stop at (so callers skip the gathers altogether)."""
        if stop is None:
            return None
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
            raise ArgumentTypeError("stop", f"expected a list of strings or token-id lists, got {type(stop).__name__}")
        strings: list[bytes] = []
        ids: list[list[int]] = []
        for k, entry in enumerate(stop):
            if isinstance(entry, str):
                if not entry:
                    raise ArgumentError("stop", f"entry {k} is an empty string")
                strings.append(entry.encode("utf-8"))
            elif isinstance(entry, Sequence) and not isinstance(entry, bytes):
                if not entry or not all(isinstance(i, int) and not isinstance(i, bool) for i in entry):
                    raise ArgumentError("stop", f"entry {k} must be a non-empty list of token ids, got {entry!r}")
                if any(int(i) < 0 or int(i) >= vocab_size for i in entry):
                    raise ArgumentError("stop", f"entry {k} has ids outside [0, {vocab_size}): {list(entry)}")
                ids.append([int(i) for i in entry])
            else:
                raise ArgumentTypeError("stop", f"entry {k} must be a string or a list of token ids, got {entry!r}")
        if not strings and not ids:
            return None
        if strings and vocab_bytes is None:
            if tokenizer is None:
                raise ArgumentError("stop", "string stop patterns need a tokenizer; pass token-id lists instead")
            vocab_bytes = token_bytes(tokenizer, vocab_size)
        byte_state, byte_hit = np.zeros((1, vocab_size), np.int32), np.zeros((1, vocab_size), bool)
        if strings:
            assert vocab_bytes is not None
            if len(vocab_bytes) != vocab_size:
                raise ArgumentError("vocab_bytes", f"has {len(vocab_bytes)} entries for a vocabulary of {vocab_size}")
            byte_state, byte_hit = _lift_bytes(*_aho_corasick([list(s) for s in strings], 256), vocab_bytes)
        id_state, id_accept = _aho_corasick(ids, vocab_size)  # [S2, V], [S2]
        n_ids = id_state.shape[0]
        # combined state s = b * n_ids + i; the next state and the hit are taken per component
        nxt = byte_state[:, None, :].astype(np.int64) * n_ids + id_state[None, :, :]  # [S1, S2, V]
        hit = byte_hit[:, None, :] | id_accept[id_state][None, :, :]
        dev = torch.device(device)
        next_state = torch.from_numpy(nxt.reshape(-1, vocab_size)).to(dev)
        completes = torch.from_numpy(hit.reshape(-1, vocab_size)).to(dev)
        patterns = tuple(s.decode("utf-8") for s in strings) + tuple(tuple(i) for i in ids)
        return cls(next_state, completes, patterns)

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])

    def initial(self, rows: int) -> Tensor:
        """The state of an empty continuation, for ``rows`` rows: [rows] long."""
        return torch.zeros(rows, dtype=torch.long, device=self.next_state.device)

    def step(self, state: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """(state [B], token [B]) -> (next state [B], does token complete a stop? [B] bool)."""
        return self.next_state[state, token], self.completes[state, token]

    def scan(self, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Run ``step`` along tokens [B, T] from state [B]: (states after each token [B, T], hits [B, T])."""
        states, hits = [], []
        for t in range(tokens.shape[1]):
            hit = self.completes[state, tokens[:, t]]
            state = self.next_state[state, tokens[:, t]]
            states.append(state)
            hits.append(hit)
        empty = tokens.new_zeros(tokens.shape[0], 0)
        if not states:
            return empty, empty.bool()
        return torch.stack(states, 1), torch.stack(hits, 1)

    def first_stop(self, tokens: Sequence[int]) -> int | None:
        """Index of the token that first completes a pattern in ``tokens`` (host-side reference)."""
        state = 0
        for t, v in enumerate(tokens):
            if bool(self.completes[state, v]):
                return t
            state = int(self.next_state[state, v])
        return None

    def __repr__(self) -> str:
        return f"StopSet({list(self.patterns)!r}, states={self.num_states})"


_BYTES: weakref.WeakKeyDictionary[Any, list[bytes]] = weakref.WeakKeyDictionary()
_BUILT: weakref.WeakKeyDictionary[Any, dict[Any, StopSet | None]] = weakref.WeakKeyDictionary()


def stop_set(engine: Any, stop: StopSpec | None) -> StopSet | None:
    """``StopSet.build`` for an engine (its vocabulary, tokenizer and device), built once per
    engine and pattern list (an evaluation calls the sampler once per problem with the same stops);
    the token byte table is computed once per tokenizer."""
    key = _key(stop)
    try:
        built = _BUILT.setdefault(engine, {})
    except TypeError:  # not weak-referenceable: no cache
        built = {}
    if key not in built:
        built[key] = _build_for(engine, stop)
    return built[key]


def _key(stop: Any) -> Any:
    if stop is None or isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
        return ("uncached", id(stop))  # invalid or empty input: let build() raise or return None
    return tuple(e if isinstance(e, str) else ("ids", *map(repr, e)) for e in stop)


def _build_for(engine: Any, stop: StopSpec | None) -> StopSet | None:
    vocab_bytes = None
    if stop is not None and engine.tokenizer is not None and any(isinstance(e, str) for e in stop):
        try:
            vocab_bytes = _BYTES.get(engine.tokenizer)
        except TypeError:  # not weak-referenceable: no cache
            vocab_bytes = None
        if vocab_bytes is None or len(vocab_bytes) != engine.vocab_size:
            vocab_bytes = token_bytes(engine.tokenizer, engine.vocab_size)
            try:
                _BYTES[engine.tokenizer] = vocab_bytes
            except TypeError:
                pass
    return StopSet.build(
        stop, engine.vocab_size, tokenizer=engine.tokenizer, vocab_bytes=vocab_bytes, device=engine.device
    )
