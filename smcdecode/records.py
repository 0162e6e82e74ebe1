"""Append-only JSONL records that survive a crash at any moment (including kill -9).

Each record is one line written with a single ``write`` of the complete line, then flushed and
fsync'ed. A torn last line (the process died mid-write) is ignored by the reader and cut off
before the next append, so the file never holds a corrupt line in the middle. Other malformed
lines are reported with their line number and skipped.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from typing import Any


class MalformedLineWarning(UserWarning):
    pass


def read_jsonl(path: str, *, what: str = "record") -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; warn (with line numbers) and skip malformed lines."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # no final newline: the last write did not complete
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if torn and number == len(lines):
                warnings.warn(f"{path}:{number}: ignoring a torn last {what} line", MalformedLineWarning, stacklevel=2)
            else:
                warnings.warn(
                    f"{path}:{number}: skipping malformed {what} line ({e})", MalformedLineWarning, stacklevel=2
                )
            continue
        yield obj


def repair_tail(path: str) -> None:
    """Cut a torn final line (no trailing newline) so the next append starts a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


class RecordWriter:
    """Appends one JSON object per line; each append is durable when it returns. ``stamp``: fields
    added to every record (e.g. the run's id)."""

    def __init__(self, path: str, stamp: dict[str, Any] | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        repair_tail(path)
        self.path = path
        self.stamp = dict(stamp or {})
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps({**record, **self.stamp}, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
        written = 0
        while written < len(line):
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
