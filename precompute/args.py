"""Checks of what the commands are given: argparse types for counts and shares (a bad value ends in
argparse's one line, exit 2, not a traceback or an empty result later), and output paths checked before
any work."""
import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from sae_core.errors import UserError
from sae_core.folders import FOLDER_KINDS, folder_kind


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


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates, expansions, sizes, seconds)."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number of 0 or more (loss coefficients, thresholds)."""
    value = finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, not {text!r}")
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


def out_folder(out: Path, what: str, writes: tuple[str, ...] = ()) -> Path:
    """`out`, refused in one sentence when it is an existing file where the command writes a folder (`what`), or
    a folder that holds another step's output than the kinds it `writes` (FOLDER_KINDS: an SAE trained into an
    extraction's folder, a bundle built into an SAE's, mixed two runs' files in one folder)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for {what}.")
    kind = folder_kind(out) if writes else None
    if kind is not None and kind not in writes:
        raise UserError(f"--out {out} holds {FOLDER_KINDS[kind]}; give a new folder for {what}.")
    return out


def check_writable(path: Path) -> None:
    """Refuse, before any work, a file the command could not write at the end (a folder in its place,
    a file where a folder must be, a folder without write permission)."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, so the output cannot be written there; give another --out.")
    folder = path.parent
    while not folder.exists():  # the nearest existing folder above decides: the rest is created
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, so {path} cannot be created under it; give another --out.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder} is not writable, so {path} cannot be written; give an --out you can write to.")


def command_line(args: argparse.Namespace) -> str:
    """The command that ran, to record beside its output: its own arguments (`args.argv`, set by
    precompute's main and by the demo for each step it runs), so a step the demo ran reads as the step,
    runnable by itself, and not as the demo's command line."""
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return shlex.join(["python", "-m", "precompute", *argv])
