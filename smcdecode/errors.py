"""Typed errors. Every error caused by a user's argument names that argument."""

from __future__ import annotations


class SmcdecodeError(Exception):
    """Base class of every error smcdecode raises on purpose."""


class ArgumentError(SmcdecodeError, ValueError):
    """A bad value for a named argument: ``err.argument`` is its name.

    Args:
        argument: The argument's name (the message starts with it).
        message: What is wrong with its value.
    """

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class ArgumentTypeError(SmcdecodeError, TypeError):
    """A value of the wrong kind for a named argument.

    Args:
        argument: The argument's name (``err.argument``; the message starts with it).
        message: What kind was expected or given.
    """

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class RewardError(SmcdecodeError, RuntimeError):
    """A reward function raised or returned a non-finite value.

    ``prompt_index`` and ``sample_index`` say which prompt and which sample (row within the prompt)
    triggered it; the original exception, if any, is chained as ``__cause__``.

    Args:
        message: What went wrong.
        prompt_index: The prompt whose row triggered it.
        sample_index: The row within that prompt.
    """

    def __init__(self, message: str, prompt_index: int, sample_index: int):
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        super().__init__(f"prompt {prompt_index}, sample {sample_index}: {message}")


def check_finite_positive(name: str, value: float) -> float:
    """``value`` as a float, checked finite and > 0.

    Args:
        name: The argument's name, used in the error.
        value: The value to check.

    Raises:
        ArgumentTypeError: ``value`` is not a number.
        ArgumentError: it is not finite or not positive (the error names ``name``).
    """
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(name, f"must be finite and > 0, got {value}")
    return float(value)


def check_finite(name: str, value: float) -> float:
    """``value`` as a float, checked finite.

    Args:
        name: The argument's name, used in the error.
        value: The value to check.

    Raises:
        ArgumentTypeError: ``value`` is not a number.
        ArgumentError: it is not finite (the error names ``name``).
    """
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ArgumentError(name, f"must be finite, got {value}")
    return float(value)


def check_int(name: str, value: int, minimum: int) -> int:
    """``value``, checked to be an int ≥ ``minimum``.

    Args:
        name: The argument's name, used in the error.
        value: The value to check.
        minimum: The least value allowed.

    Raises:
        ArgumentTypeError: ``value`` is not an int (a bool is not).
        ArgumentError: it is below ``minimum`` (the error names ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(name, f"expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ArgumentError(name, f"must be >= {minimum}, got {value}")
    return value
