"""The one exception type for mistakes a user can make and fix, and the sentences several readers share."""
import errno
import os
import re
from pathlib import Path

import numpy as np


class UserError(Exception):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do.

    Command lines print it without a traceback and exit with status 2.
    """


def counted(n: int, word: str) -> str:
    """"1 latent", "2 latents", "1,024 nodes": a count and its noun, plural but for one."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def readable(text) -> str:
    """`text` with what no page, JSON answer or tokenizer can carry spelt out: a name that is not UTF-8 (a lone
    surrogate, as Python reads the Latin-1 "caf\xe9" of an old archive) as its bytes, "caf\\xe9"."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def terminal_text(text: str) -> str:
    """`text` (read from a bundle or another file) safe to print to a terminal: control characters other than a
    line end or a tab as \\xNN, which a terminal would obey (a labels method of "\\x1b[2J" cleared the screen and
    "\\x1b]0;...\\x07" set the window's title in `inspect` until 2026-12-05); a name not UTF-8 by its bytes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", readable(text))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def not_utf8_argument(argv) -> str | None:
    """The refusal of a command-line argument that is not UTF-8 (a path named in another encoding), or None: such
    a path went into the bundle's manifest, whose every page then failed in the explorer's JSON encoder (until
    2026-12-05)."""
    for arg in argv:
        if readable(arg) != arg:
            return (f"the argument '{readable(arg)}' is not UTF-8 text (a name in another encoding, shown by its "
                    "bytes); rename that file or folder to UTF-8 (e.g. `convmv -f latin1 -t utf8 -r --notest NAME`) "
                    "and run again")
    return None


_WRITE_FAILURES = {errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is used up",
                   errno.EFBIG: "a file would grow past the size limit (ulimit -f)",
                   errno.EROFS: "the file system is read-only", errno.EIO: "the device reported an input/output error"}


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, where `e` says the storage refused it (full, over quota or the size limit, read-only,
    failing), else None: an OSError's errno, numpy's errno-less "N requested and M written" of a cut-short array,
    and safetensors' SafetensorError ("... (os error 28)"), which is no OSError."""
    code = getattr(e, "errno", None)
    if code in _WRITE_FAILURES:
        return _WRITE_FAILURES[code]
    text = str(e)
    if type(e).__name__ == "SafetensorError" and (found := re.search(r"os error (\d+)", text)):
        return _WRITE_FAILURES.get(int(found.group(1)))
    if isinstance(e, OSError) and code is None and re.search(r"\d+ requested and \d+ written", text):
        return "a file could not be written whole (the device is probably full)"
    return None


def not_utf8(path) -> UserError:
    """The error for a text file that is not UTF-8, naming its first bad byte and that byte's line.

    Read line by line in binary, so a large file is never held whole; a UTF-8 character cannot span a
    line end, so decoding each line alone finds the same first bad byte as decoding the file.
    """
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return UserError(f"{path} line {n} is not UTF-8 text (byte {line[e.start]:#04x}); save it as "
                                 f"UTF-8 and run again.")
    return UserError(f"{path} is not UTF-8 text; save it as UTF-8 and run again.")


def is_count(value) -> bool:
    """Whether `value` is a whole number from 1 as a library caller passes it: a Python or numpy integer, not a
    bool (what k, a chunk size or an answer length must be; 2.5 or True were taken as 2 or 1, 0 failed deep down)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


_INTEGER_TEXT = re.compile(r"[-+]?[0-9]{1,4000}")  # past 4,300 digits int() refuses the text itself


def integer_text(text: str) -> int | None:
    """The integer a user typed ("3", " -3 ", "+3", or "#3" as Neuronpedia writes a neuron), None when the text
    is none. ASCII digits only, read alike by the app and the commands: int() also took other scripts' digits and
    "1_000", and str.isdigit took a superscript two, which int() then refused with a traceback."""
    t = text.strip().removeprefix("#").strip()
    return int(t) if _INTEGER_TEXT.fullmatch(t) else None


def checked_index(value, what: str, n: int, covers: str) -> int:
    """`value` as an id in [0, n): an int, a numpy integer, a whole float (a 0-d array or tensor too) or the digits
    of one (`integer_text`); UserError (one sentence) for anything else (int() alone took 2.5 for 2, and said
    nothing useful of "x" or inf)."""
    try:
        i = int(integer_text(value) if isinstance(value, str) else value)  # None: TypeError
        # a float of any kind, a 0-d array or tensor included, must be whole (np.array(2.5) and torch.tensor(2.5)
        # were id 2 until 2026-12-05)
        boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")  # np.bool_ too
        if boolean or (not isinstance(value, (int, np.integer, str)) and float(value) != i):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} id {value!r} is not an integer; pick one between 0 and {n - 1}.") from None
    if not 0 <= i < n:
        raise UserError(f"{what} {i} does not exist; {covers} 0 to {n - 1}.")
    return i


def unknown_world_part(root: str, parts: tuple[str, ...], what: str) -> None:
    """UserError when `root` (the folder of a world: spec) does not exist because it ends in ":X" after a world's
    folder: X is then a misspelt split or model ("world:W:vall" was "world directory W:vall does not exist")."""
    head, sep, tail = root.rpartition(":")
    if sep and Path(os.path.expandvars(os.path.expanduser(head))).is_dir():
        raise UserError(f"{tail!r} in world:{root} is not a {what} of the world {head}; give one of {', '.join(parts)}.")
