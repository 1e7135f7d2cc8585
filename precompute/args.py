"""argparse types for counts and shares: a bad value ends in argparse's one line (exit 2), not a traceback
or an empty result later."""
import argparse
import math


def positive_int(text: str) -> int:
    """An integer of at least 1 (images, neighbours, tokens, batch sizes)."""
    return _int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer of at least 0 (worker processes)."""
    return _int(text, 0, "an integer of 0 or more")


def share(text: str) -> float:
    """A number in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], not {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _int(text: str, low: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
    return value
