"""What defines an evaluation run, stored beside its records so a resume cannot mix two runs.

A run directory holds one run: ``DIR/run.json`` is its definition (task, method, seed, every
sampling and task argument, and whatever identifies the model: for a file, its name, size and
sha256, the name only informative (the same content elsewhere, e.g. another machine's shard, is
the same run); for a registry model or the embedded one, also its name; for a hub model, its id
and revision; the backend and dtype), written by the first
``run_eval`` into DIR. A later ``run_eval`` into DIR resumes only when its definition is the
same, field for field; otherwise it raises :class:`~smcdecode.errors.ArgumentError` naming
every differing field. Each record carries the definition's :func:`run_id`, so ``report``
keeps records of different definitions in different rows. A run directory is written by one
run at a time (:func:`lock`, on ``DIR/run.lock``): a second ``run_eval`` into it while the
first runs would record the same problems twice, so it is refused.

Not part of a definition (they do not change what a problem's samples are drawn from): which
problems are taken (``--limit``, ``--skip``, ``--shard``, ``--levels``, ``--subjects``),
``batch_size`` and the executor (a streamed problem's samples depend only on seed, problem id
and method; batch-at-a-time SMC above one problem per call also on its batch), the device,
``n_ctx`` and the KV layout (``--kv-split``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; one writer per directory is then the caller's care
    fcntl = None  # type: ignore[assignment]

from smcdecode.errors import ArgumentError

FILE = "run.json"
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


INFORMATIVE = ("file", "path")  # a file's name (``path`` in run.json files written before names)


def comparable(definition: Any) -> Any:
    """``definition`` without the names of files identified by their sha256: the same model or
    data under another name or path (another machine's shard, a moved file) is the same run. (A
    model's ``name`` is a registry key, ``embedded`` or a hub id; a ``name`` that is a path, as
    older ``run.json`` files hold for a model given by path, is informative too.)"""
    if isinstance(definition, dict):
        return {k: comparable(v) for k, v in definition.items() if not _informative(k, v, definition)}
    return definition


def _informative(key: str, value: Any, definition: dict[str, Any]) -> bool:
    if "sha256" not in definition:
        return False
    return key in INFORMATIVE or (key == "name" and isinstance(value, str) and ("/" in value or os.sep in value))


def run_id(definition: dict[str, Any]) -> str:
    """A short fingerprint of a definition (sha256 of its :func:`comparable` canonical JSON, 16
    hex digits)."""
    text = json.dumps(comparable(definition), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str) -> dict[str, Any]:
    """A file: {file, bytes, sha256}, ``file`` its name without the folders (where a file sits on
    one machine says nothing about the run, and a path outside the run directory would leak into
    shared records); a directory: the same over its files (names and contents)."""
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip(os.sep))
    if os.path.isfile(path):
        return {"file": name, "bytes": os.path.getsize(path), "sha256": _sha256(path)}
    if os.path.isdir(path):
        total, digest = 0, hashlib.sha256()
        for d, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                total += os.path.getsize(p)
                digest.update(f"{os.path.relpath(p, path)}\0{_sha256(p)}\n".encode())
        return {"file": name, "bytes": total, "sha256": digest.hexdigest()}
    raise ArgumentError("path", f"no such file or directory: {path}")


def _sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``field: stored -> wanted`` for every field whose value differs (nested fields dotted)."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "(absent)"), wanted.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{key}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")
    return out


LOCK = "run.lock"  # the lock file inside a run directory
_UNLOCKABLE = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)


@contextmanager
def lock(out_dir: str, wait: float = 1.0) -> Iterator[None]:
    """Hold ``out_dir`` (created if need be) as its one writer until the block ends: an exclusive
    advisory lock on ``out_dir/run.lock``, released when the block ends or the process dies.
    A holder is waited for up to ``wait`` seconds (a :func:`check` by another command holds it for
    an instant). Where the filesystem has no locks (some network filesystems; Windows), a warning
    says so and the block runs unlocked: one writer per directory is then the caller's care.

    Raises:
        ArgumentError: another run (another process, or another block of this one) holds it.
    """
    os.makedirs(out_dir, exist_ok=True)
    if fcntl is None:
        warnings.warn(f"no file locks on this system: nothing stops a second run writing {out_dir}", stacklevel=3)
        yield
        return
    fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)  # writable: NFS's emulated flock
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ArgumentError(
                        "out",
                        f"{out_dir} is being written by another run right now; a second writer would record "
                        "its problems twice. Wait for that run to end, or use another --out.",
                    ) from None
                time.sleep(0.05)
            except OSError as e:
                if e.errno not in _UNLOCKABLE:
                    raise
                warnings.warn(f"{out_dir}: file locks unsupported here ({e}); writing unlocked", stacklevel=3)
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def check(out_dir: str, definition: dict[str, Any], unknown: tuple[str, ...] = ()) -> None:
    """Raise as :func:`claim` would when ``out_dir`` holds another run, or as :func:`lock` would
    when a run is writing it now, without writing anything: a check before the costly part
    (loading a model). ``unknown``: dotted fields not known yet (e.g. ``model.revision`` before
    the model is loaded), left out of the comparison."""
    if os.path.exists(os.path.join(out_dir, LOCK)):  # a run writing out_dir made it
        with lock(out_dir, wait=0.0):
            pass
    path = os.path.join(out_dir, FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return  # claim() says what is wrong with it
    wanted = as_stored(definition)
    for field in unknown:
        *parents, last = field.split(".")
        for d in (stored, wanted):
            for key in parents:
                d = d.get(key) if isinstance(d, dict) else None
            if isinstance(d, dict):
                d.pop(last, None)
    _refuse(out_dir, differences(comparable(stored), comparable(wanted)))


def _refuse(out_dir: str, diff: list[str]) -> None:
    if diff:
        raise ArgumentError(
            "out",
            f"{out_dir} holds another run; resuming would mix two runs. Differing: "
            + "; ".join(diff)
            + ". Use another --out for this run.",
        )


def as_stored(definition: dict[str, Any]) -> dict[str, Any]:
    """``definition`` as ``run.json`` stores it (tuples become lists). Raises ArgumentTypeError
    (not a dict) or ArgumentError (not JSON data) naming ``definition``."""
    if not isinstance(definition, dict):
        from smcdecode.errors import ArgumentTypeError

        raise ArgumentTypeError("definition", f"expected a dict, got {type(definition).__name__}")
    try:
        return json.loads(json.dumps(definition))
    except (TypeError, ValueError) as e:
        raise ArgumentError("definition", f"must be JSON data ({e})") from e


def claim(out_dir: str, definition: dict[str, Any]) -> str:
    """Make ``out_dir`` the directory of the run ``definition`` (writing ``run.json``), or check
    that it already is; returns :func:`run_id`. Raises ArgumentError("out", ...) naming every
    field that differs from the stored definition."""
    definition = as_stored(definition)
    path = os.path.join(out_dir, FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            raise ArgumentError("out", f"{path} is not a run definition ({e}); use another directory") from e
        _refuse(out_dir, differences(comparable(stored), comparable(definition)))
        return run_id(definition)
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(definition, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return run_id(definition)
