"""The child process of :class:`smcdecode.tasks.mathverify.Verifier` (run as a script: it imports
nothing from smcdecode, so it starts without torch).

Protocol, one JSON object per line: the parent writes ``{"op": "grade", "gold": G, "answer": A}``
or ``{"op": "parses", "answer": A}``; the child answers ``{"ok": true|false|null}`` (null: math-verify
raised). math-verify runs without its own signal timeouts: the parent bounds every request and
kills this process when one overruns. The first line the child writes is ``{"ready": true}``, or
``{"error": "..."}`` when math-verify cannot be imported.
"""

import json
import resource
import signal
import sys

MEMORY = 4 << 30  # address space cap: an answer that makes sympy allocate without end fails here


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    except (ValueError, OSError):
        pass
    out = sys.stdout
    try:
        from math_verify import parse, verify
    except ImportError as e:
        out.write(json.dumps({"error": f"{e}"}) + "\n")
        out.flush()
        return
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            boxed = parse(f"$\\boxed{{{req['answer']}}}$", parsing_timeout=None)
            if req["op"] == "grade":
                gold = parse(f"${req['gold']}$", parsing_timeout=None)
                ok = bool(verify(gold, boxed, timeout_seconds=None))
            else:
                ok = bool(boxed)
        except Exception:  # any failure of math-verify (MemoryError included) is the parent's fallback
            ok = None
        out.write(json.dumps({"ok": ok}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
