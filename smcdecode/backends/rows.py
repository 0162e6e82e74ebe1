"""The HF backend's column bookkeeping: which KV-cache columns hold each row's context, at which
positions (the masked-column scheme; a backend with per-sequence caches does not need it).

A batch of B rows owns S columns (one per token ever fed). Per row b and column s:

    valid[b, s]  bool   column s holds a token of row b's current context
    pos[b, s]    long   the position id the token in column s was written with

New tokens are appended as new columns (position ids = the row's length), so a row's valid
columns are in position order. Operations:

* rollback to length k: ``valid &= pos < k``, O(B·S), no copy (the dropped columns stay until
  :meth:`Rows.compact_order`);
* save / restore: a per-row snapshot of ``valid`` (an MH move's old context: the old suffix's KV is
  never overwritten, new tokens go to new columns);
* select with repeats (resampling): whole rows (the backend copies only the KV after the
  ``shared`` prefix when every index stays inside its row's group);
* compaction: a stable gather of each row's live (valid or saved) columns, left-padded.

Buffers are preallocated and grow by doubling, so a decode step writes its column in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FIELDS = ("_valid", "_pos", "_saved")


class Rows:
    """The HF backend's per-row column bookkeeping (``valid``, ``pos`` and saved masks over S
    columns); see the module docstring for its operations.

    Args:
        size: Rows B.
        device: Where the masks live.
    """

    def __init__(self, size: int, device: torch.device):
        z = torch.zeros(size, 0, dtype=torch.long, device=device)
        self._valid, self._pos, self._saved = z.bool(), z, z.bool()
        self.width = 0  # S: columns in use
        self.size = size
        self.has_saved = False  # set by the first save
        self.shared = 0  # leading columns identical across the rows of a group

    # ------------------------------------------------------------------ views [B, S]
    @property
    def valid(self) -> Tensor:
        """[B, S] bool: column s holds a token of row b's current context."""
        return self._valid[:, : self.width]

    @property
    def pos(self) -> Tensor:
        """[B, S] long: the position id each column was written with."""
        return self._pos[:, : self.width]

    @property
    def saved(self) -> Tensor | None:
        """[B, S] bool: the saved contexts of checkpointed rows (None when none is saved)."""
        return self._saved[:, : self.width] if self.has_saved else None

    # ------------------------------------------------------------------ growth
    def append(self, real: Tensor, pos: Tensor) -> None:
        """Columns for a forward of Q tokens; ``real`` [B, Q] marks the real (not padding) tokens
        and ``pos`` [B, Q] their position ids.

        Args:
            real: Bool [B, Q], the real tokens (they become valid columns).
            pos: Long [B, Q], their position ids.
        """
        q = real.shape[1]
        w = self.width
        self._grow(w + q)
        self._valid[:, w : w + q] = real
        self._pos[:, w : w + q] = pos
        self._saved[:, w : w + q] = False
        self.width = w + q

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
        """Rows ``rows`` (long [k]) drop their columns and snapshot and take ``part``'s k rows,
        written into Q = ``part.width`` new columns; the other rows get Q dead columns. No prefix
        is shared across rows afterwards.

        Args:
            rows: Long [k], distinct row indices in [0, B).
            part: The k admitted rows' bookkeeping (their prefilled prompts).
        """
        q, w = part.width, self.width
        self._grow(w + q)
        for name in _FIELDS:
            getattr(self, name)[:, w : w + q] = 0
        self._valid[rows, :w] = False
        self._saved[rows, :w] = False
        self._valid[rows, w : w + q] = part.valid
        self._pos[rows, w : w + q] = part.pos
        self._saved[rows, w : w + q] = part.valid  # the snapshot of an admitted row is its prompt
        self.width = w + q
        self.shared = 0

    @staticmethod
    def stack(parts: list[Rows]) -> Rows:
        """Rows of several batches on top of each other, shorter ones left-padded with dead columns.

        Args:
            parts: Non-empty list of bookkeepings of B_1, B_2, .. rows on one device.

        Returns:
            Bookkeeping of B_1 + B_2 + .. rows over max S columns, with no snapshot.
        """
        s = max(p.width for p in parts)
        out = Rows(sum(p.size for p in parts), parts[0]._valid.device)
        pad = lambda t: torch.nn.functional.pad(t, (s - t.shape[1], 0))  # noqa: E731
        out._valid = torch.cat([pad(p.valid) for p in parts])
        out._pos = torch.cat([pad(p.pos) for p in parts])
        out._saved = torch.zeros_like(out._valid)
        out.width = s
        return out

    # ------------------------------------------------------------------ row operations
    def rollback(self, lengths: Tensor) -> None:
        """Row b keeps the columns of its first ``lengths[b]`` positions.

        Args:
            lengths: Long [B], positions to keep per row (``valid &= pos < lengths[b]``).
        """
        w = self.width
        self._valid[:, :w] &= self._pos[:, :w] < lengths[:, None]

    def save(self, rows: Tensor) -> None:
        """Snapshot the columns of ``rows`` (bool [B]) for :meth:`restore`.

        Args:
            rows: Bool [B], the rows whose snapshot is replaced by their current ``valid``.
        """
        w = self.width
        if not self.has_saved:
            self._saved.zero_()
            self.has_saved = True
        self._saved[:, :w] = torch.where(rows[:, None], self._valid[:, :w], self._saved[:, :w])

    def restore(self, rows: Tensor) -> None:
        """``rows`` return to their last snapshot.

        Args:
            rows: Bool [B], the rows to restore (nothing happens if no row was ever saved).
        """
        if not self.has_saved:
            return  # nothing was ever saved: callers only restore rows they saved
        w = self.width
        self._valid[:, :w] = torch.where(rows[:, None], self._saved[:, :w], self._valid[:, :w])

    def select(self, idx: Tensor) -> None:
        """Row b becomes old row ``idx[b]``. The flags of every column move with its row, even
        when the backend copies only the KV after the shared prefix: a row that re-fed the
        prompt's last token (a move from i = 0) has that prefix column dead and the token again
        after the prefix, so its ``valid`` flags must travel together.

        Args:
            idx: Long [B'], old row indices (repeats allowed); B' ≠ B resets the shared prefix.
        """
        w = self.width
        if idx.numel() == self.size:
            for name in _FIELDS:
                buf = getattr(self, name)
                buf[:, :w] = buf[idx, :w]
        else:
            for name in _FIELDS:
                setattr(self, name, getattr(self, name)[idx])
            self.shared = 0
            self.size = int(idx.numel())

    def fork(self, idx: Tensor) -> Rows:
        """New rows: row r copies row ``idx[r]``'s columns; no snapshot, no shared prefix.

        Args:
            idx: Long [R], row indices (repeats allowed).

        Returns:
            A new bookkeeping of R rows over the same S columns.
        """
        w = self.width
        out = Rows(int(idx.shape[0]), self._valid.device)
        out._valid = self._valid[idx, :w].clone()
        out._pos = self._pos[idx, :w].clone()
        out._saved = torch.zeros_like(out._valid)
        out.width = w
        return out

    def compact_order(self, ratio: float, force: bool) -> Tensor | None:
        """When live columns (valid or saved) are fewer than ``ratio`` · S (or ``force``), gather
        them and return the column order [B, S'] the backend applies to its cache; else None.
        After the shared prefix: dead columns first (stable), then live ones in their order.

        Args:
            ratio: Compact when the live columns after the shared prefix plus the prefix are
                fewer than ``ratio`` · S.
            force: Compact whatever the ratio.

        Returns:
            Long [B, S'] column indices (S' = shared prefix + the most live columns of a row), or
            None when nothing was done.
        """
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
