"""Progress bars that suit where they are written: a redrawn bar on a terminal, a line now and then in a log."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between two progress lines when the bar's stream is a file or a pipe (a cluster job's log, `cmd 2>
log`); TQDM_MININTERVAL, tqdm's own setting, overrides it."""


def is_terminal(stream) -> bool:
    """A terminal, or a Jupyter cell's output (ipykernel's streams say they are no tty, yet draw "\\r" in place)."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineWriter:
    """A stream for tqdm that ends each redraw with a newline instead of starting it with a carriage return, so a
    log holds one readable line a refresh rather than one line that grows by every redraw of the job."""

    def __init__(self, stream):
        self.stream = stream
        self._after_redraw = False

    def write(self, s: str) -> None:
        if s.startswith("\r"):  # tqdm's redraw: "\r" + status + spaces over the last one's tail
            text = s[1:].rstrip()
            if text:
                self.stream.write(text + "\n")
            self._after_redraw = True
            return
        if s == "\n" and self._after_redraw:  # close()'s newline after its last redraw: the line has one
            self._after_redraw = False
            return
        self._after_redraw = False
        if s:
            self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # encoding, fileno, ... of the stream
        return getattr(self.stream, name)


def progress_bar(*args, file=None, **kwargs) -> tqdm:
    """`tqdm(*args, **kwargs)` on `file` (sys.stderr by default). When that is not a terminal, the bar is written
    as whole lines, at most one every LOG_INTERVAL_S seconds (and its first and last state, `leave` or not)."""
    stream = sys.stderr if file is None else file
    if not is_terminal(stream):
        stream = LineWriter(stream)
        if "TQDM_MININTERVAL" not in os.environ:
            kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), LOG_INTERVAL_S)
            # tqdm's monitor thread redraws a bar silent for maxinterval (10 s by default): not sooner than a line
            kwargs["maxinterval"] = max(float(kwargs.get("maxinterval", 10.0)), kwargs["mininterval"])
        kwargs["dynamic_ncols"] = False  # no terminal to measure
        # a log cannot clear a line, so leave=False (a bar that disappears from a terminal once done) wrote no
        # last state and the log ended at "0/2000" for a finished extraction; a log keeps every bar's end
        kwargs["leave"] = True
        # no place among other bars: with one open anywhere (the atlas's pipeline bar on the terminal), tqdm
        # put this one a line down and wrote cursor-up escapes into the log
        kwargs["position"] = 0
    return tqdm(*args, file=stream, **kwargs)


def _library_bar(factory, args, kwargs):
    """transformers' tqdm hook: its bars (e.g. "Loading weights", one per model load) made by `progress_bar`
    where they would be written to a log; on a terminal, in a notebook, or switched off, as transformers makes them."""
    stream = kwargs.get("file") or sys.stderr
    if not (isinstance(factory, type) and issubclass(factory, tqdm)) or is_terminal(stream):
        return factory(*args, **kwargs)
    return progress_bar(*args, **kwargs)


@contextmanager
def transformers_bars_as_lines():
    """Within the block, transformers' own progress bars follow `progress_bar`'s rules (lines in a log). Scoped,
    so a program that imports sae_core keeps its transformers as it set it, and a hook of its own wins."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # older transformers keep their bars
    if set_hook is None:
        yield
        return
    previous = set_hook(_library_bar)
    if previous is not None:  # the program's own hook
        set_hook(previous)
    try:
        yield
    finally:
        set_hook(previous)
