"""math-verify behind a hard timeout, callable from any thread.

math-verify bounds its own parsing and comparison with ``signal.alarm``, which works only in a
process's main thread: called from any other thread (an SMC problem's coroutine thread, a Ray
worker's evaluation thread) it raises, so a correct answer fell back to string equality and the
``boxed`` reward read 0. And an answer such as ``9^{9^{9^{9}}}`` keeps sympy busy without end once
those timeouts are off. So math-verify runs in one long-lived child process per process
(``_verify_child.py``, started on first use, without torch): each request is bounded by
``timeout`` seconds of wall time, and a child that overruns (or dies) is killed and replaced,
the request counting as not verified. A lock serialises the threads' requests.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from typing import Any

from smcdecode.errors import SmcdecodeError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_child.py")
TIMEOUT = 5.0  # seconds a request may take (math-verify's own default per parse and per comparison)
START_TIMEOUT = 120.0  # importing sympy on a loaded machine


class Verifier:
    """``grade(answer, gold)`` and ``parses(answer)`` in a child process, each bounded by
    ``timeout`` seconds. Returns True / False, or None when math-verify raised (the caller's
    fallback); a request that times out is False."""

    def __init__(self, timeout: float = TIMEOUT):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = -1  # the pid that started the child (a forked process starts its own)
        self.timeouts = 0  # requests cut off so far (diagnostics, tests)

    def grade(self, answer: str, gold: str) -> bool | None:
        return self._ask({"op": "grade", "gold": gold, "answer": answer})

    def parses(self, answer: str) -> bool | None:
        return self._ask({"op": "parses", "answer": answer})

    def _ask(self, request: dict[str, Any]) -> bool | None:
        line = (json.dumps(request) + "\n").encode()
        with self._lock:
            for attempt in range(2):  # a child found dead is replaced once
                proc = self._child()
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(line)
                    proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    self._kill()
                    continue
                reply = self._read(proc, self.timeout)
                if reply is None:  # overran (killed) or died
                    died = proc.poll() is not None
                    self._kill()
                    if died and attempt == 0:
                        continue
                    self.timeouts += not died
                    return False
                ok = json.loads(reply)["ok"]
                return None if ok is None else bool(ok)
            return False

    def _child(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None:
            return self._proc
        self._proc = subprocess.Popen(
            [sys.executable, CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._owner = os.getpid()
        first = self._read(self._proc, START_TIMEOUT)
        hello = json.loads(first) if first else {"error": "the math-verify process did not start"}
        if "error" in hello:
            self._kill()
            why = hello["error"]
            raise SmcdecodeError(f"MATH-500 grading needs math-verify ({why}): pip install 'smcdecode[eval]'")
        return self._proc

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
        """One line from the child within ``timeout`` s, or None (timed out or closed)."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line or None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            proc.kill()
            proc.wait()

    def close(self) -> None:
        with self._lock:
            self._kill()


_VERIFIER: Verifier | None = None
_MAKE = threading.Lock()


def verifier() -> Verifier:
    """This process's verifier (started on first use, closed at exit)."""
    global _VERIFIER
    with _MAKE:
        if _VERIFIER is None:
            _VERIFIER = Verifier()
            atexit.register(_VERIFIER.close)
        return _VERIFIER
