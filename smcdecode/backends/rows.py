"""Per-row context bookkeeping shared by every backend: which cache columns hold each row's
context, at which positions, with which tokens.

A batch of B rows owns S columns (one per token ever fed, KV or not). Per row b and column s:

    valid[b, s]  bool   column s holds a token of row b's current context
    pos[b, s]    long   the position id the token in column s was written with
    tok[b, s]    long   the token id fed in column s
    lengths[b]   long   number of valid columns = position id of the next token

New tokens are appended as new columns (position ids = lengths), so a row's valid columns are in
position order and its context is ``tok[b, valid[b]]``. Operations:

* rollback to length k: ``valid &= pos < k``, O(B·S), no copy (the dropped columns stay until
  :meth:`Rows.compact_order`);
* truncate to length k: roll back to k − 1 and mark x_{k−1} *pending*, so the next decode feeds it
  again and returns the distribution after k tokens (readouts are never cached per position);
* save / restore: a per-row snapshot of ``valid`` and ``lengths`` (an MH move's old context);
* select with repeats (resampling): whole rows, or only the columns after the ``shared`` prefix
  when every index stays inside its row's group (a prompt's chains share the prompt's columns);
* compaction: a stable gather of each row's live (valid or saved) columns, left-padded.

Buffers are preallocated and grow by doubling, so a decode step writes its column in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FIELDS = ("_valid", "_pos", "_tok", "_saved")


class Rows:
    def __init__(self, size: int, device: torch.device):
        z = torch.zeros(size, 0, dtype=torch.long, device=device)
        self._valid, self._pos, self._tok, self._saved = z.bool(), z, z.clone(), z.bool()
        self.width = 0  # S: columns in use
        self.lengths = torch.zeros(size, dtype=torch.long, device=device)  # [B]
        self.saved_lengths: Tensor | None = None  # [B], set by the first save
        self.pending = torch.full((size,), -1, dtype=torch.long, device=device)  # [B] token to re-feed, −1 none
        self.shared = 0  # leading columns identical across the rows of a group

    # ------------------------------------------------------------------ views [B, S]
    @property
    def valid(self) -> Tensor:
        return self._valid[:, : self.width]

    @property
    def pos(self) -> Tensor:
        return self._pos[:, : self.width]

    @property
    def tok(self) -> Tensor:
        return self._tok[:, : self.width]

    @property
    def saved(self) -> Tensor | None:
        return None if self.saved_lengths is None else self._saved[:, : self.width]

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    def contexts(self) -> list[list[int]]:
        """Each row's current context (prompt + generated tokens), in position order."""
        return [t[v].tolist() for t, v in zip(self.tok, self.valid)]

    # ------------------------------------------------------------------ growth
    def append(self, tokens: Tensor, real: Tensor, pos: Tensor) -> None:
        """Columns for a forward of ``tokens`` [B, Q]; ``real`` [B, Q] marks the real (not padding)
        tokens and ``pos`` [B, Q] their position ids. Lengths grow by the real tokens."""
        q = tokens.shape[1]
        w = self.width
        self._grow(w + q)
        self._valid[:, w : w + q] = real
        self._pos[:, w : w + q] = pos
        self._tok[:, w : w + q] = tokens
        self._saved[:, w : w + q] = False
        self.width = w + q
        self.lengths = self.lengths + real.long().sum(1)

    def _grow(self, columns: int) -> None:
        """Capacity for ``columns`` columns (doubling)."""
        w = self.width
        if columns > self._valid.shape[1]:
            cap = max(64, 2 * columns)
            for name in _FIELDS:
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], cap)
                new[:, :w] = old[:, :w]
                setattr(self, name, new)

    def admit(self, rows: Tensor, part: Rows) -> None:
        """Rows ``rows`` (long [k]) drop their context, snapshot and pending token, and take
        ``part``'s k rows, written into Q = ``part.width`` new columns; the other rows get Q dead
        columns. No prefix is shared across rows afterwards."""
        q, w = part.width, self.width
        self._grow(w + q)
        for name in _FIELDS:
            getattr(self, name)[:, w : w + q] = 0
        self._valid[rows, :w] = False
        self._saved[rows, :w] = False
        self._valid[rows, w : w + q] = part.valid
        self._pos[rows, w : w + q] = part.pos
        self._tok[rows, w : w + q] = part.tok
        self.width = w + q
        self.lengths = self.lengths.index_put((rows,), part.lengths)
        self.pending = self.pending.index_put((rows,), torch.full_like(part.lengths, -1))
        if self.saved_lengths is not None:
            self.saved_lengths = self.saved_lengths.index_put((rows,), part.lengths)
        self.shared = 0

    @staticmethod
    def stack(parts: list[Rows]) -> Rows:
        """Rows of several batches on top of each other, shorter ones left-padded with dead columns."""
        s = max(p.width for p in parts)
        out = Rows(sum(p.size for p in parts), parts[0].lengths.device)
        pad = lambda t: torch.nn.functional.pad(t, (s - t.shape[1], 0))  # noqa: E731
        out._valid = torch.cat([pad(p.valid) for p in parts])
        out._pos = torch.cat([pad(p.pos) for p in parts])
        out._tok = torch.cat([pad(p.tok) for p in parts])
        out._saved = torch.zeros_like(out._valid)
        out.width = s
        out.lengths = torch.cat([p.lengths for p in parts])
        out.pending = torch.cat([p.pending for p in parts])
        return out

    # ------------------------------------------------------------------ row operations
    def rollback(self, lengths: Tensor) -> None:
        """Row b keeps its first ``lengths[b]`` tokens (values above the current length change nothing)."""
        w = self.width
        self._valid[:, :w] &= self._pos[:, :w] < lengths[:, None]
        self.lengths = torch.minimum(self.lengths, lengths)

    def truncate(self, rows: Tensor, lengths: Tensor) -> None:
        """For ``rows`` (bool [B]): keep the first ``lengths[b]`` ≥ 1 tokens and queue the last kept
        one to be fed again, so the next decode returns the distribution after them."""
        at = (self.valid & (self.pos == (lengths - 1)[:, None])).long().argmax(1)  # column of x_{k−1}
        last = self.tok.gather(1, at[:, None])[:, 0]
        big = torch.full_like(lengths, 1 << 40)
        self.rollback(torch.where(rows, lengths - 1, big))
        self.pending = torch.where(rows, last, self.pending)

    def take_pending(self, tokens: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """The tokens and active mask of the next decode with pending rows substituted; clears them."""
        pending = self.pending >= 0
        tokens = torch.where(pending, self.pending, tokens)
        self.pending = torch.full_like(self.pending, -1)
        return tokens, active | pending

    def save(self, rows: Tensor) -> None:
        """Snapshot the context of ``rows`` (bool [B]) for :meth:`restore`."""
        w = self.width
        if self.saved_lengths is None:
            self.saved_lengths = self.lengths.clone()
            self._saved.zero_()
        self._saved[:, :w] = torch.where(rows[:, None], self._valid[:, :w], self._saved[:, :w])
        self.saved_lengths = torch.where(rows, self.lengths, self.saved_lengths)

    def restore(self, rows: Tensor) -> None:
        """``rows`` return to their last snapshot (a pending re-feed is dropped)."""
        if self.saved_lengths is None:
            return  # nothing was ever saved: callers only restore rows they saved
        w = self.width
        self._valid[:, :w] = torch.where(rows[:, None], self._saved[:, :w], self._valid[:, :w])
        self.lengths = torch.where(rows, self.saved_lengths, self.lengths)
        self.pending = torch.where(rows, -1, self.pending)

    def select(self, idx: Tensor) -> None:
        """Row b becomes old row ``idx[b]``. The bookkeeping of every column moves with its row,
        even when the backend copies only the KV after the shared prefix (``start``): a row that
        re-fed the prompt's last token (a move from i = 0) has that prefix column dead and the
        token again after the prefix, so its ``valid`` flags must travel together."""
        w = self.width
        if idx.numel() == self.size:
            for name in _FIELDS:
                buf = getattr(self, name)
                buf[:, :w] = buf[idx, :w]
        else:
            for name in _FIELDS:
                setattr(self, name, getattr(self, name)[idx])
            self.shared = 0
        self.lengths, self.pending = self.lengths[idx], self.pending[idx]
        if self.saved_lengths is not None:
            self.saved_lengths = self.saved_lengths[idx]

    def fork(self, idx: Tensor) -> Rows:
        """New rows: row r copies row ``idx[r]`` (columns, lengths, pending re-feed); no snapshot,
        no shared prefix. ``self`` is unchanged."""
        w = self.width
        out = Rows(int(idx.shape[0]), self.lengths.device)
        for name in ("_valid", "_pos", "_tok"):
            setattr(out, name, getattr(self, name)[idx, :w].clone())
        out._saved = torch.zeros_like(out._valid)
        out.width = w
        out.lengths = self.lengths[idx].clone()
        out.pending = self.pending[idx].clone()
        return out

    def compact_order(self, ratio: float, force: bool) -> Tensor | None:
        """When live columns (valid or saved) are fewer than ``ratio`` · S (or ``force``), gather
        them and return the column order [B, S'] the backend applies to its cache; else None.
        After the shared prefix: dead columns first (stable), then live ones in their order."""
        s, sh = self.width, self.shared
        if s == 0:
            return None
        keep = self.valid if self.saved is None else self.valid | self._saved[:, :s]
        rest = keep[:, sh:]
        live = int(rest.sum(1).max())  # host sync
        if not force and sh + live >= ratio * s:
            return None
        key = rest.long() * (s + 1) + torch.arange(s - sh, device=keep.device)
        tail = torch.sort(key, dim=1).indices[:, s - sh - live :] + sh  # [B, live]
        prefix = torch.arange(sh, device=keep.device).expand(self.size, sh)
        order = torch.cat([prefix, tail], dim=1)  # [B, sh + live]
        for name in _FIELDS:
            setattr(self, name, getattr(self, name)[:, :s].gather(1, order))
        self.width = sh + live
        return order
