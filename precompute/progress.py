"""One progress bar over a pipeline of weighted stages (the demo and the atlas show a single display).

Each stage has a weight (its expected seconds on a small CPU). A stage reports fractions when it can
(`advance`); for stages that cannot (a world build, SAE training), a ticker thread moves the bar with
elapsed time up to 90% of the stage's weight, so the ETA keeps moving. Inner progress bars of the
stages are silenced (TQDM_DISABLE) and their printed output goes to a log file. Where stderr is not a
terminal (a job's log), the bar is a line at each stage and at most one every LOG_INTERVAL_S between.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

from sae_core.progress import progress_bar


class PipelineProgress:
    def __init__(self, weights: dict[str, float], desc: str = "build", log: str | Path | None = None,
                 enabled: bool = True):
        self.weights = dict(weights)
        self.total = float(sum(weights.values())) or 1.0
        self.log = Path(log) if log else None
        enabled = enabled and os.environ.get("TQDM_DISABLE", "") in ("", "0")
        self.bar = progress_bar(total=round(self.total, 1), desc=desc, unit="", disable=not enabled,
                                dynamic_ncols=True, file=sys.__stderr__,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self.done = 0.0  # weight of finished stages
        self._in_stage = 0.0  # weight credited inside the current stage
        self._lock = threading.Lock()
        self._drawn = time.monotonic()  # of the last draw: tqdm draws the first state
        self.timings: dict[str, float] = {}
        self._running: str | None = None  # the stage being run, while it runs (or stopped by an error)

    def _set(self, value: float, draw: bool = False) -> None:
        """Move the bar to `value`; drawn at once with `draw` (a new stage), else at most once a
        bar.mininterval (a fraction of a second on a terminal, LOG_INTERVAL_S in a log)."""
        with self._lock:
            self.bar.n = round(min(value, self.total), 1)
            now = time.monotonic()
            if not self.bar.disable and (draw or now - self._drawn >= self.bar.mininterval):
                self.bar.refresh()
                self._drawn = now

    @contextlib.contextmanager
    def stage(self, name: str, quiet: bool = True):
        """Run one stage: yields `advance(fraction)`; output of the stage goes to the log when `quiet`."""
        w = self.weights.get(name, 1.0)
        self._in_stage = 0.0
        self.bar.postfix = self._running = name
        self._set(self.done, draw=True)
        t0 = time.time()
        stop = threading.Event()
        reported = threading.Event()

        def advance(fraction: float) -> None:
            reported.set()
            self._in_stage = max(self._in_stage, min(1.0, fraction) * w)
            self._set(self.done + self._in_stage)

        def tick():
            while not stop.wait(0.5):
                if not reported.is_set():
                    self._in_stage = min(0.9 * w, time.time() - t0)
                    self._set(self.done + self._in_stage)

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            with self._quiet() if quiet else contextlib.nullcontext():
                yield advance
        finally:
            stop.set()
            ticker.join()
        self._running = None
        self.timings[name] = round(time.time() - t0, 1)
        self.done += w
        self._set(self.done)

    def skip(self, name: str) -> None:
        """A stage already done: credit its weight at once."""
        self.done += self.weights.get(name, 1.0)
        self.timings.setdefault(name, 0.0)
        self._set(self.done)

    @contextlib.contextmanager
    def _quiet(self):
        old = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        if self.log is None:
            sink = open(os.devnull, "w", encoding="utf-8")
        else:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            sink = open(self.log, "a", encoding="utf-8")
        # Python logging too: a library's first logging.warning() inside the stage (open_clip's "no pretrained
        # weights") would otherwise configure the root logger on this sink, and every later warning would
        # write to it after it is closed ("--- Logging error --- I/O operation on closed file").
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        logging.root.addHandler(handler)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            logging.root.removeHandler(handler)
            sink.close()
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old

    def note(self, line: str) -> None:
        """A line the user should see now, while a stage's own output goes to the log: written above
        the bar (or to the terminal when the bar is off) and to the log."""
        if self.bar.disable:
            print(line, file=sys.__stderr__)
        else:
            self.bar.write(line, file=sys.__stderr__)
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a", encoding="utf-8", errors="backslashreplace") as f:  # a name not UTF-8:
                f.write(line + "\n")  # a traceback that took the --out folder's scan with it until 2026-12-05

    def close(self, finished: bool = True) -> None:
        """The last state: "done", or where the build stopped (an error or a kill), not "done"."""
        self.bar.postfix = "done" if finished else f"stopped in {self._running}" if self._running else "stopped"
        self.bar.close()  # draws the last state

    def __enter__(self) -> "PipelineProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)
